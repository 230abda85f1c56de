"""X.509 checks for device and manufacturer CA certificates, with cryptography's verifier.

AWS IoT (and moto) accept whatever a registered CA appears to have issued; fleetkey decides trust
itself: chain to the manufacturer CA, validity window, key usage, key strength. Every certificate
first passes the baseline policy of `fleetkey.crypto.x509_policy` (it decodes, and conforms to
RFC 5280 / RFC 5480); the rules here are the ones of each role. No function here lets a parser's
exception escape: a field that does not decode is `InvalidCertificate(malformed_certificate)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from fleetkey.crypto.x509_policy import (
    MAX_PEM_BYTES,
    check_certificate,
    check_validity_encoding,
    decode_certificate,
    decoding,
    describe_public_key,
    pem_bytes,
)
from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate

__all__ = [
    "MAX_PEM_BYTES",
    "DeviceCertificate",
    "certificate_id",
    "check_ca_profile",
    "check_key_policy",
    "claimed_common_name",
    "describe_key",
    "load_certificate",
    "public_key_fingerprint",
    "validate_device_certificate",
    "validate_manufacturer_ca",
    "verify_chain",
    "verify_proof_of_possession",
]
# The longest claimed device id recorded for a refused certificate (AWS IoT thing names: 128).
MAX_CLAIMED_NAME = 128


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """What fleetkey needs to know about a validated device certificate."""

    certificate_id: str  # AWS IoT certificate id: SHA-256 of the DER, lowercase hex
    device_id: str  # subject CN = the thing name
    serial_number: str | None  # subject serialNumber (the device's hardware serial), if present
    public_key_fingerprint: str  # SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex
    not_before: datetime
    not_after: datetime
    key_description: str  # e.g. "ec:secp256r1", "rsa:2048"
    public_key_pem: str  # SubjectPublicKeyInfo, what the device's client assertions verify with


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate and force-decode every field (`x509_policy.decode_certificate`),
    so that whatever reads it later reads values known to decode. Policy is not applied here: a
    certificate that loads can still be refused, with the reason that says why.

    Raises:
        InvalidCertificate(malformed_certificate): not a single parseable PEM certificate, or a
            field of it does not decode.
    """
    data = pem_bytes(pem, "certificate")
    with decoding("certificate"):
        certs = x509.load_pem_x509_certificates(data)
    if len(certs) != 1:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "expected exactly one certificate"
        )
    decode_certificate(certs[0])
    return certs[0]


def claimed_common_name(cert: x509.Certificate) -> str | None:
    """The first subject CN, unverified and truncated, for the records of a refused certificate;
    None when there is none or it does not decode. Never raises: it is read on the refusal path,
    for certificates that may not even parse."""
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if names else None
    except Exception:  # noqa: BLE001 - a refusal must be recordable whatever the cert holds
        return None
    return value[:MAX_CLAIMED_NAME] if isinstance(value, str) else None


def certificate_id(cert: x509.Certificate) -> str:
    """The AWS IoT certificate id: SHA-256 of the DER, lowercase hex (never raises)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex.

    Raises:
        InvalidCertificate(malformed_certificate): the public key does not decode.
    """
    with decoding("certificate public key"):
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return hashlib.sha256(spki).hexdigest()


def describe_key(cert: x509.Certificate) -> str:
    """The certificate's key as `KeyPolicy` names it ("ec:secp256r1", "rsa:2048", "other:...").

    Raises:
        InvalidCertificate(malformed_certificate): the public key does not decode.
    """
    with decoding("certificate public key"):
        key = cert.public_key()
    return describe_public_key(key)


def check_key_policy(cert: x509.Certificate, policy: KeyPolicy) -> None:
    """A profile's key policy, on top of the baseline (`x509_policy.check_public_key`).

    Raises:
        InvalidCertificate: weak_key for a key type or size the policy does not allow;
            malformed_certificate when the key does not decode.
    """
    if policy.allows(describe_key(cert)):
        return
    raise InvalidCertificate(
        RejectionReason.WEAK_KEY,
        f"key {describe_key(cert)} is not allowed",
        details={"key": describe_key(cert)},
    )


