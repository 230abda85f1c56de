"""Typed errors. Each carries a stable machine-readable code and the HTTP status it maps to.

Callers branch on the type (or `code`), never on the message text.
"""

from __future__ import annotations

from typing import Any


class FleetkeyError(Exception):
    """Base of every error fleetkey raises on purpose."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequest(FleetkeyError):
    """The caller sent something malformed or out of bounds."""

    code = "invalid_request"
    status = 400


class NotFound(FleetkeyError):
    code = "not_found"
    status = 404


class Conflict(FleetkeyError):
    """The request is valid but contradicts the current state (already exists, wrong state)."""

    code = "conflict"
    status = 409


class IllegalTransition(Conflict):
    """The device state machine has no such transition from the current state."""

    code = "illegal_transition"


class ConcurrentModification(Conflict):
    """A conditional write lost a race; re-reading and retrying converges."""

    code = "concurrent_modification"


class InvalidCertificate(InvalidRequest):
    """A certificate, CSR or CA failed parsing or validation.

    `reason` is a RejectionReason value.
    """

    code = "invalid_certificate"

    def __init__(self, reason: str, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.reason = reason


class AuditChainBroken(FleetkeyError):
    """Verification of an audit hash chain found a gap, a reordering or an altered record."""

    code = "audit_chain_broken"
    status = 500


class TransientAwsError(FleetkeyError):
    """An AWS call failed in a way a retry may fix (throttling, 5xx, timeouts)."""

    code = "service_unavailable"
    status = 503


class NotSettled(FleetkeyError):
    """AWS has not settled yet (e.g. a detach not yet visible to a delete): the work is not
    finished and must be retried later, by the queue that carries it."""

    code = "not_settled"
    status = 503


class EstRefused(FleetkeyError):
    """An EST request refused (fleetkey.services.rotation): `status` 400 (the request) or 401
    (the client certificate)."""

    code = "est_refused"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
