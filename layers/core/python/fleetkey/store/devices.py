"""The device repository: the only code that writes a device's `state`, and only by applying a
`Transition` from the lifecycle table (`apply`), conditionally on the state and audit head it
read, with the change's audit record in the same transaction.

Item: pk DEVICE#<id>, sk DEVICE. Its certificates are one map attribute, by certificate id:
{role, origin, public_key, key, not_after, arn}.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import create_parser

from fleetkey.adapters.aws import is_transient
from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.lifecycle import DeviceState, target_state
from fleetkey.domain.models import (
    CertificateOrigin,
    CertificateRole,
    Device,
    HeldCertificate,
    Teardown,
    TeardownStatus,
)
from fleetkey.domain.rotation import (
    all_due_shards,
    due_shard,
    key_fingerprint,
    next_deadline,
    next_renewal,
)
from fleetkey.errors import TransientAwsError
from fleetkey.ports import (
    DeviceChange,
    DeviceChanged,
    DeviceCredential,
    DeviceNotEligible,
    ImportOutcome,
    Write,
)
from fleetkey.store import schema
from fleetkey.store.table import (
    MAX_TRANSACTION_ATTEMPTS,
    Action,
    ConditionFailed,
    Table,
    de,
    plain,
    ser,
)

if TYPE_CHECKING:  # pydantic's: not imported by the functions that never read an allow-list
    from fleetkey.domain.allowlist import AllowlistEntry

# The state attribute: written by `_change_action` alone (tests/unit/test_state_writes.py).
STATE = "state"
# DynamoDB allows 100 actions per transaction; an allow-list row is two (device + first record).
ROWS_PER_TRANSACTION = 50

# The item's attributes the token path reads (see `credential`); `state` is a DynamoDB reserved
# word, so every name goes through ExpressionAttributeNames.
DEVICE_CREDENTIAL_FIELDS = (
    "device_id",
    STATE,
    "profile",
    "certificates",
    "tokens_not_before",
    "owner",
    "epoch",
)
_CREDENTIAL_NAMES = {f"#f{i}": name for i, name in enumerate(DEVICE_CREDENTIAL_FIELDS)}
_CREDENTIAL_PROJECTION = ", ".join(_CREDENTIAL_NAMES)

# DECOY, never a device: the GetItem response body of an ACTIVE P-256 device with every projected
# field, of typical sizes (a P-256 key's PEM is 178 characters). A miss in `credential` parses and
# decodes it so that an unknown device costs the CPU a known one costs. Its values are
# placeholders (the "key" is not a key) and nothing reads the result.
_DECOY_DEVICE_RESPONSE = json.dumps(
    {
        "Item": {
            "device_id": {"S": "decoy-device-0000"},
            STATE: {"S": DeviceState.ACTIVE.value},
            "profile": {"S": "telemetry-sensor"},
            "epoch": {"N": "1"},
            "certificates": {
                "M": {
                    "0" * 64: {
                        "M": {
                            "role": {"S": CertificateRole.CURRENT.value},
                            "origin": {"S": CertificateOrigin.FACTORY.value},
                            "public_key": {
                                "S": "-----BEGIN PUBLIC KEY-----\n"
                                + "A" * 64
                                + "\n"
                                + "A" * 60
                                + "\n-----END PUBLIC KEY-----\n"
                            },
                            "key": {"S": "ec:secp256r1"},
                            "not_after": {"S": "2036-01-01T00:00:00.000+00:00"},
                            "not_before": {"S": "2026-01-01T00:00:00.000+00:00"},
                            "arn": {"S": "arn:aws:iot:eu-west-1:000000000000:cert/" + "0" * 64},
                        }
                    }
                }
            },
        }
    },
    separators=(",", ":"),
).encode()


# The optional fields of a held certificate, stored under their own names when set.
_HELD_OPTIONAL = (
    "arn",
    "not_before",
    "serial",
    "certificate_pem",
    "commit_deadline",
    "retired_at",
    "delete_after",
    "renewal_requested_at",
)


def _held(certificate_id: str, value: Mapping[str, Any]) -> HeldCertificate:
    return HeldCertificate(
        certificate_id=certificate_id,
        role=CertificateRole(value["role"]),
        origin=CertificateOrigin(value["origin"]),
        public_key_pem=value["public_key"],
        key=value["key"],
        not_after=value["not_after"],
        **{name: value.get(name) for name in _HELD_OPTIONAL},
    )


def _certificates_from_item(item: Mapping[str, Any]) -> tuple[HeldCertificate, ...]:
    held = item.get("certificates")
    if not isinstance(held, dict):
        return ()
    return tuple(sorted((_held(k, v) for k, v in held.items()), key=lambda c: c.role.value))


def _certificates_to_item(certificates: Sequence[HeldCertificate]) -> dict[str, Any]:
    return {
        c.certificate_id: {
            "role": c.role.value,
            "origin": c.origin.value,
            "public_key": c.public_key_pem,
            "key": c.key,
            "not_after": c.not_after,
            **{name: getattr(c, name) for name in _HELD_OPTIONAL if getattr(c, name)},
        }
        for c in certificates
    }


def _teardown_from_item(value: Any) -> Teardown | None:
    if not isinstance(value, dict):
        return None
    return Teardown(
        status=TeardownStatus(value["status"]),
        started_at=value["started_at"],
        certificates=tuple(value.get("certificates") or ()),
        completed_at=value.get("completed_at"),
    )


def _teardown_to_item(teardown: Teardown) -> dict[str, Any]:
    return {
        "status": teardown.status.value,
        "started_at": teardown.started_at,
        "certificates": list(teardown.certificates),
        **({"completed_at": teardown.completed_at} if teardown.completed_at else {}),
    }


def device_from_item(item: Mapping[str, Any]) -> Device:
    item = plain(dict(item))
    return Device(
        device_id=item["device_id"],
        serial_number=item["serial_number"],
        manufacturer_ca=item["manufacturer_ca"],
        profile=item["profile"],
        state=DeviceState(item[STATE]),
        audit_head=ChainHead(seq=int(item["audit_seq"]), hash=item["audit_hash"]),
        public_key_fingerprint=item.get("public_key_fingerprint"),
        attributes=dict(item.get("attributes") or {}),
        certificates=_certificates_from_item(item),
        owner=item.get("owner"),
        epoch=int(item.get("epoch") or 1),
        tokens_not_before=item.get("tokens_not_before"),
        teardown=_teardown_from_item(item.get("teardown")),
        factory_certificate_id=item.get("factory_certificate_id"),
        held_keys=frozenset(item.get("held_keys") or ()),
        rotation_held_until=item.get("rotation_held_until"),
        created_at=item.get("created_at"),
        updated_at=item.get("updated_at"),
    )


def _credential_from_item(item: Mapping[str, Any]) -> DeviceCredential:
    item = plain(dict(item))
    return DeviceCredential(
        device_id=item["device_id"],
        state=DeviceState(item[STATE]),
        profile=item["profile"],
        certificates=_certificates_from_item(item),
        tokens_not_before=item.get("tokens_not_before"),
        owner=item.get("owner"),
        epoch=int(item.get("epoch") or 1),
    )


def _item_from_entry(entry: AllowlistEntry, head: ChainHead, at: str) -> dict[str, Any]:
    return {
        **schema.device_key(entry.device_id),
        "device_id": entry.device_id,
        "serial_number": entry.serial_number,
        "manufacturer_ca": entry.manufacturer_ca,
        "profile": entry.profile,
        "public_key_fingerprint": entry.public_key_fingerprint,
        "attributes": dict(entry.attributes),
        STATE: DeviceState.ALLOWLISTED.value,
        "epoch": 1,
        "audit_seq": head.seq,
        "audit_hash": head.hash,
        "created_at": at,
        "updated_at": at,
    }


def same_entry(item: Mapping[str, Any], entry: AllowlistEntry) -> bool:
    """Is the stored device the allow-list entry `entry` describes (whatever its state)?"""
    return (
        item.get("serial_number") == entry.serial_number
        and item.get("manufacturer_ca") == entry.manufacturer_ca
        and item.get("profile") == entry.profile
        and item.get("public_key_fingerprint") == entry.public_key_fingerprint
        and dict(item.get("attributes") or {}) == dict(entry.attributes)
    )


def _addresses_a_device(write: Write) -> bool:
    for body in write.body.values():
        key = body.get("Key") or body.get("Item") or {}
        if str(key.get(schema.PARTITION_KEY, {}).get("S", "")).startswith("DEVICE#"):
            return True
    return False


def _changed(device_id: str) -> Any:
    def refusal(items: Mapping[str, dict[str, Any]]) -> DeviceChanged:
        item = items.get("device")
        return DeviceChanged(device_id, device_from_item(item) if item else None)

    return refusal


class DynamoDeviceRepository:
    """Devices in the fleetkey table (the `DeviceRepository` port)."""

    def __init__(self, table: Table) -> None:
        self._table = table

    # ---- reads -----------------------------------------------------------------------------

    def get(self, device_id: str) -> Device | None:
        """AWS calls: 1 (GetItem, strongly consistent)."""
        item = self._table.get(schema.device_key(device_id))
        return device_from_item(item) if item else None

    def credential(self, device_id: str) -> DeviceCredential | None:
        """The fields of a device that authenticate it (state, profile, certificates), read with
        a projection: a fraction of the item, for the token path.

        A miss costs the decoding a hit costs: botocore's parsing of a response holding the item
        and its deserialization, done on `_DECOY_DEVICE_RESPONSE` and thrown away, so that the
        caller's CPU time does not tell an unknown device from a known one (without it an unknown
        device was refused ~0.3 ms faster, measured by benchmarks/token_timing.py).

        AWS calls: 1 (GetItem, strongly consistent, `ProjectionExpression` of
        `DEVICE_CREDENTIAL_FIELDS`).
        """
        response = self._table.client.get_item(
            TableName=self._table.name,
            Key=ser(schema.device_key(device_id)),
            ConsistentRead=True,
            ProjectionExpression=_CREDENTIAL_PROJECTION,
            ExpressionAttributeNames=_CREDENTIAL_NAMES,
        )
        item = response.get("Item")
        if item:
            return _credential_from_item(de(item))
        self._decode_decoy_device()
        return None

    def _decode_decoy_device(self) -> None:
        """Equal work for a miss (see `credential`): parse a decoy GetItem response with this
        client's own response parser and decode its item exactly as a hit is decoded, then drop
        the result. The decoy is nobody's: it is never returned or compared."""
        operation = self._table.client.meta.service_model.operation_model("GetItem")
        if operation.output_shape is None:  # never for GetItem; keeps the types honest
            return
        parsed = create_parser(operation.metadata["protocol"]).parse(
            {"status_code": 200, "headers": {}, "body": _DECOY_DEVICE_RESPONSE},
            operation.output_shape,
        )
        _credential_from_item(de(parsed["Item"]))

    def due(self, now: int, limit: int) -> list[tuple[str, int]]:
        """Devices with a deadline due at `now` (a rollback, a deletion: the sparse `due`
        index), at most `limit`, each with its deadline (`due_at`, epoch seconds: an index key,
        so in every item the query returns). AWS calls: 1 Query per shard (DUE_SHARDS) and
        further pages."""
        return self._sparse(schema.DUE_INDEX, now, limit)

    def renewals_due(self, now: int, limit: int) -> list[str]:
        """ACTIVE devices due for a renewal request at `now` (the sparse `renewal` index), at
        most `limit`. AWS calls: as `due`, stopping once `limit` are found."""
        return [device_id for device_id, _ in self._sparse(schema.RENEWAL_INDEX, now, limit)]

    def _sparse(self, index: str, now: int, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` (device id, moment) pairs from a sparse index, due at `now` (earliest
        first within each shard). The index holds only devices with that moment set, so this
        reads what is due and never the rest of the fleet."""
        shard_key, moment_key = schema.SPARSE_INDEXES[index]
        shards = all_due_shards()
        # Each shard gets its share, so one busy shard never starves the others.
        share = -(-limit // len(shards))
        found: list[tuple[str, int]] = []
        for shard in shards:
            if len(found) >= limit:
                break
            wanted = len(found) + min(share, limit - len(found))
            kwargs: dict[str, Any] = {
                "TableName": self._table.name,
                "IndexName": index,
                "KeyConditionExpression": "#shard = :shard AND #moment <= :now",
                "ExpressionAttributeNames": {"#shard": shard_key, "#moment": moment_key},
                "ExpressionAttributeValues": ser({":shard": shard, ":now": now}),
            }
            while len(found) < wanted:
                kwargs["Limit"] = wanted - len(found)
                response = self._table.client.query(**kwargs)
                for item in response.get("Items", []):
                    keys = de(item)
                    found.append((str(keys["pk"]).removeprefix("DEVICE#"), int(keys[moment_key])))
                if "LastEvaluatedKey" not in response:
                    break
                kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return found

    # ---- checks other transactions carry ----------------------------------------------------

    def eligibility_check(
        self,
        device: DeviceCredential,
        certificate_id: str,
        role: CertificateRole = CertificateRole.CURRENT,
    ) -> Write:
        """The device is still as the caller decided on it: ACTIVE, `certificate_id` its current
        certificate (or, for a rotation's commit, the pending one: `role`), and the same
        profile, epoch, owner and tokens_not_before as `device` (the credential read or cached).
        Checked in the transaction that grants something (a token's jti, a data key), so that
        nothing is granted after a suspension, a decommission or a recommission committed, nor
        on a stale cache. A failed check reports the device's credential as it is
        (`DeviceNotEligible.current`), so the caller can decide again without reading it."""
        names = {
            "#state": STATE,
            "#certs": "certificates",
            "#cid": certificate_id,
            "#role": "role",
            "#profile": "profile",
            "#epoch": "epoch",
            "#owner": "owner",
            "#tnb": "tokens_not_before",
        }
        values: dict[str, Any] = {
            ":active": DeviceState.ACTIVE.value,
            ":role": role.value,
            ":profile": device.profile,
            ":epoch": device.epoch,
        }
        conditions = ["#state = :active", "#certs.#cid.#role = :role", "#profile = :profile"]
        # A device item written before epochs existed has none: its epoch is 1.
        conditions.append(
            "(#epoch = :epoch OR attribute_not_exists(#epoch))"
            if device.epoch == 1
            else "#epoch = :epoch"
        )
        for name, value in (("#owner", device.owner), ("#tnb", device.tokens_not_before)):
            if value is None:
                conditions.append(f"attribute_not_exists({name})")
            else:
                conditions.append(f"{name} = :{name[1:]}")
                values[f":{name[1:]}"] = value
        device_id = device.device_id

        def refusal(items: Mapping[str, dict[str, Any]]) -> DeviceNotEligible:
            item = items.get("device")
            current = _credential_from_item(item) if item else None
            return DeviceNotEligible(f"device {device_id} is not eligible", current)

        return Action(
            "device",
            {
                "ConditionCheck": {
                    "TableName": self._table.name,
                    "Key": ser(schema.device_key(device_id)),
                    "ConditionExpression": " AND ".join(conditions),
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": ser(values),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
            refusal=refusal,
        )

    def absent_check(self, device_id: str) -> Write:
        """The device does not exist (its item is reported when it does)."""
        return Action(
            "device",
            {
                "ConditionCheck": {
                    "TableName": self._table.name,
                    "Key": ser(schema.device_key(device_id)),
                    "ConditionExpression": "attribute_not_exists(pk)",
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )

    # ---- writes ------------------------------------------------------------------------------

    def apply(
        self, device: Device, change: DeviceChange, *, with_writes: Sequence[Write] = ()
    ) -> Device:
        """Record `change` (a transition, a fact, or both) with its audit record, in one
        transaction conditional on the device being exactly as read (state and audit head),
        together with `with_writes`.

        AWS calls: 1 (TransactWriteItems).

        Raises:
            IllegalTransition: the lifecycle table has no such transition (nothing written).
            DeviceChanged: the device changed since it was read (the current device attached).
            the refusal of the first failed `with_writes` write.
        """
        new_state = (
            target_state(device.state, change.transition) if change.transition else device.state
        )
        details = dict(change.details)
        if change.transition is not None:
            details.setdefault("from", device.state.value)
            details.setdefault("to", new_state.value)
        record = device.audit_head.next_record(
            subject=schema.device_subject(device.device_id),
            at=change.at,
            action=change.action,
            actor=change.actor,
            details=details,
        )
        if any(_addresses_a_device(write) for write in with_writes):
            # Only this method writes devices: a companion write may not touch one.
            raise ValueError("a write carried with a device change may not address a device")
        updated = self._applied(device, record, new_state, change)
        sets, removes = self._attributes(change)
        # The sparse indexes follow every change (domain.rotation); a device with nothing due
        # leaves them.
        for (shard, moment), due in (
            (schema.SPARSE_INDEXES[schema.DUE_INDEX], next_deadline(updated)),
            (schema.SPARSE_INDEXES[schema.RENEWAL_INDEX], next_renewal(updated)),
        ):
            if due is None:
                removes += [shard, moment]
            else:
                sets.update({shard: due_shard(device.device_id), moment: due})
        added_keys = updated.held_keys - device.held_keys
        update = self._change_action(device, record, new_state, sets, removes, added_keys)
        actions = [update, self._table.audit_put(record), *with_writes]
        try:
            self._table.transact(actions)
        except ConditionFailed as failure:
            # The device moved on first: what the other writes refused follows from that, so
            # the caller reads the device again and decides again.
            if "device" in failure.failed:
                raise _changed(device.device_id)(failure.items) from None
            for action in actions:
                if action.name in failure.failed and action.refusal is not None:
                    raise action.refusal(failure.items) from None
            raise
        return updated

    @staticmethod
    def _attributes(change: DeviceChange) -> tuple[dict[str, Any], list[str]]:
        sets: dict[str, Any] = {}
        removes: list[str] = []
        if change.certificates is not None:
            sets["certificates"] = _certificates_to_item(change.certificates)
        for name in (
            "profile",
            "epoch",
            "tokens_not_before",
            "registered_at",
            "rotation_held_until",
        ):
            value = getattr(change, name)
            if value is not None:
                sets[name] = value
        if change.factory_certificate_id is not None:
            sets["factory_certificate_id"] = change.factory_certificate_id
        if change.owner is not None:
            sets["owner"] = change.owner
        elif change.clear_owner:
            removes.append("owner")
        if change.teardown is not None:
            sets["teardown"] = _teardown_to_item(change.teardown)
        elif change.clear_teardown:
            removes.append("teardown")
        return sets, removes

    def _change_action(
        self,
        device: Device,
        record: AuditRecord,
        new_state: DeviceState,
        sets: Mapping[str, Any],
        removes: Sequence[str],
        added_keys: frozenset[str] = frozenset(),
    ) -> Action:
        """The one Update of a device item that may write its state."""
        values: dict[str, Any] = {
            ":seq": record.seq,
            ":hash": record.hash,
            ":at": record.at,
            ":state": device.state.value,
            ":prev_seq": device.audit_head.seq,
        }
        names = {"#state": STATE}
        expressions = ["audit_seq = :seq", "audit_hash = :hash", "updated_at = :at"]
        if new_state is not device.state:
            expressions.append("#state = :new_state")
            values[":new_state"] = new_state.value
        for index, (name, value) in enumerate(sets.items()):
            names[f"#a{index}"] = name
            values[f":a{index}"] = value
            expressions.append(f"#a{index} = :a{index}")
        update = "SET " + ", ".join(expressions)
        if removes:
            for index, name in enumerate(removes):
                names[f"#r{index}"] = name
            update += " REMOVE " + ", ".join(f"#r{i}" for i in range(len(removes)))
        if added_keys:
            names["#held_keys"] = "held_keys"
            values[":held_keys"] = set(added_keys)
            update += " ADD #held_keys :held_keys"
        return Action(
            "device",
            {
                "Update": {
                    "TableName": self._table.name,
                    "Key": ser(schema.device_key(device.device_id)),
                    "UpdateExpression": update,
                    "ConditionExpression": "#state = :state AND audit_seq = :prev_seq",
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": ser(values),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )

    @staticmethod
    def _applied(
        device: Device, record: AuditRecord, new_state: DeviceState, change: DeviceChange
    ) -> Device:
        updated = replace(
            device,
            state=new_state,
            audit_head=ChainHead(seq=record.seq, hash=record.hash),
            updated_at=record.at,
        )
        if change.certificates is not None:
            updated = replace(
                updated,
                certificates=tuple(change.certificates),
                held_keys=device.held_keys
                | {key_fingerprint(c.public_key_pem) for c in change.certificates},
            )
        if change.profile is not None:
            updated = replace(updated, profile=change.profile)
        if change.epoch is not None:
            updated = replace(updated, epoch=change.epoch)
        if change.tokens_not_before is not None:
            updated = replace(updated, tokens_not_before=change.tokens_not_before)
        if change.owner is not None or change.clear_owner:
            updated = replace(updated, owner=change.owner)
        if change.teardown is not None or change.clear_teardown:
            updated = replace(updated, teardown=change.teardown)
        if change.factory_certificate_id is not None:
            updated = replace(updated, factory_certificate_id=change.factory_certificate_id)
        if change.rotation_held_until is not None:
            updated = replace(updated, rotation_held_until=change.rotation_held_until)
        return updated

    def create(self, rows: Sequence[tuple[AllowlistEntry, AuditRecord]], at: str) -> ImportOutcome:
        """Create allow-listed devices, each with the first record of its audit chain.

        Rows go in transactions of up to 50 (device + record each), so a row is written whole or
        not at all, and a device that exists is never overwritten. A device that already exists
        with the same entry counts as unchanged (a re-run import converges); with a different
        entry it is a conflict. Cancelled transactions are retried without the rows that caused
        them; conflicts with concurrent writers are retried with backoff.

        Raises:
            TransientAwsError: a chunk still failed after MAX_TRANSACTION_ATTEMPTS tries.
        """
        imported: list[str] = []
        unchanged: list[str] = []
        conflicting: list[str] = []
        for start in range(0, len(rows), ROWS_PER_TRANSACTION):
            pending = list(rows[start : start + ROWS_PER_TRANSACTION])
            attempt = 0
            while pending:
                actions: list[Action] = []
                for entry, record in pending:
                    item = _item_from_entry(entry, ChainHead(record.seq, record.hash), at)
                    actions.append(
                        Action(
                            f"device:{entry.device_id}",
                            {
                                "Put": {
                                    "TableName": self._table.name,
                                    "Item": ser(item),
                                    "ConditionExpression": "attribute_not_exists(pk)",
                                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                                }
                            },
                        )
                    )
                    actions.append(self._table.audit_put(record))
                try:
                    self._table.transact(actions)
                except ConditionFailed as failure:
                    # Every failed action settles its row: the device exists (same entry or
                    # not), or a trail exists for the id without a device (a conflict to look
                    # into). The rest of the chunk is retried; each round settles at least one.
                    failed = set(failure.failed)
                    still = []
                    for entry, record in pending:
                        device_action = f"device:{entry.device_id}"
                        if device_action in failed:
                            existing = failure.items.get(device_action, {})
                            (unchanged if same_entry(existing, entry) else conflicting).append(
                                entry.device_id
                            )
                        elif self._table.audit_put(record).name in failed:
                            conflicting.append(entry.device_id)
                        else:
                            still.append((entry, record))
                    if len(still) == len(pending):
                        raise
                    pending = still
                    continue
                except (TransientAwsError, ClientError, BotoCoreError) as exc:
                    if not isinstance(exc, TransientAwsError) and not is_transient(exc):
                        raise
                    attempt += 1
                    if attempt >= MAX_TRANSACTION_ATTEMPTS:
                        raise TransientAwsError(
                            "allow-list import could not finish; re-run it to continue"
                        ) from exc
                    jitter = random.random()  # noqa: S311 - backoff jitter, not key material
                    time.sleep(min(2.0, 0.05 * 2**attempt) * jitter)
                    continue
                imported.extend(entry.device_id for entry, _ in pending)
                pending = []
        return ImportOutcome(imported=imported, unchanged=unchanged, conflicting=conflicting)
