"""Domain records: a device, a manufacturer CA, a certificate decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from fleetkey.domain.audit import ChainHead
from fleetkey.domain.lifecycle import DeviceState


class CertificateRole(StrEnum):
    """What a certificate in a device's set is for: the one it connects and authenticates with
    (current), one issued by a rotation and not yet committed (pending), or one a rotation
    replaced or rolled back (retired: INACTIVE in AWS IoT, revoked, deleted after a grace)."""

    CURRENT = "current"
    PENDING = "pending"
    RETIRED = "retired"


class CertificateOrigin(StrEnum):
    """The factory identity (the manufacturer's certificate, registered by JITR), or an
    operational one fleetkey issued."""

    FACTORY = "factory"
    ISSUED = "issued"


@dataclass(frozen=True, slots=True)
class HeldCertificate:
    """A certificate a device holds, as fleetkey recorded it when it accepted it."""

    certificate_id: str
    role: CertificateRole
    origin: CertificateOrigin
    public_key_pem: str
    key: str  # "ec:secp256r1", "rsa:2048"
    not_after: str  # ISO 8601
    arn: str | None = None
    not_before: str | None = None
    # Certificates fleetkey issued: the serial (hex) and the certificate itself (a repeated
    # rotation request for the same CSR is answered with it).
    serial: str | None = None
    certificate_pem: str | None = None
    # pending: the moment the rotation is rolled back unless committed.
    commit_deadline: str | None = None
    # retired: when it was retired, and when it is deleted from AWS IoT.
    retired_at: str | None = None
    delete_after: str | None = None
    # current: when fleetkey last asked the device to renew it.
    renewal_requested_at: str | None = None

    def not_after_epoch(self) -> int:
        return int(datetime.fromisoformat(self.not_after).timestamp())

    def to_public(self) -> dict[str, Any]:
        public: dict[str, Any] = {
            "certificate_id": self.certificate_id,
            "role": self.role.value,
            "origin": self.origin.value,
            "key": self.key,
            "not_after": self.not_after,
        }
        for name in (
            "not_before",
            "serial",
            "commit_deadline",
            "retired_at",
            "delete_after",
            "renewal_requested_at",
        ):
            value = getattr(self, name)
            if value is not None:
                public[name] = value
        return public


class TeardownStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class Teardown:
    """The removal of a decommissioned device from AWS IoT: what is left to remove (its
    certificates and thing), and whether it is done."""

    status: TeardownStatus
    started_at: str
    certificates: tuple[str, ...] = ()
    completed_at: str | None = None

    def to_public(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "started_at": self.started_at,
            "certificates": list(self.certificates),
            "completed_at": self.completed_at,
        }


@dataclass(frozen=True, slots=True)
class Device:
    """A device as its repository read it. `certificates` is its set (at most one current and
    one pending); `epoch` counts its lives (a recommission starts the next one); tokens issued
    before `tokens_not_before` (epoch seconds) are no longer active."""

    device_id: str
    serial_number: str
    manufacturer_ca: str
    profile: str
    state: DeviceState
    audit_head: ChainHead
    public_key_fingerprint: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    certificates: tuple[HeldCertificate, ...] = ()
    owner: str | None = None
    epoch: int = 1
    tokens_not_before: int | None = None
    teardown: Teardown | None = None
    # The factory certificate JITR accepted (it survives decommission: the device re-onboards
    # with it after a recommission).
    factory_certificate_id: str | None = None
    # SHA-256 (hex) of the SubjectPublicKeyInfo of every key the device has held, in any life:
    # a rotation never certifies one of them again.
    held_keys: frozenset[str] = frozenset()
    # After a rollback, no rotation starts before this moment (each rollback leaves a revoked
    # certificate in the CRL until it expires: a device that never commits cannot grow it fast).
    rotation_held_until: str | None = None
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def retired_certificates(self) -> tuple[HeldCertificate, ...]:
        return tuple(c for c in self.certificates if c.role is CertificateRole.RETIRED)

    @property
    def current_certificate(self) -> HeldCertificate | None:
        return next((c for c in self.certificates if c.role is CertificateRole.CURRENT), None)

    @property
    def pending_certificate(self) -> HeldCertificate | None:
        return next((c for c in self.certificates if c.role is CertificateRole.PENDING), None)

    def holds(self, certificate_id: str) -> HeldCertificate | None:
        return next((c for c in self.certificates if c.certificate_id == certificate_id), None)

    # The current certificate's fields, as the device's one certificate was read before sets.
    @property
    def certificate_id(self) -> str | None:
        current = self.current_certificate
        return current.certificate_id if current else None

    @property
    def certificate_public_key(self) -> str | None:
        current = self.current_certificate
        return current.public_key_pem if current else None

    @property
    def certificate_key(self) -> str | None:
        current = self.current_certificate
        return current.key if current else None

    @property
    def certificate_not_after(self) -> str | None:
        current = self.current_certificate
        return current.not_after if current else None

    def certificate_not_after_epoch(self) -> int | None:
        current = self.current_certificate
        return current.not_after_epoch() if current else None

    def thing_attributes(self) -> dict[str, str]:
        """The AWS IoT thing attributes: the entry's own plus those fleetkey sets."""
        return {
            **self.attributes,
            "serial_number": self.serial_number,
            "profile": self.profile,
            "manufacturer_ca": self.manufacturer_ca,
        }

    def to_public(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "serial_number": self.serial_number,
            "manufacturer_ca": self.manufacturer_ca,
            "profile": self.profile,
            "state": self.state.value,
            "owner": self.owner,
            "epoch": self.epoch,
            "public_key_fingerprint": self.public_key_fingerprint,
            "attributes": dict(self.attributes),
            "certificate_id": self.certificate_id,
            "certificates": [c.to_public() for c in self.certificates],
            "factory_certificate_id": self.factory_certificate_id,
            "tokens_not_before": self.tokens_not_before,
            "rotation_held_until": self.rotation_held_until,
            "teardown": self.teardown.to_public() if self.teardown else None,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "audit": {"records": self.audit_head.seq, "head": self.audit_head.hash},
        }


class CaStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"


@dataclass(frozen=True, slots=True)
class ManufacturerCa:
    """A trust anchor for just-in-time registration, registered with AWS IoT."""

    name: str
    iot_ca_id: str
    certificate_pem: str
    status: CaStatus
    audit_head: ChainHead
    registered_at: str | None = None

    def to_public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "iot_ca_id": self.iot_ca_id,
            "status": self.status.value,
            "certificate_pem": self.certificate_pem,
            "registered_at": self.registered_at,
        }


class CertificateOutcome(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """fleetkey's decision on one certificate, keyed by its AWS IoT certificate id."""

    certificate_id: str
    outcome: CertificateOutcome
    device_id: str | None
    reason: str | None
    decided_at: str
    # The life of the device (its epoch) an acceptance belongs to: a recommissioned device's
    # factory certificate is decided again in its next life. Refusals hold for every life.
    epoch: int | None = None
