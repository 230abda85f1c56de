"""X.509 checks for device and manufacturer CA certificates, with cryptography's verifier.

AWS IoT (and moto) accept whatever a registered CA appears to have issued; fleetkey decides trust
itself: chain to the manufacturer CA, validity window, key usage, key strength.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate

# A PEM certificate chain is a few KiB; anything far larger is not a certificate.
MAX_PEM_BYTES = 64 * 1024


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
    """Parse one PEM certificate.

    Raises:
        InvalidCertificate(malformed_certificate): not a single parseable PEM certificate.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_PEM_BYTES:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "certificate PEM is too large"
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "not a PEM X.509 certificate"
        ) from None
    if len(certs) != 1:
        raise InvalidCertificate(
            RejectionReason.MALFORMED_CERTIFICATE, "expected exactly one certificate"
        )
    return certs[0]


def certificate_id(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def describe_key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec:{key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa:{key.key_size}"
    return f"other:{type(key).__name__}"


def check_key_policy(cert: x509.Certificate, policy: KeyPolicy) -> None:
    """Raises InvalidCertificate(weak_key) for a key type or size the policy does not allow."""
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
# (devices are named by subject CN, as AWS IoT thing names).
_DEVICE_EE_POLICY = (
    verification.ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _forbid_ca)
    .require_present(
        x509.KeyUsage, verification.Criticality.AGNOSTIC, _require_digital_signature
    )
    .may_be_present(
        x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, _require_client_auth
    )
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
    """Verify `leaf` chains to the trust anchor `anchor` at time `now`.

    Raises:
        InvalidCertificate: not_yet_valid / expired (leaf validity window), wrong_issuer (another
            CA's name), invalid_chain (signature, CA constraints, key usage, anchor validity).
    """
    if now < leaf.not_valid_before_utc:
        raise InvalidCertificate(RejectionReason.NOT_YET_VALID, "certificate is not yet valid")
    if now > leaf.not_valid_after_utc:
        raise InvalidCertificate(RejectionReason.EXPIRED, "certificate has expired")
    if leaf.issuer != anchor.subject:
        raise InvalidCertificate(
            RejectionReason.WRONG_ISSUER, "certificate was not issued by the manufacturer CA"
        )
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

    Raises:
        InvalidCertificate: with the RejectionReason of the first check that failed.
    """
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
    """A manufacturer CA must be a currently valid CA certificate allowed to sign certificates.

    Raises:
        InvalidCertificate: malformed, not a CA, no keyCertSign, outside its validity window,
            or a self-signed certificate whose signature does not verify.
    """
    cert = load_certificate(pem)
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidCertificate(RejectionReason.EXPIRED, "CA certificate is not currently valid")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN, "CA certificate lacks basicConstraints or keyUsage"
        ) from None
    if not constraints.ca or not key_usage.key_cert_sign:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN, "certificate is not a CA allowed to sign certificates"
        )
    if cert.issuer == cert.subject:
        try:
            cert.verify_directly_issued_by(cert)
        except (InvalidSignature, ValueError, TypeError):
            raise InvalidCertificate(
                RejectionReason.INVALID_CHAIN, "self-signed CA signature does not verify"
            ) from None
    return cert


def verify_proof_of_possession(
    ca: x509.Certificate, verification_pem: str | bytes, registration_code: str, now: datetime
) -> None:
    """AWS IoT's CA registration proof: a certificate whose CN is the account's registration code,
    signed by the CA's private key. Checked here too, because moto does not check it.

    Raises:
        InvalidCertificate(invalid_chain): wrong CN, not signed by the CA, or not currently valid.
    """
    cert = load_certificate(verification_pem)
    if _single_attribute(cert.subject, NameOID.COMMON_NAME) != registration_code:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN,
            "verification certificate common name is not the registration code",
        )
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidCertificate(
            RejectionReason.EXPIRED, "verification certificate is not currently valid"
        )
    # Verified with the CA policy device certificates will meet (basicConstraints critical,
    # allowed key algorithms and sizes), so a CA that could never admit a device is refused here
    # rather than every one of its devices later.
    try:
        _verifier(ca, now, verification.ExtensionPolicy.permit_all()).verify(cert, [])
    except verification.VerificationError as exc:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN,
            "verification certificate does not verify against the CA under the device policy",
            details={"error": str(exc)[:300]},
        ) from None
