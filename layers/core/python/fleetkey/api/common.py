"""What the admin API's routers share: the composition root, the caller, path segments, the
strict JSON reader and the error responses each route documents.

Routers live in the layer, not beside the function, because Lambda (and the local loader) import
`functions/admin/handler.py` alone: nothing next to it is importable. This module, not the
package, holds them: the device-facing functions import `fleetkey.api.device`, and a package's
`__init__` runs for every submodule, so it imports nothing (no pydantic, no models).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, cast
from urllib.parse import unquote

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path
from pydantic import AfterValidator

from fleetkey.api.models import ErrorResponse

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
    from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent
    from aws_lambda_powertools.utilities.data_classes.common import BaseProxyEvent

    from fleetkey.composition import Components


def new_router() -> Router:
    """A router for one bounded context's routes (the admin function includes them all)."""
    return Router()  # type: ignore[no-untyped-call]  # Powertools 3.37: __init__ is unannotated


def components() -> Components:
    """The services, from the composition root. Looked up on each call (not imported by name) so
    the composition is built on the first request and tests can replace it."""
    from fleetkey import composition

    return composition.components()


def caller(event: BaseProxyEvent) -> str:
    """The IAM principal API Gateway authenticated (SigV4); recorded in audit records."""
    identity = cast("APIGatewayProxyEvent", event).request_context.identity
    return identity.user_arn or identity.caller or "unknown"


# Path parameters. API Gateway hands the `{proxy+}` path over still percent-encoded, so each is
# decoded here, once, for every route. No length or pattern rule: the services answer 404 for an
# id that cannot exist, as for one that does not.
DeviceIdSegment = Annotated[
    str, AfterValidator(unquote), Path(description="The device id (its AWS IoT thing name)")
]
CertificateIdSegment = Annotated[
    str, AfterValidator(unquote), Path(description="The AWS IoT certificate id (64 hex digits)")
]
CaNameSegment = Annotated[
    str, AfterValidator(unquote), Path(description="The manufacturer CA's name in fleetkey")
]
StreamNameSegment = Annotated[
    str,
    AfterValidator(unquote),
    Path(description="An audit stream (e.g. registration-events, token-revocations)"),
]


def read_json(text: str) -> Any:
    """`json.loads` whose every refusal is a JSONDecodeError, which request validation answers as
    a 400 (a 5,000-digit number or nesting 100,000 deep raise ValueError and RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError):
        raise json.JSONDecodeError("a value is too large or too deeply nested", text, 0) from None


# ---- documented responses ---------------------------------------------------------------------

ERRORS: dict[int, str] = {
    400: "Invalid request (`invalid_request`, `invalid_certificate`): the body, a parameter or "
    "what it names was refused",
    404: "Not found (`not_found`)",
    409: "Conflict with the current state (`conflict`, `illegal_transition`, "
    "`concurrent_modification`)",
    503: "AWS is unavailable (`service_unavailable`); retrying may succeed",
}


def responses(status: int, description: str, *errors: int) -> dict[int, OpenAPIResponse]:
    """The OpenAPI responses of a route: its success (the schema is its return annotation) and
    the errors it may answer, besides the 400 and 503 every route may answer."""
    documented: dict[int, OpenAPIResponse] = {status: {"description": description}}
    for code in sorted({400, 503, *errors}):
        documented[code] = {
            "description": ERRORS[code],
            "content": {"application/json": {"model": ErrorResponse}},
        }
    return documented
