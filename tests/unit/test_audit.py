"""The hash-chained audit trail: building, verifying, and detecting every kind of tampering."""

import hashlib
import json

import pytest

from fleetkey.domain.audit import (
    GENESIS_HASH,
    AuditRecord,
    ChainHead,
    canonical_json,
    verify_chain,
)
from fleetkey.errors import AuditChainBroken

SUBJECT = "device#pump-0001"


def build_chain(subject=SUBJECT, n=4):
    """n records as the store keeps them: (body, hash) in sequence order."""
    head, stored = ChainHead(), []
    for i in range(1, n + 1):
        record = head.next_record(
            subject=subject,
            at=f"2025-01-0{i}T00:00:00Z",
            action=["allowlisted", "registered", "suspended", "resumed", "decommissioned"][i - 1],
            actor="operator:alice" if i != 2 else "jitr",
            details={"step": i, "note": "ok"},
        )
        stored.append((record.body, record.hash))
        head = ChainHead(record.seq, record.hash)
    return stored, head


def sha(body):
    return hashlib.sha256(body.encode()).hexdigest()


def rewrite(body, **changes):
    """The same record with some fields changed, serialised canonically."""
    data = json.loads(body)
    data.update(changes)
    return canonical_json(data)


def broken(subject, stored, expected_head=None):
    with pytest.raises(AuditChainBroken) as caught:
        verify_chain(subject, stored, expected_head)
    return caught.value


# --- building and verifying -------------------------------------------------------------------


def test_first_record_links_to_genesis():
    # Given an empty chain
    # When its first record is made
    record = ChainHead().next_record(
        subject=SUBJECT, at="2025-01-01T00:00:00Z", action="allowlisted", actor="op", details={}
    )

    # Then it is record 1, links to the genesis hash, and its hash covers its canonical body
    assert record.seq == 1
    assert record.prev_hash == GENESIS_HASH == "0" * 64
    assert record.hash == sha(record.body)
    assert AuditRecord.from_body(record.body) == record


def test_intact_chain_verifies_and_returns_its_head():
    # Given a chain of four records
    stored, head = build_chain(n=4)

    # When it is verified, with and without the head the subject records
    plain = verify_chain(SUBJECT, stored)
    anchored = verify_chain(SUBJECT, iter(stored), expected_head=head)

    # Then both pass and report the last record as head
    for result in (plain, anchored):
        assert result.subject == SUBJECT
        assert result.records == 4
        assert result.head == head == ChainHead(4, stored[-1][1])


def test_each_record_links_to_the_previous_hash():
    # Given a chain
    stored, _ = build_chain(n=3)

    # When the records are decoded
    records = [AuditRecord.from_body(body) for body, _ in stored]

    # Then record n carries the hash of record n-1
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS_HASH
    assert records[1].prev_hash == stored[0][1]
    assert records[2].prev_hash == stored[1][1]


def test_empty_chain_verifies_to_the_genesis_head():
    # Given no records
    # When / Then: an empty chain is valid and ends at genesis (a subject with no history)
    result = verify_chain(SUBJECT, [], expected_head=ChainHead())
    assert result.records == 0
    assert result.head == ChainHead(0, GENESIS_HASH)


def test_empty_chain_fails_when_the_subject_says_it_has_records():
    # Given a subject whose head says 4 records, and a store that returns none (all deleted)
    _, head = build_chain(n=4)

    # When / Then
    error = broken(SUBJECT, [], expected_head=head)
    assert error.details == {"seq": 0, "expected_seq": 4}


# --- tampering ----------------------------------------------------------------------------------


def test_altered_body_is_detected():
    # Given a chain where record 2's details were changed but its stored hash kept
    stored, _ = build_chain()
    stored[1] = (rewrite(stored[1][0], details={"step": 2, "note": "forged"}), stored[1][1])

    # When / Then: record 2 no longer matches its hash
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 2}
    assert "altered" in error.message


def test_altered_body_with_recomputed_hash_breaks_the_next_link():
    # Given a chain where record 2 was altered and its hash recomputed to match
    stored, _ = build_chain()
    forged = rewrite(stored[1][0], actor="operator:mallory")
    stored[1] = (forged, sha(forged))

    # When / Then: record 2 is self-consistent, but record 3 still points at the original hash
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 3}
    assert "does not link" in error.message


def test_rewritten_newest_record_is_caught_only_by_the_expected_head():
    # Given a chain whose last record was replaced by a self-consistent forgery that links properly
    stored, head = build_chain()
    forged = rewrite(stored[-1][0], action="resumed-by-nobody")
    stored[-1] = (forged, sha(forged))

    # When verified without the subject's head, the forgery is not visible
    assert verify_chain(SUBJECT, stored).records == 4

    # Then against the head recorded on the subject it is
    error = broken(SUBJECT, stored, expected_head=head)
    assert error.details == {"seq": 4, "expected_seq": 4}


