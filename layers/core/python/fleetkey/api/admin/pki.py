"""fleetkey's issuing CA (its key in KMS): set up self-signed, or subordinate to the customer's
root (a CSR, then the signed certificate and its chain), and read. Served by the rotation
function, the only one whose role may create and sign with the CA's key (`/v1/admin/pki/*`)."""

from __future__ import annotations

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.api.models import (
    IssuingCaView,
    PkiCsrRequest,
    PkiCsrView,
    PkiInitRequest,
    PkiInstallRequest,
)

router = new_router()
TAGS = ["issuing CA"]


def _actor() -> str:
    return caller(router.current_event)


@router.get(
    "/pki",
    summary="Read the issuing CA",
    operation_id="getIssuingCa",
    tags=TAGS,
    responses=responses(200, "The issuing CA and its CRL"),
)
def show_issuing_ca() -> IssuingCaView:
    return IssuingCaView.model_validate(components().pki.show())


@router.post(
    "/pki/init",
    summary="Create a self-signed issuing CA",
    description="Creates the KMS key and a self-signed CA certificate signed by it, and registers "
    "the CA with AWS IoT (auto-registration off). Repeating it with the same parameters answers "
    "the CA.",
    operation_id="initIssuingCa",
    tags=TAGS,
    status_code=201,
    responses=responses(201, "The issuing CA", 409),
)
def init_issuing_ca(request: PkiInitRequest) -> IssuingCaView:
    view = components().pki.init(
        key_spec=request.key_spec,
        subject=request.subject,
        validity_days=request.validity_days,
        actor=_actor(),
    )
    return IssuingCaView.model_validate(view)


@router.post(
    "/pki/csr",
    summary="Make a CSR for an issuing CA subordinate to your root",
    description="Creates the KMS key (once) and answers a CSR signed by it, for your CA to sign; "
    "then install the certificate with /pki/install.",
    operation_id="issuingCaCsr",
    tags=TAGS,
    status_code=201,
    responses=responses(201, "The CSR", 409),
)
def issuing_ca_csr(request: PkiCsrRequest) -> PkiCsrView:
    view = components().pki.csr(key_spec=request.key_spec, subject=request.subject, actor=_actor())
    return PkiCsrView.model_validate(view)


@router.post(
    "/pki/install",
    summary="Install the subordinate issuing CA's certificate",
    description="The certificate your CA signed for the CSR, and its chain up to the root.",
    operation_id="installIssuingCa",
    tags=TAGS,
    responses=responses(200, "The issuing CA, active", 409),
)
def install_issuing_ca(request: PkiInstallRequest) -> IssuingCaView:
    view = components().pki.install(
        certificate_pem=request.certificate_pem, chain_pem=request.chain_pem, actor=_actor()
    )
    return IssuingCaView.model_validate(view)
