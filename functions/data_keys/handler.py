"""Device-facing: POST /v1/devices/{device_id}/data-key. The device proves itself with a client
assertion exactly as at /v1/token and receives its data key sealed to its current certificate's
key (`DataKeyService.for_device`). Public route, throttled like /v1/token. Errors are RFC 6749
§5.2-style JSON; nothing in them tells which check failed.

Metrics: `DataKeysIssued`, `DataKeysRefused` (dimension `error`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.api.device import handle_device_errors, json_body, no_store_json
from fleetkey.composition import Components, from_environ
from fleetkey.observability import logger, metrics, tracer


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


app = APIGatewayRestResolver()
MAX_BODY_BYTES = 16 * 1024


handle_device_errors(app, refused_metric="DataKeysRefused", what="data key")


@app.post("/v1/devices/<device_id>/data-key")
def data_key(device_id: str) -> Response[dict[str, Any]]:
    response = components().data_keys.for_device(unquote(device_id), json_body(app, MAX_BODY_BYTES))
    metrics.add_metric(name="DataKeysIssued", unit=MetricUnit.Count, value=1)
    return no_store_json(200, response)


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
