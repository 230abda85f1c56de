"""Device-facing token endpoint: POST /v1/token (client-credentials grant with a JWT client
assertion) and POST /v1/challenge (a single-use nonce). Public routes, throttled by API Gateway.
Errors are RFC 6749 §5.2 JSON; nothing in them tells which check failed."""

from functools import lru_cache
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey.composition import from_environ
from fleetkey.domain.oauth import InvalidClient, OAuthError, OAuthInvalidRequest
from fleetkey.errors import FleetkeyError
from fleetkey.observability import logger, metrics, tracer
from fleetkey.services.tokens import TokenService, read_request_form

app = APIGatewayRestResolver()
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_FORM_BYTES = 16 * 1024


@lru_cache(maxsize=1)
def service() -> TokenService:
    return from_environ().tokens


def _json(status: int, body: dict[str, Any]) -> Response[dict[str, Any]]:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=body, headers=NO_STORE
    )


def _form() -> dict[str, str]:
    """The request's form (`read_form`: the one media type, UTF-8, each parameter at most once),
    from a request that authenticates the client by its assertion alone.

    Raises:
        OAuthInvalidRequest: a malformed form, or an `Authorization` header: RFC 6749 §2.3, one
            client authentication method per request (the assertion is one already).
    """
    event = app.current_event
    if event.headers.get("authorization") is not None:
        raise OAuthInvalidRequest("more than one client authentication method")
    content_types = (event.multi_value_headers or {}).get("content-type") or [
        event.headers.get("content-type") or ""
    ]
    return read_request_form(
        content_types, lambda: event.decoded_body or "", max_fields=16, max_bytes=MAX_FORM_BYTES
    )


@app.exception_handler(OAuthError)
def _oauth_error(exc: OAuthError) -> Response[dict[str, Any]]:
    reason = exc.reason if isinstance(exc, InvalidClient) else exc.message
    metrics.add_dimension(name="error", value=exc.code)
    metrics.add_metric(name="TokensRefused", unit=MetricUnit.Count, value=1)
    logger.warning("token refused", extra={"error": exc.code, "reason": reason})
    return _json(exc.status, exc.to_body())


@app.exception_handler(FleetkeyError)
def _unavailable(exc: FleetkeyError) -> Response[dict[str, Any]]:
    logger.error("token endpoint unavailable", extra={"code": exc.code})
    return _json(503, {"error": "temporarily_unavailable", "error_description": "try again later"})


@app.exception_handler(ClientError)
@app.exception_handler(BotoCoreError)
def _aws_error(exc: Exception) -> Response[dict[str, Any]]:
    if not is_transient(exc):
        raise exc
    logger.warning("AWS unavailable", extra={"error": type(exc).__name__})
    return _json(503, {"error": "temporarily_unavailable", "error_description": "try again later"})


@app.post("/v1/token")
def token() -> Response[dict[str, Any]]:
    response = service().issue(_form())
    metrics.add_metric(name="TokensIssued", unit=MetricUnit.Count, value=1)
    return _json(200, response)


@app.post("/v1/challenge")
def challenge() -> Response[dict[str, Any]]:
    return _json(200, service().challenge())


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
