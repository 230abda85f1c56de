"""The baseline X.509 policy: what every certificate and CSR fleetkey reads must be, in any role.

Device certificates, manufacturer CA certificates, CA proof-of-possession (verification)
certificates and rotation CSRs all pass through here before any role-specific rule looks at them.
The rules come from RFC 5280 (certificate profile), RFC 5480 (EC keys), RFC 4055 / RFC 8017 (RSA)
and the CA/Browser Forum Baseline Requirements §6.1.5-6.1.6 and §7.1.3 (key and algorithm
encodings), where they fit devices:

- everything decodes: subject, issuer, serial, validity, every extension (critical or not), public
  key, signature algorithm; a parse failure is a refusal, never an exception of the parser's type;
- an unrecognized critical extension is refused (RFC 5280 §4.2);
- serial number positive, non-zero, at most 20 octets (RFC 5280 §4.1.2.2);
- notBefore not after notAfter; the signature algorithm inside and outside the TBS agree
  (RFC 5280 §4.1.1.2);
- signatures: ECDSA or RSA (PKCS#1 v1.5 or PSS) with SHA-256/384/512 only;
- public keys: EC on P-256/P-384 with named-curve parameters (never explicit, RFC 5480 §2.1.1),
  or RSA of 2048 to 4096 bits with an odd public exponent 2^16 < e < 2^64; nothing else, and in
  the canonical SubjectPublicKeyInfo encoding only.

Profiles (`KeyPolicy`) may be stricter; never looser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Final

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate

# A PEM certificate, chain or CSR is a few KiB; anything far larger is not one.
MAX_PEM_BYTES: Final = 64 * 1024

BASELINE_EC_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
RSA_MIN_BITS: Final = 2048
# Larger keys buy devices nothing and cost every verification; OpenSSL's RSA verification also
# caps the exponent of moduli over 3072 bits (below), so 4096 is the ceiling.
RSA_MAX_BITS: Final = 4096
# CA/Browser Forum BR §6.1.6: odd, and at least 2^16 + 1. Its upper bound (2^256 - 1) is
# lowered to 2^64 - 1: OpenSSL refuses to verify with a modulus over 3072 bits and an exponent
# over 64 bits (RSA_R_BAD_E_VALUE: OPENSSL_RSA_MAX_PUBEXP_BITS = 64 above
# OPENSSL_RSA_SMALL_MODULUS_BITS = 3072), so such a device would register and then never
# get a token, its signatures refused as invalid.
RSA_MIN_EXPONENT: Final = 2**16 + 1
RSA_MAX_EXPONENT: Final = 2**64 - 1
MAX_SERIAL_OCTETS: Final = 20

SOUND_SIGNATURE_ALGORITHMS: Final = frozenset(
    {
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
    }
)
_SOUND_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


# The outer structures, to reach the raw bytes `cryptography` does not expose (the certificate's
# own SubjectPublicKeyInfo and the two signature AlgorithmIdentifiers). Decoded with cryptography's
# strict DER decoder, never by hand; the fields fleetkey does not need stay opaque TLVs.
@asn1.sequence
class _Certificate:
    tbs_certificate: asn1.TLV
    signature_algorithm: asn1.TLV
    signature_value: asn1.BitString


@asn1.sequence
class _TbsCertificate:
    # v1 certificates omit the version (OpenSSL 3.0's `x509 -req` without extensions makes them).
    version: Annotated[int, asn1.Explicit(0), asn1.Default(0)]
    serial_number: asn1.TLV
    signature: asn1.TLV
    issuer: asn1.TLV
    validity: asn1.TLV
    subject: asn1.TLV
    subject_public_key_info: asn1.TLV
    issuer_unique_id: Annotated[asn1.BitString | None, asn1.Implicit(1)]
    subject_unique_id: Annotated[asn1.BitString | None, asn1.Implicit(2)]
    extensions: Annotated[list[asn1.TLV] | None, asn1.Explicit(3)]


@asn1.sequence
class _Validity:
    not_before: asn1.TLV
    not_after: asn1.TLV


@asn1.sequence
class _CertificationRequestInfo:
    version: int
    subject: asn1.TLV
    subject_public_key_info: asn1.TLV
    attributes: Annotated[asn1.SetOf[asn1.TLV], asn1.Implicit(0)]


def malformed(message: str, **details: str) -> InvalidCertificate:
    """The refusal for anything that does not decode or does not conform to RFC 5280."""
    return InvalidCertificate(
        RejectionReason.MALFORMED_CERTIFICATE, message, details=dict(details) or None
    )


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """Turn any failure of cryptography's parsers inside the block into malformed_certificate.

    cryptography parses most fields lazily and reports a bad one with whatever type its parser
    raises (ValueError, UnsupportedAlgorithm, DuplicateExtension, UnsupportedGeneralNameType,
    InvalidVersion, TypeError...); the set changes between releases, so the boundary catches every
    Exception. What cryptography only warns about (a serial that is not positive, a name attribute
    outside RFC 5280's bounds) is checked explicitly by the policy instead of by turning warnings
    into errors: warning filters are process-wide state, which threads (the local stack serves
    requests on several) would race on.

    Raises:
        InvalidCertificate(malformed_certificate): the block raised.
    """
    try:
        yield
    except InvalidCertificate:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is the input's fault
        raise malformed(
            f"{what} does not decode", error=type(exc).__name__, detail=str(exc)[:200]
        ) from None


def pem_bytes(pem: str | bytes, what: str) -> bytes:
    """The PEM text as bytes, bounded in size.

    Raises:
        InvalidCertificate(malformed_certificate): larger than MAX_PEM_BYTES or not ASCII text.
    """
    if isinstance(pem, str):
        try:
            pem = pem.encode("ascii")
        except UnicodeEncodeError:
            raise malformed(f"{what} PEM is not ASCII") from None
    if len(pem) > MAX_PEM_BYTES:
        raise malformed(f"{what} PEM is too large")
    return pem


# ---- certificates ------------------------------------------------------------------------------


def decode_certificate(cert: x509.Certificate) -> None:
    """Force-decode every field fleetkey (or cryptography's verifier) will read, once, so later
    code works on values known to decode. Idempotent and cheap.

    Raises:
        InvalidCertificate(malformed_certificate): a field does not decode.
    """
    with decoding("certificate"):
        _ = cert.version, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
        check_name_bounds(cert.subject)
        check_name_bounds(cert.issuer)
        _ = cert.signature_algorithm_oid, cert.signature_algorithm_parameters
        _ = cert.signature_hash_algorithm, cert.signature, cert.public_key_algorithm_oid
        for extension in cert.extensions:
            _decode_extension(extension)
        cert.public_key()
        outer = asn1.decode_der(_Certificate, cert.public_bytes(serialization.Encoding.DER))
        tbs = asn1.decode_der(_TbsCertificate, cert.tbs_certificate_bytes)
    if _raw(outer.signature_algorithm) != _raw(tbs.signature):
        raise malformed("the signature algorithm differs inside and outside the signed part")


def check_certificate(cert: x509.Certificate) -> None:
    """Apply the baseline policy (module docstring) to a certificate of any role.

    Raises:
        InvalidCertificate, first failing check in this order: malformed_certificate (does not
            decode, bad serial, inverted validity, unrecognized critical extension), weak_key
            (key kind, curve, size, exponent or encoding not allowed), weak_signature (unsound
            signature algorithm).
    """
    decode_certificate(cert)
    check_serial_number(cert.serial_number)
    if cert.not_valid_before_utc > cert.not_valid_after_utc:
        raise malformed("notBefore is after notAfter")
    check_extensions(cert.extensions)
    # The key before the signature: for a self-signed certificate (Ed25519, DSA) the key is the
    # cause, the signature algorithm only its consequence.
    with decoding("certificate"):
        spki = asn1.decode_der(_TbsCertificate, cert.tbs_certificate_bytes).subject_public_key_info
    check_public_key(cert.public_key(), spki)
    check_signature_algorithm(cert.signature_algorithm_oid, cert.signature_hash_algorithm)


_UTC_TIME_TAG: Final = b"\x17"


def check_validity_encoding(
    cert: x509.Certificate, refuse: Callable[[str], InvalidCertificate]
) -> None:
    """RFC 5280 §4.1.2.5: validity dates through 2049 MUST be UTCTime, GeneralizedTime only from
    2050 (cryptography's verifier enforces it on every certificate of a chain, the trust anchor
    included; cryptography's parser accepts both).

    Raises:
        InvalidCertificate: `refuse(message)`, for a date before 2050 as GeneralizedTime.
    """
    with decoding("certificate validity"):
        tbs = asn1.decode_der(_TbsCertificate, cert.tbs_certificate_bytes)
        validity = tbs.validity.parse(_Validity)
    for tlv, when in (
        (validity.not_before, cert.not_valid_before_utc),
        (validity.not_after, cert.not_valid_after_utc),
    ):
        if tlv.tag_bytes != _UTC_TIME_TAG and when.year < 2050:
            raise refuse("a validity date before 2050 is not encoded as UTCTime")


# RFC 5280 Appendix A upper bounds, in characters (cryptography only warns when a parsed name
# exceeds some of them): country names are two letters, a common name 1 to 64 characters
# (ub-common-name), a serial number 1 to 64 (ub-serial-number). Characters, not UTF-8 bytes: a
# 64-character UTF8String CN is conforming even when it takes more than 64 bytes.
_NAME_ATTRIBUTE_BOUNDS: Final = {
    NameOID.COUNTRY_NAME: (2, 2),
    NameOID.JURISDICTION_COUNTRY_NAME: (2, 2),
    NameOID.COMMON_NAME: (1, 64),
    NameOID.SERIAL_NUMBER: (1, 64),
}


def check_name_bounds(name: x509.Name) -> None:
    """Every attribute of `name` decodes, and those with an RFC 5280 size bound respect it.

    Raises:
        InvalidCertificate(malformed_certificate): an attribute does not decode or is out of
            bounds.
    """
    with decoding("name"):
        name.rfc4514_string()
        attributes = list(name)
    for attribute in attributes:
        bounds = _NAME_ATTRIBUTE_BOUNDS.get(attribute.oid)
        if bounds is None:
            continue
        value = attribute.value
        size = len(value)  # characters of a str (bytes only for a bit-string attribute)
        if not bounds[0] <= size <= bounds[1]:
            raise malformed(
                "name attribute is out of RFC 5280 bounds", oid=attribute.oid.dotted_string
            )


def check_serial_number(serial: int) -> None:
    """RFC 5280 §4.1.2.2: a positive integer of at most 20 octets (as DER encodes it).

    Raises:
        InvalidCertificate(malformed_certificate): zero, negative or longer.
    """
    if serial <= 0:
        raise malformed("serial number is not positive")
    # DER content length of a positive INTEGER: one more octet when the top bit would be set.
    if serial.bit_length() // 8 + 1 > MAX_SERIAL_OCTETS:
        raise malformed(f"serial number is longer than {MAX_SERIAL_OCTETS} octets")


def check_extensions(extensions: x509.Extensions) -> None:
    """RFC 5280 §4.2: a critical extension fleetkey (through cryptography) does not recognize
    is refused; every extension's value decodes (checked by `decode_certificate`).

    Raises:
        InvalidCertificate(malformed_certificate): an unrecognized critical extension.
    """
    for extension in extensions:
        if extension.critical and isinstance(extension.value, x509.UnrecognizedExtension):
            raise malformed("unrecognized critical extension", oid=extension.oid.dotted_string)


def check_signature_algorithm(
    oid: x509.ObjectIdentifier, hash_algorithm: hashes.HashAlgorithm | None
) -> None:
    """Only ECDSA and RSA (PKCS#1 v1.5, PSS) with SHA-256, SHA-384 or SHA-512.

    Raises:
        InvalidCertificate(weak_signature): any other algorithm (SHA-1, MD5, DSA, ...).
    """
    if oid not in SOUND_SIGNATURE_ALGORITHMS or not isinstance(hash_algorithm, _SOUND_HASHES):
        raise InvalidCertificate(
            RejectionReason.WEAK_SIGNATURE,
            "signature algorithm is not allowed",
            details={"algorithm": oid.dotted_string},
        )


# ---- public keys -------------------------------------------------------------------------------


def describe_public_key(key: CertificatePublicKeyTypes) -> str:
    """The key as `KeyPolicy` names it: "ec:<curve>", "rsa:<bits>", or "other:<type>"."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ec:{key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa:{key.key_size}"
    return f"other:{type(key).__name__}"


def check_public_key(key: CertificatePublicKeyTypes, spki: asn1.TLV) -> None:
    """The baseline key rules; `spki` is the SubjectPublicKeyInfo as the certificate or CSR
    encodes it.

    Raises:
        InvalidCertificate(weak_key): not EC P-256/P-384 or RSA of 2048-4096 bits with a sound
            public exponent (odd, 2^16 < e < 2^64), or not in the canonical encoding (explicit
            curve parameters, compressed point, RSA parameters other than NULL).
    """
    description = describe_public_key(key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in BASELINE_EC_CURVES:
            raise _weak_key(description, "curve is not allowed")
    elif isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if key.key_size < RSA_MIN_BITS:
            raise _weak_key(description, "RSA key is too short")
        if key.key_size > RSA_MAX_BITS:
            raise _weak_key(description, "RSA key is longer than 4096 bits")
        if not (numbers.e % 2 == 1 and RSA_MIN_EXPONENT <= numbers.e <= RSA_MAX_EXPONENT):
            raise _weak_key(description, "RSA public exponent is not allowed")
        if numbers.n % 2 == 0:
            raise _weak_key(description, "RSA modulus is even")
    else:
        raise _weak_key(description, "key type is not allowed")
    # cryptography silently reads explicit curve parameters that equal a named curve as that
    # curve, so the parsed key cannot tell. Instead of interpreting the encoding ourselves, compare
    # it, as DER, with the one cryptography writes for the same key: a named-curve OID and an
    # uncompressed point for EC, rsaEncryption with NULL parameters for RSA (the encodings RFC 5480
    # §2.1.1 and CA/B Forum BR §7.1.3.1 mandate). Any other encoding of the same key (explicit
    # parameters, compressed points, absent or non-NULL parameters, an RSA-PSS-only key)
    # differs and is refused; we never need to enumerate them.
    canonical = asn1.decode_der(
        asn1.TLV,
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    if _raw(spki) != _raw(canonical):
        raise _weak_key(
            description, "public key encoding is not the named-curve / rsaEncryption form"
        )


def _weak_key(description: str, message: str) -> InvalidCertificate:
    return InvalidCertificate(
        RejectionReason.WEAK_KEY,
        f"key {description}: {message}",
        details={"key": description},
    )


# ---- CSRs --------------------------------------------------------------------------------------


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse one PEM certificate signing request (PKCS #10) and force-decode its fields.

    Raises:
        InvalidCertificate(malformed_certificate): not a single parseable PEM CSR, or a field
            (subject, attributes, requested extensions, public key, signature) does not decode.
    """
    data = pem_bytes(pem, "CSR")
    with decoding("CSR"):
        csr = x509.load_pem_x509_csr(data)
    decode_csr(csr)
    return csr


def decode_csr(csr: x509.CertificateSigningRequest) -> None:
    """Force-decode every field of a CSR (see `decode_certificate`).

    Raises:
        InvalidCertificate(malformed_certificate): a field does not decode.
    """
    with decoding("CSR"):
        check_name_bounds(csr.subject)
        for attribute in csr.attributes:
            _ = attribute.oid, attribute.value
        for extension in csr.extensions:
            _decode_extension(extension)
        _ = csr.signature_algorithm_oid, csr.signature_algorithm_parameters
        _ = csr.signature_hash_algorithm, csr.signature
        csr.public_key()
        asn1.decode_der(_CertificationRequestInfo, csr.tbs_certrequest_bytes)


def check_csr(csr: x509.CertificateSigningRequest, key_policy: KeyPolicy) -> None:
    """A CSR fleetkey may sign: it decodes, requests only extensions it recognizes when critical,
    is signed soundly by its own key, and that key meets the baseline and the profile's policy.

    Raises:
        InvalidCertificate: malformed_certificate (does not decode, unrecognized critical
            extension), weak_signature, weak_key (baseline or `key_policy`), invalid_chain (the
            self-signature does not verify: no proof the requester holds the key).
    """
    decode_csr(csr)
    check_extensions(csr.extensions)
    with decoding("CSR"):
        info = asn1.decode_der(_CertificationRequestInfo, csr.tbs_certrequest_bytes)
    key = csr.public_key()
    check_public_key(key, info.subject_public_key_info)
    description = describe_public_key(key)
    if not key_policy.allows(description):
        raise _weak_key(description, "not allowed by the device profile")
    check_signature_algorithm(csr.signature_algorithm_oid, csr.signature_hash_algorithm)
    with decoding("CSR"):
        signed = csr.is_signature_valid
    if not signed:
        raise InvalidCertificate(
            RejectionReason.INVALID_CHAIN, "CSR signature does not verify with its public key"
        )


# ---- helpers -----------------------------------------------------------------------------------


def _decode_extension(extension: x509.Extension[x509.ExtensionType]) -> None:
    # Known extensions are fully decoded by cryptography when `.extensions` is read; an
    # unrecognized one is kept as raw bytes, which must still be exactly one DER element
    # (RFC 5280 §4.1: extnValue is the DER encoding of the extension's value).
    value = extension.value
    if isinstance(value, x509.UnrecognizedExtension):
        asn1.decode_der(asn1.TLV, value.value)


def _raw(tlv: asn1.TLV) -> tuple[bytes, bytes]:
    # Two DER elements are equal exactly when their tags and contents are (DER lengths are
    # determined by the content).
    return tlv.tag_bytes, bytes(tlv.data)
