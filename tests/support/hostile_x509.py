"""Hostile certificates and CSRs, the way an attacker (or a careless factory) makes them.

Each case breaks one property and keeps everything else right: leaves are issued by the test CA
you pass, with the extensions a device certificate needs, so the chain verifies and only the
hostile property is wrong. Integration tests can feed the leaves through JITR the same way:

    factory = HostileX509(tmp_path)
    for case in factory.leaf_cases(acme):          # acme: fleetkey_local.pki.CertificateAuthority
        register(case.pem, case.issuer) ...        # expect a refusal with case.reason

Three sources: the openssl CLI (explicit curve parameters, compressed points, negative / zero /
21-octet serials, SHA-1, DSA, RSA exponent 3, unknown critical and garbled extensions: the
shapes real tools emit), `cryptography` plus DER byte surgery on the signed part, then re-signed
by the issuer (duplicate or truncated extensions, inverted validity, odd string types), and a
seeded mutation fuzz of a valid DER (`mutants`). Cases that need openssl are left out when it is
not installed (`HostileX509.openssl_available`).
"""

from __future__ import annotations

import base64
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetkey.domain.rejection import RejectionReason
from fleetkey_local.pki import CertificateAuthority, generate_key, key_pem, pem

R = RejectionReason
OPENSSL = shutil.which("openssl")

# Placeholder extension OIDs (2.5.29.9x) that encode to as many bytes as the real ones they are
# patched into after building, since cryptography's builder refuses to write duplicates or junk.
_PLACEHOLDER_ARC = bytes.fromhex("06 03 55 1d")
_KEY_USAGE, _SUBJECT_ALT_NAME, _BASIC_CONSTRAINTS = 0x0F, 0x11, 0x13


@dataclass(frozen=True)
class HostileCase:
    """One hostile input. `issuer` signed it (None for self-signed CAs and CSRs); `reason` is the
    refusal fleetkey must give. None marks an odd but legal input (a UniversalString CN): it may
    be accepted, and if refused, only with InvalidCertificate."""

    name: str
    kind: str  # "leaf", "ca" or "csr"
    pem: str
    issuer: CertificateAuthority | None
    reason: RejectionReason | None


# The named cases and the reason each must be refused with. Tests parametrize over these names
# (collection happens before the generating fixture runs).
LEAF_CASES: dict[str, RejectionReason | None] = {
    "ec-explicit-parameters-p256": R.WEAK_KEY,
    "ec-compressed-point": R.WEAK_KEY,
    "ec-secp256k1": R.WEAK_KEY,
    "serial-negative": R.MALFORMED_CERTIFICATE,
    "serial-zero": R.MALFORMED_CERTIFICATE,
    "serial-21-octets": R.MALFORMED_CERTIFICATE,
    "signature-sha1": R.WEAK_SIGNATURE,
    "key-dsa": R.WEAK_KEY,
    "key-ed25519": R.WEAK_KEY,
    "key-x25519": R.WEAK_KEY,
    "rsa-exponent-3": R.WEAK_KEY,
    "rsa-exponent-even": R.WEAK_KEY,
    "rsa-1024": R.WEAK_KEY,
    "unknown-critical-extension": R.MALFORMED_CERTIFICATE,
    "garbled-subject-alt-name": R.MALFORMED_CERTIFICATE,
    "unknown-extension-not-der": R.MALFORMED_CERTIFICATE,
    "duplicate-key-usage": R.MALFORMED_CERTIFICATE,
    "truncated-basic-constraints": R.MALFORMED_CERTIFICATE,
    "unsupported-general-name": R.MALFORMED_CERTIFICATE,
    "not-before-after-not-after": R.MALFORMED_CERTIFICATE,
    "outer-signature-algorithm-differs": R.MALFORMED_CERTIFICATE,
    "cn-bmpstring-odd-length": R.MALFORMED_CERTIFICATE,
    "cn-utf8-invalid": R.MALFORMED_CERTIFICATE,
    "cn-universalstring": None,  # odd but legal: decodes; fleetkey may accept it
    "cn-t61string": None,
    "truncated-der": R.MALFORMED_CERTIFICATE,
    "trailing-garbage": R.MALFORMED_CERTIFICATE,
}
CA_CASES: dict[str, RejectionReason | None] = {
    "ca-ec-explicit-parameters": R.WEAK_KEY,
    "ca-serial-negative": R.MALFORMED_CERTIFICATE,
    "ca-signature-sha1": R.WEAK_SIGNATURE,
    "ca-rsa-exponent-3": R.WEAK_KEY,
    "ca-rsa-1024": R.WEAK_KEY,
    "ca-key-ed25519": R.WEAK_KEY,
    "ca-unknown-critical-extension": R.MALFORMED_CERTIFICATE,
    "ca-garbled-subject-alt-name": R.MALFORMED_CERTIFICATE,
    "ca-duplicate-basic-constraints": R.MALFORMED_CERTIFICATE,
    "ca-not-before-after-not-after": R.MALFORMED_CERTIFICATE,
}
CSR_CASES: dict[str, RejectionReason | None] = {
    "csr-ec-explicit-parameters": R.WEAK_KEY,
    "csr-ec-compressed-point": R.WEAK_KEY,
    "csr-signature-sha1": R.WEAK_SIGNATURE,
    "csr-key-ed25519": R.WEAK_KEY,
    "csr-key-dsa": R.WEAK_KEY,
    "csr-rsa-exponent-3": R.WEAK_KEY,
    "csr-unknown-critical-extension": R.MALFORMED_CERTIFICATE,
    "csr-garbled-subject-alt-name": R.MALFORMED_CERTIFICATE,
    "csr-duplicate-key-usage": R.MALFORMED_CERTIFICATE,
    "csr-bad-signature": R.INVALID_CHAIN,
    "csr-truncated": R.MALFORMED_CERTIFICATE,
}


