"""Ports: what the services need from storage and from AWS, one `Protocol` per aggregate or AWS
capability. The DynamoDB adapters (fleetkey.store) and the AWS adapters (fleetkey.adapters)
implement them; services depend on these and see domain objects and domain exceptions only.

A write that must land in the same transaction as a device change (a certificate decision, a
check that a CA is still active) is a `Write`: an opaque value one adapter makes and the device
repository carries into its transaction; if its condition fails, the repository raises the
domain exception that write names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.firmware import FirmwareRelease
from fleetkey.domain.lifecycle import DeviceState, Transition
from fleetkey.domain.models import (
    CaStatus,
    CertificateOutcome,
    CertificateRecord,
    CertificateRole,
    Device,
    HeldCertificate,
    ManufacturerCa,
    Teardown,
)
from fleetkey.domain.pki import Revocation
from fleetkey.domain.validation import RefusalReason, Validation, ValidationAnswer
from fleetkey.errors import ConcurrentModification, Conflict

if TYPE_CHECKING:  # pydantic's: not imported by the functions that never read an allow-list
    from fleetkey.domain.allowlist import AllowlistEntry

# ---- domain exceptions raised by adapters ---------------------------------------------------


class DeviceChanged(ConcurrentModification):
    """The device is not as it was read (another change landed first). `current` is the device
    as it is now (None: it does not exist)."""

    def __init__(self, device_id: str, current: Device | None) -> None:
        super().__init__(f"device {device_id} changed; read it again")
        self.current = current


class DeviceExists(Conflict):
    """A write that required the device not to exist found it."""

    def __init__(self, device: Device) -> None:
        super().__init__(f"device {device.device_id} exists")
        self.device = device


class AlreadyDecided(Conflict):
    """fleetkey has already decided on this certificate. `device` is the device the same
    transaction read, when it reported it."""

    def __init__(self, decision: CertificateRecord, device: Device | None = None) -> None:
        super().__init__(f"certificate {decision.certificate_id} is already decided")
        self.decision = decision
        self.device = device


class CaChanged(ConcurrentModification):
    """The manufacturer CA is not as read (disabled, replaced, or its record moved on)."""


class AlreadyExists(Conflict):
    """The record exists. `current` is what is there (a domain object, or the name holding a
    claim)."""

    def __init__(self, message: str, current: Any = None) -> None:
        super().__init__(message)
        self.current = current


class CaTaken(AlreadyExists):
    """A CA name or CA id is held: `existing` is the CA recorded under the name (if that is what
    failed), `id_holder` the name that holds the CA id (claimed or registered)."""

    def __init__(
        self, existing: ManufacturerCa | None = None, id_holder: str | None = None
    ) -> None:
        super().__init__("manufacturer CA name or id is taken", current=existing)
        self.existing = existing
        self.id_holder = id_holder


class StaleRecord(ConcurrentModification):
    """A record changed since it was read (its audit head moved)."""


class AssertionReplayed(Conflict):
    """A client assertion's jti was used already."""


class ChallengeUnusable(Conflict):
    """A challenge nonce is unknown, used or expired."""


class DeviceNotEligible(Conflict):
    """The device is no longer ACTIVE with the certificate the request was authenticated by, or
    no longer as the service decided on it (profile, epoch, tokens_not_before). `current` is its
    record's credential as the failed condition found it (None: no such device)."""

    def __init__(self, message: str, current: DeviceCredential | None = None) -> None:
        super().__init__(message)
        self.current = current


class FirmwareNotReleased(Conflict):
    """The firmware measurement is not a published release of the device's profile (never
    published, another version, or revoked)."""


