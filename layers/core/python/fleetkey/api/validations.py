"""The relying parties' validation routes (IAM-authenticated): ask fleetkey to have a device
prove itself now (`POST /v1/validations`), and read the result (`GET /v1/validations/{id}`),
waiting for it with `?wait=N`. Served by the validations function."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.domain.validation import (
    DEFAULT_EXPIRES_IN,
    MAX_EXPIRES_IN,
    MAX_WAIT_SECONDS,
    MIN_EXPIRES_IN,
    Validation,
    principal,
)
from fleetkey.observability import metrics
from fleetkey.services.validations import iso

router = new_router()
TAGS = ["validations"]


class ValidationRequest(BaseModel):
    """What the relying party asks: which device, for what, and for whom the result is."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    device_id: str = Field(max_length=128, description="The device to validate")
    purpose: str = Field(
        max_length=64,
        description="The critical action about to happen (1-64 of A-Z a-z 0-9 . _ : -), copied "
        "into the token's `validation` claim and shown to the device",
    )
    audience: str = Field(
        max_length=256,
        description="The token's `aud`: one of the audiences the device's profile allows",
    )
    require_attestation: StrictBool = Field(
        default=False,
        description="Require a firmware measurement that is a published release, whatever the "
        "device's profile says",
    )
    expires_in: StrictInt = Field(
        default=DEFAULT_EXPIRES_IN,
        ge=MIN_EXPIRES_IN,
        le=MAX_EXPIRES_IN,
        description="Seconds the device has to answer",
    )


class ValidationCreatedView(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    validation_id: str
    status: str
    expires_at: str = Field(description="When the device must have answered (ISO 8601, UTC)")


class ValidationView(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    validation_id: str
    device_id: str
    purpose: str
    audience: str
    status: str = Field(description="pending, validated, refused or expired")
    reason: str | None = Field(
        default=None,
        description="Why it was refused: device_not_active, firmware_not_released, "
        "attestation_missing or assertion_invalid",
    )
    token: str | None = Field(
        default=None,
        description="The validated device's access token (RFC 9068): verify it against the "
        "JWKS, with this audience, before acting on it",
    )
    expires_at: str
    decided_at: str | None = None


def _requester() -> str:
    return principal(caller(router.current_event))


def _view(validation: Validation, now: int) -> ValidationView:
    return ValidationView(
        validation_id=validation.validation_id,
        device_id=validation.device_id,
        purpose=validation.purpose,
        audience=validation.audience,
        status=validation.status_at(now).value,
        reason=validation.reason.value if validation.reason else None,
        token=validation.token,
        expires_at=iso(validation.answer_by),
        decided_at=iso(validation.decided_at) if validation.decided_at is not None else None,
    )


@router.post(
    "/v1/validations",
    summary="Have a device prove itself now",
    description="Sends the device a validate command; it answers fleetkey with an assertion "
    "signed by its key. Read the result with GET /v1/validations/{validation_id}.",
    operation_id="requestValidation",
    tags=TAGS,
    status_code=201,
    responses=responses(
        201, "The validation (refused at once for a device that is not ACTIVE)", 404
    ),
)
def request_validation(body: ValidationRequest) -> ValidationCreatedView:
    validation = components().validations.request(
        _requester(),
        body.device_id,
        body.purpose,
        body.audience,
        require_attestation=body.require_attestation,
        expires_in=body.expires_in,
    )
    metrics.add_metric(name="ValidationsRequested", unit=MetricUnit.Count, value=1)
    return ValidationCreatedView(
        validation_id=validation.validation_id,
        status=validation.status.value,
        expires_at=iso(validation.answer_by),
    )


@router.get(
    "/v1/validations/<validation_id>",
    summary="Read a validation's result",
    operation_id="getValidation",
    tags=TAGS,
    responses=responses(200, "The validation as of now", 404),
)
def get_validation(
    validation_id: Annotated[str, Path(description="The validation's id")],
    wait: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description=f"Wait up to this many seconds (at most {MAX_WAIT_SECONDS}) while it "
            "is pending",
        ),
    ] = 0,
) -> ValidationView:
    service = components().validations
    validation = service.result(_requester(), validation_id, wait)
    now = int(service.now())
    return _view(validation, now)
