"""The append-only, hash-chained audit trail.

Every subject (a device, a certificate that was refused before it could be tied to a device, a
manufacturer CA) has its own chain. Record n carries the hash of record n-1, and its own hash is
SHA-256 over its canonical JSON body, so altering, removing or reordering any record breaks every
later link. The body is stored verbatim, so verification does not depend on how the database
represents numbers or maps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleetkey.errors import AuditChainBroken

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of a subject's chain. `body` is the canonical JSON that `hash` covers."""

    subject: str
    seq: int
    at: str
    action: str
    actor: str
    prev_hash: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> str:
        return canonical_json(
            {
                "subject": self.subject,
                "seq": self.seq,
                "at": self.at,
                "action": self.action,
                "actor": self.actor,
                "prev_hash": self.prev_hash,
                "details": self.details,
            }
        )

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @classmethod
    def from_body(cls, body: str) -> AuditRecord:
        data = json.loads(body)
        return cls(
            subject=data["subject"],
            seq=data["seq"],
            at=data["at"],
            action=data["action"],
            actor=data["actor"],
            prev_hash=data["prev_hash"],
            details=data["details"],
        )


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a chain ends: the sequence number and hash of its last record (0 and the genesis hash
    if the chain is empty)."""

    seq: int = 0
    hash: str = GENESIS_HASH

    def next_record(
        self, *, subject: str, at: str, action: str, actor: str, details: dict[str, Any]
    ) -> AuditRecord:
        return AuditRecord(
            subject=subject,
            seq=self.seq + 1,
            at=at,
            action=action,
            actor=actor,
            prev_hash=self.hash,
            details=details,
        )


@dataclass(frozen=True, slots=True)
class ChainVerification:
    subject: str
    records: int
    head: ChainHead


def verify_chain(
    subject: str, stored: Iterable[tuple[str, str]], expected_head: ChainHead | None = None
) -> ChainVerification:
    """Walk a chain from its first record and check every link.

    `stored` yields (body, hash) pairs in sequence order, as they were read from the store.
    `expected_head` is the head recorded on the subject itself; when given, the chain must end there
    (this catches truncation of the newest records).

    Raises:
        AuditChainBroken: a body does not match its hash, a sequence number is skipped or repeated,
            a record does not link to its predecessor, a record names another subject, or the chain
            does not end at `expected_head`.
    """
    head = ChainHead()
    count = 0
    for index, (body, stored_hash) in enumerate(stored):
        try:
            record = AuditRecord.from_body(body)
        except (ValueError, KeyError, TypeError):
            raise AuditChainBroken(
                f"record {index + 1} of {subject} is unreadable", details={"index": index}
            ) from None
        actual = hashlib.sha256(body.encode()).hexdigest()
        if actual != stored_hash or record.body != body:
            raise AuditChainBroken(
                f"record {record.seq} of {subject} was altered", details={"seq": record.seq}
            )
        if record.subject != subject:
            raise AuditChainBroken(
                f"record {record.seq} belongs to {record.subject}, not {subject}",
                details={"seq": record.seq},
            )
        if record.seq != head.seq + 1:
            raise AuditChainBroken(
                f"{subject}: expected record {head.seq + 1}, found {record.seq}",
                details={"seq": record.seq},
            )
        if record.prev_hash != head.hash:
            raise AuditChainBroken(
                f"record {record.seq} of {subject} does not link to record {head.seq}",
                details={"seq": record.seq},
            )
        head = ChainHead(seq=record.seq, hash=stored_hash)
        count += 1
    if expected_head is not None and expected_head != head:
        raise AuditChainBroken(
            f"{subject}: chain ends at record {head.seq}, the subject says {expected_head.seq}",
            details={"seq": head.seq, "expected_seq": expected_head.seq},
        )
    return ChainVerification(subject=subject, records=count, head=head)
