"""DynamoDB store. Every state change is one conditional write (a transaction where a change and
its audit record must land together); nothing is ever read-modify-written without a condition.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import create_parser

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code, is_transient
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import (
    CaStatus,
    CertificateOutcome,
    CertificateRecord,
    Device,
    ManufacturerCa,
)
from fleetkey.errors import TransientAwsError
from fleetkey.store import schema

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import TransactWriteItemTypeDef

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

# DynamoDB allows 100 actions per transaction; an allow-list row is two (device + first record).
ROWS_PER_TRANSACTION = 50
MAX_TRANSACTION_ATTEMPTS = 8
# Cancellation reasons a retry can outlast (the others, e.g. ValidationError, are our bug).
TRANSIENT_CANCELLATION_CODES = frozenset(
    {
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    }
)


def _plain(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal; the registry holds whole numbers only."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return int(value)
    return value


def _ser(item: dict[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(v) for k, v in item.items() if v is not None}


def _de(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deserializer.deserialize(v) for k, v in item.items()}


@dataclass
class ConditionFailed(Exception):
    """A transaction was cancelled because named conditions failed.

    `failed` names the actions whose condition failed; `items` holds, by name, the item as it was
    (for the actions that asked for it), so the caller can decide without another read.
    """

    failed: list[str]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"conditions failed: {', '.join(self.failed)}"


@dataclass(frozen=True, slots=True)
class Action:
    """One named action of a transaction."""

    name: str
    body: TransactWriteItemTypeDef


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    imported: list[str]
    unchanged: list[str]
    conflicting: list[str]


def _device_from_item(item: dict[str, Any]) -> Device:
    return Device(
        device_id=item["device_id"],
        serial_number=item["serial_number"],
        manufacturer_ca=item["manufacturer_ca"],
        profile=item["profile"],
        state=DeviceState(item["state"]),
        audit_head=ChainHead(seq=int(item["audit_seq"]), hash=item["audit_hash"]),
        public_key_fingerprint=item.get("public_key_fingerprint"),
        attributes=dict(item.get("attributes") or {}),
        certificate_id=item.get("certificate_id"),
        certificate_public_key=item.get("certificate_public_key"),
        certificate_key=item.get("certificate_key"),
        certificate_not_after=item.get("certificate_not_after"),
        created_at=item.get("created_at"),
        updated_at=item.get("updated_at"),
    )


def _ca_from_item(item: dict[str, Any]) -> ManufacturerCa:
    return ManufacturerCa(
        name=item["sk"],
        iot_ca_id=item["iot_ca_id"],
        certificate_pem=item["certificate_pem"],
        status=CaStatus(item["status"]),
        audit_head=ChainHead(seq=int(item["audit_seq"]), hash=item["audit_hash"]),
        registered_at=item.get("registered_at"),
    )


def _certificate_from_item(item: dict[str, Any]) -> CertificateRecord:
    return CertificateRecord(
        certificate_id=item["certificate_id"],
        outcome=CertificateOutcome(item["outcome"]),
        device_id=item.get("device_id"),
        reason=item.get("reason"),
        decided_at=item["decided_at"],
    )


def device_from_entry(entry: AllowlistEntry, head: ChainHead, at: str) -> dict[str, Any]:
    return {
        **schema.device_key(entry.device_id),
        "device_id": entry.device_id,
        "serial_number": entry.serial_number,
        "manufacturer_ca": entry.manufacturer_ca,
        "profile": entry.profile,
        "public_key_fingerprint": entry.public_key_fingerprint,
        "attributes": dict(entry.attributes),
        "state": DeviceState.ALLOWLISTED.value,
        "audit_seq": head.seq,
        "audit_hash": head.hash,
        "created_at": at,
        "updated_at": at,
    }


def same_entry(item: dict[str, Any], entry: AllowlistEntry) -> bool:
    """Is the stored device the allow-list entry `entry` describes (whatever its state)?"""
    return (
        item.get("serial_number") == entry.serial_number
        and item.get("manufacturer_ca") == entry.manufacturer_ca
        and item.get("profile") == entry.profile
        and item.get("public_key_fingerprint") == entry.public_key_fingerprint
        and dict(item.get("attributes") or {}) == dict(entry.attributes)
    )


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What authenticates a device at the token endpoint: a projection of its item."""

    device_id: str
    state: DeviceState
    profile: str
    certificate_id: str | None = None
    certificate_public_key: str | None = None  # PEM
    certificate_key: str | None = None  # "ec:secp256r1", "rsa:2048"
    certificate_not_after: str | None = None  # ISO 8601

    def certificate_not_after_epoch(self) -> int | None:
        if not self.certificate_not_after:
            return None
        return int(datetime.fromisoformat(self.certificate_not_after).timestamp())


