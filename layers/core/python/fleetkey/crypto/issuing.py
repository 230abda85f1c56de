"""X.509 for fleetkey's issuing CA, whose private key never leaves KMS.

cryptography's builders sign only with a private key in hand. So each builder is first signed
with a throwaway key of the CA's curve: that yields the exact to-be-signed bytes
(TBSCertificate, TBSCertList, CertificationRequestInfo) and the outer signatureAlgorithm. The
to-be-signed bytes are hashed (SHA-256 for P-256, SHA-384 for P-384), the `DigestSigner` signs
the hash (KMS `Sign(MessageType="DIGEST")`: no 4,096-byte limit, which a CRL outgrows), and the
DER is reassembled as SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature } (RFC 5280 §4.1
and §5.1, RFC 2986 §4). Every result is parsed again by cryptography and verified with the key
that must have signed it before it is returned: a KMS key other than the one expected fails
loudly (`IssuingKeyMismatch`) instead of handing out certificates nobody can verify.

What the issuing CA issues (RFC 5280 profiles):
- itself, self-signed (`issuing_ca_certificate`) or as a request to a customer's root
  (`issuing_ca_request`, then `check_issuing_ca` on what comes back): cA true, pathLen 0,
  keyCertSign and cRLSign;
- device certificates (`device_certificate`): subject CN = the device id only, digitalSignature,
  clientAuth, not a CA, with the CRL distribution point;
- AWS IoT's CA proof of possession (`verification_certificate`);
- CRLs (`revocation_list`) and PKCS#7 certs-only bundles for EST (`certs_only`).

And what it reads from devices: rotation CSRs (`load_rotation_csr`, `check_requested`).

Times are timezone-aware datetimes (they are compared with cryptography's `*_utc` values).
Whatever the signer raises (a KMS ClientError: throttling, a disabled key, a missing grant)
propagates unchanged from every function that signs; each signs exactly once.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Final, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from fleetkey.crypto.certificates import check_ca_profile, load_certificate
from fleetkey.crypto.x509_policy import (
    check_certificate,
    check_csr,
    decode_certificate,
    decoding,
    malformed,
    pem_bytes,
)
from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import FleetkeyError, InvalidCertificate, InvalidRequest

__all__ = [
    "MAX_CHAIN_CERTIFICATES",
    "MAX_CSR_BYTES",
    "CsrNotIssuable",
    "DigestSigner",
    "IssuingKeyMismatch",
    "RevokedEntry",
    "certs_only",
    "check_issuing_ca",
    "check_requested",
    "device_certificate",
    "issuing_ca_certificate",
    "issuing_ca_request",
    "load_rotation_csr",
    "random_serial",
    "revocation_list",
    "sign_certificate",
    "sign_crl",
    "sign_csr",
    "spki_sha256",
    "verification_certificate",
]

# A rotation CSR is a few hundred bytes (P-256) to about 1.5 KiB (RSA-4096, PEM).
MAX_CSR_BYTES: Final = 8 * 1024
# Certificates above the issuing CA in `pki install`'s chain (intermediates and the root).
MAX_CHAIN_CERTIFICATES: Final = 5
# The CA and the AWS IoT verification certificate start a little in the past, so that a clock
# slightly behind (AWS IoT's, a relying party's) does not find them not yet valid.
CLOCK_SKEW: Final = timedelta(minutes=5)
# AWS IoT's proof of possession is checked once, at RegisterCACertificate.
VERIFICATION_VALIDITY: Final = timedelta(days=1)

# The CA's curve decides the hash: the signature is as strong as the key (SP 800-57).
_HASHES: Final[dict[str, Callable[[], hashes.SHA256 | hashes.SHA384]]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
}
_SEQUENCE: Final = b"\x30"
_BIT_STRING: Final = b"\x03"
# RFC 5280 ub-common-name: a device id longer than this cannot be a certificate's CN.
_MAX_COMMON_NAME: Final = 64
# PKCS #9 extensionRequest (RFC 2985 §5.4.2), the attribute that carries requested extensions.
_EXTENSION_REQUEST: Final = x509.ObjectIdentifier("1.2.840.113549.1.9.14")


class DigestSigner(Protocol):
    """A P-256 or P-384 private key held elsewhere (KMS): it signs a prehashed digest."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature over `digest` (SHA-256 for P-256, SHA-384 for P-384)."""
        ...