def test_removed_middle_record_is_detected():
    # Given a chain with record 2 deleted
    stored, _ = build_chain()
    del stored[1]

    # When / Then: the sequence skips from 1 to 3
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 3}


def test_removed_middle_record_with_renumbering_is_detected():
    # Given record 2 deleted and record 3 renumbered (and re-hashed) to close the gap
    stored, _ = build_chain()
    del stored[1]
    renumbered = rewrite(stored[1][0], seq=2)
    stored[1] = (renumbered, sha(renumbered))

    # When / Then: the renumbered record does not link to record 1
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 2}
    assert "does not link" in error.message


def test_reordered_records_are_detected():
    # Given records 2 and 3 swapped
    stored, _ = build_chain()
    stored[1], stored[2] = stored[2], stored[1]

    # When / Then
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 3}


def test_duplicated_record_is_detected():
    # Given record 2 stored twice
    stored, _ = build_chain()
    stored.insert(2, stored[1])

    # When / Then: the second copy repeats a sequence number
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 2}


def test_record_from_another_subject_is_detected():
    # Given record 2 of another device's chain spliced into this one
    stored, _ = build_chain()
    other, _ = build_chain(subject="device#pump-0002")
    stored[1] = other[1]

    # When / Then: it names the other subject
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 2}
    assert "device#pump-0002" in error.message


def test_whole_chain_of_another_subject_is_rejected():
    # Given a perfectly valid chain, but of another subject
    other, _ = build_chain(subject="device#pump-0002")

    # When / Then: it cannot be passed off as this subject's history
    error = broken(SUBJECT, other)
    assert error.details == {"seq": 1}


def test_truncated_tail_is_detected_only_with_the_expected_head():
    # Given a four-record chain with its newest record deleted
    stored, head = build_chain(n=4)
    truncated = stored[:-1]

    # When verified without the subject's head, the shorter chain is internally consistent
    assert verify_chain(SUBJECT, truncated).records == 3

    # Then against the head recorded on the subject, the truncation is found
    error = broken(SUBJECT, truncated, expected_head=head)
    assert error.details == {"seq": 3, "expected_seq": 4}


def test_non_canonical_body_is_rejected_even_with_a_matching_hash():
    # Given record 1 stored as the same JSON with different spacing and key order, hash to match
    stored, _ = build_chain(n=1)
    loose = json.dumps(json.loads(stored[0][0]), indent=2)
    assert json.loads(loose) == json.loads(stored[0][0])
    stored[0] = (loose, sha(loose))

    # When / Then: only the canonical form is accepted, so there is one body per record
    error = broken(SUBJECT, stored)
    assert error.details == {"seq": 1}


def test_hash_of_another_record_is_rejected():
    # Given record 2 stored with record 3's hash
    stored, _ = build_chain()
    stored[1] = (stored[1][0], stored[2][1])

    # When / Then
    assert broken(SUBJECT, stored).details == {"seq": 2}


@pytest.mark.parametrize("body", ["not json", "{}", "[]"], ids=["not-json", "missing-keys", "list"])
def test_corrupt_body_is_reported_as_a_broken_chain(body):
    # Given a chain whose second record's body is not a record at all
    stored, _ = build_chain()
    stored[1] = (body, sha(body))

    # When / Then: verification reports tampering, not an unrelated exception
    broken(SUBJECT, stored)


# --- canonical JSON -----------------------------------------------------------------------------


def test_canonical_json_ignores_key_order_at_every_level():
    # Given the same value built with different key orders
    a = {"b": 1, "a": {"y": [1, {"d": 2, "c": 3}], "x": None}}
    b = {"a": {"x": None, "y": [1, {"c": 3, "d": 2}]}, "b": 1}

    # When / Then: one serialisation, sorted, with no whitespace
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == '{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}'


def test_canonical_json_keeps_unicode_unescaped():
    # Given non-ASCII text
    # When / Then: it is emitted as UTF-8 text, not \\u escapes, so the hash covers what is shown
    assert canonical_json({"name": "Müller ✓ 設備"}) == '{"name":"Müller ✓ 設備"}'


def test_canonical_json_is_deterministic_for_records():
    # Given two records made from details with keys in different orders
    make = lambda details: ChainHead().next_record(  # noqa: E731
        subject=SUBJECT, at="t", action="a", actor="op", details=details
    )
    one = make({"reason": "clone_suspected", "certificate_id": "ab"})
    two = make({"certificate_id": "ab", "reason": "clone_suspected"})

    # When / Then: the same body and hash
    assert one.body == two.body
    assert one.hash == two.hash


def test_chain_with_unicode_details_verifies():
    # Given a record whose details contain non-ASCII text
    record = ChainHead().next_record(
        subject=SUBJECT, at="t", action="note", actor="opérateur", details={"note": "Zürich ✓"}
    )

    # When / Then: its UTF-8 body hashes and verifies
    result = verify_chain(SUBJECT, [(record.body, record.hash)])
    assert result.head == ChainHead(1, record.hash)