# The item's attributes the token path reads (see `Store.get_device_credential`); `state` is a
# DynamoDB reserved word, so every name goes through ExpressionAttributeNames.
DEVICE_CREDENTIAL_FIELDS = (
    "device_id",
    "state",
    "profile",
    "certificate_id",
    "certificate_public_key",
    "certificate_key",
    "certificate_not_after",
)
_DEVICE_CREDENTIAL_NAMES = {f"#f{i}": name for i, name in enumerate(DEVICE_CREDENTIAL_FIELDS)}
_DEVICE_CREDENTIAL_PROJECTION = ", ".join(_DEVICE_CREDENTIAL_NAMES)

# DECOY, never a device: the GetItem response body of an ACTIVE P-256 device with every projected
# field, of typical sizes (a P-256 key's PEM is 178 characters). A miss in
# `get_device_credential` parses and decodes it so that an unknown device costs the CPU a known
# one costs. Its values are placeholders (the "key" is not a key) and nothing reads the result.
_DECOY_DEVICE_RESPONSE = json.dumps(
    {
        "Item": {
            "device_id": {"S": "decoy-device-0000"},
            "state": {"S": DeviceState.ACTIVE.value},
            "profile": {"S": "telemetry-sensor"},
            "certificate_id": {"S": "0" * 64},
            "certificate_public_key": {
                "S": "-----BEGIN PUBLIC KEY-----\n"
                + "A" * 64
                + "\n"
                + "A" * 60
                + "\n-----END PUBLIC KEY-----\n"
            },
            "certificate_key": {"S": "ec:secp256r1"},
            "certificate_not_after": {"S": "2036-01-01T00:00:00.000+00:00"},
        }
    },
    separators=(",", ":"),
).encode()


def _credential_from_item(item: dict[str, Any]) -> DeviceCredential:
    return DeviceCredential(
        device_id=item["device_id"],
        state=DeviceState(item["state"]),
        profile=item["profile"],
        certificate_id=item.get("certificate_id"),
        certificate_public_key=item.get("certificate_public_key"),
        certificate_key=item.get("certificate_key"),
        certificate_not_after=item.get("certificate_not_after"),
    )