def _require_digital_signature(
    _policy: verification.Policy, _cert: x509.Certificate, key_usage: x509.KeyUsage | None
) -> None:
    if key_usage is None or not key_usage.digital_signature:
        raise ValueError("device certificate key usage must include digitalSignature")
    if key_usage.key_cert_sign:
        raise ValueError("a device certificate may not sign certificates")


def _forbid_ca(
    _policy: verification.Policy, _cert: x509.Certificate, constraints: x509.BasicConstraints | None
) -> None:
    if constraints is not None and constraints.ca:
        raise ValueError("a CA certificate is not a device certificate")


def _require_client_auth(
    _policy: verification.Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None
) -> None:
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ValueError("device certificate extended key usage excludes clientAuth")


# Device certificates: not a CA; key usage digitalSignature is required and keyCertSign forbidden;
# if an extended key usage is present it must allow TLS client authentication; no SAN is required
# (devices are named by subject CN, as AWS IoT thing names); no nameConstraints (RFC 5280
# §4.2.1.10: "MUST be used only in a CA certificate").
_DEVICE_EE_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .require_not_present(x509.NameConstraints)
    .may_be_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _forbid_ca)
    .require_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _require_digital_signature)
    .may_be_present(x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _require_client_auth)
)


def _verifier(
    anchor: x509.Certificate, now: datetime, ee_policy: verification.ExtensionPolicy
) -> verification.ClientVerifier:
    """A verifier for certificates issued directly by `anchor`, under the web PKI's CA rules."""
    return (
        verification.PolicyBuilder()
        .store(verification.Store([anchor]))
        .time(now)
        .max_chain_depth(1)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
        )
        .build_client_verifier()
    )


def verify_chain(leaf: x509.Certificate, anchor: x509.Certificate, now: datetime) -> None:
    """Verify `leaf` chains to the trust anchor `anchor` at time `now`. Both come from
    `load_certificate` (the leaf through `validate_device_certificate`, the anchor through the
    trust-anchor cache), so their fields are known to decode.

    Raises:
        InvalidCertificate: not_yet_valid / expired (leaf validity window), wrong_issuer (another
            CA's name), invalid_chain (signature, CA constraints, key usage, anchor validity),
            malformed_certificate (what the verifier's own parsing refuses).
    """
    if now < leaf.not_valid_before_utc:
        raise InvalidCertificate(RejectionReason.NOT_YET_VALID, "certificate is not yet valid")
    if now > leaf.not_valid_after_utc:
        raise InvalidCertificate(RejectionReason.EXPIRED, "certificate has expired")
    if leaf.issuer != anchor.subject:
        raise InvalidCertificate(
            RejectionReason.WRONG_ISSUER, "certificate was not issued by the manufacturer CA"
        )
    # decoding(): whatever else the verifier's parsing raises is a malformed certificate.
    with decoding("certificate"):
        try:
            _verifier(anchor, now, _DEVICE_EE_POLICY).verify(leaf, [])
        except verification.VerificationError as exc:
            raise InvalidCertificate(
                RejectionReason.INVALID_CHAIN,
                "certificate does not chain to the manufacturer CA",
                details={"error": str(exc)[:300]},
            ) from None


