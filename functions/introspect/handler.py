"""POST /v1/introspect (RFC 7662), IAM-authenticated: for relying parties that check online."""

from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.adapters.kms import KmsKeys
from fleetkey.observability import logger, metrics, tracer
from fleetkey.services.introspection import IntrospectionService
from fleetkey.services.signing_keys import KeyTrust, SigningKeys
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import Store

app = APIGatewayRestResolver()


@lru_cache(maxsize=1)
def service() -> IntrospectionService:
    settings = Settings.from_environ()
    store = Store(settings.table_name, region=settings.region)
    keys = SigningKeys(
        store, KmsKeys(region=settings.region), trust=KeyTrust.from_settings(settings)
    )
    return IntrospectionService(settings, store, keys)


@app.post("/v1/introspect")
def introspect() -> Response[dict[str, Any]]:
    try:
        form = dict(parse_qsl(app.current_event.decoded_body or "", max_num_fields=8))
    except (ValueError, UnicodeDecodeError):
        form = {}
    if "token" not in form:
        return Response(
            status_code=400,
            content_type=content_types.APPLICATION_JSON,
            body={"error": "invalid_request", "error_description": "token is required"},
        )
    return Response(
        status_code=200,
        content_type=content_types.APPLICATION_JSON,
        body=service().introspect(form["token"]),
        headers={"Cache-Control": "no-store"},
    )


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
