"""The allow-list: which devices may register. Operators add entries one by one or import a
factory manifest; each new device starts ALLOWLISTED with the first record of its audit chain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.domain.allowlist import AllowlistEntry, RejectedRow, parse_manifest
from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.models import Device
from fleetkey.errors import Conflict, FleetkeyError
from fleetkey.ports import DeviceRepository
from fleetkey.settings import Settings
from fleetkey.store import schema


@dataclass(frozen=True, slots=True)
class ImportReport:
    received: int
    imported: int
    unchanged: int
    rejected: list[RejectedRow] = field(default_factory=list)

    def to_public(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "imported": self.imported,
            "unchanged": self.unchanged,
            "rejected": [
                {"row": r.row, "device_id": r.device_id, "reason": r.reason} for r in self.rejected
            ],
        }


class AllowlistService:
    def __init__(
        self, settings: Settings, devices: DeviceRepository, clock: Clock = utc_now
    ) -> None:
        self._settings = settings
        self._devices = devices
        self._clock = clock

    def _first_record(self, entry: AllowlistEntry, at: str, actor: str, source: str) -> AuditRecord:
        return ChainHead().next_record(
            subject=schema.device_subject(entry.device_id),
            at=at,
            action="allowlisted",
            actor=actor,
            details={
                "source": source,
                "serial_number": entry.serial_number,
                "manufacturer_ca": entry.manufacturer_ca,
                "profile": entry.profile,
                "public_key_fingerprint": entry.public_key_fingerprint,
                "attributes": dict(entry.attributes),
            },
        )

    def add(self, entry: AllowlistEntry, *, actor: str) -> Device:
        """Allow-list one device. Adding the same entry again returns the device as it is.

        Raises:
            Conflict: a device with this id exists with a different entry.
        """
        at = timestamp(self._clock())
        outcome = self._devices.create(
            [(entry, self._first_record(entry, at, actor, "single"))], at
        )
        if outcome.conflicting:
            raise Conflict(
                f"device {entry.device_id} is already allow-listed with different details"
            )
        device = self._devices.get(entry.device_id)
        if device is None:  # an invariant (no path deletes a device), checked also under -O
            raise FleetkeyError(f"device {entry.device_id} is missing after it was written")
        return device

    def import_manifest(self, text: str, fmt: str, *, actor: str) -> ImportReport:
        """Import a factory manifest (CSV or JSON). Valid rows are written whole, in transactions;
        invalid rows, duplicates, and devices that exist with different details are reported
        with the reason. Re-running an import is safe: rows already present count as unchanged.

        Raises:
            InvalidRequest: the manifest as a whole is unusable (format, header, size).
            TransientAwsError: writes kept failing; re-running continues where it stopped.
        """
        parsed = parse_manifest(text, fmt, max_rows=self._settings.max_import_rows)
        at = timestamp(self._clock())
        rows = [(e, self._first_record(e, at, actor, "manifest")) for _, e in parsed.entries]
        outcome = self._devices.create(rows, at)
        conflicting = set(outcome.conflicting)
        rejected = list(parsed.rejected) + [
            RejectedRow(number, e.device_id, "already allow-listed with different details")
            for number, e in parsed.entries
            if e.device_id in conflicting
        ]
        rejected.sort(key=lambda r: r.row)
        return ImportReport(
            received=len(parsed.entries) + len(parsed.rejected),
            imported=len(outcome.imported),
            unchanged=len(outcome.unchanged),
            rejected=rejected,
        )
