"""Audit chains (the `AuditLog` port): any subject's records, and streams, chains of events with
no record of their own (pk STREAM#<name>: a HEAD item and the records)."""

from __future__ import annotations

from typing import Any

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.errors import TransientAwsError
from fleetkey.store import schema
from fleetkey.store.table import MAX_TRANSACTION_ATTEMPTS, Action, ConditionFailed, Table, ser

# The name of a stream head's Put in a transaction (`ConditionFailed.failed` names it when another
# append moved the head first).
STREAM_HEAD_WRITE = "stream-head"


class DynamoAuditLog:
    def __init__(self, table: Table) -> None:
        self._table = table

    def read(self, subject: str) -> list[tuple[str, str]]:
        """The subject's audit records as (body, hash), oldest first (one Query, all pages)."""
        items = self._table.query(schema.subject_partition(subject), sk_prefix=schema.AUDIT_PREFIX)
        return [(i["body"], i["hash"]) for i in items]

    def stream_writes(
        self, stream: str, *, action: str, actor: str, details: dict[str, Any], at: str
    ) -> tuple[AuditRecord, list[Action]]:
        """The next record of a stream chain and the writes that append it (the head's
        conditional Put, named STREAM_HEAD_WRITE, and the record's Put), for a transaction that
        makes the change the record is about: the two land together or not at all. When the
        head's condition fails, another append landed first: make the writes again and retry.

        AWS calls: 1 (GetItem of the head).
        """
        subject = f"stream:{stream}"
        key = schema.stream_head_key(stream)
        item = self._table.get(key)
        head = ChainHead(int(item["audit_seq"]), item["audit_hash"]) if item else ChainHead()
        record = head.next_record(
            subject=subject, at=at, action=action, actor=actor, details=details
        )
        put_head = Action(
            STREAM_HEAD_WRITE,
            {
                "Put": {
                    "TableName": self._table.name,
                    "Item": ser({**key, "audit_seq": record.seq, "audit_hash": record.hash}),
                    "ConditionExpression": "attribute_not_exists(pk) OR audit_seq = :prev",
                    "ExpressionAttributeValues": ser({":prev": head.seq}),
                }
            },
        )
        return record, [put_head, self._table.audit_put(record)]

    def append_to_stream(
        self, stream: str, *, action: str, actor: str, details: dict[str, Any], at: str
    ) -> AuditRecord:
        """Append a record to a stream chain, retrying when a concurrent writer moved the head.

        AWS calls: 2 (GetItem of the head, a transaction of head and record), more on races.

        Raises:
            TransientAwsError: the head kept moving for MAX_TRANSACTION_ATTEMPTS tries.
        """
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            record, writes = self.stream_writes(
                stream, action=action, actor=actor, details=details, at=at
            )
            try:
                self._table.transact(writes)
                return record
            except ConditionFailed:
                continue
        raise TransientAwsError(f"could not append to audit stream {stream}")

    def stream_head(self, stream: str) -> ChainHead:
        item = self._table.get(schema.stream_head_key(stream))
        return ChainHead(int(item["audit_seq"]), item["audit_hash"]) if item else ChainHead()
