"""Why a certificate was refused. The values are stable: they appear in audit records and
metrics."""

from enum import StrEnum


class RejectionReason(StrEnum):
    UNKNOWN_CERTIFICATE = "unknown_certificate"
    CERTIFICATE_NOT_PENDING = "certificate_not_pending"
    MALFORMED_CERTIFICATE = "malformed_certificate"
    UNKNOWN_CA = "unknown_ca"
    CA_DISABLED = "ca_disabled"
    WRONG_ISSUER = "wrong_issuer"
    INVALID_CHAIN = "invalid_chain"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WEAK_KEY = "weak_key"
    WEAK_SIGNATURE = "weak_signature"
    NOT_ALLOWLISTED = "not_allowlisted"
    UNEXPECTED_PUBLIC_KEY = "unexpected_public_key"
    SERIAL_MISMATCH = "serial_mismatch"
    DECOMMISSIONED = "decommissioned"
    CLONE_SUSPECTED = "clone_suspected"
    # A certificate the device's rotation replaced, presented again in the same life.
    RETIRED = "certificate_retired"
    # Not a refusal of the certificate: the event does not match what AWS IoT says about it
    # (another CA, not PENDING_ACTIVATION, no such certificate), so nothing was done and no
    # decision was recorded; the event is audited in the registration-events stream.
    MISMATCHED_EVENT = "mismatched_event"
