"""Reading devices and verifying audit trails."""

from __future__ import annotations

import re

from fleetkey.domain.audit import AuditRecord, ChainHead, ChainVerification, verify_chain
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.models import Device
from fleetkey.errors import InvalidRequest, NotFound
from fleetkey.ports import AuditLog, CertificateDecisions, DeviceRepository, TrustAnchorStore

SUBJECT_KINDS = ("device", "certificate", "ca", "stream")
_SUBJECT_NAMES = {
    "device": DEVICE_ID,
    "certificate": re.compile(r"[0-9a-f]{64}"),
    "ca": re.compile(r"[a-z0-9][a-z0-9-]{0,62}"),
    "stream": re.compile(r"[a-z0-9-]{1,64}"),
}


class DeviceService:
    def __init__(
        self,
        devices: DeviceRepository,
        audit: AuditLog,
        anchors: TrustAnchorStore,
        certificates: CertificateDecisions,
    ) -> None:
        self._devices = devices
        self._audit = audit
        self._anchors = anchors
        self._certificates = certificates

    def get(self, device_id: str) -> Device:
        """Raises NotFound (also for ids that could not name a device)."""
        if not DEVICE_ID.fullmatch(device_id):
            raise NotFound(f"no device {device_id[:128]!r}")
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def audit(self, subject: str) -> tuple[list[AuditRecord], ChainVerification]:
        """The subject's audit records, oldest first, and the verification of their chain
        against the head the subject records.

        Raises:
            InvalidRequest: not a known subject kind; NotFound: nothing recorded for it;
            AuditChainBroken: the chain was altered.
        """
        kind, _, name = subject.partition(":")
        if kind not in SUBJECT_KINDS:
            raise InvalidRequest(
                "audit subject is <kind>:<name> with kind one of " + ", ".join(SUBJECT_KINDS)
            )
        if not _SUBJECT_NAMES[kind].fullmatch(name):
            raise NotFound(f"no audit records for {subject[:200]}")
        stored = self._audit.read(subject)
        if not stored:
            raise NotFound(f"no audit records for {subject}")
        head = self._head(kind, name)
        verification = verify_chain(subject, stored, head)
        return [AuditRecord.from_body(body) for body, _ in stored], verification

    def _head(self, kind: str, name: str) -> ChainHead | None:
        if kind == "device":
            device = self._devices.get(name)
            return device.audit_head if device else None
        if kind == "ca":
            ca = self._anchors.get(name)
            return ca.audit_head if ca else None
        if kind == "stream":
            return self._audit.stream_head(name)
        return self._certificates.head(name)
