"""The admin API's request and response bodies. Powertools validates requests against them (a
failure is a 400 `invalid_request`), checks each response against its route's return annotation,
and generates the OpenAPI document (docs/openapi/admin.json) from them.

Every model defers building its validator to its first use (`defer_build`): a cold start pays
only for the few models the request's route uses, not for all of them at import.

Response views mirror the domain's `to_public()` dictionaries field for field. They allow extra
fields, so a field added to a `to_public()` reaches callers before its view documents it (the
OpenAPI test compares the two and says which field is missing).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import CaStatus


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters (no control characters or line breaks)")
    return value


# ---- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    """A request body: unknown fields are refused (a misspelt optional field would otherwise be
    ignored without a word)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(_printable),
    Field(description="Why, for the audit trail: 1-256 printable characters"),
]
Owner = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9:_.@-]{1,128}$"),
    Field(description="The device's owner: 1-128 characters of A-Z a-z 0-9 : _ . @ -"),
]
ProfileName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64),
    Field(description="A device profile's name (one the stack defines)"),
]


class RegisterCaRequest(BaseModel):
    """A manufacturer CA, and a certificate it signed whose common name is the account's AWS IoT
    registration code (the proof of possession of its key). Unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    name: str = Field(description="fleetkey's name for the CA: [a-z0-9][a-z0-9-]{0,62}")
    certificate_pem: str = Field(description="The CA certificate (PEM)")
    verification_certificate_pem: str = Field(
        description="A certificate signed by the CA, its CN the registration code (PEM)"
    )


class RevokeTokenRequest(BaseModel):
    """An access token to revoke, named by its `jti`. Unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    jti: Annotated[
        str,
        StringConstraints(min_length=1, max_length=128),
        AfterValidator(_printable),
        Field(description="The token's `jti` claim"),
    ]


class SuspendRequest(_Request):
    reason: Reason


class ResumeRequest(_Request):
    """Resuming takes no fields: an empty body or `{}`."""


class DecommissionRequest(_Request):
    reason: Reason


class RecommissionRequest(_Request):
    """What the device's next life changes; a field left out keeps its value."""

    owner: Owner | None = None
    profile: ProfileName | None = None


# ---- responses ----------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)


class ErrorResponse(_View):
    """Every error fleetkey answers: a stable code, a message, and details if there are any."""

    error: str = Field(description="Stable machine-readable code, e.g. invalid_request")
    message: str
    details: dict[str, Any] = Field(default_factory=dict, description="Present when not empty")


class AuditSummary(_View):
    records: int = Field(description="Number of audit records of the device")
    head: str = Field(description="Hash of the newest record")


class HeldCertificateView(_View):
    certificate_id: str
    role: str = Field(description="current, pending (a rotation not yet committed) or retired")
    origin: str = Field(description="factory (the manufacturer's) or issued (fleetkey's)")
    key: str = Field(description='The key, e.g. "ec:secp256r1" or "rsa:2048"')
    not_after: str = Field(description="Expiry (ISO 8601)")
    not_before: str | None = Field(default=None, description="Start of validity (ISO 8601)")
    serial: str | None = Field(default=None, description="Serial (hex), of an issued one")
    commit_deadline: str | None = Field(
        default=None, description="pending: rolled back unless committed by then"
    )
    retired_at: str | None = Field(default=None, description="retired: when")
    delete_after: str | None = Field(
        default=None, description="retired: deleted from AWS IoT after this moment"
    )
    renewal_requested_at: str | None = Field(
        default=None, description="current: when the device was last asked to rotate"
    )


class TeardownView(_View):
    status: str = Field(description="pending or completed")
    started_at: str
    certificates: list[str] = Field(description="Certificates still to remove from AWS IoT")
    completed_at: str | None


class DeviceView(_View):
    device_id: str
    serial_number: str
    manufacturer_ca: str
    profile: str
    state: DeviceState
    owner: str | None
    epoch: int = Field(description="The device's life: each recommission starts the next one")
    public_key_fingerprint: str | None
    attributes: dict[str, str]
    certificate_id: str | None = Field(description="The current certificate's id")
    certificates: list[HeldCertificateView]
    factory_certificate_id: str | None = Field(
        description="The factory certificate JITR accepted; the device re-onboards with it"
    )
    tokens_not_before: int | None = Field(
        description="Tokens issued before this time (epoch seconds) are inactive"
    )
    teardown: TeardownView | None = Field(
        description="The removal from AWS IoT after a decommission"
    )
    rotation_held_until: str | None = Field(
        description="After a rolled-back rotation, no rotation starts before this moment"
    )
    created_at: str | None
    updated_at: str | None
    audit: AuditSummary


class RejectedRowView(_View):
    row: int = Field(description="1-based data row (a CSV header is not counted)")
    device_id: str | None
    reason: str


