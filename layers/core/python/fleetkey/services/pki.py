"""fleetkey's issuing CA: its private key is a KMS key (ECC_NIST_P256 or P384) that only the
rotation functions may sign with; certificates and CRLs are built with `cryptography` and signed
through KMS with `MessageType=DIGEST` (fleetkey.crypto.issuing).

Two ways to set it up (`fleetkey pki ...`):
- `init`: a self-signed CA (fleetkey is the root devices' operational certificates chain to);
- `csr` then `install`: a CA subordinate to the customer's own root (offline or enterprise): the
  CSR is signed by the KMS key, the customer's CA signs it, `install` checks the certificate
  (its key is the KMS key, it is a CA, its chain links to a self-signed root) and activates it.

Either way the CA is registered with AWS IoT ACTIVE with auto-registration off: fleetkey
registers each certificate it issues itself, so just-in-time registration never sees one.

Each step is recorded before the next AWS call (the KMS key, then the certificate, then the AWS
IoT registration), each record conditional on the one read, so a retry after a failure at any
call continues from where it stopped and never makes a second CA certificate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto import issuing
from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.pki import CA_KEY_SPECS, IssuingCa, IssuingCaStatus, PublishedCrl
from fleetkey.errors import Conflict, FleetkeyError, InvalidRequest
from fleetkey.ports import StaleRecord
from fleetkey.settings import Settings
from fleetkey.store.pki import CA_STREAM, DynamoPkiStore

TAG_KEY = "fleetkey:purpose"
TAG_VALUE_PREFIX = "issuing-ca:"
# How long a CRL is valid (nextUpdate); it is published again after half of it, or at once when
# a revocation is not yet in it.
CRL_VALIDITY = timedelta(hours=24)
CRL_REFRESH_AFTER = CRL_VALIDITY / 2
MAX_SUBJECT = 256
# The shortest certificate worth issuing (below it, the issuing CA is too close to its end).
MIN_ISSUED_LIFETIME = timedelta(days=7)
MAX_ROUNDS = 4


class NoIssuingCa(FleetkeyError):
    """The issuing CA is not set up (or not yet active): nothing can be issued."""

    code = "temporarily_unavailable"
    status = 503


def issuing_ca_tags(stack_name: str) -> dict[str, str]:
    """The tag of the stack's issuing CA keys: the only keys its rotation roles may sign with."""
    return {TAG_KEY: f"{TAG_VALUE_PREFIX}{stack_name}"}


def issuing_ca_key_policy(signer_role_arns: tuple[str, ...]) -> dict[str, Any]:
    """The CA key's policy: the account's IAM governs the key as with KMS's default policy, the
    rotation roles sign, and nobody else may sign whatever IAM grants elsewhere.

    Raises:
        ValueError: no signer role, or roles that are not IAM role ARNs of one account.
    """
    if not signer_role_arns:
        raise ValueError("an issuing CA key policy needs the roles that sign")
    accounts = set()
    for arn in signer_role_arns:
        parts = arn.split(":")
        if (
            len(parts) != 6
            or parts[0] != "arn"
            or parts[2] != "iam"
            or not parts[5].startswith("role/")
        ):
            raise ValueError(f"{arn!r} is not an IAM role ARN")
        accounts.add((parts[1], parts[4]))
    if len(accounts) != 1:
        raise ValueError("the signer roles must be of one account")
    ((partition, account),) = accounts
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "EnableIamPolicies",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "TheRotationFunctionsSign",
                "Effect": "Allow",
                "Principal": {"AWS": list(signer_role_arns)},
                "Action": "kms:Sign",
                "Resource": "*",
            },
            {
                "Sid": "OnlyTheRotationFunctionsSign",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:Sign",
                "Resource": "*",
                "Condition": {"ArnNotEquals": {"aws:PrincipalArn": list(signer_role_arns)}},
            },
        ],
    }


