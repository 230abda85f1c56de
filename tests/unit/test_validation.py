"""The validation domain: what a validation answer must look like, who a result belongs to, and
when a pending validation reads expired."""

from __future__ import annotations

import pytest

from fleetkey.domain.validation import (
    Validation,
    ValidationStatus,
    principal,
    validation_answer,
)

ID = "0123456789abcdef0123456789abcdef"


def test_an_assertion_without_a_validation_claim_answers_none():
    assert validation_answer({"nonce": "n"}, "urn:a") is None


def test_a_validation_answer_is_read_from_the_claims_and_the_audience():
    answer = validation_answer(
        {"validation": {"id": ID, "purpose": "dose-change"}, "nonce": "n0"}, "urn:a"
    )
    assert answer is not None
    assert (answer.validation_id, answer.purpose, answer.nonce, answer.audience) == (
        ID,
        "dose-change",
        "n0",
        "urn:a",
    )


@pytest.mark.parametrize(
    ("claims", "audience"),
    [
        ({"validation": "x", "nonce": "n"}, "urn:a"),
        ({"validation": [ID, "p"], "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "p", "x": 1}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID.upper(), "purpose": "p"}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": 7, "purpose": "p"}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "dose change"}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "p" * 65}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID, "purpose": None}, "nonce": "n"}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "p"}}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "p"}, "nonce": 5}, "urn:a"),
        ({"validation": {"id": ID, "purpose": "p"}, "nonce": "n"}, None),
        ({"validation": {"id": ID, "purpose": "p"}, "nonce": "n"}, "urn:a urn:b"),
    ],
)
def test_malformed_validation_answers_are_refused(claims, audience):
    with pytest.raises(ValueError):
        validation_answer(claims, audience)


def test_a_role_session_is_its_role_and_other_principals_are_themselves():
    session = "arn:aws:sts::123456789012:assumed-role/clinic-app/session-7"
    assert principal(session) == "arn:aws:sts::123456789012:assumed-role/clinic-app"
    assert principal(session.replace("session-7", "other")) == principal(session)
    user = "arn:aws:iam::123456789012:user/app"
    assert principal(user) == user
    assert principal("arn:aws:sts::123456789012:assumed-role/other/session-7") != principal(session)


def test_a_pending_validation_reads_expired_once_its_deadline_passed():
    validation = Validation(ID, "pump-1", "dose", "urn:a", "rp", False, "n", 100, 130)
    assert validation.status_at(129) is ValidationStatus.PENDING
    assert validation.status_at(130) is ValidationStatus.EXPIRED
    decided = Validation(
        ID, "pump-1", "dose", "urn:a", "rp", False, "n", 100, 130, ValidationStatus.VALIDATED
    )
    assert decided.status_at(1_000) is ValidationStatus.VALIDATED