class IssuingKeyMismatch(FleetkeyError):
    """The issuing CA's signer does not hold the CA's key, or what it signed does not verify with
    it: a misconfigured key id or a broken signer, never the caller's fault."""

    code = "issuing_key_mismatch"
    status = 500


class CsrNotIssuable(InvalidRequest):
    """A well-formed CSR that asks for more than (or other than) what fleetkey issues a device."""

    code = "invalid_csr"


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """A revoked certificate, as the CRL lists it."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags


# ---- signing with a DigestSigner ---------------------------------------------------------------


@asn1.sequence
class _Signed:
    # Certificate, CertificateList and CertificationRequest share this outer shape.
    tbs: asn1.TLV
    signature_algorithm: asn1.TLV
    signature: asn1.BitString


@asn1.sequence
class _RequestInfo:
    version: asn1.TLV
    subject: asn1.TLV
    subject_public_key_info: asn1.TLV
    attributes: asn1.TLV


def _der(tag: bytes, content: bytes) -> bytes:
    """One DER element (definite, minimal length: X.690 §10.1)."""
    size = len(content)
    if size < 0x80:
        return tag + bytes([size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return tag + bytes([0x80 | len(octets)]) + octets + content


def _tlv_bytes(tlv: asn1.TLV) -> bytes:
    return _der(tlv.tag_bytes, bytes(tlv.data))


def _hash_for(key: ec.EllipticCurvePublicKey) -> hashes.SHA256 | hashes.SHA384:
    """Raises:
    ValueError: not a P-256/P-384 key.
    """
    factory = _HASHES.get(key.curve.name)
    if factory is None:
        raise ValueError(f"the issuing CA key must be P-256 or P-384, not {key.curve.name}")
    return factory()


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signed_der(
    template_der: bytes, tbs: bytes, signer: DigestSigner, algorithm: hashes.HashAlgorithm
) -> bytes:
    """`tbs` signed by `signer`, with the signatureAlgorithm of `template_der` (the same
    structure signed by a throwaway key): SEQUENCE { tbs, signatureAlgorithm, BIT STRING }."""
    outer = asn1.decode_der(_Signed, template_der)
    digest = hashes.Hash(algorithm)
    digest.update(tbs)
    signature = signer.sign_digest(digest.finalize())
    # The signature fills the BIT STRING: no unused bits.
    body = tbs + _tlv_bytes(outer.signature_algorithm) + _der(_BIT_STRING, b"\x00" + signature)
    return _der(_SEQUENCE, body)


_Parsed = TypeVar("_Parsed")


def _reparse(load: Callable[[bytes], _Parsed], der: bytes, what: str) -> _Parsed:
    """Raises:
    IssuingKeyMismatch: the assembled DER does not parse (the signer's answer broke it).
    """
    try:
        return load(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IssuingKeyMismatch(f"the signed {what} does not parse: {exc}") from None


def _verify_signed(
    key: ec.EllipticCurvePublicKey,
    signature: bytes,
    tbs: bytes,
    algorithm: hashes.HashAlgorithm,
    what: str,
) -> None:
    """Raises:
    IssuingKeyMismatch: `signature` over `tbs` does not verify with `key`.
    """
    try:
        key.verify(signature, tbs, ec.ECDSA(algorithm))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        raise IssuingKeyMismatch(
            f"the {what} the issuing CA's signer signed does not verify with its public key"
        ) from None


def _throwaway(key: ec.EllipticCurvePublicKey) -> ec.EllipticCurvePrivateKey:
    # Signs only the template, whose signature is discarded.
    return ec.generate_private_key(key.curve)


def sign_certificate(builder: x509.CertificateBuilder, signer: DigestSigner) -> x509.Certificate:
    """`builder` (complete but for the signature) signed by `signer`.

    Raises:
        IssuingKeyMismatch: the result does not verify with `signer.public_key()`.
        ValueError: the builder is incomplete, or the signer's key is not P-256/P-384.
    """
    key = signer.public_key()
    algorithm = _hash_for(key)
    template = builder.sign(_throwaway(key), algorithm)
    tbs = template.tbs_certificate_bytes
    der = _signed_der(template.public_bytes(serialization.Encoding.DER), tbs, signer, algorithm)
    certificate = _reparse(x509.load_der_x509_certificate, der, "certificate")
    _verify_signed(
        key, certificate.signature, certificate.tbs_certificate_bytes, algorithm, "certificate"
    )
    return certificate


def sign_crl(
    builder: x509.CertificateRevocationListBuilder, signer: DigestSigner
) -> x509.CertificateRevocationList:
    """`builder` (complete but for the signature) signed by `signer`.

    Raises:
        IssuingKeyMismatch: the result does not verify with `signer.public_key()`.
        ValueError: the builder is incomplete, or the signer's key is not P-256/P-384.
    """
    key = signer.public_key()
    algorithm = _hash_for(key)
    template = builder.sign(_throwaway(key), algorithm)
    tbs = template.tbs_certlist_bytes
    der = _signed_der(template.public_bytes(serialization.Encoding.DER), tbs, signer, algorithm)
    crl = _reparse(x509.load_der_x509_crl, der, "CRL")
    _verify_signed(key, crl.signature, crl.tbs_certlist_bytes, algorithm, "CRL")
    return crl


def sign_csr(
    builder: x509.CertificateSigningRequestBuilder, signer: DigestSigner
) -> x509.CertificateSigningRequest:
    """`builder` signed by `signer`, for `signer`'s public key. A CSR builder takes its public
    key from the key that signs it, so the throwaway key's SubjectPublicKeyInfo is replaced by
    the signer's in the CertificationRequestInfo before it is signed.

    Raises:
        IssuingKeyMismatch: the result is not for `signer.public_key()` or does not verify with it.
        ValueError: the builder is incomplete, or the signer's key is not P-256/P-384.
    """
    key = signer.public_key()
    algorithm = _hash_for(key)
    template = builder.sign(_throwaway(key), algorithm)
    info = asn1.decode_der(_RequestInfo, template.tbs_certrequest_bytes)
    tbs = _der(
        _SEQUENCE,
        _tlv_bytes(info.version)
        + _tlv_bytes(info.subject)
        + _spki(key)
        + _tlv_bytes(info.attributes),
    )
    der = _signed_der(template.public_bytes(serialization.Encoding.DER), tbs, signer, algorithm)
    csr = _reparse(x509.load_der_x509_csr, der, "CSR")
    if _spki(csr.public_key()) != _spki(key):
        raise IssuingKeyMismatch("the signed CSR is not for the issuing CA's key")
    _verify_signed(key, csr.signature, csr.tbs_certrequest_bytes, algorithm, "CSR")
    return csr


def _require_ca_key(signer: DigestSigner, ca: x509.Certificate) -> None:
    """Before any signature: the signer holds the key `ca` certifies.

    Raises:
        IssuingKeyMismatch: it does not.
    """
    if _spki(signer.public_key()) != _spki(ca.public_key()):
        raise IssuingKeyMismatch(
            "the issuing CA's signer holds another key than the CA certificate's"
        )


# ---- what the issuing CA signs -----------------------------------------------------------------


def random_serial() -> int:
    """128 random bits, positive and non-zero (RFC 5280 §4.1.2.2; CA/B BR §7.1: at least 64
    bits of randomness)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def spki_sha256(public_key: CertificatePublicKeyTypes) -> str:
    """Hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(_spki(public_key)).hexdigest()


_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_DEVICE_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
# The issuing CA issues device certificates only, never another CA.
_CA_CONSTRAINTS: Final = x509.BasicConstraints(ca=True, path_length=0)
_NOT_A_CA: Final = x509.BasicConstraints(ca=False, path_length=None)


def _authority_key_identifier(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The CA's own subjectKeyIdentifier as keyIdentifier (RFC 5280 §4.2.1.1), or one derived
    from its key when it has none."""
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def issuing_ca_certificate(
    signer: DigestSigner, subject: x509.Name, *, now: datetime, validity_days: int
) -> x509.Certificate:
    """The issuing CA, self-signed by `signer`: cA true with pathLen 0 (critical), keyCertSign
    and cRLSign (critical), subject and authority key identifiers, a 128-bit random serial,
    valid from `now` (less CLOCK_SKEW) for `validity_days`. One `sign_digest`.

    Raises:
        InvalidRequest: an empty subject, or `validity_days` not positive.
        IssuingKeyMismatch: the signature does not verify with the signer's key.
    """
    if len(subject) == 0:
        raise InvalidRequest("the issuing CA subject is empty")
    if validity_days <= 0:
        raise InvalidRequest("the issuing CA validity must be at least one day")
    key = signer.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key)
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(_CA_CONSTRAINTS, critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key), critical=False)
    )
    return sign_certificate(builder, signer)


