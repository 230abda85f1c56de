"""Device data keys, only ever KMS-wrapped: pk DATAKEY#<device_id>, sk EPOCH#<epoch> (the
`DataKeyRecords` port). One per device life; destroyed at decommission (and so before any
transfer of ownership)."""

from __future__ import annotations

from fleetkey.ports import AlreadyExists, Write
from fleetkey.store import schema
from fleetkey.store.table import Action, Table, ser


class DynamoDataKeyRecords:
    def __init__(self, table: Table) -> None:
        self._table = table

    def get(self, device_id: str, epoch: int) -> bytes | None:
        """AWS calls: 1 (GetItem)."""
        item = self._table.get(schema.data_key_key(device_id, epoch))
        return bytes(item["blob"]) if item else None

    def put(self, device_id: str, epoch: int, blob: bytes) -> Write:
        """The Put of a life's first data key, for the transaction that records its creation in
        the device's chain (refusal: AlreadyExists, a concurrent first request won)."""
        return Action(
            "data_key",
            {
                "Put": {
                    "TableName": self._table.name,
                    "Item": ser({**schema.data_key_key(device_id, epoch), "blob": blob}),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
            refusal=lambda _items: AlreadyExists(f"device {device_id} has a data key"),
        )

    def destroy(self, device_id: str, *, up_to_epoch: int) -> int:
        """Delete the device's data keys of every life up to `up_to_epoch` (never a later
        life's: a late copy of an old teardown must not touch the next owner's key). Returns how
        many were deleted. AWS calls: 1 Query + 1 DeleteItem per key."""
        items = [
            item
            for item in self._table.query(schema.data_key_partition(device_id))
            if int(str(item["sk"]).removeprefix("EPOCH#")) <= up_to_epoch
        ]
        for item in items:
            self._table.client.delete_item(
                TableName=self._table.name,
                Key=ser({schema.PARTITION_KEY: item["pk"], schema.SORT_KEY: item["sk"]}),
            )
        return len(items)