def _single_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def validate_device_certificate(
    cert: x509.Certificate, anchor: x509.Certificate, now: datetime, key_policy: KeyPolicy
) -> DeviceCertificate:
    """Fully validate a (parsed) device certificate issued by a manufacturer CA.

    Order: the baseline policy (decoding, RFC 5280 conformance, key, signature algorithm), then the
    validity window, the issuer, the chain, the profile's key policy, the subject.

    Raises:
        InvalidCertificate: with the RejectionReason of the first check that failed.
    """
    check_certificate(cert)
    verify_chain(cert, anchor, now)
    check_key_policy(cert, key_policy)
    device_id = _single_attribute(cert.subject, NameOID.COMMON_NAME)
    if not device_id:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "certificate subject has no single common name"
        )
    # The serial number is optional, but never ambiguous: two of them would let a certificate
    # dodge the allow-list's serial check.
    serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    serial_number = _single_attribute(cert.subject, NameOID.SERIAL_NUMBER)
    if serials and serial_number is None:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "certificate subject has several serial numbers"
        )
    return DeviceCertificate(
        certificate_id=certificate_id(cert),
        device_id=device_id,
        serial_number=serial_number,
        public_key_fingerprint=public_key_fingerprint(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_description=describe_key(cert),
        public_key_pem=cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


def validate_manufacturer_ca(pem: str | bytes, now: datetime) -> x509.Certificate:
    """A manufacturer CA must be a currently valid CA certificate allowed to sign certificates,
    and meet every rule the device verifier will apply to it as a trust anchor
    (`check_ca_profile`), whatever the proof of possession that comes with it.

    Raises:
        InvalidCertificate: malformed, weak_signature or weak_key (the baseline policy);
            expired (outside its validity window); invalid_chain (not a CA profile the device
            verifier accepts, or a self-signed certificate whose signature does not verify).
    """
    cert = load_certificate(pem)
    check_certificate(cert)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidCertificate(RejectionReason.EXPIRED, "CA certificate is not currently valid")
    check_ca_profile(cert)
    if cert.issuer == cert.subject:
        with decoding("CA certificate"):
            try:
                cert.verify_directly_issued_by(cert)
            except (InvalidSignature, ValueError, TypeError):
                raise InvalidCertificate(
                    RejectionReason.INVALID_CHAIN, "self-signed CA signature does not verify"
                ) from None
    return cert


# Extensions cryptography's CA policy (`ExtensionPolicy.webpki_defaults_ca()`, cryptography 48)
# accounts for; a critical extension outside this set fails verification. Of these, the ones
# that must not be critical (RFC 5280 §4.2.1.1-2, §4.2.2.1; CA/B BR §7.1.2.10).
_CA_POLICY_EXTENSIONS = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)
_CA_NON_CRITICAL_EXTENSIONS = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)