class Store:
    """The fleetkey table. `client` is a boto3 DynamoDB client; None builds a real one."""

    def __init__(
        self, table_name: str, client: DynamoDBClient | None = None, region: str | None = None
    ) -> None:
        self.table = table_name
        self._client: DynamoDBClient = client or aws_client("dynamodb", region)

    # ---- reads -----------------------------------------------------------------------------

    def _get(self, key: dict[str, str]) -> dict[str, Any] | None:
        response = self._client.get_item(TableName=self.table, Key=_ser(key), ConsistentRead=True)
        item = response.get("Item")
        return _de(item) if item else None

    def get_device(self, device_id: str) -> Device | None:
        item = self._get(schema.device_key(device_id))
        return _device_from_item(item) if item else None

    def get_device_credential(self, device_id: str) -> DeviceCredential | None:
        """The fields of a device that authenticate it (state, profile, current certificate and
        its key), read with a projection: a fraction of the item, for the token path.

        A miss costs the decoding a hit costs: botocore's parsing of a response holding the item
        and its deserialization, done on `_DECOY_DEVICE_RESPONSE` and thrown away, so that the
        caller's CPU time does not tell an unknown device from a known one (without it an unknown
        device was refused ~0.3 ms faster, measured by benchmarks/token_timing.py).

        AWS calls: 1 (GetItem, strongly consistent, `ProjectionExpression` of
        `DEVICE_CREDENTIAL_FIELDS`).

        Raises:
            botocore ClientError/BotoCoreError: DynamoDB refused or could not be reached.
        """
        response = self._client.get_item(
            TableName=self.table,
            Key=_ser(schema.device_key(device_id)),
            ConsistentRead=True,
            ProjectionExpression=_DEVICE_CREDENTIAL_PROJECTION,
            ExpressionAttributeNames=_DEVICE_CREDENTIAL_NAMES,
        )
        item = response.get("Item")
        if item:
            return _credential_from_item(_de(item))
        self._decode_decoy_device()
        return None

    def _decode_decoy_device(self) -> None:
        """Equal work for a miss (see `get_device_credential`): parse a decoy GetItem response
        with this client's own response parser and decode its item exactly as a hit is decoded,
        then drop the result. The decoy is nobody's: it is never returned or compared."""
        operation = self._client.meta.service_model.operation_model("GetItem")
        if operation.output_shape is None:  # never for GetItem; keeps the types honest
            return
        parsed = create_parser(operation.metadata["protocol"]).parse(
            {"status_code": 200, "headers": {}, "body": _DECOY_DEVICE_RESPONSE},
            operation.output_shape,
        )
        _credential_from_item(_de(parsed["Item"]))

    def get_certificate(self, certificate_id: str) -> CertificateRecord | None:
        item = self._get(schema.certificate_key(certificate_id))
        return _certificate_from_item(item) if item else None

    def certificate_head(self, certificate_id: str) -> ChainHead | None:
        item = self._get(schema.certificate_key(certificate_id))
        if not item or "audit_seq" not in item:
            return None
        return ChainHead(int(item["audit_seq"]), item["audit_hash"])

    def get_ca(self, name: str) -> ManufacturerCa | None:
        item = self._get(schema.ca_key(name))
        return _ca_from_item(item) if item else None

    def list_cas(self) -> list[ManufacturerCa]:
        """All manufacturer CAs: one Query of their partition (there are few)."""
        return [_ca_from_item(i) for i in self._query(schema.CA_PK)]

    def read_audit(self, subject: str) -> list[tuple[str, str]]:
        """The subject's audit records as (body, hash), oldest first."""
        items = self._query(schema.subject_partition(subject), sk_prefix=schema.AUDIT_PREFIX)
        return [(i["body"], i["hash"]) for i in items]

    def _query(self, pk: str, sk_prefix: str | None = None) -> list[dict[str, Any]]:
        condition = "pk = :pk"
        values: dict[str, Any] = {":pk": pk}
        if sk_prefix:
            condition += " AND begins_with(sk, :prefix)"
            values[":prefix"] = sk_prefix
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": condition,
            "ExpressionAttributeValues": _ser(values),
            "ConsistentRead": True,
        }
        items: list[dict[str, Any]] = []
        while True:
            response = self._client.query(**kwargs)
            items.extend(_de(i) for i in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return items
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    # ---- building blocks of transactions ----------------------------------------------------

    def _audit_put(self, record: AuditRecord) -> Action:
        item = {
            **schema.audit_key(record.subject, record.seq),
            "subject": record.subject,
            "seq": record.seq,
            "at": record.at,
            "action": record.action,
            "body": record.body,
            "hash": record.hash,
        }
        return Action(
            f"audit:{record.subject}:{record.seq}",
            {
                "Put": {
                    "TableName": self.table,
                    "Item": _ser(item),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
        )

    def certificate_put(
        self,
        certificate_id: str,
        outcome: CertificateOutcome,
        *,
        device_id: str | None,
        reason: str | None,
        at: str,
        extra: dict[str, Any] | None = None,
    ) -> Action:
        """Record fleetkey's decision on a certificate, once: a second decision is a conflict."""
        item = {
            **schema.certificate_key(certificate_id),
            "certificate_id": certificate_id,
            "outcome": outcome.value,
            "device_id": device_id,
            "reason": reason,
            "decided_at": at,
            **(extra or {}),
        }
        return Action(
            "certificate",
            {
                "Put": {
                    "TableName": self.table,
                    "Item": _ser(item),
                    "ConditionExpression": "attribute_not_exists(pk)",
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )

    def ca_active_check(self, ca: ManufacturerCa) -> Action:
        return Action(
            "ca",
            {
                "ConditionCheck": {
                    "TableName": self.table,
                    "Key": _ser(schema.ca_key(ca.name)),
                    "ConditionExpression": "#status = :active AND iot_ca_id = :id",
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": _ser(
                        {":active": CaStatus.ACTIVE.value, ":id": ca.iot_ca_id}
                    ),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )

    def device_absent_check(self, device_id: str) -> Action:
        return Action(
            "device",
            {
                "ConditionCheck": {
                    "TableName": self.table,
                    "Key": _ser(schema.device_key(device_id)),
                    "ConditionExpression": "attribute_not_exists(pk)",
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )

    def _transact(self, actions: list[Action]) -> None:
        """Run a transaction; a cancelled one raises ConditionFailed naming the failed actions."""
        try:
            self._client.transact_write_items(TransactItems=[a.body for a in actions])
        except ClientError as exc:
            if error_code(exc) != "TransactionCanceledException":
                raise
            reasons = exc.response.get("CancellationReasons") or []
            failed, items, other = [], {}, set()
            # AWS gives one reason per action; none at all when the response carries no reasons.
            for action, reason in zip(actions, reasons, strict=False):
                code = reason.get("Code")
                if code == "ConditionalCheckFailed":
                    failed.append(action.name)
                    if reason.get("Item"):
                        items[action.name] = _de(reason["Item"])
                elif code not in (None, "None"):
                    other.add(code)
            if failed:
                raise ConditionFailed(failed, items) from None
            if other and other <= TRANSIENT_CANCELLATION_CODES:
                # Another transaction touched the same items, or capacity ran short; a retry of
                # the same request converges.
                raise TransientAwsError(
                    f"transaction cancelled: {', '.join(sorted(other))}"
                ) from exc
            raise

    # ---- devices ----------------------------------------------------------------------------

    def refuse_certificate(
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

        Raises:
            ConditionFailed: 'certificate' (already decided; the earlier decision is attached)
                and/or 'device' (the device exists; its item is attached).
            ValueError: `unless_device_exists` without a `claimed_device_id` to look up.
        """
        actions: list[Action] = []
        if unless_device_exists:
            if claimed_device_id is None:
                raise ValueError("unless_device_exists needs the claimed device id")
            actions.append(self.device_absent_check(claimed_device_id))
        actions += [
            self.certificate_put(
                certificate_id,
                CertificateOutcome.REFUSED,
                device_id=claimed_device_id,
                reason=record.details.get("reason"),
                at=at,
                extra={"audit_seq": record.seq, "audit_hash": record.hash},
            ),
            self._audit_put(record),
        ]
        self._transact(actions)

    def update_device(
        self,
        device: Device,
        record: AuditRecord,
        *,
        new_state: DeviceState | None = None,
        set_attributes: dict[str, Any] | None = None,
        extra: Iterable[Action] = (),
    ) -> Device:
        """Append `record` to the device's chain and apply the change in the same transaction,
        conditional on the device still being exactly as read (state and audit head).

        Raises:
            ConditionFailed: 'device' when the device changed since it was read (its current item
                is attached), or the names of failed `extra` actions.
        """
        # A caller's bug, not a race: raised even under `python -O`, before anything is written.
        if record.seq != device.audit_head.seq + 1 or record.prev_hash != device.audit_head.hash:
            raise AssertionError("the audit record does not extend the device's chain head")
        values: dict[str, Any] = {
            ":seq": record.seq,
            ":hash": record.hash,
            ":at": record.at,
            ":state": device.state.value,
            ":prev_seq": device.audit_head.seq,
        }
        names = {"#state": "state"}
        sets = ["audit_seq = :seq", "audit_hash = :hash", "updated_at = :at"]
        if new_state is not None:
            sets.append("#state = :new_state")
            values[":new_state"] = new_state.value
        for index, (name, value) in enumerate((set_attributes or {}).items()):
            names[f"#a{index}"] = name
            values[f":a{index}"] = value
            sets.append(f"#a{index} = :a{index}")
        update = Action(
            "device",
            {
                "Update": {
                    "TableName": self.table,
                    "Key": _ser(schema.device_key(device.device_id)),
                    "UpdateExpression": "SET " + ", ".join(sets),
                    "ConditionExpression": "#state = :state AND audit_seq = :prev_seq",
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": _ser(values),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )
        self._transact([update, self._audit_put(record), *extra])
        changes: dict[str, Any] = {
            "audit_head": ChainHead(seq=record.seq, hash=record.hash),
            "updated_at": record.at,
        }
        if new_state is not None:
            changes["state"] = new_state
        for name, value in (set_attributes or {}).items():
            if name in Device.__dataclass_fields__:
                changes[name] = value
        return replace(device, **changes)

    def create_devices(
        self, rows: list[tuple[AllowlistEntry, AuditRecord]], at: str
    ) -> ImportOutcome:
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
            pending = rows[start : start + ROWS_PER_TRANSACTION]
            attempt = 0
            while pending:
                actions: list[Action] = []
                for entry, record in pending:
                    item = device_from_entry(entry, ChainHead(record.seq, record.hash), at)
                    actions.append(
                        Action(
                            f"device:{entry.device_id}",
                            {
                                "Put": {
                                    "TableName": self.table,
                                    "Item": _ser(item),
                                    "ConditionExpression": "attribute_not_exists(pk)",
                                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                                }
                            },
                        )
                    )
                    actions.append(self._audit_put(record))
                try:
                    self._transact(actions)
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
                        elif self._audit_put(record).name in failed:
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

    def append_to_stream(
        self, stream: str, *, action: str, actor: str, details: dict[str, Any], at: str
    ) -> AuditRecord:
        """Append a record to a stream chain (a subject with no item of its own), retrying
        when a concurrent writer moved the head.

        Raises:
            TransientAwsError: the head kept moving for MAX_TRANSACTION_ATTEMPTS tries.
        """
        subject = f"stream:{stream}"
        key = schema.stream_head_key(stream)
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            item = self._get(key)
            head = ChainHead(int(item["audit_seq"]), item["audit_hash"]) if item else ChainHead()
            record = head.next_record(
                subject=subject, at=at, action=action, actor=actor, details=details
            )
            put_head = Action(
                "head",
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": _ser({**key, "audit_seq": record.seq, "audit_hash": record.hash}),
                        "ConditionExpression": "attribute_not_exists(pk) OR audit_seq = :prev",
                        "ExpressionAttributeValues": _ser({":prev": head.seq}),
                    }
                },
            )
            try:
                self._transact([put_head, self._audit_put(record)])
                return record
            except ConditionFailed:
                continue
        raise TransientAwsError(f"could not append to audit stream {stream}")

    def stream_head(self, stream: str) -> ChainHead:
        item = self._get(schema.stream_head_key(stream))
        return ChainHead(int(item["audit_seq"]), item["audit_hash"]) if item else ChainHead()

    # ---- tokens ---------------------------------------------------------------------------

    def use_assertion(
        self, device_id: str, jti: str, expires_at: int, now: int, nonce: str | None = None
    ) -> None:
        """Record a client assertion's jti as used (and consume its challenge nonce), in one
        conditional write. A jti may be reused only once its earlier assertion has expired.

        Raises:
            ConditionFailed: 'jti' (a replay) and/or 'nonce' (unknown, used or expired).
        """
        actions = [
            Action(
                "jti",
                {
                    "Put": {
                        "TableName": self.table,
                        "Item": _ser(
                            {
                                **schema.assertion_key(device_id, jti),
                                schema.TTL_ATTRIBUTE: expires_at,
                            }
                        ),
                        "ConditionExpression": "attribute_not_exists(pk) OR #exp < :now",
                        "ExpressionAttributeNames": {"#exp": schema.TTL_ATTRIBUTE},
                        "ExpressionAttributeValues": _ser({":now": now}),
                    }
                },
            )
        ]
        if nonce is not None:
            actions.append(
                Action(
                    "nonce",
                    {
                        "Delete": {
                            "TableName": self.table,
                            "Key": _ser(schema.nonce_key(nonce)),
                            "ConditionExpression": "attribute_exists(pk) AND #exp >= :now",
                            "ExpressionAttributeNames": {"#exp": schema.TTL_ATTRIBUTE},
                            "ExpressionAttributeValues": _ser({":now": now}),
                        }
                    },
                )
            )
        self._transact(actions)

    def put_nonce(self, nonce: str, expires_at: int) -> None:
        self._client.put_item(
            TableName=self.table,
            Item=_ser({**schema.nonce_key(nonce), schema.TTL_ATTRIBUTE: expires_at}),
            ConditionExpression="attribute_not_exists(pk)",
        )

    def revoke_token(self, jti: str, expires_at: int) -> None:
        self._client.put_item(
            TableName=self.table,
            Item=_ser({**schema.revoked_token_key(jti), schema.TTL_ATTRIBUTE: expires_at}),
        )

    def is_token_revoked(self, jti: str, now: int) -> bool:
        item = self._get(schema.revoked_token_key(jti))
        if not item:
            return False
        return int(item[schema.TTL_ATTRIBUTE]) >= now

    def get_signing_keys(self) -> tuple[ChainHead, list[dict[str, Any]]]:
        item = self._get(schema.stream_head_key("signing-keys"))
        if not item:
            return ChainHead(), []
        head = ChainHead(int(item["audit_seq"]), item["audit_hash"])
        keys = item.get("keys")
        # Entries are checked one by one by the reader; a list is all this layer can promise.
        return head, [_plain(k) for k in keys] if isinstance(keys, list) else []

    def put_signing_keys(
        self, head: ChainHead, keys: list[dict[str, Any]], record: AuditRecord
    ) -> None:
        """Replace the signing-key registry, conditional on it being as read (its audit head),
        with the audit record of the change.

        Raises:
            ConditionFailed('registry'): it changed since it was read.
        """
        key = schema.stream_head_key("signing-keys")
        self._transact(
            [
                Action(
                    "registry",
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": _ser(
                                {
                                    **key,
                                    "audit_seq": record.seq,
                                    "audit_hash": record.hash,
                                    "keys": keys,
                                }
                            ),
                            "ConditionExpression": "attribute_not_exists(pk) OR audit_seq = :prev",
                            "ExpressionAttributeValues": _ser({":prev": head.seq}),
                        }
                    },
                ),
                self._audit_put(record),
            ]
        )

    # ---- manufacturer CAs -------------------------------------------------------------------

    # The state of a `CAID#` item that claims a CA id for a registration still under way (the
    # final item, written with the CA's record, has no state).
    CA_ID_REGISTERING = "registering"

    def claim_ca_id(self, iot_ca_id: str, name: str, *, stale_claim_of: str | None = None) -> None:
        """Claim the CA id for `name` before AWS IoT hears of the CA (`CAID#<id>`, state
        "registering"): a retry of the same registration finds its own claim and may adopt the CA
        it finds in AWS IoT; anyone else's CA there is not adopted. Idempotent for the same name.
        One TransactWriteItems of one Put (so a failed condition reports the item as the other
        CA writes do).

        `stale_claim_of` names another name's claim that this one may replace, still only while
        it is a claim (its registration never recorded the CA: it was refused or abandoned).

        Raises:
            ConditionFailed('ca_id'): the id is claimed or registered under another name, or
                already registered (the item is attached).
        """
        names = [name] if stale_claim_of is None else [name, stale_claim_of]
        self._transact(
            [
                Action(
                    "ca_id",
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": _ser(
                                {
                                    **schema.ca_id_key(iot_ca_id),
                                    "name": name,
                                    "state": self.CA_ID_REGISTERING,
                                }
                            ),
                            "ConditionExpression": (
                                "attribute_not_exists(pk) OR "
                                "(#name IN ("
                                + ", ".join(f":n{i}" for i in range(len(names)))
                                + ") AND #state = :claim)"
                            ),
                            "ExpressionAttributeNames": {"#name": "name", "#state": "state"},
                            "ExpressionAttributeValues": _ser(
                                {
                                    **{f":n{i}": n for i, n in enumerate(names)},
                                    ":claim": self.CA_ID_REGISTERING,
                                }
                            ),
                            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                        }
                    },
                )
            ]
        )

    def create_ca(self, ca: ManufacturerCa, record: AuditRecord) -> None:
        """Record a new trust anchor, turning this name's claim on the CA id (`claim_ca_id`) into
        the final `CAID#` item. A name holds one CA and a CA has one name.

        Raises:
            ConditionFailed: 'ca' (the name is taken; that CA is attached) and/or 'ca_id' (this
                CA is claimed or registered under another name, attached as {"name": ...}).
        """
        item = {
            **schema.ca_key(ca.name),
            "iot_ca_id": ca.iot_ca_id,
            "certificate_pem": ca.certificate_pem,
            "status": ca.status.value,
            "audit_seq": record.seq,
            "audit_hash": record.hash,
            "registered_at": ca.registered_at,
        }
        self._transact(
            [
                Action(
                    "ca",
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": _ser(item),
                            "ConditionExpression": "attribute_not_exists(pk)",
                            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                        }
                    },
                ),
                Action(
                    "ca_id",
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": _ser({**schema.ca_id_key(ca.iot_ca_id), "name": ca.name}),
                            # Only a claim of this same name may become the record (or none,
                            # for a CA id recorded directly).
                            "ConditionExpression": (
                                "attribute_not_exists(pk) OR (#name = :name AND #state = :claim)"
                            ),
                            "ExpressionAttributeNames": {"#name": "name", "#state": "state"},
                            "ExpressionAttributeValues": _ser(
                                {":name": ca.name, ":claim": self.CA_ID_REGISTERING}
                            ),
                            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                        }
                    },
                ),
                self._audit_put(record),
            ]
        )

    def ca_claim_for(self, iot_ca_id: str) -> tuple[str, bool] | None:
        """The name the CA with AWS IoT id `iot_ca_id` is registered or being registered under,
        and whether that is still only a claim (its registration has not recorded it); None
        when fleetkey has neither. One GetItem (strongly consistent)."""
        item = self._get(schema.ca_id_key(iot_ca_id))
        name = item.get("name") if item else None
        if item is None or not isinstance(name, str):
            return None
        return name, item.get("state") == self.CA_ID_REGISTERING

    def set_ca_status(
        self, ca: ManufacturerCa, status: CaStatus, record: AuditRecord
    ) -> ManufacturerCa:
        """Raises ConditionFailed('ca') if the CA changed since it was read."""
        update = Action(
            "ca",
            {
                "Update": {
                    "TableName": self.table,
                    "Key": _ser(schema.ca_key(ca.name)),
                    "UpdateExpression": "SET #status = :new, audit_seq = :seq, audit_hash = :hash",
                    "ConditionExpression": "#status = :old AND audit_seq = :prev_seq",
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": _ser(
                        {
                            ":new": status.value,
                            ":old": ca.status.value,
                            ":seq": record.seq,
                            ":hash": record.hash,
                            ":prev_seq": ca.audit_head.seq,
                        }
                    ),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )
        self._transact([update, self._audit_put(record)])
        return replace(ca, status=status, audit_head=ChainHead(record.seq, record.hash))

    # ---- decoding helpers for callers that received items from ConditionFailed ------------

    @staticmethod
    def device_from_item(item: dict[str, Any]) -> Device:
        return _device_from_item(item)

    @staticmethod
    def certificate_from_item(item: dict[str, Any]) -> CertificateRecord:
        return _certificate_from_item(item)

    @staticmethod
    def ca_from_item(item: dict[str, Any]) -> ManufacturerCa:
        return _ca_from_item(item)