def _subject(value: object) -> x509.Name:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SUBJECT:
        raise InvalidRequest(f"subject must be an RFC 4514 name of 1-{MAX_SUBJECT} characters")
    try:
        name = x509.Name.from_rfc4514_string(value)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"subject is not an RFC 4514 name: {exc}") from None
    if not name.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        raise InvalidRequest("subject needs a common name (CN=...)")
    return name


def _key_spec(value: object) -> str:
    if value not in CA_KEY_SPECS:
        raise InvalidRequest(f"key_spec must be one of {sorted(CA_KEY_SPECS)}")
    return str(value)


class PkiService:
    """`kms` is a fleetkey.adapters.kms.KmsKeys, `registry` an IotRegistry; `signer_for(key_id)`
    gives the DigestSigner of a KMS key."""

    def __init__(
        self,
        settings: Settings,
        store: DynamoPkiStore,
        kms: Any,
        registry: Any,
        signer_for: Callable[[str], issuing.DigestSigner],
        audit: Any,
        clock: Clock = utc_now,
    ) -> None:
        self._settings = settings
        self._store = store
        self._kms = kms
        self._registry = registry
        self._signer_for = signer_for
        self._audit = audit
        self._clock = clock
        # The active CA, its certificate and its signer: immutable once active (cached).
        self._active: tuple[IssuingCa, x509.Certificate, issuing.DigestSigner] | None = None

    # ---- set-up ------------------------------------------------------------------------------

    def init(
        self,
        *,
        key_spec: object = "ECC_NIST_P256",
        subject: object = "CN=fleetkey issuing CA",
        validity_days: object = 3650,
        actor: str,
    ) -> dict[str, Any]:
        """Create a self-signed issuing CA (or finish one a failure interrupted). Running it
        again once the CA is active with the same parameters answers the CA (idempotent).

        AWS calls: CreateKey, 2 record writes, GetPublicKey + Sign (the certificate), a record
        write, GetRegistrationCode + Sign (the verification certificate) + RegisterCACertificate,
        the final record write (+ 1 read first).

        Raises:
            InvalidRequest: bad key spec, subject or validity.
            Conflict: another CA exists (different parameters, or one awaiting `install`).
        """
        spec = _key_spec(key_spec)
        name = _subject(subject)
        if type(validity_days) is not int or not 30 <= validity_days <= 7300:
            raise InvalidRequest("validity_days must be a whole number from 30 to 7300")
        for _ in range(MAX_ROUNDS):
            ca = self._store.get_ca()
            try:
                if ca is None:
                    ca = self._create_key(spec, name, self_signed=True)
                    ca = self._record(ca, "issuing_ca_key_created", actor, {"self_signed": True})
                if ca.key_spec != spec or ca.subject != name.rfc4514_string() or not ca.self_signed:
                    raise Conflict(
                        "an issuing CA with another key spec or subject exists",
                        details={"key_spec": ca.key_spec, "subject": ca.subject},
                    )
                if ca.status is IssuingCaStatus.AWAITING_CERTIFICATE and ca.certificate_pem is None:
                    signer = self._signer_for(ca.key_id)
                    certificate = issuing.issuing_ca_certificate(
                        signer, name, now=self._clock(), validity_days=validity_days
                    )
                    ca = self._record(
                        replace(ca, certificate_pem=_pem(certificate)),
                        "issuing_ca_certificate_signed",
                        actor,
                        {"serial": format(certificate.serial_number, "x")},
                    )
                if ca.certificate_pem and _validity_days(ca.certificate_pem) != validity_days:
                    raise Conflict(
                        "an issuing CA with another validity exists",
                        details={"validity_days": _validity_days(ca.certificate_pem)},
                    )
                if ca.status is IssuingCaStatus.AWAITING_CERTIFICATE:
                    return self._activate(ca, actor)
                if self._store.crl()[0] is None:  # activated, its first CRL not yet published
                    self.refresh_crl()
                return self.show()
            except StaleRecord:
                continue
        raise Conflict("the issuing CA kept changing; retry")

    def csr(
        self,
        *,
        key_spec: object = "ECC_NIST_P256",
        subject: object = "CN=fleetkey issuing CA",
        actor: str,
    ) -> dict[str, Any]:
        """A CSR for a CA subordinate to the customer's root, signed by the CA's KMS key (made
        now, or the one an earlier `csr` made with the same parameters).

        AWS calls: 1 read, CreateKey + 1 record write the first time, GetPublicKey + Sign.

        Raises:
            InvalidRequest, Conflict: an active CA exists, or one with other parameters.
        """
        spec = _key_spec(key_spec)
        name = _subject(subject)
        for _ in range(MAX_ROUNDS):
            ca = self._store.get_ca()
            try:
                if ca is None:
                    ca = self._create_key(spec, name, self_signed=False)
                    ca = self._record(ca, "issuing_ca_key_created", actor, {"self_signed": False})
            except StaleRecord:
                continue
            break
        else:
            raise Conflict("the issuing CA kept changing; retry")
        if ca.status is IssuingCaStatus.ACTIVE:
            raise Conflict("the issuing CA is active; a new CSR would replace it")
        if (
            ca.self_signed
            or ca.key_spec != spec
            or ca.subject != name.rfc4514_string()
            or ca.certificate_pem
        ):
            raise Conflict("an issuing CA with other parameters is being set up")
        request = issuing.issuing_ca_request(self._signer_for(ca.key_id), name)
        return {
            "csr_pem": request.public_bytes(serialization.Encoding.PEM).decode(),
            "key_id": ca.key_id,
            "key_spec": ca.key_spec,
            "subject": ca.subject,
        }

    def install(self, *, certificate_pem: object, chain_pem: object, actor: str) -> dict[str, Any]:
        """Install the subordinate CA's certificate, signed by the customer's CA, with its chain
        up to the root; then register and activate it.

        AWS calls: 1 read, GetPublicKey, 1 record write, then as `init`'s activation.

        Raises:
            InvalidRequest: not PEM strings; InvalidCertificate: the certificate or chain fails
            the checks (its key is not the CA key, not a CA, the chain does not link to a root).
            Conflict: no CSR was made, or a CA is already active.
        """
        if not isinstance(certificate_pem, str) or not isinstance(chain_pem, str):
            raise InvalidRequest("certificate_pem and chain_pem must be PEM strings")
        if len(certificate_pem) > 16_384 or len(chain_pem) > 65_536:
            raise InvalidRequest("certificate or chain too large")
        ca = self._store.get_ca()
        if ca is None or ca.self_signed:
            raise Conflict("no CSR awaits a certificate: run pki csr first")
        if ca.status is IssuingCaStatus.ACTIVE:
            raise Conflict("the issuing CA is already active")
        signer = self._signer_for(ca.key_id)
        certificate, chain = issuing.check_issuing_ca(
            certificate_pem, chain_pem, signer.public_key(), self._clock()
        )
        if certificate.subject.rfc4514_string() != ca.subject:
            raise InvalidRequest("the certificate's subject is not the CSR's")
        if ca.certificate_pem is None:
            try:
                ca = self._record(
                    replace(
                        ca,
                        certificate_pem=_pem(certificate),
                        chain_pem=tuple(_pem(c) for c in chain),
                    ),
                    "issuing_ca_certificate_installed",
                    actor,
                    {"serial": format(certificate.serial_number, "x")},
                )
            except StaleRecord:
                raise Conflict("the issuing CA changed; retry") from None
        elif ca.certificate_pem != _pem(certificate):
            raise Conflict("another certificate was installed for this CA")
        return self._activate(ca, actor)

    def _create_key(self, spec: str, name: x509.Name, *, self_signed: bool) -> IssuingCa:
        key_id: str = self._kms.create_signing_key(
            "fleetkey issuing CA (device operational certificates)",
            issuing_ca_tags(self._settings.stack_name),
            json.dumps(issuing_ca_key_policy(self._settings.issuing_ca_signer_role_arns)),
            key_spec=spec,
        )
        return IssuingCa(
            key_id=key_id,
            key_spec=spec,
            subject=name.rfc4514_string(),
            status=IssuingCaStatus.AWAITING_CERTIFICATE,
            audit_head=ChainHead(),
            self_signed=self_signed,
            created_at=timestamp(self._clock()),
        )

    def _activate(self, ca: IssuingCa, actor: str) -> dict[str, Any]:
        """Register the CA with AWS IoT (auto-registration off) and record it active."""
        if ca.certificate_pem is None:
            raise NoIssuingCa("the issuing CA has no certificate")
        certificate = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
        signer = self._signer_for(ca.key_id)
        verification = issuing.verification_certificate(
            signer, certificate, self._registry.registration_code(), now=self._clock()
        )
        self._registry.register_issuing_ca(ca.certificate_pem, _pem(verification))
        iot_ca_id = certificate_id(certificate)
        try:
            self._record(
                replace(ca, status=IssuingCaStatus.ACTIVE, iot_ca_id=iot_ca_id),
                "issuing_ca_activated",
                actor,
                {"iot_ca_id": iot_ca_id},
            )
        except StaleRecord:
            latest = self._store.get_ca()
            if latest is None or latest.status is not IssuingCaStatus.ACTIVE:
                raise Conflict("the issuing CA changed; retry") from None
        # The first CRL (empty), so that the CRL distribution point answers from the start.
        self._active = None
        self.refresh_crl()
        return self.show()

    def _record(self, ca: IssuingCa, action: str, actor: str, details: dict[str, Any]) -> IssuingCa:
        record = ca.audit_head.next_record(
            subject=f"stream:{CA_STREAM}",
            at=timestamp(self._clock()),
            action=action,
            actor=actor,
            details={"key_id": ca.key_id, **details},
        )
        return self._store.put_ca(ca, record, previous=ca.audit_head)

    # ---- reading -----------------------------------------------------------------------------

    def show(self) -> dict[str, Any]:
        """The CA and its CRL. AWS calls: 2 (GetItem each).

        Raises:
            NoIssuingCa: none set up.
        """
        ca = self._store.get_ca()
        if ca is None:
            raise NoIssuingCa("no issuing CA: run fleetkey pki init (or pki csr and install)")
        view = ca.to_public()
        if ca.certificate_pem:
            certificate = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
            view["not_after"] = timestamp(certificate.not_valid_after_utc)
        crl, revocations = self._store.crl()
        view["crl"] = {
            "number": crl.number if crl else None,
            "this_update": crl.this_update if crl else None,
            "next_update": crl.next_update if crl else None,
            "revocations": revocations,
        }
        return view

    def active(self) -> tuple[IssuingCa, x509.Certificate, issuing.DigestSigner]:
        """The active CA, its certificate and signer (read once per process: immutable).

        AWS calls: 1 (GetItem) the first time.

        Raises:
            NoIssuingCa: none is active.
        """
        if self._active is None:
            ca = self._store.get_ca()
            if ca is None or ca.status is not IssuingCaStatus.ACTIVE or not ca.certificate_pem:
                raise NoIssuingCa("the issuing CA is not set up")
            certificate = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
            self._active = (ca, certificate, self._signer_for(ca.key_id))
        return self._active

    def chain(self) -> list[x509.Certificate]:
        """The CA certificate, then its issuers up to the root."""
        ca, certificate, _ = self.active()
        return [
            certificate,
            *(x509.load_pem_x509_certificate(p.encode()) for p in ca.chain_pem),
        ]

    def chain_pem(self) -> str:
        return "".join(_pem(c) for c in self.chain())

    def ca_pem(self) -> str:
        return _pem(self.active()[1])

    def cacerts_pkcs7(self) -> bytes:
        """The CA chain as DER PKCS#7 certs-only (EST /cacerts)."""
        return issuing.certs_only(self.chain())

    # ---- issuing -----------------------------------------------------------------------------

    def issue(
        self,
        *,
        public_key: Any,
        device_id: str,
        serial: int,
        not_before: datetime,
        validity_days: int,
    ) -> x509.Certificate:
        """A device's operational certificate, never outliving the CA.

        AWS calls: 1 (Sign), + GetPublicKey and a read the first time in a process.
        """
        _, ca_certificate, signer = self.active()
        not_after = min(
            not_before + timedelta(days=validity_days), ca_certificate.not_valid_after_utc
        )
        if not_after - not_before < MIN_ISSUED_LIFETIME:
            # The CA is at (or past) the end of its life: a certificate of a few days would only
            # bring the next renewal sooner. A new CA is an operator's decision.
            raise NoIssuingCa("the issuing CA expires too soon to issue certificates")
        return issuing.device_certificate(
            signer,
            ca_certificate,
            public_key=public_key,
            device_id=device_id,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            crl_url=f"{self._settings.issuer}/v1/pki/crl",
        )

    # ---- the CRL -----------------------------------------------------------------------------

    def crl_der(self) -> bytes:
        """The CRL as last published: never signed on a caller's request (the sweep publishes
        it each minute a revocation is missing from it, and when half its validity is gone; the
        CA's activation publishes the first).

        AWS calls: 1 (GetItem) + 1 (Query of its chunks); again if a publish replaced it
        between the two.

        Raises:
            NoIssuingCa: none published yet (the CA is not set up).
        """
        for _ in range(MAX_ROUNDS):
            crl, _ = self._store.crl()
            if crl is None:
                raise NoIssuingCa("no CRL yet: the issuing CA is not set up")
            der = self._store.crl_der(crl)
            if der is not None:
                return der
        raise NoIssuingCa("the CRL kept changing; retry")

    def refresh_crl(self, *, force: bool = False) -> tuple[PublishedCrl | None, bool]:
        """Publish a new CRL when due (a revocation is missing from it, half of its validity
        has passed, or there is none), else keep the current one: (the CRL, whether this call
        published it). The CRL is None when a concurrent publisher stored a newer one first.

        AWS calls: 1 (GetItem); publishing adds a Query, a Sign and a TransactWriteItems.

        Raises:
            CrlTooLarge: more revocations than a CRL can hold (see fleetkey.store.pki).
        """
        now = self._clock()
        crl, revocations = self._store.crl()
        if (
            not force
            and crl is not None
            and crl.covers >= revocations
            and now < datetime.fromisoformat(crl.this_update) + CRL_REFRESH_AFTER
        ):
            return crl, False
        _, ca_certificate, signer = self.active()
        entries = self._store.revocations_after(timestamp(now))
        number = (crl.number + 1) if crl else 1
        signed = issuing.revocation_list(
            signer,
            ca_certificate,
            [
                issuing.RevokedEntry(
                    serial=int(entry.serial, 16),
                    revoked_at=datetime.fromisoformat(entry.revoked_at),
                    reason=x509.ReasonFlags(entry.reason),
                )
                for entry in entries
            ],
            number=number,
            this_update=now,
            next_update=now + CRL_VALIDITY,
        )
        published = PublishedCrl(
            number=number,
            this_update=timestamp(now),
            next_update=timestamp(now + CRL_VALIDITY),
            covers=revocations,
        )
        der = signed.public_bytes(serialization.Encoding.DER)
        if not self._store.publish_crl(published, der, previous=crl):
            return None, False
        return published, True


def _validity_days(certificate_pem: str) -> int:
    """The whole days a CA certificate is valid for (its start is back-dated a few minutes)."""
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    return round(lifetime / timedelta(days=1))


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
