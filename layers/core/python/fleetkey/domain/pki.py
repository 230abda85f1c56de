"""fleetkey's issuing CA and what it has revoked, as records (the X.509 work is in
fleetkey.crypto.issuing; the KMS key in fleetkey.adapters.kms)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleetkey.domain.audit import ChainHead

# The key specs an issuing CA may have (KMS asymmetric SIGN_VERIFY keys).
CA_KEY_SPECS = frozenset({"ECC_NIST_P256", "ECC_NIST_P384"})


class IssuingCaStatus(StrEnum):
    # A key and a CSR exist; the customer's CA has not yet signed the certificate (`pki install`).
    AWAITING_CERTIFICATE = "awaiting_certificate"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class IssuingCa:
    """The CA that signs devices' operational certificates. Its private key is the KMS key
    `key_id`; `chain_pem` is its issuers up to the root (empty for a self-signed CA)."""

    key_id: str
    key_spec: str
    subject: str
    status: IssuingCaStatus
    audit_head: ChainHead
    certificate_pem: str | None = None
    chain_pem: tuple[str, ...] = ()
    iot_ca_id: str | None = None
    # Self-signed (`pki init`), or subordinate to the customer's root (`pki csr` + `install`).
    self_signed: bool = True
    created_at: str | None = None

    def to_public(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "self_signed": self.self_signed,
            "key_id": self.key_id,
            "key_spec": self.key_spec,
            "subject": self.subject,
            "certificate_pem": self.certificate_pem,
            "chain_pem": "".join(self.chain_pem),
            "iot_ca_id": self.iot_ca_id,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Revocation:
    """A certificate fleetkey issued and revoked: listed in the CRL until it expires."""

    serial: str  # hex
    certificate_id: str
    device_id: str
    not_after: str  # ISO 8601
    revoked_at: str  # ISO 8601
    reason: str  # an x509.ReasonFlags value: superseded, cessationOfOperation, ...


@dataclass(frozen=True, slots=True)
class PublishedCrl:
    """The latest CRL: its number (monotonic), dates, how many revocations it covers (the table
    counts revocations; a CRL that covers fewer is out of date), and how many chunks its DER is
    stored in."""

    number: int
    this_update: str
    next_update: str
    covers: int
    chunks: int = 1
