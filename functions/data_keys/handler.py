"""Device-facing: POST /v1/devices/{device_id}/data-key. The device proves itself with a client
assertion exactly as at /v1/token and receives its data key sealed to its current certificate's
key (`DataKeyService.for_device`). Public route, throttled like /v1/token. Errors are RFC 6749
§5.2-style JSON; nothing in them tells which check failed.

Metrics: `DataKeysIssued`, `DataKeysRefused` (dimension `error`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey.composition import Components, from_environ
from fleetkey.domain.oauth import InvalidClient, OAuthError, OAuthInvalidRequest
from fleetkey.errors import FleetkeyError
from fleetkey.observability import logger, metrics, tracer


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


app = APIGatewayRestResolver()
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_BODY_BYTES = 16 * 1024


def _json(status: int, body: dict[str, Any]) -> Response[dict[str, Any]]:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=body, headers=NO_STORE
    )


def _body() -> dict[str, Any]:
    """The JSON object the device sent (one content type, UTF-8, at most 16 KiB)."""
    event = app.current_event
    if event.headers.get("authorization") is not None:
        raise OAuthInvalidRequest("more than one client authentication method")
    media = (event.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != content_types.APPLICATION_JSON:
        raise OAuthInvalidRequest("the body must be application/json")
    try:
        text = event.decoded_body or ""
    except ValueError:
        raise OAuthInvalidRequest("the body must be UTF-8") from None
    if len(text) > MAX_BODY_BYTES:
        raise OAuthInvalidRequest("the request is too large")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise OAuthInvalidRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise OAuthInvalidRequest("the body must be a JSON object")
    return body


@app.exception_handler(OAuthError)
def _oauth_error(exc: OAuthError) -> Response[dict[str, Any]]:
    reason = exc.reason if isinstance(exc, InvalidClient) else exc.message
    metrics.add_dimension(name="error", value=exc.code)
    metrics.add_metric(name="DataKeysRefused", unit=MetricUnit.Count, value=1)
    logger.warning("data key refused", extra={"error": exc.code, "reason": reason})
    return _json(exc.status, exc.to_body())


@app.exception_handler(FleetkeyError)
def _unavailable(exc: FleetkeyError) -> Response[dict[str, Any]]:
    logger.error("data-key endpoint unavailable", extra={"code": exc.code})
    return _json(503, {"error": "temporarily_unavailable", "error_description": "try again later"})


@app.exception_handler(ClientError)
@app.exception_handler(BotoCoreError)
def _aws_error(exc: Exception) -> Response[dict[str, Any]]:
    if not is_transient(exc):
        raise exc
    logger.warning("AWS unavailable", extra={"error": type(exc).__name__})
    return _json(503, {"error": "temporarily_unavailable", "error_description": "try again later"})


@app.post("/v1/devices/<device_id>/data-key")
def data_key(device_id: str) -> Response[dict[str, Any]]:
    response = components().data_keys.for_device(unquote(device_id), _body())
    metrics.add_metric(name="DataKeysIssued", unit=MetricUnit.Count, value=1)
    return _json(200, response)


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
