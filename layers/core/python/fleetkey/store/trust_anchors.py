"""Manufacturer CAs (pk CA, sk <name>; one partition, one Query) and the claims on their AWS IoT
ids (pk CAID#<id>): the `TrustAnchorStore` port."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.models import CaStatus, ManufacturerCa
from fleetkey.ports import CaChanged, CaTaken, StaleRecord, Write
from fleetkey.store import schema
from fleetkey.store.table import Action, ConditionFailed, Table, ser

# The state of a `CAID#` item that claims a CA id for a registration still under way (the final
# item, written with the CA's record, has no state).
CA_ID_REGISTERING = "registering"


def ca_from_item(item: Mapping[str, Any]) -> ManufacturerCa:
    return ManufacturerCa(
        name=item["sk"],
        iot_ca_id=item["iot_ca_id"],
        certificate_pem=item["certificate_pem"],
        status=CaStatus(item["status"]),
        audit_head=ChainHead(seq=int(item["audit_seq"]), hash=item["audit_hash"]),
        registered_at=item.get("registered_at"),
    )


def _taken(failure: ConditionFailed) -> CaTaken:
    ca = failure.items.get("ca")
    holder = failure.items.get("ca_id", {}).get("name")
    return CaTaken(
        existing=ca_from_item(ca) if ca and "ca" in failure.failed else None,
        id_holder=holder if isinstance(holder, str) and "ca_id" in failure.failed else None,
    )


class DynamoTrustAnchorStore:
    def __init__(self, table: Table) -> None:
        self._table = table

    def get(self, name: str) -> ManufacturerCa | None:
        item = self._table.get(schema.ca_key(name))
        return ca_from_item(item) if item else None

    def list(self) -> list[ManufacturerCa]:
        """All manufacturer CAs: one Query of their partition (there are few)."""
        return [ca_from_item(i) for i in self._table.query(schema.CA_PK)]

    def claim_id(self, iot_ca_id: str, name: str, *, stale_claim_of: str | None = None) -> None:
        """Claim the CA id for `name` before AWS IoT hears of the CA (`CAID#<id>`, state
        "registering"): a retry of the same registration finds its own claim and may adopt the CA
        it finds in AWS IoT; anyone else's CA there is not adopted. Idempotent for the same name.
        One TransactWriteItems of one Put (so a failed condition reports the item as the other
        CA writes do).

        `stale_claim_of` names another name's claim that this one may replace, still only while
        it is a claim (its registration never recorded the CA: it was refused or abandoned).

        Raises:
            CaTaken: the id is claimed or registered under another name (`id_holder`), or
                already registered under this one.
        """
        names = [name] if stale_claim_of is None else [name, stale_claim_of]
        try:
            self._table.transact(
                [
                    Action(
                        "ca_id",
                        {
                            "Put": {
                                "TableName": self._table.name,
                                "Item": ser(
                                    {
                                        **schema.ca_id_key(iot_ca_id),
                                        "name": name,
                                        "state": CA_ID_REGISTERING,
                                    }
                                ),
                                "ConditionExpression": (
                                    "attribute_not_exists(pk) OR "
                                    "(#name IN ("
                                    + ", ".join(f":n{i}" for i in range(len(names)))
                                    + ") AND #state = :claim)"
                                ),
                                "ExpressionAttributeNames": {"#name": "name", "#state": "state"},
                                "ExpressionAttributeValues": ser(
                                    {
                                        **{f":n{i}": n for i, n in enumerate(names)},
                                        ":claim": CA_ID_REGISTERING,
                                    }
                                ),
                                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                            }
                        },
                    )
                ]
            )
        except ConditionFailed as failure:
            raise _taken(failure) from None

    def create(self, ca: ManufacturerCa, record: AuditRecord) -> None:
        """Record a new trust anchor, turning this name's claim on the CA id (`claim_id`) into
        the final `CAID#` item. A name holds one CA and a CA has one name.

        Raises:
            CaTaken: the name is taken (`existing`) and/or this CA is claimed or registered
                under another name (`id_holder`).
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
        try:
            self._table.transact(
                [
                    Action(
                        "ca",
                        {
                            "Put": {
                                "TableName": self._table.name,
                                "Item": ser(item),
                                "ConditionExpression": "attribute_not_exists(pk)",
                                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                            }
                        },
                    ),
                    Action(
                        "ca_id",
                        {
                            "Put": {
                                "TableName": self._table.name,
                                "Item": ser({**schema.ca_id_key(ca.iot_ca_id), "name": ca.name}),
                                # Only a claim of this same name may become the record (or none,
                                # for a CA id recorded directly).
                                "ConditionExpression": (
                                    "attribute_not_exists(pk) OR "
                                    "(#name = :name AND #state = :claim)"
                                ),
                                "ExpressionAttributeNames": {"#name": "name", "#state": "state"},
                                "ExpressionAttributeValues": ser(
                                    {":name": ca.name, ":claim": CA_ID_REGISTERING}
                                ),
                                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                            }
                        },
                    ),
                    self._table.audit_put(record),
                ]
            )
        except ConditionFailed as failure:
            raise _taken(failure) from None

    def claim_for(self, iot_ca_id: str) -> tuple[str, bool] | None:
        """The name the CA with AWS IoT id `iot_ca_id` is registered or being registered under,
        and whether that is still only a claim (its registration has not recorded it); None
        when fleetkey has neither. One GetItem (strongly consistent)."""
        item = self._table.get(schema.ca_id_key(iot_ca_id))
        name = item.get("name") if item else None
        if item is None or not isinstance(name, str):
            return None
        return name, item.get("state") == CA_ID_REGISTERING

    def set_status(
        self, ca: ManufacturerCa, status: CaStatus, record: AuditRecord
    ) -> ManufacturerCa:
        """Raises StaleRecord if the CA changed since it was read."""
        update = Action(
            "ca",
            {
                "Update": {
                    "TableName": self._table.name,
                    "Key": ser(schema.ca_key(ca.name)),
                    "UpdateExpression": "SET #status = :new, audit_seq = :seq, audit_hash = :hash",
                    "ConditionExpression": "#status = :old AND audit_seq = :prev_seq",
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": ser(
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
            refusal=lambda _items: StaleRecord(f"manufacturer CA {ca.name} changed"),
        )
        self._table.transact_or_refuse([update, self._table.audit_put(record)])
        return replace(ca, status=status, audit_head=ChainHead(record.seq, record.hash))

    def active_check(self, ca: ManufacturerCa) -> Write:
        """The CA is ACTIVE and still the one of that AWS IoT id (refusal: CaChanged)."""
        return Action(
            "ca",
            {
                "ConditionCheck": {
                    "TableName": self._table.name,
                    "Key": ser(schema.ca_key(ca.name)),
                    "ConditionExpression": "#status = :active AND iot_ca_id = :id",
                    "ExpressionAttributeNames": {"#status": "status"},
                    "ExpressionAttributeValues": ser(
                        {":active": CaStatus.ACTIVE.value, ":id": ca.iot_ca_id}
                    ),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
            refusal=lambda _items: CaChanged(f"manufacturer CA {ca.name} changed"),
        )