class ValidationUnanswerable(Conflict):
    """A validation answer that does not fit its validation (another device, another nonce,
    purpose or audience, already answered, past its deadline, or unattested when attestation
    is required). `current` is the validation record as the failed condition found it."""

    def __init__(self, message: str, current: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.current = current


# ---- values the ports exchange ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """A conditional write one adapter prepares for another's transaction (opaque to services)."""

    name: str
    body: Any
    # Builds the domain exception to raise when this write's condition fails, from the items the
    # transaction reported (by write name).
    refusal: Any = None


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    imported: list[str]
    unchanged: list[str]
    conflicting: list[str]


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What authenticates a device: a projection of its record (state, profile, certificates)."""

    device_id: str
    state: DeviceState
    profile: str
    certificates: tuple[HeldCertificate, ...] = ()
    tokens_not_before: int | None = None
    owner: str | None = None
    epoch: int = 1

    def holds(self, certificate_id: str) -> HeldCertificate | None:
        return next((c for c in self.certificates if c.certificate_id == certificate_id), None)


@dataclass(frozen=True, slots=True)
class DeviceChange:
    """One change of a device, recorded with one audit record. With a `transition`, the
    repository computes the new state from the lifecycle table; without, the state is kept
    (and still required unchanged). The other fields are the facts a change may set (None
    leaves one as it is); nothing here can name a state."""

    action: str
    actor: str
    at: str
    details: Mapping[str, Any] = field(default_factory=dict)
    transition: Transition | None = None
    certificates: tuple[HeldCertificate, ...] | None = None
    owner: str | None = None
    clear_owner: bool = False
    profile: str | None = None
    epoch: int | None = None
    tokens_not_before: int | None = None
    teardown: Teardown | None = None
    clear_teardown: bool = False
    registered_at: str | None = None
    factory_certificate_id: str | None = None
    rotation_held_until: str | None = None


# ---- ports -------------------------------------------------------------------------------------


class DeviceRepository(Protocol):
    """Devices. The only writer of a device's state, and only through `apply`."""

    def get(self, device_id: str) -> Device | None: ...

    def credential(self, device_id: str) -> DeviceCredential | None: ...

    def eligibility_check(
        self,
        device: DeviceCredential,
        certificate_id: str,
        role: CertificateRole = CertificateRole.CURRENT,
    ) -> Write:
        """A check, for another write's transaction, that the device is ACTIVE with
        `certificate_id` in its set in `role`, and otherwise as `device` says (profile, epoch,
        owner, tokens_not_before). Refusal: DeviceNotEligible with the device as it is."""
        ...

    def create(
        self, rows: Sequence[tuple[AllowlistEntry, AuditRecord]], at: str
    ) -> ImportOutcome: ...

    def due(self, now: int, limit: int) -> list[tuple[str, int]]:
        """Devices with a deadline due at `now` (the sparse `due` index), at most `limit`, each
        with that deadline (epoch seconds)."""
        ...

    def renewals_due(self, now: int, limit: int) -> list[str]:
        """ACTIVE devices due for renewal at `now` (the `renewal` index), at most `limit`."""
        ...

    def apply(
        self, device: Device, change: DeviceChange, *, with_writes: Sequence[Write] = ()
    ) -> Device:
        """Record `change` and its audit record, conditional on the device being as read.

        Raises:
            IllegalTransition: the lifecycle table has no such transition.
            DeviceChanged: the device changed since it was read.
            the refusal of a failed `with_writes` write.
        """
        ...


class CertificateDecisions(Protocol):
    """fleetkey's decisions on certificates (CERT#<id>)."""

    def get(self, certificate_id: str) -> CertificateRecord | None: ...

    def head(self, certificate_id: str) -> ChainHead | None: ...

    def decision(
        self,
        certificate_id: str,
        outcome: CertificateOutcome,
        *,
        device_id: str,
        reason: str | None,
        at: str,
        epoch: int,
    ) -> Write: ...

    def refuse(
        self,
        certificate_id: str,
        claimed_device_id: str | None,
        record: AuditRecord,
        at: str,
        *,
        unless_device_exists: bool = False,
    ) -> None: ...


class TrustAnchorStore(Protocol):
    """Manufacturer CAs and the claims on their AWS IoT ids."""

    def get(self, name: str) -> ManufacturerCa | None: ...

    def list(self) -> list[ManufacturerCa]: ...

    def claim_id(self, iot_ca_id: str, name: str, *, stale_claim_of: str | None = None) -> None: ...

    def claim_for(self, iot_ca_id: str) -> tuple[str, bool] | None: ...

    def create(self, ca: ManufacturerCa, record: AuditRecord) -> None: ...

    def set_status(
        self, ca: ManufacturerCa, status: CaStatus, record: AuditRecord
    ) -> ManufacturerCa: ...

    def active_check(self, ca: ManufacturerCa) -> Write: ...


class AuditLog(Protocol):
    """Audit chains: reading any subject's, appending to streams (subjects without a record)."""

    def read(self, subject: str) -> list[tuple[str, str]]: ...

    def append_to_stream(
        self, stream: str, *, action: str, actor: str, details: dict[str, Any], at: str
    ) -> AuditRecord: ...

    def stream_head(self, stream: str) -> ChainHead: ...


class TokenRecords(Protocol):
    """Used assertions, challenges and revoked tokens."""

    def use_assertion(
        self,
        device_id: str,
        jti: str,
        expires_at: int,
        now: int,
        nonce: str | None = None,
        *,
        with_writes: Sequence[Write] = (),
        then: Sequence[Write] = (),
    ) -> None: ...

    def put_nonce(self, nonce: str, expires_at: int) -> None: ...

    def revoke(self, jti: str, expires_at: int) -> None: ...

    def is_revoked(self, jti: str, now: int) -> bool: ...


class FirmwareReleases(Protocol):
    """Published (and revoked) firmware releases, by profile and measurement, and their audit
    stream (fleetkey.store.firmware.DynamoFirmwareReleases)."""

    def get(self, profile: str, sha256: str) -> FirmwareRelease | None: ...

    def list(self, profile: str) -> list[FirmwareRelease]: ...

    def publish(self, release: FirmwareRelease, actor: str, at: str) -> FirmwareRelease:
        """Raises AlreadyExists: released with another version, or revoked."""
        ...

    def revoke(
        self, profile: str, sha256: str, reason: str | None, actor: str, at: str
    ) -> FirmwareRelease:
        """Raises NotFound: no such release."""
        ...

    def released_check(self, profile: str, sha256: str, version: str) -> Write:
        """A check, for a grant's transaction, that `sha256` is a published release of
        `profile` with `version` (refusal: FirmwareNotReleased)."""
        ...


class ValidationRecords(Protocol):
    """Validation requests and their results (`fleetkey.domain.validation`)."""

    def create(self, validation: Validation) -> None: ...

    def get(self, validation_id: str, now: int) -> Validation | None: ...

    def answer(
        self,
        device_id: str,
        answer: ValidationAnswer,
        *,
        epoch: int,
        tokens_not_before: int | None,
        attested: bool,
        token: str,
        now: int,
    ) -> Write:
        """The write deciding the validation `validated` with `token`, for the grant's
        transaction (refusal: ValidationUnanswerable with the record as it was)."""
        ...

    def refuse(
        self, device_id: str, answer: ValidationAnswer, reason: RefusalReason, now: int
    ) -> bool: ...


class SigningKeyRegistry(Protocol):
    """The token signing-key registry (one record with its audit head)."""

    def get(self) -> tuple[ChainHead, list[dict[str, Any]]]: ...

    def put(self, head: ChainHead, keys: list[dict[str, Any]], record: AuditRecord) -> None: ...


class CertificateControl(Protocol):
    """AWS IoT's certificates and things (fleetkey.adapters.iot.IotRegistry)."""

    def certificate_status(self, certificate_id: str) -> str | None: ...

    def set_certificate_status(
        self, certificate_id: str, status: Literal["ACTIVE", "INACTIVE"]
    ) -> bool: ...

    def teardown_certificate(self, certificate_id: str) -> bool: ...

    def delete_thing(self, thing_name: str, *, owned_thing_types: frozenset[str]) -> bool: ...


class DeviceConnections(Protocol):
    """Devices' MQTT sessions (iot-data: fleetkey.adapters.iot_data.DeviceChannel)."""

    def send_command(self, device_id: str, command: str, payload: dict[str, Any]) -> None: ...

    def disconnect(self, device_id: str) -> bool: ...


class LifecycleQueue(Protocol):
    """Work that outlasts a request (teardown), run by the converge function from a queue."""

    def enqueue(self, device_id: str, epoch: int) -> None: ...


class RevocationRecords(Protocol):
    """Revocations of certificates fleetkey issued (fleetkey.store.pki.DynamoPkiStore)."""

    def revocations(self, entries: Sequence[Revocation]) -> list[Write]:
        """The writes recording `entries`, for a device change's transaction."""
        ...


class DataKeyVault(Protocol):
    """KMS data keys (fleetkey.adapters.data_keys.KmsDataKeys)."""

    def generate(self, key_id: str, context: dict[str, str]) -> tuple[bytes, bytes]: ...

    def decrypt(self, key_id: str, blob: bytes, context: dict[str, str]) -> bytes: ...


class DataKeyRecords(Protocol):
    """The KMS-wrapped data key of each device life."""

    def get(self, device_id: str, epoch: int) -> bytes | None: ...

    def put(self, device_id: str, epoch: int, blob: bytes) -> Write:
        """The write of a life's first data key, for the device change's transaction
        (refusal: AlreadyExists)."""
        ...

    def destroy(self, device_id: str, *, up_to_epoch: int) -> int: ...