def issuing_ca_request(signer: DigestSigner, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A PKCS #10 request for the issuing CA's key, to be signed by a customer's root (or
    intermediate): it requests cA true with pathLen 0 and keyCertSign and cRLSign, all critical.
    One `sign_digest`.

    Raises:
        InvalidRequest: an empty subject.
        IssuingKeyMismatch: the signature does not verify with the signer's key.
    """
    if len(subject) == 0:
        raise InvalidRequest("the issuing CA subject is empty")
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(_CA_CONSTRAINTS, critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
    )
    return sign_csr(builder, signer)


def device_certificate(
    signer: DigestSigner,
    ca: x509.Certificate,
    *,
    public_key: CertificatePublicKeyTypes,
    device_id: str,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    crl_url: str,
) -> x509.Certificate:
    """A device's operational certificate: subject CN = `device_id` only, issuer the CA's
    subject, keyUsage digitalSignature (critical), extendedKeyUsage clientAuth, not a CA
    (critical), key identifiers, and `crl_url` as its CRL distribution point. One `sign_digest`.

    Raises:
        InvalidRequest: `device_id` cannot be a common name (1 to 64 characters).
        IssuingKeyMismatch: `signer` does not hold the CA's key (checked before signing), or the
            signature does not verify with it.
        ValueError: an impossible serial or validity (the caller's bug).
    """
    if not 1 <= len(device_id) <= _MAX_COMMON_NAME:
        raise InvalidRequest("the device id cannot be a certificate's common name")
    _require_ca_key(signer, ca)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_NOT_A_CA, critical=True)
        .add_extension(_DEVICE_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca), critical=False)
        .add_extension(
            x509.CRLDistributionPoints(
                [
                    x509.DistributionPoint(
                        full_name=[x509.UniformResourceIdentifier(crl_url)],
                        relative_name=None,
                        reasons=None,
                        crl_issuer=None,
                    )
                ]
            ),
            critical=False,
        )
    )
    return sign_certificate(builder, signer)


def verification_certificate(
    signer: DigestSigner, ca: x509.Certificate, registration_code: str, *, now: datetime
) -> x509.Certificate:
    """AWS IoT RegisterCACertificate's proof of possession: subject CN = the account's
    registration code, the public key of a fresh key nobody keeps, signed by the CA, valid for
    VERIFICATION_VALIDITY from `now` (less CLOCK_SKEW). One `sign_digest`.

    Raises:
        InvalidRequest: `registration_code` cannot be a common name (1 to 64 characters).
        IssuingKeyMismatch: `signer` does not hold the CA's key, or the signature does not
            verify with it.
    """
    if not 1 <= len(registration_code) <= _MAX_COMMON_NAME:
        raise InvalidRequest("the registration code cannot be a certificate's common name")
    _require_ca_key(signer, ca)
    # Only the CA's signature matters to AWS IoT; the key itself is thrown away.
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_code)]))
        .issuer_name(ca.subject)
        .public_key(key)
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VERIFICATION_VALIDITY)
        .add_extension(_NOT_A_CA, critical=True)
        .add_extension(_DEVICE_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(_authority_key_identifier(ca), critical=False)
    )
    return sign_certificate(builder, signer)


def revocation_list(
    signer: DigestSigner,
    ca: x509.Certificate,
    revoked: Sequence[RevokedEntry],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """The CA's CRL (RFC 5280 §5): issuer the CA's subject, the given update times, extensions
    authorityKeyIdentifier and cRLNumber `number`, one entry per revoked serial (a serial listed
    twice appears once, with its earliest revocation). The reasonCode entry extension is left
    out for `unspecified`, as RFC 5280 §5.3.1 asks. One `sign_digest`, whatever the size.

    Raises:
        IssuingKeyMismatch: `signer` does not hold the CA's key, or the signature does not
            verify with it.
        ValueError: a negative `number`, or an impossible serial (the caller's bug).
    """
    _require_ca_key(signer, ca)
    entries: dict[int, RevokedEntry] = {}
    for entry in sorted(revoked, key=lambda e: e.revoked_at):
        entries.setdefault(entry.serial, entry)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(_authority_key_identifier(ca), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in entries.values():
        revoked_builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not x509.ReasonFlags.unspecified:
            revoked_builder = revoked_builder.add_extension(
                x509.CRLReason(entry.reason), critical=False
            )
        builder = builder.add_revoked_certificate(revoked_builder.build())
    return sign_crl(builder, signer)


def certs_only(certificates: Sequence[x509.Certificate]) -> bytes:
    """DER PKCS #7 SignedData holding only `certificates` (RFC 7030 §4.1.3 "certs-only").

    Raises:
        ValueError: no certificates.
    """
    if not certificates:
        raise ValueError("a certs-only bundle needs at least one certificate")
    return pkcs7.serialize_certificates(list(certificates), serialization.Encoding.DER)


# ---- pki install: a subordinate issuing CA ------------------------------------------------------


def _refuse_chain(message: str) -> InvalidCertificate:
    return InvalidCertificate(RejectionReason.INVALID_CHAIN, message)


def _load_chain(chain_pem: str) -> list[x509.Certificate]:
    """The certificates of `chain_pem`, in order; none for blank text.

    Raises:
        InvalidCertificate(malformed_certificate): not only PEM certificates, more than
            MAX_CHAIN_CERTIFICATES, or one does not decode.
    """
    data = pem_bytes(chain_pem, "chain")
    if not data.strip():
        return []
    with decoding("chain"):
        chain = x509.load_pem_x509_certificates(data)
    # cryptography skips PEM blocks of other types (a private key pasted by mistake).
    if data.count(b"-----BEGIN ") != len(chain):
        raise malformed("the chain holds PEM blocks that are not certificates")
    if len(chain) > MAX_CHAIN_CERTIFICATES:
        raise malformed(f"the chain has more than {MAX_CHAIN_CERTIFICATES} certificates")
    for certificate in chain:
        decode_certificate(certificate)
    return chain


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """`certificate` names `issuer` as its issuer and verifies with its key."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _check_valid_at(certificate: x509.Certificate, now: datetime, what: str) -> None:
    if now < certificate.not_valid_before_utc:
        raise InvalidCertificate(RejectionReason.NOT_YET_VALID, f"{what} is not yet valid")
    if now > certificate.not_valid_after_utc:
        raise InvalidCertificate(RejectionReason.EXPIRED, f"{what} has expired")


def _check_issuer(issuer: x509.Certificate, below: int, what: str) -> None:
    """`issuer`, with `below` CA certificates under it in the path, may issue them.

    Raises:
        InvalidCertificate(invalid_chain): not a CA, no keyCertSign, or a path length
            constraint the path exceeds.
    """
    with decoding(what):
        extensions = issuer.extensions
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _refuse_chain(f"{what} is not a CA (no basicConstraints)") from None
    if not constraints.ca:
        raise _refuse_chain(f"{what} is not a CA")
    if constraints.path_length is not None and constraints.path_length < below:
        raise _refuse_chain(f"{what} allows {constraints.path_length} CAs below it, not {below}")
    try:
        key_usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise _refuse_chain(f"{what} has no keyUsage") from None
    if not key_usage.key_cert_sign:
        raise _refuse_chain(f"{what} may not sign certificates (no keyCertSign)")


def check_issuing_ca(
    certificate_pem: str,
    chain_pem: str,
    public_key: CertificatePublicKeyTypes,
    now: datetime,
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The issuing CA certificate a customer's CA signed for fleetkey's KMS key (`pki install`),
    with its chain: `chain_pem` is the certificate's issuer first, then each one's issuer, up to
    a self-signed root (at most MAX_CHAIN_CERTIFICATES); blank only when the certificate is
    itself self-signed. Every certificate passes the baseline policy and is valid at `now`; the
    issuing CA is for `public_key`, meets the CA profile devices are verified under
    (`certificates.check_ca_profile`) and has keyCertSign and cRLSign; each link verifies
    (signature and names) and each issuer is a CA allowed to issue what is below it.

    Returns the certificate and the chain, parsed.

    Raises:
        InvalidCertificate: malformed_certificate (does not decode, not one certificate, a chain
            too long or holding other PEM blocks), weak_key / weak_signature (baseline policy),
            unexpected_public_key (not for `public_key`), expired / not_yet_valid (any
            certificate of the path), invalid_chain (not a CA, missing key usage, a link that
            does not verify, no self-signed root at the end).
    """
    certificate = load_certificate(certificate_pem)
    chain = _load_chain(chain_pem)
    path = [certificate, *chain]
    for certificate_in_path in path:
        check_certificate(certificate_in_path)
    if _spki(certificate.public_key()) != _spki(public_key):
        raise InvalidCertificate(
            RejectionReason.UNEXPECTED_PUBLIC_KEY,
            "the issuing CA certificate is not for the issuing CA's KMS key",
        )
    _check_issuer(certificate, 0, "the issuing CA certificate")
    check_ca_profile(certificate)
    key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    if not key_usage.crl_sign:
        raise _refuse_chain("the issuing CA certificate may not sign CRLs (no cRLSign)")
    for position, certificate_in_path in enumerate(path):
        what = "the issuing CA certificate" if position == 0 else f"chain certificate {position}"
        _check_valid_at(certificate_in_path, now, what)
    for position, (subject, issuer) in enumerate(pairwise(path)):
        below = "the issuing CA certificate" if position == 0 else f"chain certificate {position}"
        if subject.issuer == subject.subject:
            raise _refuse_chain(f"the chain goes on past the self-signed {below}")
        if not _issued_by(subject, issuer):
            raise _refuse_chain(f"{below} is not issued by chain certificate {position + 1}")
        _check_issuer(issuer, position + 1, f"chain certificate {position + 1}")
    root = path[-1]
    if root.issuer != root.subject or not _issued_by(root, root):
        raise _refuse_chain("the chain does not end in a self-signed root")
    return certificate, chain


# ---- rotation CSRs -----------------------------------------------------------------------------


def load_rotation_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """A device's rotation CSR: `str` is one PEM CSR, `bytes` one DER CSR (EST), at most
    MAX_CSR_BYTES either way, fully decoded and checked with the baseline policy
    (`x509_policy.check_csr` with the default `KeyPolicy`; the caller applies the device
    profile's key policy on top).

    Raises:
        InvalidCertificate: malformed_certificate (too large, not one PEM CSR, trailing data, a
            field that does not decode, an unrecognized critical extension), weak_key,
            weak_signature, invalid_chain (the CSR's signature does not verify with its key).
    """
    if len(data) > MAX_CSR_BYTES:
        raise malformed(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    if isinstance(data, str):
        pem = pem_bytes(data, "CSR")
        # cryptography reads the first CSR block and ignores any other PEM block around it.
        if pem.count(b"-----BEGIN ") != 1:
            raise malformed("expected exactly one PEM CSR")
        with decoding("CSR"):
            csr = x509.load_pem_x509_csr(pem)
    else:
        with decoding("CSR"):
            csr = x509.load_der_x509_csr(bytes(data))
    check_csr(csr, KeyPolicy())
    return csr


def _requested_key_usage_allowed(key_usage: x509.KeyUsage) -> bool:
    # encipher_only/decipher_only are readable only with keyAgreement, which is refused first.
    return not (
        key_usage.content_commitment
        or key_usage.key_encipherment
        or key_usage.data_encipherment
        or key_usage.key_agreement
        or key_usage.key_cert_sign
        or key_usage.crl_sign
    )


def check_requested(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    """The CSR asks for nothing beyond what `device_certificate` issues `device_id`: its subject
    is exactly one RDN holding one commonName equal to `device_id`; its only attribute, if any,
    is the extension request, whose extensions are within keyUsage digitalSignature,
    extendedKeyUsage clientAuth and basicConstraints cA false (no subjectAltName, nothing else).
    `csr` comes from `load_rotation_csr`.

    Raises:
        CsrNotIssuable: what was refused, first found.
        InvalidCertificate(malformed_certificate): a field does not decode.
    """
    with decoding("CSR"):
        rdns = csr.subject.rdns
        attributes = list(csr.attributes)
        extensions = list(csr.extensions)
    if len(rdns) != 1 or len(rdns[0]) != 1:
        raise CsrNotIssuable("the CSR subject must be one common name and nothing else")
    (name,) = rdns[0]
    if name.oid != NameOID.COMMON_NAME:
        raise CsrNotIssuable("the CSR subject must be one common name and nothing else")
    if name.value != device_id:
        raise CsrNotIssuable("the CSR subject common name is not the device id")
    for attribute in attributes:
        if attribute.oid == AttributeOID.CHALLENGE_PASSWORD:
            raise CsrNotIssuable("the CSR carries a challengePassword attribute")
        if attribute.oid != _EXTENSION_REQUEST:
            raise CsrNotIssuable(
                f"the CSR carries the attribute {attribute.oid.dotted_string}, which fleetkey "
                "does not issue"
            )
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.KeyUsage):
            if not _requested_key_usage_allowed(value):
                raise CsrNotIssuable("the CSR requests key usages other than digitalSignature")
        elif isinstance(value, x509.ExtendedKeyUsage):
            if any(usage != ExtendedKeyUsageOID.CLIENT_AUTH for usage in value):
                raise CsrNotIssuable("the CSR requests extended key usages other than clientAuth")
        elif isinstance(value, x509.BasicConstraints):
            if value.ca or value.path_length is not None:
                raise CsrNotIssuable("the CSR requests a CA certificate")
        else:
            raise CsrNotIssuable(
                f"the CSR requests the extension {type(value).__name__} "
                f"({extension.oid.dotted_string}), which fleetkey does not issue"
            )
