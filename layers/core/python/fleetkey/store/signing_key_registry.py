"""The token signing-key registry: the head item of STREAM#signing-keys holds the keys (the
`SigningKeyRegistry` port)."""

from __future__ import annotations

from typing import Any

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.ports import StaleRecord
from fleetkey.store import schema
from fleetkey.store.table import Action, Table, plain, ser

REGISTRY_STREAM = "signing-keys"


class DynamoSigningKeyRegistry:
    def __init__(self, table: Table) -> None:
        self._table = table

    def get(self) -> tuple[ChainHead, list[dict[str, Any]]]:
        """AWS calls: 1 (GetItem)."""
        item = self._table.get(schema.stream_head_key(REGISTRY_STREAM))
        if not item:
            return ChainHead(), []
        head = ChainHead(int(item["audit_seq"]), item["audit_hash"])
        keys = item.get("keys")
        # Entries are checked one by one by the reader; a list is all this layer can promise.
        return head, [plain(k) for k in keys] if isinstance(keys, list) else []

    def put(self, head: ChainHead, keys: list[dict[str, Any]], record: AuditRecord) -> None:
        """Replace the registry, conditional on it being as read (its audit head), with the
        audit record of the change. AWS calls: 1 (TransactWriteItems).

        Raises:
            StaleRecord: it changed since it was read.
        """
        key = schema.stream_head_key(REGISTRY_STREAM)
        self._table.transact_or_refuse(
            [
                Action(
                    "registry",
                    {
                        "Put": {
                            "TableName": self._table.name,
                            "Item": ser(
                                {
                                    **key,
                                    "audit_seq": record.seq,
                                    "audit_hash": record.hash,
                                    "keys": keys,
                                }
                            ),
                            "ConditionExpression": "attribute_not_exists(pk) OR audit_seq = :prev",
                            "ExpressionAttributeValues": ser({":prev": head.seq}),
                        }
                    },
                    refusal=lambda _items: StaleRecord("signing keys changed since read"),
                ),
                self._table.audit_put(record),
            ]
        )