class ImportReportView(_View):
    received: int
    imported: int
    unchanged: int = Field(description="Rows already allow-listed with the same details")
    rejected: list[RejectedRowView]


class AuditRecordView(_View):
    seq: int
    at: str
    action: str
    actor: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class ChainHeadView(_View):
    seq: int
    hash: str


class AuditTrailView(_View):
    subject: str = Field(description="<kind>:<name>, e.g. device:pump-7")
    verified: bool = Field(description="Always true: a broken chain is an error, not a trail")
    records: list[AuditRecordView]
    head: ChainHeadView


class CaView(_View):
    name: str
    iot_ca_id: str
    status: CaStatus
    certificate_pem: str
    registered_at: str | None


class CaListView(_View):
    cas: list[CaView]


class RegistrationCodeView(_View):
    registration_code: str


class SigningKeyView(_View):
    kid: str = Field(description="RFC 7638 thumbprint, the JWS `kid`")
    key_id: str = Field(description="The KMS key")
    active_from: int = Field(description="Epoch seconds")
    retire_after: int | None = Field(description="Epoch seconds")


class SigningKeyListView(_View):
    keys: list[SigningKeyView]


class RotatedKeyView(_View):
    kid: str
    key_id: str
    active_from: int


class RetiredKeysView(_View):
    retired: list[str] = Field(description="The retired keys' kids")


class RevokedTokenView(_View):
    revoked: str = Field(description="The revoked token's jti")
    until: int = Field(description="When the revocation lapses (epoch seconds)")


class DataKeyView(_View):
    """A device's data key as a backend gets it: wrapped by KMS; decrypt the blob with
    kms:Decrypt and exactly this encryption context."""

    device_id: str
    owner: str | None
    epoch: int
    key_id: str = Field(description="The wrapping KMS key")
    key_ref: str = Field(description="A stable, non-secret name of this wrapped key")
    ciphertext_blob: str = Field(description="The KMS-wrapped data key (base64)")
    encryption_context: dict[str, str]


# ---- the issuing CA and rotation ----------------------------------------------------------------

CaKeySpec = Annotated[
    str,
    StringConstraints(pattern=r"^ECC_NIST_P(256|384)$"),
    Field(description="The KMS key spec of the issuing CA: ECC_NIST_P256 or ECC_NIST_P384"),
]
CaSubject = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(_printable),
    Field(description="The CA's subject, an RFC 4514 name with a CN (e.g. CN=Acme devices CA)"),
]


class PkiInitRequest(_Request):
    key_spec: CaKeySpec = "ECC_NIST_P256"
    subject: CaSubject = "CN=fleetkey issuing CA"
    validity_days: int = Field(default=3650, ge=30, le=7300)


class PkiCsrRequest(_Request):
    key_spec: CaKeySpec = "ECC_NIST_P256"
    subject: CaSubject = "CN=fleetkey issuing CA"


class PkiInstallRequest(_Request):
    certificate_pem: str = Field(max_length=16_384, description="The CA certificate (PEM)")
    chain_pem: str = Field(
        max_length=65_536, description="Its issuers up to the self-signed root (PEM)"
    )


class CrlSummary(_View):
    number: int | None
    this_update: str | None
    next_update: str | None
    revocations: int


class IssuingCaView(_View):
    status: str
    self_signed: bool
    key_id: str
    key_spec: str
    subject: str
    certificate_pem: str | None
    chain_pem: str
    iot_ca_id: str | None
    created_at: str | None
    not_after: str | None = None
    crl: CrlSummary


class PkiCsrView(_View):
    csr_pem: str
    key_id: str
    key_spec: str
    subject: str


class RotationStatusView(_View):
    device_id: str
    state: DeviceState
    current: HeldCertificateView | None
    pending: HeldCertificateView | None
    retired: list[HeldCertificateView]
    renewal_due_at: str | None


# ---- firmware releases --------------------------------------------------------------------------

FirmwareSha256 = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="The image's SHA-256: 64 lowercase hex digits"),
]
FirmwareVersion = Annotated[
    str,
    StringConstraints(pattern=r"^[\x21-\x7e]{1,64}$"),
    Field(
        description="The version devices running the image report (`firmware_version`): "
        "1-64 printable ASCII characters, no spaces"
    ),
]


class FirmwarePublishRequest(_Request):
    profile: ProfileName
    version: FirmwareVersion
    sha256: FirmwareSha256


class FirmwareRevokeRequest(_Request):
    """Why the release is withdrawn (optional): an empty body or `{}` is a revocation without
    a reason."""

    reason: Reason | None = None


class FirmwareReleaseView(_View):
    profile: str
    version: str
    sha256: str
    status: str = Field(description="published, or revoked (attestation of it fails)")
    published_at: str
    published_by: str = Field(description="The IAM principal that published it")
    revoked_at: str | None
    revoked_by: str | None
    revoke_reason: str | None


class FirmwareReleaseListView(_View):
    releases: list[FirmwareReleaseView]
