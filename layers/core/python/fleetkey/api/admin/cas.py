"""Manufacturer CAs: the trust anchors of just-in-time registration, registered with AWS IoT."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Body

from fleetkey.api.admin.devices import AUDIT_TAGS, audit_trail
from fleetkey.api.common import CaNameSegment, caller, components, new_router, responses
from fleetkey.api.models import (
    AuditTrailView,
    CaListView,
    CaView,
    RegisterCaRequest,
    RegistrationCodeView,
)

router = new_router()
TAGS = ["manufacturer CAs"]


def _actor() -> str:
    return caller(router.current_event)


@router.get(
    "/cas",
    summary="List manufacturer CAs",
    operation_id="listCas",
    tags=TAGS,
    responses=responses(200, "Every manufacturer CA"),
)
def list_cas() -> CaListView:
    return CaListView.model_validate({"cas": [ca.to_public() for ca in components().cas.list()]})


@router.get(
    "/cas/registration-code",
    summary="Read the account's AWS IoT registration code",
    description="The common name of the verification certificate that proves possession of a "
    "CA's key.",
    operation_id="getRegistrationCode",
    tags=TAGS,
    responses=responses(200, "The registration code"),
)
def registration_code() -> RegistrationCodeView:
    return RegistrationCodeView(registration_code=components().cas.registration_code())


@router.post(
    "/cas",
    summary="Register a manufacturer CA",
    description="Registers the CA with AWS IoT, active and auto-registering. Registering the "
    "same CA under the same name again converges.",
    operation_id="registerCa",
    tags=TAGS,
    status_code=201,
    responses=responses(201, "The registered CA", 409),
)
def register_ca(request: Annotated[RegisterCaRequest, Body()]) -> CaView:
    ca = components().cas.register(
        request.name,
        request.certificate_pem,
        request.verification_certificate_pem,
        actor=_actor(),
    )
    return CaView.model_validate(ca.to_public())


@router.get(
    "/cas/<name>",
    summary="Read a manufacturer CA",
    operation_id="getCa",
    tags=TAGS,
    responses=responses(200, "The CA", 404),
)
def get_ca(name: CaNameSegment) -> CaView:
    return CaView.model_validate(components().cas.get(name).to_public())


@router.post(
    "/cas/<name>/disable",
    summary="Disable a manufacturer CA",
    description="fleetkey and AWS IoT stop trusting it: no device it issued registers.",
    operation_id="disableCa",
    tags=TAGS,
    responses=responses(200, "The CA", 404),
)
def disable_ca(name: CaNameSegment) -> CaView:
    return CaView.model_validate(
        components().cas.set_enabled(name, False, actor=_actor()).to_public()
    )


@router.post(
    "/cas/<name>/enable",
    summary="Enable a manufacturer CA",
    operation_id="enableCa",
    tags=TAGS,
    responses=responses(200, "The CA", 404),
)
def enable_ca(name: CaNameSegment) -> CaView:
    return CaView.model_validate(
        components().cas.set_enabled(name, True, actor=_actor()).to_public()
    )


@router.get(
    "/cas/<name>/audit",
    summary="Read a manufacturer CA's verified audit trail",
    operation_id="getCaAudit",
    tags=AUDIT_TAGS,
    responses=responses(200, "The CA's audit records, oldest first", 404),
)
def ca_audit(name: CaNameSegment) -> AuditTrailView:
    return audit_trail(f"ca:{name}")
