"""What the device-facing endpoints (/v1/token, /v1/challenge, the data-key route) share: JSON
answers that are never cached, and one mapping of errors to RFC 6749 §5.2 bodies that tells a
caller nothing about which check failed on a device (the token endpoint says which assertion rule
a request broke when no device could have made it acceptable)."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.metrics import MetricUnit
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey.domain.oauth import InvalidClient, OAuthError, OAuthInvalidRequest
from fleetkey.errors import FleetkeyError
from fleetkey.observability import logger, metrics

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
UNAVAILABLE = {"error": "temporarily_unavailable", "error_description": "try again later"}


def no_store_json(status: int, body: dict[str, Any]) -> Response[dict[str, Any]]:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=body, headers=NO_STORE
    )


def json_body(app: APIGatewayRestResolver, max_bytes: int = 16 * 1024) -> dict[str, Any]:
    """The JSON object a device sent: one content type, UTF-8, at most `max_bytes`, and no
    second client authentication (an Authorization header) beside the assertion in it.

    Raises:
        OAuthInvalidRequest: anything else.
    """
    event = app.current_event
    if event.headers.get("authorization") is not None:
        raise OAuthInvalidRequest("more than one client authentication method")
    media, *parameters = (event.headers.get("content-type") or "").split(";")
    if media.strip().lower() != content_types.APPLICATION_JSON:
        raise OAuthInvalidRequest("the body must be application/json")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise OAuthInvalidRequest("the body must be UTF-8")
    try:
        text = event.decoded_body or ""
    except ValueError:
        raise OAuthInvalidRequest("the body must be UTF-8") from None
    if len(text.encode()) > max_bytes:
        raise OAuthInvalidRequest("the request is too large")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise OAuthInvalidRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise OAuthInvalidRequest("the body must be a JSON object")
    return body


def handle_device_errors(
    app: APIGatewayRestResolver, *, refused_metric: str, what: str, explain_rules: bool = False
) -> None:
    """Register on `app`: OAuth errors as their RFC 6749 body (counted in `refused_metric` by
    error code, the reason logged, never answered; with `explain_rules`, an `invalid_client`
    decided on the request alone says which assertion rule it broke: `InvalidClient.rule`);
    fleetkey's own failures and transient AWS failures as 503 `temporarily_unavailable`; any
    other AWS error re-raised (a 502: fleetkey's fault, logged by Lambda)."""

    @app.exception_handler(OAuthError)
    def _oauth_error(exc: OAuthError) -> Response[dict[str, Any]]:
        if isinstance(exc, InvalidClient):
            reason, body = exc.reason, exc.to_body(explain=explain_rules)
        else:
            reason, body = exc.message, exc.to_body()
        metrics.add_dimension(name="error", value=exc.code)
        metrics.add_metric(name=refused_metric, unit=MetricUnit.Count, value=1)
        logger.warning(f"{what} refused", extra={"error": exc.code, "reason": reason})
        return no_store_json(exc.status, body)

    @app.exception_handler(FleetkeyError)
    def _unavailable(exc: FleetkeyError) -> Response[dict[str, Any]]:
        logger.error(f"{what} endpoint unavailable", extra={"code": exc.code})
        return no_store_json(503, UNAVAILABLE)

    @app.exception_handler(ClientError)
    @app.exception_handler(BotoCoreError)
    def _aws_error(exc: Exception) -> Response[dict[str, Any]]:
        if not is_transient(exc):
            raise exc
        logger.warning("AWS unavailable", extra={"error": type(exc).__name__})
        return no_store_json(503, UNAVAILABLE)
