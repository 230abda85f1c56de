"""Device-facing token endpoint: POST /v1/token (client-credentials grant with a JWT client
assertion) and POST /v1/challenge (a single-use nonce). Public routes, throttled by API Gateway.
Errors are RFC 6749 §5.2 JSON; nothing in them tells which check failed on a device (an
assertion that breaks a rule of its own is told which: `InvalidClient.rule`).

Metrics: `TokensIssued`, `TokensRefused` (dimension `error`); for an answer to a delegated
validation, the outcome its write decided, once per validation (`from_environ`'s
`count_validation_outcome`): `ValidationsValidated`, `ValidationsRefused` (dimension `reason`,
a metric document of its own). An answer the validation no longer takes (a replay, a second
answer, one after the deadline) decides nothing and counts no outcome."""

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.api.device import handle_device_errors, no_store_json
from fleetkey.composition import from_environ
from fleetkey.domain.oauth import OAuthInvalidRequest
from fleetkey.init_phase import load_ahead
from fleetkey.observability import logger, metrics, tracer

if TYPE_CHECKING:
    from fleetkey.services.tokens import TokenService

# The token service's module (with its domain, JOSE and KMS modules) is imported at the first
# request, by `service()` as by `_form()`, or at init when init is ahead of requests.
load_ahead("fleetkey.services.tokens")
app = APIGatewayRestResolver()
MAX_FORM_BYTES = 16 * 1024


@lru_cache(maxsize=1)
def service() -> "TokenService":
    return from_environ().tokens


def _form() -> dict[str, str]:
    """The request's form (`read_form`: the one media type, UTF-8, each parameter at most once),
    from a request that authenticates the client by its assertion alone.

    Raises:
        OAuthInvalidRequest: a malformed form, or an `Authorization` header: RFC 6749 §2.3, one
            client authentication method per request (the assertion is one already).
    """
    from fleetkey.services.tokens import read_request_form

    event = app.current_event
    if event.headers.get("authorization") is not None:
        raise OAuthInvalidRequest("more than one client authentication method")
    content_types = (event.multi_value_headers or {}).get("content-type") or [
        event.headers.get("content-type") or ""
    ]
    return read_request_form(
        content_types, lambda: event.decoded_body or "", max_fields=16, max_bytes=MAX_FORM_BYTES
    )


# A stock client's defaults (Authlib's aud = the token endpoint, a one-hour assertion) are
# refused with the setting it needs: those refusals depend on the request alone.
handle_device_errors(app, refused_metric="TokensRefused", what="token", explain_rules=True)


@app.post("/v1/token")
def token() -> Response[dict[str, Any]]:
    response = service().issue(_form())
    metrics.add_metric(name="TokensIssued", unit=MetricUnit.Count, value=1)
    return no_store_json(200, response)


@app.post("/v1/challenge")
def challenge() -> Response[dict[str, Any]]:
    return no_store_json(200, service().challenge())


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
