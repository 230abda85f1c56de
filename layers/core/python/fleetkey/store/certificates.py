"""fleetkey's decisions on certificates: pk CERT#<id>, sk CERT (the `CertificateDecisions`
port). A decision is written once; an acceptance of an earlier life of its device may be
replaced by the decision of a later life (a recommissioned device's factory certificate)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.models import CertificateOutcome, CertificateRecord
from fleetkey.errors import ConcurrentModification
from fleetkey.ports import AlreadyDecided, DeviceExists, Write
from fleetkey.store import schema
from fleetkey.store.devices import DynamoDeviceRepository, device_from_item
from fleetkey.store.table import Action, ConditionFailed, Table, ser


def certificate_from_item(item: Mapping[str, Any]) -> CertificateRecord:
    epoch = item.get("epoch")
    return CertificateRecord(
        certificate_id=item["certificate_id"],
        outcome=CertificateOutcome(item["outcome"]),
        device_id=item.get("device_id"),
        reason=item.get("reason"),
        decided_at=item["decided_at"],
        epoch=int(epoch) if epoch is not None else None,
    )


def _already_decided(items: Mapping[str, dict[str, Any]]) -> AlreadyDecided:
    device = items.get("device")
    return AlreadyDecided(
        certificate_from_item(items["certificate"]),
        device_from_item(device) if device else None,
    )


class DynamoCertificateDecisions:
    def __init__(self, table: Table, devices: DynamoDeviceRepository) -> None:
        self._table = table
        self._devices = devices

    def get(self, certificate_id: str) -> CertificateRecord | None:
        """AWS calls: 1 (GetItem)."""
        item = self._table.get(schema.certificate_key(certificate_id))
        return certificate_from_item(item) if item else None

    def head(self, certificate_id: str) -> ChainHead | None:
        item = self._table.get(schema.certificate_key(certificate_id))
        if not item or "audit_seq" not in item:
            return None
        return ChainHead(int(item["audit_seq"]), item["audit_hash"])

    def decision(
        self,
        certificate_id: str,
        outcome: CertificateOutcome,
        *,
        device_id: str | None,
        reason: str | None,
        at: str,
        epoch: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Write:
        """The write of a decision, for the device change's transaction. It succeeds where no
        decision exists, or where the one there accepted this certificate for an earlier life
        of the same device (refusals are never replaced). Refusal: AlreadyDecided (with the
        device, when the transaction reported it)."""
        item = {
            **schema.certificate_key(certificate_id),
            "certificate_id": certificate_id,
            "outcome": outcome.value,
            "device_id": device_id,
            "reason": reason,
            "decided_at": at,
            "epoch": epoch,
            **(extra or {}),
        }
        condition = "attribute_not_exists(pk)"
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        if epoch is not None and device_id is not None:
            condition += (
                " OR (outcome = :accepted AND device_id = :device"
                " AND (attribute_not_exists(#epoch) OR #epoch < :epoch))"
            )
            names["#epoch"] = "epoch"
            values.update(
                {
                    ":accepted": CertificateOutcome.ACCEPTED.value,
                    ":device": device_id,
                    ":epoch": epoch,
                }
            )
        put: dict[str, Any] = {
            "TableName": self._table.name,
            "Item": ser(item),
            "ConditionExpression": condition,
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        if names:
            put["ExpressionAttributeNames"] = names
            put["ExpressionAttributeValues"] = ser(values)
        return Action("certificate", {"Put": put}, refusal=_already_decided)

    def refuse(
        self,
        certificate_id: str,
        claimed_device_id: str | None,
        record: AuditRecord,
        at: str,
        *,
        unless_device_exists: bool = False,
    ) -> None:
        """Record a certificate as refused, with its one-record audit chain `record`.

        With `unless_device_exists`, the same write is also the device lookup: it succeeds only
        if no device `claimed_device_id` exists.

        AWS calls: 1 (TransactWriteItems).

        Raises:
            AlreadyDecided: decided already (with the device, if it exists and was checked).
            DeviceExists: the device exists (and the certificate is not decided).
            ValueError: `unless_device_exists` without a `claimed_device_id` to look up.
        """
        actions: list[Write] = []
        if unless_device_exists:
            if claimed_device_id is None:
                raise ValueError("unless_device_exists needs the claimed device id")
            actions.append(self._devices.absent_check(claimed_device_id))
        actions += [
            self.decision(
                certificate_id,
                CertificateOutcome.REFUSED,
                device_id=claimed_device_id,
                reason=record.details.get("reason"),
                at=at,
                extra={"audit_seq": record.seq, "audit_hash": record.hash},
            ),
            self._table.audit_put(record),
        ]
        try:
            self._table.transact(actions)
        except ConditionFailed as failure:
            if "certificate" in failure.failed and "certificate" in failure.items:
                raise _already_decided(failure.items) from None
            device = failure.items.get("device")
            if "device" in failure.failed and device:
                raise DeviceExists(device_from_item(device)) from None
            # Neither condition reported its item: a transaction to retry.
            raise ConcurrentModification(f"certificate {certificate_id}: retry") from failure
