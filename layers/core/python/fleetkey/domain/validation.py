"""Delegated validation: a relying party asks fleetkey to have a device prove itself right now,
before a critical action; the device proves it to fleetkey, and the relying party receives a
signed result it can check offline.

A validation is created `pending` with a single-use nonce and a deadline; the device answers
with a client-credentials token request whose assertion carries the nonce and the validation
(`validation_answer`). It ends `validated` (with the token), `refused` (with a reason), or
`expired` when its deadline passes unanswered (reported on read, never written: nothing needs
doing when nobody answered).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# A purpose names the critical action ("dose-change", "valve:open"): short, printable, no spaces,
# as it is copied into the token and the device may display it.
PURPOSE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# fleetkey makes validation ids (uuid4 hex); anything else cannot be one.
VALIDATION_ID = re.compile(r"[0-9a-f]{32}")
# The device's answer deadline a relying party may ask for, and its default.
MIN_EXPIRES_IN = 5
MAX_EXPIRES_IN = 300
DEFAULT_EXPIRES_IN = 30
# A relying party may wait for the result in one request at most this long (API Gateway's
# integration timeout is 29 s).
MAX_WAIT_SECONDS = 20
# A validation token attests to a moment: it is short-lived.
VALIDATION_TOKEN_SECONDS = 60
# How long a result stays readable after the deadline (the record's TTL).
RESULT_RETENTION_SECONDS = 3600


class ValidationStatus(StrEnum):
    PENDING = "pending"
    VALIDATED = "validated"
    REFUSED = "refused"
    EXPIRED = "expired"  # pending past its deadline: computed, never stored


class RefusalReason(StrEnum):
    DEVICE_NOT_ACTIVE = "device_not_active"
    FIRMWARE_NOT_RELEASED = "firmware_not_released"
    ATTESTATION_MISSING = "attestation_missing"
    ASSERTION_INVALID = "assertion_invalid"


@dataclass(frozen=True, slots=True)
class Validation:
    validation_id: str
    device_id: str
    purpose: str
    audience: str
    requester: str
    require_attestation: bool
    nonce: str
    created_at: int
    answer_by: int
    status: ValidationStatus = ValidationStatus.PENDING
    reason: RefusalReason | None = None
    token: str | None = None
    decided_at: int | None = None
    # The device's life (epoch) asked about: an answer from its next life (recommissioned,
    # perhaps to another owner) does not validate this one.
    epoch: int = 1

    def status_at(self, now: int) -> ValidationStatus:
        if self.status is ValidationStatus.PENDING and now >= self.answer_by:
            return ValidationStatus.EXPIRED
        return self.status

    def command(self, expires_at: str) -> dict[str, Any]:
        """What the device receives on fleetkey/{device_id}/commands/validate."""
        return {
            "validation_id": self.validation_id,
            "nonce": self.nonce,
            "purpose": self.purpose,
            "audience": self.audience,
            "expires_at": expires_at,
        }


@dataclass(frozen=True, slots=True)
class ValidationAnswer:
    """What a device's token request says about the validation it answers: the `validation`
    claim ({id, purpose}) and `nonce` of its assertion, and the `audience` it asks for. Read
    from the assertion before its signature is verified: only the record's conditional update
    makes it count."""

    validation_id: str
    purpose: str
    nonce: str
    audience: str


def validation_answer(claims: dict[str, Any], audience: str | None) -> ValidationAnswer | None:
    """The validation a request answers, from its (not yet verified) assertion claims and its
    `audience` parameter; None when the assertion has no `validation` claim.

    Raises:
        ValueError: a `validation` claim that is not {id, purpose} of the right shapes, no
            nonce, or not exactly one audience.
    """
    claim = claims.get("validation")
    if claim is None:
        return None
    if not isinstance(claim, dict) or set(claim) != {"id", "purpose"}:
        raise ValueError("the validation claim must be {id, purpose}")
    validation_id, purpose, nonce = claim["id"], claim["purpose"], claims.get("nonce")
    if not isinstance(validation_id, str) or not VALIDATION_ID.fullmatch(validation_id):
        raise ValueError("validation id")
    if not isinstance(purpose, str) or not PURPOSE.fullmatch(purpose):
        raise ValueError("validation purpose")
    if not isinstance(nonce, str) or not nonce:
        raise ValueError("a validation answer carries the validation's nonce")
    if not audience or len(audience.split()) != 1:
        raise ValueError("a validation answer asks for the validation's one audience")
    return ValidationAnswer(validation_id, purpose, nonce, audience)


def principal(caller_arn: str) -> str:
    """The principal a result belongs to: the caller's IAM identity, an assumed-role session
    counted as its role (a relying party's session renews; its role does not)."""
    if ":assumed-role/" in caller_arn:
        head, _, tail = caller_arn.partition(":assumed-role/")
        role = tail.split("/", 1)[0]
        return f"{head}:assumed-role/{role}"
    return caller_arn