def check_ca_profile(cert: x509.Certificate) -> None:
    """What the device verifier (`verify_chain`, cryptography's web-PKI CA policy for client
    verification) requires of the manufacturer CA as an issuer, checked here explicitly so a CA
    that could never admit a device is refused at registration, with or without a v3 proof of
    possession (a v1 proof is checked by its signature alone). From cryptography 48's
    `Policy::permits_ca` and `ExtensionPolicy::webpki_defaults_ca`:

    - X.509 v3; a non-empty issuer; validity dates before 2050 as UTCTime (RFC 5280 §4.1.2.5);
    - basicConstraints present, critical, cA true (RFC 5280 §4.2.1.9);
    - keyUsage present (critical or not) with keyCertSign (RFC 5280 §4.2.1.3);
    - authorityKeyIdentifier, subjectKeyIdentifier, authorityInfoAccess and extendedKeyUsage
      not critical; an authorityKeyIdentifier, if present, with keyIdentifier (CA/B BR
      §7.1.2.11.1; cryptography 48 does not refuse an authorityCertIssuer/SerialNumber beside
      it, so neither does this);
    - nameConstraints, if present, with permitted or excluded subtrees;
    - extendedKeyUsage, if present, including clientAuth or anyExtendedKeyUsage (the verifier
      checks device certificates for TLS client authentication);
    - no critical extension outside those the policy knows (certificatePolicies, policy
      constraints... critical are refused by the verifier even though they decode).

    The serial number, key and signature rules are the baseline policy's (`check_certificate`),
    which is as strict or stricter. The path length is no constraint: devices are issued
    directly by the CA (depth 0).

    Raises:
        InvalidCertificate(invalid_chain): the first rule broken.
    """

    def refuse(message: str) -> InvalidCertificate:
        return InvalidCertificate(RejectionReason.INVALID_CHAIN, f"CA certificate: {message}")

    if cert.version is not x509.Version.v3:
        raise refuse("not an X.509 v3 certificate")
    if len(cert.issuer) == 0:
        raise refuse("empty issuer name")
    check_validity_encoding(cert, refuse)
    extensions = {extension.oid: extension for extension in cert.extensions}
    constraints = extensions.get(ExtensionOID.BASIC_CONSTRAINTS)
    if constraints is None or not isinstance(constraints.value, x509.BasicConstraints):
        raise refuse("basicConstraints is missing")
    if not constraints.critical:
        raise refuse("basicConstraints is not critical")
    if not constraints.value.ca:
        raise refuse("basicConstraints does not assert cA")
    key_usage = extensions.get(ExtensionOID.KEY_USAGE)
    if key_usage is None or not isinstance(key_usage.value, x509.KeyUsage):
        raise refuse("keyUsage is missing")
    if not key_usage.value.key_cert_sign:
        raise refuse("keyUsage does not allow keyCertSign")
    for oid, extension in extensions.items():
        if extension.critical and oid not in _CA_POLICY_EXTENSIONS:
            raise refuse(f"critical extension {oid.dotted_string} is not allowed")
        if extension.critical and oid in _CA_NON_CRITICAL_EXTENSIONS:
            raise refuse(f"extension {oid.dotted_string} must not be critical")
    aki = extensions.get(ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if (
        aki is not None
        and isinstance(aki.value, x509.AuthorityKeyIdentifier)
        and aki.value.key_identifier is None
    ):
        raise refuse("authorityKeyIdentifier lacks keyIdentifier")
    name_constraints = extensions.get(ExtensionOID.NAME_CONSTRAINTS)
    if (
        name_constraints is not None
        and isinstance(name_constraints.value, x509.NameConstraints)
        and not name_constraints.value.permitted_subtrees
        and not name_constraints.value.excluded_subtrees
    ):
        raise refuse("nameConstraints has no subtrees")
    eku = extensions.get(ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is not None and isinstance(eku.value, x509.ExtendedKeyUsage):
        allowed = {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if not allowed.intersection(eku.value):
            raise refuse("extendedKeyUsage excludes clientAuth")


def verify_proof_of_possession(
    ca: x509.Certificate, verification_pem: str | bytes, registration_code: str, now: datetime
) -> None:
    """AWS IoT's CA registration proof: a certificate whose CN is the account's registration code,
    signed by the CA's private key. Checked here too, because moto does not check it.

    Raises:
        InvalidCertificate: invalid_chain (wrong CN, not signed by the CA, or a CA that does not
            decode), expired (not currently valid), malformed_certificate, weak_signature or
            weak_key (the baseline policy).
    """
    cert = load_certificate(verification_pem)
    check_certificate(cert)
    if _single_attribute(cert.subject, NameOID.COMMON_NAME) != registration_code:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN,
            "verification certificate common name is not the registration code",
        )
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidCertificate(
            RejectionReason.EXPIRED, "verification certificate is not currently valid"
        )
    if cert.version is not x509.Version.v3:
        # OpenSSL 3.0's `x509 -req` (AWS's documented recipe) writes v1 unless it is given an
        # extension, and the verifier below requires v3. The proof only has to show the CA's key
        # signed it: check that directly (issuer name and signature).
        _verify_signed_by(cert, ca)
        return
    # Verified with the CA policy device certificates will meet (basicConstraints critical,
    # allowed key algorithms and sizes), so a CA that could never admit a device is refused here
    # rather than every one of its devices later.
    with decoding("verification certificate"):
        try:
            _verifier(ca, now, verification.ExtensionPolicy.permit_all()).verify(cert, [])
        except verification.VerificationError as exc:
            raise InvalidCertificate(
                RejectionReason.INVALID_CHAIN,
                "verification certificate does not verify against the CA under the device policy",
                details={"error": str(exc)[:300]},
            ) from None


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """`cert` names `ca` as its issuer and verifies with its key.

    Raises:
        InvalidCertificate(invalid_chain): it does not.
    """
    try:
        with decoding("verification certificate"):
            cert.verify_directly_issued_by(ca)
    except (InvalidCertificate, InvalidSignature):
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN, "verification certificate is not signed by the CA"
        ) from None
