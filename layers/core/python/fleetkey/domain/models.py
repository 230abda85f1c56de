"""Domain records: a device, a manufacturer CA, a certificate decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleetkey.domain.audit import ChainHead
from fleetkey.domain.lifecycle import DeviceState


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    serial_number: str
    manufacturer_ca: str
    profile: str
    state: DeviceState
    audit_head: ChainHead
    public_key_fingerprint: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    certificate_id: str | None = None
    # The current certificate's public key (PEM) and its kind ("ec:secp256r1", "rsa:2048").
    certificate_public_key: str | None = None
    certificate_key: str | None = None
    certificate_not_after: str | None = None  # ISO 8601
    created_at: str | None = None
    updated_at: str | None = None

    def certificate_not_after_epoch(self) -> int | None:
        if not self.certificate_not_after:
            return None
        from datetime import datetime

        return int(datetime.fromisoformat(self.certificate_not_after).timestamp())

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
            "public_key_fingerprint": self.public_key_fingerprint,
            "attributes": dict(self.attributes),
            "certificate_id": self.certificate_id,
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