@asn1.sequence
class _Signed:
    """Certificate and CertificationRequest share this shape: {to-be-signed, algorithm, sig}."""

    to_be_signed: asn1.TLV
    algorithm: asn1.TLV
    signature: asn1.BitString


def pem_text(der: bytes, label: str = "CERTIFICATE") -> str:
    """PEM armour around arbitrary bytes (mutants are not certificates any more)."""
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def _tlv_bytes(tlv: asn1.TLV) -> bytes:
    return der_element(tlv.tag_bytes, bytes(tlv.data))


def der_element(tag: bytes, content: bytes) -> bytes:
    """One DER element (definite length), for reassembling re-signed structures."""
    n = len(content)
    if n < 0x80:
        return tag + bytes([n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return tag + bytes([0x80 | len(size)]) + size + content


def _patch(data: bytes, old: bytes, new: bytes, *, occurrence: int = 0) -> bytes:
    """Replace one occurrence of `old` by `new` (same length, so no length above changes)."""
    assert len(old) == len(new), "surgery must keep lengths"
    positions = []
    start = data.find(old)
    while start != -1:
        positions.append(start)
        start = data.find(old, start + 1)
    assert positions, f"{old.hex()} not found"
    at = positions[occurrence]
    return data[:at] + new + data[at + len(old) :]


def resign(signed_der: bytes, new_tbs: bytes, key: PrivateKeyTypes) -> bytes:
    """Re-sign a patched TBSCertificate / CertificationRequestInfo with `key`, keeping the
    signature algorithm of `signed_der` (ECDSA or RSA PKCS#1 v1.5 with the hash it names)."""
    outer = asn1.decode_der(_Signed, signed_der)
    algorithm = _tlv_bytes(outer.algorithm)
    digest = _hash_of(algorithm)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(new_tbs, ec.ECDSA(digest))
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(new_tbs, padding.PKCS1v15(), digest)
    else:
        raise TypeError(f"cannot re-sign with {type(key).__name__}")
    return der_element(b"\x30", new_tbs + algorithm + der_element(b"\x03", b"\x00" + signature))


def _hash_of(algorithm_der: bytes) -> hashes.HashAlgorithm:
    # The last OID byte of ecdsa-with-SHA2 (1.2.840.10045.4.3.x) and sha*WithRSAEncryption
    # (1.2.840.113549.1.1.x) names the hash.
    table: dict[bytes, hashes.HashAlgorithm] = {
        bytes.fromhex("2a8648ce3d040302"): hashes.SHA256(),
        bytes.fromhex("2a8648ce3d040303"): hashes.SHA384(),
        bytes.fromhex("2a8648ce3d040304"): hashes.SHA512(),
        bytes.fromhex("2a864886f70d01010b"): hashes.SHA256(),
        bytes.fromhex("2a864886f70d01010c"): hashes.SHA384(),
        bytes.fromhex("2a864886f70d01010d"): hashes.SHA512(),
    }
    for oid, digest in table.items():
        if oid in algorithm_der:
            return digest
    raise ValueError(f"unknown signature algorithm {algorithm_der.hex()}")


def _tbs(signed_der: bytes) -> bytes:
    return _tlv_bytes(asn1.decode_der(_Signed, signed_der).to_be_signed)


def _placeholder(real: int) -> x509.ObjectIdentifier:
    return x509.ObjectIdentifier(f"2.5.29.{0x60 + real}")


def _swap_in(tbs: bytes, real: int, *, occurrence: int = 0) -> bytes:
    """Turn the placeholder extension OID for `real` into the real one (2.5.29.`real`)."""
    return _patch(
        tbs,
        _PLACEHOLDER_ARC + bytes([0x60 + real]),
        _PLACEHOLDER_ARC + bytes([real]),
        occurrence=occurrence,
    )


def mutants(der: bytes, *, count: int, seed: int) -> Iterator[bytes]:
    """`count` seeded mutations of `der`: bit flips, random bytes, DER length and tag edits,
    truncations, insertions, deletions and duplicated slices. Deterministic for a seed."""
    rng = random.Random(seed)  # noqa: S311 - reproducible mutations, not key material
    for _ in range(count):
        data = bytearray(der)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            at = rng.randrange(len(data))
            op = rng.randrange(8)
            if op == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[at] = rng.randrange(256)
            elif op == 2:  # a length byte made long-form, indefinite or huge
                data[at] = rng.choice((0x80, 0x81, 0x82, 0x84, 0xFF, 0x00, 0x7F))
            elif op == 3:  # a tag turned into another universal type
                data[at] = rng.choice(
                    (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x1E, 0x30, 0x31, 0xA0, 0xA3)
                )
            elif op == 4:
                del data[at:]
            elif op == 5:
                data[at:at] = bytes([rng.randrange(256)])
            elif op == 6:
                del data[at : at + rng.randrange(1, 8)]
            else:
                size = rng.randrange(1, 16)
                data[at:at] = data[rng.randrange(len(data)) :][:size]
            if not data:
                break
        yield bytes(data)


class HostileX509:
    """Generates the hostile set into `workdir` (a tmp dir). Keys are made once per factory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.openssl_available = OPENSSL is not None
        self._files: dict[str, Path] = {}
        self._now = datetime.now(UTC)

    # ---- the cases ------------------------------------------------------------------------------

    def leaf_cases(
        self, ca: CertificateAuthority, *, common_name: str | None = None
    ) -> list[HostileCase]:
        """Device certificates issued by `ca`, each wrong in exactly one way (see LEAF_CASES).
        CN = `common_name` when given (e.g. a registration code for verification certificates),
        else "hostile-<case name>"."""
        made: dict[str, str] = {}

        def cn(name: str) -> str:
            return common_name or f"hostile-{name}"

        if self.openssl_available:
            ossl = {
                "ec-explicit-parameters-p256": ("ec-explicit", {}),
                "ec-compressed-point": ("ec-compressed", {}),
                "serial-negative": ("ec-named", {"serial": "-5"}),
                "serial-zero": ("ec-named", {"serial": "0"}),
                "serial-21-octets": ("ec-named", {"serial": "0x7f" + "11" * 20}),
                "signature-sha1": ("ec-named", {"digest": "sha1"}),
                "key-dsa": ("dsa", {}),
                "rsa-exponent-3": ("rsa-e3", {}),
                "unknown-critical-extension": (
                    "ec-named",
                    {"ext": "1.3.6.1.4.1.55555.1=critical,ASN1:NULL"},
                ),
                "garbled-subject-alt-name": ("ec-named", {"ext": "2.5.29.17=DER:ff00"}),
            }
            for name, (key_name, options) in ossl.items():
                made[name] = self._openssl_leaf(ca, name, cn(name), key_name, **options)
        for name, key in (
            ("ec-secp256k1", ec.generate_private_key(ec.SECP256K1()).public_key()),
            ("key-ed25519", ed25519.Ed25519PrivateKey.generate().public_key()),
            ("key-x25519", x25519.X25519PrivateKey.generate().public_key()),
            ("rsa-1024", generate_key("rsa:1024").public_key()),
        ):
            made[name] = pem(ca._sign(self._leaf_builder(ca, cn(name), key)))
        made.update(self._surgical_leaves(ca, cn))
        return [
            HostileCase(name, "leaf", made[name], ca, reason)
            for name, reason in LEAF_CASES.items()
            if name in made
        ]

    def ca_cases(self) -> list[HostileCase]:
        """Self-signed manufacturer CA certificates, each wrong in one way (see CA_CASES)."""
        made: dict[str, str] = {}
        if self.openssl_available:
            for name, key_name, options in (
                ("ca-ec-explicit-parameters", "ec-explicit", {}),
                ("ca-serial-negative", "ec-named", {"serial": "-7"}),
                ("ca-signature-sha1", "ec-named", {"digest": "sha1"}),
                ("ca-rsa-exponent-3", "rsa-e3", {}),
                ("ca-rsa-1024", "rsa-1024", {}),
                ("ca-key-ed25519", "ed25519", {"digest": None}),
                (
                    "ca-unknown-critical-extension",
                    "ec-named",
                    {"ext": "1.3.6.1.4.1.55555.1=critical,ASN1:NULL"},
                ),
                ("ca-garbled-subject-alt-name", "ec-named", {"ext": "2.5.29.17=DER:3003820541"}),
            ):
                made[name] = self._openssl_ca(name, key_name, **options)
        key = generate_key("ec:secp256r1")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        base = self._ca_builder(key).add_extension(
            x509.UnrecognizedExtension(_placeholder(_BASIC_CONSTRAINTS), b"\x30\x03\x01\x01\xff"),
            critical=True,
        )
        der = base.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        made["ca-duplicate-basic-constraints"] = pem_text(
            resign(der, _swap_in(_tbs(der), _BASIC_CONSTRAINTS), key)
        )
        der = (
            self._ca_builder(key)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        made["ca-not-before-after-not-after"] = pem_text(
            resign(der, _swap_validity(_tbs(der)), key)
        )
        return [
            HostileCase(name, "ca", made[name], None, reason)
            for name, reason in CA_CASES.items()
            if name in made
        ]

    def csr_cases(self) -> list[HostileCase]:
        """Certificate signing requests, each wrong in one way (see CSR_CASES)."""
        made: dict[str, str] = {}
        if self.openssl_available:
            for name, key_name, options in (
                ("csr-ec-explicit-parameters", "ec-explicit", {}),
                ("csr-ec-compressed-point", "ec-compressed", {}),
                ("csr-signature-sha1", "ec-named", {"digest": "sha1"}),
                ("csr-key-ed25519", "ed25519", {"digest": None}),
                ("csr-key-dsa", "dsa", {}),
                ("csr-rsa-exponent-3", "rsa-e3", {}),
                (
                    "csr-unknown-critical-extension",
                    "ec-named",
                    {"ext": "1.3.6.1.4.1.55555.1=critical,ASN1:NULL"},
                ),
                ("csr-garbled-subject-alt-name", "ec-named", {"ext": "2.5.29.17=DER:ff00"}),
            ):
                path = self._openssl_csr(name, key_name, **options)
                made[name] = path.read_text()
        key = generate_key("ec:secp256r1")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile-csr")]))
            .add_extension(_key_usage(), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(_placeholder(_KEY_USAGE), _key_usage().public_bytes()),
                critical=True,
            )
        )
        der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        made["csr-duplicate-key-usage"] = pem_text(
            resign(der, _swap_in(_tbs(der), _KEY_USAGE), key), "CERTIFICATE REQUEST"
        )
        good = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile-csr")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        made["csr-bad-signature"] = pem_text(
            _patch(good, b"hostile-csr", b"hostile-CSR"), "CERTIFICATE REQUEST"
        )
        made["csr-truncated"] = pem_text(good[:-9], "CERTIFICATE REQUEST")
        return [
            HostileCase(name, "csr", made[name], None, reason)
            for name, reason in CSR_CASES.items()
            if name in made
        ]

    def valid_csr(self) -> tuple[PrivateKeyTypes, str]:
        """A well-formed P-256 CSR and its key, the baseline the CSR mutants start from."""
        key = generate_key("ec:secp256r1")
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-0001")]))
            .add_extension(_key_usage(), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, csr.public_bytes(serialization.Encoding.PEM).decode()

    # ---- cryptography + DER surgery -------------------------------------------------------------

    def _surgical_leaves(
        self, ca: CertificateAuthority, cn: Callable[[str], str]
    ) -> dict[str, str]:
        made: dict[str, str] = {}
        device_key = generate_key("ec:secp256r1").public_key()

        def surgery(
            name: str, builder: x509.CertificateBuilder, *patches: tuple[bytes, bytes]
        ) -> None:
            der = ca._sign(builder).public_bytes(serialization.Encoding.DER)
            tbs = _tbs(der)
            for old, new in patches:
                tbs = _patch(tbs, old, new)
            made[name] = pem_text(resign(der, tbs, ca.key))

        placeholder = _PLACEHOLDER_ARC
        leaf = self._leaf_builder
        # A second keyUsage, written under a placeholder OID, then renamed.
        surgery(
            "duplicate-key-usage",
            leaf(ca, cn("duplicate-key-usage"), device_key).add_extension(
                x509.UnrecognizedExtension(_placeholder(_KEY_USAGE), _key_usage().public_bytes()),
                critical=False,
            ),
            (placeholder + bytes([0x60 + _KEY_USAGE]), placeholder + bytes([_KEY_USAGE])),
        )
        # basicConstraints whose SEQUENCE claims more content than it has.
        builder = self._leaf_builder(ca, cn("truncated-basic-constraints"), device_key, basic=False)
        surgery(
            "truncated-basic-constraints",
            builder.add_extension(
                x509.UnrecognizedExtension(
                    _placeholder(_BASIC_CONSTRAINTS), b"\x30\x05\x01\x01\x00"
                ),
                critical=True,
            ),
            (
                placeholder + bytes([0x60 + _BASIC_CONSTRAINTS]),
                placeholder + bytes([_BASIC_CONSTRAINTS]),
            ),
        )
        # A subjectAltName with an x400Address, a GeneralName cryptography does not support.
        surgery(
            "unsupported-general-name",
            leaf(ca, cn("unsupported-general-name"), device_key).add_extension(
                x509.UnrecognizedExtension(
                    _placeholder(_SUBJECT_ALT_NAME), b"\x30\x04\xa3\x02\x30\x00"
                ),
                critical=False,
            ),
            (
                placeholder + bytes([0x60 + _SUBJECT_ALT_NAME]),
                placeholder + bytes([_SUBJECT_ALT_NAME]),
            ),
        )
        made["unknown-extension-not-der"] = pem(
            ca._sign(
                leaf(ca, cn("unknown-extension-not-der"), device_key).add_extension(
                    x509.UnrecognizedExtension(
                        x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\xff\xff"
                    ),
                    critical=False,
                )
            )
        )
        der = ca._sign(leaf(ca, cn("not-before-after-not-after"), device_key)).public_bytes(
            serialization.Encoding.DER
        )
        made["not-before-after-not-after"] = pem_text(
            resign(der, _swap_validity(_tbs(der)), ca.key)
        )
        # The signature algorithm outside the signed part says SHA-512, inside SHA-384 (or 256).
        der = ca._sign(leaf(ca, cn("outer-signature-algorithm-differs"), device_key)).public_bytes(
            serialization.Encoding.DER
        )
        outer = asn1.decode_der(_Signed, der)
        algorithm = _tlv_bytes(outer.algorithm)
        other = algorithm[:-1] + bytes([algorithm[-1] ^ 0x07])  # ...03 <-> ...04, ...0b <-> ...0c
        made["outer-signature-algorithm-differs"] = pem_text(
            der_element(b"\x30", _tbs(der) + other + _tlv_bytes_bitstring(outer.signature))
        )
        # Subject strings: a BMPString of odd length, invalid UTF-8, and two legal oddities.
        for name, string_type, old, new in (
            (
                "cn-bmpstring-odd-length",
                _ASN1Type.PrintableString,
                b"\x13\x05abcde",
                b"\x1e\x05abcde",
            ),
            ("cn-utf8-invalid", _ASN1Type.UTF8String, b"\x0c\x05abcde", b"\x0c\x05ab\xff\xfee"),
        ):
            builder = leaf(ca, "abcde", device_key, cn_type=string_type)
            surgery(name, builder, (old, new))
        for name, string_type in (
            ("cn-universalstring", _ASN1Type.UniversalString),
            ("cn-t61string", _ASN1Type.T61String),
        ):
            made[name] = pem(ca._sign(leaf(ca, cn(name), device_key, cn_type=string_type)))
        valid = ca._sign(leaf(ca, cn("truncated-der"), device_key)).public_bytes(
            serialization.Encoding.DER
        )
        made["truncated-der"] = pem_text(valid[:-20])
        made["trailing-garbage"] = pem_text(valid + b"\x00\x00")
        # An even public exponent (65536), patched into a 65537 key's SubjectPublicKeyInfo:
        # cryptography will not build such a key.
        rsa_key = generate_key("rsa:2048").public_key()
        surgery(
            "rsa-exponent-even",
            leaf(ca, cn("rsa-exponent-even"), rsa_key),
            (b"\x02\x03\x01\x00\x01", b"\x02\x03\x01\x00\x00"),
        )
        return made

    def _leaf_builder(
        self,
        ca: CertificateAuthority,
        common_name: str,
        key: CertificatePublicKeyTypes,
        *,
        basic: bool = True,
        cn_type: _ASN1Type | None = None,
    ) -> x509.CertificateBuilder:
        attribute = (
            x509.NameAttribute(NameOID.COMMON_NAME, common_name, _type=cn_type)
            if cn_type is not None
            else x509.NameAttribute(NameOID.COMMON_NAME, common_name)
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([attribute]))
            .issuer_name(ca.certificate.subject)
            .public_key(key)  # hostile kinds on purpose
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - timedelta(hours=1))
            .not_valid_after(self._now + timedelta(days=30))
            .add_extension(_key_usage(), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if basic:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
        return builder

    def _ca_builder(self, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile device CA")])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - timedelta(days=1))
            .not_valid_after(self._now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )

    # ---- openssl --------------------------------------------------------------------------------

    def _openssl(self, *args: str) -> None:
        assert OPENSSL is not None
        subprocess.run(
            [OPENSSL, *args], cwd=self.workdir, check=True, capture_output=True, timeout=30
        )

    def _key(self, kind: str) -> Path:
        """openssl keys, made once: the encodings the CLI can produce and cryptography cannot."""
        if kind in self._files:
            return self._files[kind]
        path = self.workdir / f"{kind}.key"
        commands: dict[str, list[list[str]]] = {
            "ec-named": [
                ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path.name]
            ],
            "ec-explicit": [
                [
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-param_enc",
                    "explicit",
                    "-genkey",
                    "-noout",
                    "-out",
                    path.name,
                ]
            ],
            "ec-compressed": [
                ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec-tmp.key"],
                ["ec", "-in", "ec-tmp.key", "-conv_form", "compressed", "-out", path.name],
            ],
            "dsa": [["dsaparam", "-genkey", "-noout", "-out", path.name, "1024"]],
            "rsa-e3": [["genrsa", "-3", "-out", path.name, "2048"]],
            "rsa-1024": [["genrsa", "-out", path.name, "1024"]],
            "ed25519": [["genpkey", "-algorithm", "ed25519", "-out", path.name]],
        }
        for command in commands[kind]:
            self._openssl(*command)
        self._files[kind] = path
        return path

    def _ca_files(self, ca: CertificateAuthority) -> tuple[Path, Path]:
        cert, key = self.workdir / f"ca-{id(ca)}.pem", self.workdir / f"ca-{id(ca)}.key"
        if not cert.exists():
            cert.write_text(ca.pem)
            key.write_text(key_pem(ca.key))
        return cert, key

    def _openssl_csr(
        self,
        name: str,
        key_kind: str,
        *,
        common_name: str = "hostile-csr",
        digest: str | None = "sha256",
        ext: str | None = None,
    ) -> Path:
        out = self.workdir / f"{name}.csr"
        args = [
            "req",
            "-new",
            "-key",
            self._key(key_kind).name,
            "-subj",
            f"/CN={common_name}",
            "-out",
            out.name,
        ]
        if digest:
            args.append(f"-{digest}")
        if ext:
            args += ["-addext", ext]
        self._openssl(*args)
        return out

    def _openssl_leaf(
        self,
        ca: CertificateAuthority,
        name: str,
        common_name: str,
        key_kind: str,
        *,
        serial: str | None = None,
        digest: str = "sha384",
        ext: str | None = None,
    ) -> str:
        csr = self._openssl_csr(f"leaf-{name}", key_kind, common_name=common_name)
        ca_cert, ca_key = self._ca_files(ca)
        extfile = self.workdir / f"leaf-{name}.cnf"
        lines = [
            "[v3]",
            "basicConstraints = critical,CA:FALSE",
            "keyUsage = critical,digitalSignature",
            "extendedKeyUsage = clientAuth",
            "authorityKeyIdentifier = keyid",
        ]
        if ext:
            lines.append(ext.replace("=", " = ", 1))
        extfile.write_text("\n".join(lines) + "\n")
        out = self.workdir / f"leaf-{name}.pem"
        self._openssl(
            "x509",
            "-req",
            "-in",
            csr.name,
            "-CA",
            ca_cert.name,
            "-CAkey",
            ca_key.name,
            "-set_serial",
            serial or str(random.SystemRandom().getrandbits(63)),
            "-days",
            "30",
            f"-{digest}",
            "-extfile",
            extfile.name,
            "-extensions",
            "v3",
            "-out",
            out.name,
        )
        return out.read_text()

    def _openssl_ca(
        self,
        name: str,
        key_kind: str,
        *,
        serial: str | None = None,
        digest: str | None = "sha256",
        ext: str | None = None,
    ) -> str:
        out = self.workdir / f"{name}.pem"
        args = [
            "req",
            "-new",
            "-x509",
            "-key",
            self._key(key_kind).name,
            "-subj",
            f"/CN={name}",
            "-days",
            "365",
            "-set_serial",
            serial or "4242",
            "-out",
            out.name,
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ]
        if digest:
            args.append(f"-{digest}")
        if ext:
            args += ["-addext", ext]
        self._openssl(*args)
        return out.read_text()


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
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


def _swap_validity(tbs: bytes) -> bytes:
    """notBefore and notAfter exchanged (both UTCTime, 13 bytes each: equal lengths)."""
    start = tbs.find(b"\x30\x1e\x17\x0d")
    assert start != -1, "expected a Validity of two UTCTimes"
    not_before, not_after = tbs[start + 2 : start + 17], tbs[start + 17 : start + 32]
    return tbs[: start + 2] + not_after + not_before + tbs[start + 32 :]


def _tlv_bytes_bitstring(bits: asn1.BitString) -> bytes:
    return der_element(b"\x03", bytes([bits.padding_bits()]) + bits.as_bytes())


__all__ = [
    "CA_CASES",
    "CSR_CASES",
    "LEAF_CASES",
    "HostileCase",
    "HostileX509",
    "der_element",
    "mutants",
    "pem_text",
    "resign",
]
