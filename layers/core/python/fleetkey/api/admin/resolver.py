"""The admin API's resolver: what every function serving /v1/admin routes shares (the admin
function, and the rotation function for /v1/admin/pki): strict JSON, request validation, and one
mapping of errors to JSON responses."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
    ResponseValidationError,
)
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from fleetkey.adapters.aws import error_code, is_transient
from fleetkey.api.common import read_json
from fleetkey.errors import FleetkeyError, InvalidRequest, TransientAwsError
from fleetkey.observability import logger

# AWS errors that mean the caller's input was refused, not that fleetkey failed.
CALLER_ERROR_CODES = frozenset({"CertificateValidationException", "InvalidRequestException"})


def admin_resolver(
    routers: tuple[Router, ...], *, strip_prefixes: tuple[str, ...] = ("/v1/admin",)
) -> APIGatewayRestResolver:
    """A resolver for /v1/admin (or, with no prefix, another IAM route group: validations) with
    `routers` and the admin API's error responses."""
    app = APIGatewayRestResolver(
        strip_prefixes=list(strip_prefixes),
        enable_validation=True,
        # A response that fails its model is fleetkey's fault (a 500), never the caller's.
        response_validation_error_http_code=500,
        json_body_deserializer=read_json,
    )
    for router in routers:
        app.include_router(router)

    @app.exception_handler(ClientError)
    @app.exception_handler(BotoCoreError)
    def _aws_error(exc: Exception) -> Response[Any]:
        """AWS failures that are not the caller's fault: 503 when a retry may succeed, 400 when AWS
        refused what the caller sent (e.g. a CA certificate AWS IoT will not register).

        Certificates never reach here unparsed: the services turn every parse failure of a
        certificate into InvalidCertificate (400) before any AWS call.

        Raises:
            the AWS error itself when it is neither (a 502: fleetkey's fault, logged by Lambda).
        """
        if is_transient(exc):
            return _error_response(TransientAwsError("AWS is unavailable; retry the request"))
        if isinstance(exc, ClientError) and error_code(exc) in CALLER_ERROR_CODES:
            return _error_response(InvalidRequest(f"AWS refused the request: {error_code(exc)}"))
        raise exc

    @app.exception_handler(FleetkeyError)
    def _fleetkey_error(exc: FleetkeyError) -> Response[Any]:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    def _invalid_request(exc: RequestValidationError) -> Response[Any]:
        """A request its route's models refuse: 400 invalid_request like every other refusal
        (not Powertools' 422), naming each field and what is wrong with it, never echoing what
        was sent."""
        return _error_response(InvalidRequest(validation_message(exc.errors())))

    @app.exception_handler(RequestUnsupportedContentType)
    def _unsupported_content_type(exc: RequestUnsupportedContentType) -> Response[Any]:
        return _error_response(InvalidRequest("request body must be JSON (application/json)"))

    @app.exception_handler(UnicodeDecodeError)
    def _not_utf8(exc: UnicodeDecodeError) -> Response[Any]:
        """A body that is not UTF-8, found when request validation decodes it (the routes decode
        nothing else themselves; the services turn undecodable input into typed errors)."""
        return _error_response(InvalidRequest("request body must be JSON (UTF-8)"))

    @app.exception_handler(ResponseValidationError)
    @app.exception_handler(ValidationError)
    def _invalid_response(exc: ResponseValidationError | ValidationError) -> Response[Any]:
        """A response that does not match its view (checked where a route builds the view, and again
        by Powertools against the route's return annotation): fleetkey's fault, a 500, logged with
        the fields that failed. Requests never get here: the routes' models refuse them first, and
        the domain turns its own validation errors into InvalidRequest."""
        failed = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        return _error_response(FleetkeyError("the response failed validation"), fields=failed)

    return app


def validation_message(errors: Any) -> str:
    """`field: what is wrong` for each refused part, joined by "; " (body fields by their path in
    the body, parameters as e.g. `query format`); a body that is not JSON or not an object is
    said to be so in one phrase."""
    parts: list[str] = []
    for error in errors:
        where, *path = error.get("loc") or ("body",)
        kind = error.get("type", "")
        if kind == "json_invalid":  # located at the offset where parsing failed
            return "request body must be JSON"
        if where == "body" and not path:
            if kind == "missing":
                return "request body must be a JSON object; it is empty"
            if kind in ("model_type", "model_attributes_type", "dict_type"):
                return "request body must be a JSON object"
        field = ".".join(str(p) for p in path)
        field = (field or "body") if where == "body" else f"{where} {field}".strip()
        parts.append(f"{field}: {error.get('msg', kind)}")
    return "; ".join(parts) or "invalid request"


def _error_response(exc: FleetkeyError, **log: Any) -> Response[Any]:
    """The JSON error body and status of a typed error; a 5xx is logged with its stack (and
    `log`, for the log only)."""
    if exc.status >= 500:
        logger.exception("request failed", extra={"code": exc.code, **log})
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.details:
        body["details"] = exc.details
    return Response(status_code=exc.status, content_type=content_types.APPLICATION_JSON, body=body)
