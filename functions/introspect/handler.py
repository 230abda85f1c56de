"""POST /v1/introspect (RFC 7662), IAM-authenticated: for relying parties that check online."""

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import from_environ
from fleetkey.domain.oauth import OAuthInvalidRequest
from fleetkey.init_phase import load_ahead
from fleetkey.observability import logger, metrics, tracer

if TYPE_CHECKING:
    from fleetkey.services.introspection import IntrospectionService

# The services' modules are imported at the first request (or at init, ahead of requests).
load_ahead("fleetkey.services.introspection", "fleetkey.services.tokens")
app = APIGatewayRestResolver()
# An access token is at most 8 KiB (MAX_TOKEN_BYTES), percent-encoded at most ~3x larger.
MAX_FORM_BYTES = 32 * 1024


@lru_cache(maxsize=1)
def service() -> "IntrospectionService":
    return from_environ().introspection


def _invalid_request(description: str) -> Response[dict[str, Any]]:
    return Response(
        status_code=400,
        content_type=content_types.APPLICATION_JSON,
        body={"error": "invalid_request", "error_description": description},
        headers={"Cache-Control": "no-store"},
    )


@app.post("/v1/introspect")
def introspect() -> Response[dict[str, Any]]:
    """RFC 7662 §2.1: a form with one `token` (and an optional hint), read as the token endpoint
    reads its own (`read_form`). A `token` sent twice is refused rather than one of them picked:
    the caller and fleetkey could otherwise disagree on which token was judged."""
    from fleetkey.services.tokens import read_request_form

    event = app.current_event
    try:
        form = read_request_form(
            (event.multi_value_headers or {}).get("content-type")
            or [event.headers.get("content-type") or ""],
            lambda: event.decoded_body or "",
            max_fields=8,
            max_bytes=MAX_FORM_BYTES,
        )
    except OAuthInvalidRequest as exc:
        return _invalid_request(exc.message)
    if "token" not in form:
        return _invalid_request("token is required")
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
