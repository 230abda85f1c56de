"""The baseline X.509 policy, against a hostile set: every public entry point that reads a
certificate or CSR refuses with InvalidCertificate and the reason the policy names, and nothing
a parser raises ever escapes (named cases from tests/support/hostile_x509.py, then a seeded
mutation fuzz)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from fleetkey.crypto.certificates import (
    claimed_common_name,
    load_certificate,
    validate_device_certificate,
    validate_manufacturer_ca,
    verify_proof_of_possession,
)
from fleetkey.crypto.x509_policy import (
    check_certificate,
    check_csr,
    check_name_bounds,
    check_public_key,
    check_serial_number,
    check_signature_algorithm,
    load_csr,
)
from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate
from fleetkey_local.pki import CertificateAuthority, generate_key, pem
from tests.support.hostile_x509 import (
    CA_CASES,
    CSR_CASES,
    LEAF_CASES,
    HostileCase,
    HostileX509,
    mutants,
    pem_text,
)
from tests.support.pki_cache import ca as cached_ca

NOW = datetime.now(UTC)
BASELINE = KeyPolicy()
REGISTRATION_CODE = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
MUTANTS = 300


@pytest.fixture(scope="session")
def acme() -> CertificateAuthority:
    return cached_ca("hostile-acme")


@pytest.fixture(scope="session")
def factory(tmp_path_factory: pytest.TempPathFactory) -> HostileX509:
    return HostileX509(tmp_path_factory.mktemp("hostile-x509"))


@pytest.fixture(scope="session")
def hostile(factory: HostileX509, acme: CertificateAuthority) -> dict[str, HostileCase]:
    cases = [*factory.leaf_cases(acme), *factory.ca_cases(), *factory.csr_cases()]
    verification = factory.leaf_cases(acme, common_name=REGISTRATION_CODE)
    return {
        **{case.name: case for case in cases},
        **{f"verification:{case.name}": case for case in verification},
    }


def now() -> datetime:
    """The time of the check: after the session's hostile set was generated (openssl starts a
    certificate's validity at the second it signs it)."""
    return datetime.now(UTC)


def case(hostile: dict[str, HostileCase], name: str) -> HostileCase:
    if name not in hostile:
        pytest.skip(f"{name} was not generated (it needs the openssl CLI)")
    return hostile[name]


def outcome(check: Callable[[], object]) -> InvalidCertificate | None:
    """The refusal `check` raised, or None if it accepted; anything else fails the test."""
    try:
        check()
    except InvalidCertificate as refusal:
        return refusal
    return None


def assert_refused_as(refusal: InvalidCertificate | None, reason: RejectionReason | None) -> None:
    if reason is None:  # odd but legal input: acceptance is fine, a refusal must be typed
        return
    assert refusal is not None, "hostile input was accepted"
    assert refusal.reason == reason, refusal.message


# ---- named hostile cases ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LEAF_CASES))
def test_hostile_device_certificate_is_refused_with_its_reason(
    hostile: dict[str, HostileCase], acme: CertificateAuthority, name: str
) -> None:
    # Given a device certificate issued by the manufacturer CA, wrong in exactly one way
    hostile_case = case(hostile, name)

    # When it goes through the registration path (load, then validate)
    refusal = outcome(
        lambda: validate_device_certificate(
            load_certificate(hostile_case.pem), acme.certificate, now(), BASELINE
        )
    )

    # Then it is refused with the policy's reason, never with a parser's exception
    assert_refused_as(refusal, LEAF_CASES[name])


@pytest.mark.parametrize("name", sorted(CA_CASES))
def test_hostile_manufacturer_ca_is_refused_with_its_reason(
    hostile: dict[str, HostileCase], name: str
) -> None:
    # Given a self-signed CA certificate, wrong in exactly one way
    hostile_case = case(hostile, name)

    # When an operator registers it
    refusal = outcome(lambda: validate_manufacturer_ca(hostile_case.pem, now()))

    # Then it is refused (a 400 at the admin API, not a 502)
    assert_refused_as(refusal, CA_CASES[name])


@pytest.mark.parametrize("name", sorted(LEAF_CASES))
def test_hostile_verification_certificate_is_refused_with_its_reason(
    hostile: dict[str, HostileCase], acme: CertificateAuthority, name: str
) -> None:
    # Given a proof-of-possession certificate (CN = registration code) signed by the CA, wrong
    # in exactly one way
    hostile_case = case(hostile, f"verification:{name}")

    # When it is checked as the proof for registering the CA
    refusal = outcome(
        lambda: verify_proof_of_possession(
            acme.certificate, hostile_case.pem, REGISTRATION_CODE, now()
        )
    )

    # Then it is refused with the same reason as a device certificate would be
    assert_refused_as(refusal, LEAF_CASES[name])


@pytest.mark.parametrize("name", sorted(CSR_CASES))
def test_hostile_csr_is_refused_with_its_reason(hostile: dict[str, HostileCase], name: str) -> None:
    # Given a certificate signing request, wrong in exactly one way
    hostile_case = case(hostile, name)

    # When rotation would read and check it
    refusal = outcome(lambda: check_csr(load_csr(hostile_case.pem), BASELINE))

    # Then it is refused with the policy's reason
    assert_refused_as(refusal, CSR_CASES[name])


def test_claimed_common_name_never_raises_on_hostile_certificates(
    hostile: dict[str, HostileCase],
) -> None:
    # Given every hostile certificate cryptography itself agrees to load
    loaded = []
    for hostile_case in hostile.values():
        if hostile_case.kind == "csr":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded.append(x509.load_pem_x509_certificate(hostile_case.pem.encode()))
            except ValueError:
                continue

    assert len(loaded) > len(hostile) // 2  # most of the set loads: the loop below checks them
    # When / Then: the unverified CN is a short string or None, never an exception
    for cert in loaded:
        claimed = claimed_common_name(cert)
        assert claimed is None or len(claimed) <= 128


class _LazilyBrokenCertificate:
    """cryptography decodes some fields only when read; this one's subject fails then."""

    @property
    def subject(self) -> x509.Name:
        raise ValueError("error parsing asn1 value")


def test_claimed_common_name_of_an_undecodable_subject_is_none() -> None:
    # Given a certificate whose subject raises when read
    cert = _LazilyBrokenCertificate()

    # When / Then
    assert claimed_common_name(cert) is None  # type: ignore[arg-type]


def test_claimed_common_name_is_the_first_cn_truncated(acme: CertificateAuthority) -> None:
    # Given certificates with a normal and with an overlong CN
    _, normal = acme.issue_device("pump-0001")
    with pytest.warns(UserWarning, match="length"):  # over RFC 5280's 64: cryptography warns
        long_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p" * 300, _validate=False)])
    key = generate_key("ec:secp256r1")
    long = (
        x509.CertificateBuilder()
        .subject_name(long_name)
        .issuer_name(acme.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(acme.key, hashes.SHA384())
    )

    # When / Then: recorded (truncated) even though the long one is refused as malformed
    assert claimed_common_name(normal) == "pump-0001"
    assert claimed_common_name(long) == "p" * 128
    with pytest.raises(InvalidCertificate) as caught:
        load_certificate(pem(long))
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE


@pytest.mark.parametrize("action", ["error", "ignore", "default"])
def test_negative_serial_is_refused_whatever_the_warning_filters(
    hostile: dict[str, HostileCase], action: Literal["error", "ignore", "default"]
) -> None:
    # Given process-wide warning filters that turn warnings into errors, or hide them
    pem_of_negative = case(hostile, "serial-negative").pem

    # When the certificate is loaded under them
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        refusal = outcome(lambda: check_certificate(load_certificate(pem_of_negative)))

    # Then the refusal is the same typed one, not a CryptographyDeprecationWarning
    assert_refused_as(refusal, RejectionReason.MALFORMED_CERTIFICATE)


# ---- seeded mutation fuzz ---------------------------------------------------------------------


def fuzz(
    der: bytes, label: str, check: Callable[[str], object], *, count: int = MUTANTS, seed: int
) -> None:
    """Feed `count` mutants of `der` to `check`: only InvalidCertificate (or acceptance) is
    allowed; every escape is reported with the mutant's PEM."""
    escaped = []
    for mutant in mutants(der, count=count, seed=seed):
        text = pem_text(mutant, label)
        try:
            check(text)
        except InvalidCertificate:
            continue
        except Exception as exc:  # noqa: BLE001 - this test is about exactly that
            escaped.append(f"{type(exc).__name__}: {exc}\n{text}")
    assert not escaped, f"{len(escaped)} mutants escaped as other errors:\n" + "\n".join(
        escaped[:3]
    )


def test_mutated_device_certificates_raise_only_invalid_certificate(
    acme: CertificateAuthority,
) -> None:
    # Given a valid device certificate
    _, cert = acme.issue_device("pump-0001", serial_number="SN-0001")
    der = cert.public_bytes(serialization.Encoding.DER)

    # When / Then: every mutant is refused with the typed error (or, rarely, still valid)
    fuzz(
        der,
        "CERTIFICATE",
        lambda text: validate_device_certificate(
            load_certificate(text), acme.certificate, NOW, BASELINE
        ),
        seed=7,
    )


def test_mutated_manufacturer_cas_raise_only_invalid_certificate(
    acme: CertificateAuthority,
) -> None:
    fuzz(
        acme.certificate.public_bytes(serialization.Encoding.DER),
        "CERTIFICATE",
        lambda text: validate_manufacturer_ca(text, NOW),
        count=150,
        seed=11,
    )


def test_mutated_verification_certificates_raise_only_invalid_certificate(
    acme: CertificateAuthority,
) -> None:
    proof = acme.verification_certificate(REGISTRATION_CODE)
    fuzz(
        proof.public_bytes(serialization.Encoding.DER),
        "CERTIFICATE",
        lambda text: verify_proof_of_possession(acme.certificate, text, REGISTRATION_CODE, NOW),
        count=150,
        seed=13,
    )


def test_mutated_csrs_raise_only_invalid_certificate(factory: HostileX509) -> None:
    _, csr_pem = factory.valid_csr()
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    fuzz(
        der,
        "CERTIFICATE REQUEST",
        lambda text: check_csr(load_csr(text), BASELINE),
        count=150,
        seed=17,
    )


# ---- the policy's boundaries ------------------------------------------------------------------


@pytest.mark.parametrize(
    "serial, allowed",
    [(1, True), (2**159 - 1, True), (2**159, False), (0, False), (-1, False)],
    ids=["one", "20-octets", "21-octets", "zero", "negative"],
)
def test_serial_number_boundaries(serial: int, allowed: bool) -> None:
    # Given / When
    refusal = outcome(lambda: check_serial_number(serial))

    # Then: RFC 5280 §4.1.2.2, positive and at most 20 octets as DER encodes it
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.reason == RejectionReason.MALFORMED_CERTIFICATE


RSA_MODULUS = generate_key("rsa:2048").public_key().public_numbers().n  # type: ignore[union-attr]


def spki_of(key: CertificatePublicKeyTypes) -> asn1.TLV:
    tlv: asn1.TLV = asn1.decode_der(
        asn1.TLV,
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return tlv


@pytest.mark.parametrize(
    "exponent, allowed",
    [
        (65537, True),
        (2**63 + 1, True),
        (2**64 - 1, True),
        (3, False),
        (65535, False),
        (2**64 + 1, False),
        (2**255 + 1, False),
        (2**256 + 1, False),
    ],
    ids=[
        "65537",
        "odd-below-2^64",
        "2^64-1",
        "3",
        "odd-below-2^16",
        "above-2^64",
        "odd-below-2^256",
        "above-2^256",
    ],
)
def test_rsa_public_exponent_boundaries(exponent: int, allowed: bool) -> None:
    # Given an RSA-2048 public key with this exponent, in its canonical encoding
    key = rsa.RSAPublicNumbers(exponent, RSA_MODULUS).public_key()

    # When
    refusal = outcome(lambda: check_public_key(key, spki_of(key)))

    # Then: CA/Browser Forum BR §6.1.6, with the upper bound OpenSSL can verify with (2^64 - 1)
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.reason == RejectionReason.WEAK_KEY


@pytest.mark.parametrize(
    "extra_bits, allowed",
    [(4096 - 2048, True), (4096 - 2048 + 8, False), (8192 - 2048, False)],
    ids=["4096", "4104", "8192"],
)
def test_rsa_modulus_is_at_most_4096_bits(extra_bits: int, allowed: bool) -> None:
    # Given an RSA public key of this size (an odd modulus: the check is on the size alone)
    modulus = RSA_MODULUS * (2**extra_bits + 1)
    key = rsa.RSAPublicNumbers(65537, modulus).public_key()
    assert key.key_size == 2048 + extra_bits

    # When
    refusal = outcome(lambda: check_public_key(key, spki_of(key)))

    # Then: 2048 to 4096 bits, never more
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.reason == RejectionReason.WEAK_KEY


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["p256", "p384"])
def test_named_curves_in_their_canonical_encoding_are_allowed(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve).public_key()
    check_public_key(key, spki_of(key))


def test_a_key_checked_against_another_keys_encoding_is_refused() -> None:
    # Given a P-256 key and the (canonical) SubjectPublicKeyInfo of another P-256 key
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()

    # When / Then: the encoding must be the key's own, byte for byte
    with pytest.raises(InvalidCertificate) as caught:
        check_public_key(key, spki_of(other))
    assert caught.value.reason == RejectionReason.WEAK_KEY


@pytest.mark.parametrize(
    "oid, digest, allowed",
    [
        (SignatureAlgorithmOID.ECDSA_WITH_SHA256, hashes.SHA256(), True),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA512, hashes.SHA512(), True),
        (SignatureAlgorithmOID.RSA_WITH_SHA384, hashes.SHA384(), True),
        (SignatureAlgorithmOID.RSASSA_PSS, hashes.SHA256(), True),
        (SignatureAlgorithmOID.ECDSA_WITH_SHA1, hashes.SHA1(), False),  # noqa: S303 - refused
        (SignatureAlgorithmOID.RSA_WITH_SHA1, hashes.SHA1(), False),  # noqa: S303 - refused
        (SignatureAlgorithmOID.RSA_WITH_MD5, hashes.MD5(), False),  # noqa: S303 - refused
        (SignatureAlgorithmOID.RSASSA_PSS, hashes.SHA1(), False),  # noqa: S303 - refused
        (SignatureAlgorithmOID.DSA_WITH_SHA256, hashes.SHA256(), False),
        (SignatureAlgorithmOID.ED25519, None, False),
    ],
    ids=[
        "ecdsa-sha256",
        "ecdsa-sha512",
        "rsa-sha384",
        "pss-sha256",
        "ecdsa-sha1",
        "rsa-sha1",
        "rsa-md5",
        "pss-sha1",
        "dsa-sha256",
        "ed25519",
    ],
)
def test_signature_algorithms(
    oid: x509.ObjectIdentifier, digest: hashes.HashAlgorithm | None, allowed: bool
) -> None:
    refusal = outcome(lambda: check_signature_algorithm(oid, digest))
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.reason == RejectionReason.WEAK_SIGNATURE


def test_device_certificate_signed_with_rsa_pss_is_accepted() -> None:
    # Given an RSA manufacturer CA that signs with RSASSA-PSS / SHA-256
    rsa_ca = cached_ca("pss-works", "rsa:2048")
    key = generate_key("ec:secp256r1")
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-0001")]))
        .issuer_name(rsa_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(rsa_ca.key.public_key()),
            critical=False,
        )
    )
    cert = builder.sign(
        rsa_ca.key,
        hashes.SHA256(),
        rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
    )

    # When / Then
    result = validate_device_certificate(
        load_certificate(pem(cert)), rsa_ca.certificate, NOW, BASELINE
    )
    assert result.device_id == "pump-0001"


def test_valid_csr_passes_and_a_profile_can_be_stricter(factory: HostileX509) -> None:
    # Given a well-formed P-256 CSR
    _, csr_pem = factory.valid_csr()
    csr = load_csr(csr_pem)

    # When / Then: the baseline accepts it, an RSA-only profile does not
    check_csr(csr, BASELINE)
    with pytest.raises(InvalidCertificate) as caught:
        check_csr(csr, KeyPolicy(ec_curves=frozenset()))
    assert caught.value.reason == RejectionReason.WEAK_KEY


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"junk",
        "é" * 10,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "A" * (64 * 1024 + 1),
    ],
    ids=["empty", "junk", "not-ascii", "bad-body", "oversized"],
)
def test_load_csr_refuses_anything_but_one_pem_csr(data: str | bytes) -> None:
    with pytest.raises(InvalidCertificate) as caught:
        load_csr(data)
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE


def test_generated_leaves_are_issued_by_the_given_ca(
    hostile: dict[str, HostileCase], acme: CertificateAuthority
) -> None:
    # Given the hostile leaves (for reuse by integration tests through JITR)
    leaves = [
        c
        for name, c in hostile.items()
        if c.kind == "leaf" and not name.startswith("verification:")
    ]

    # Then each names its issuing CA, and those that load are issued by it
    assert leaves and all(c.issuer is acme for c in leaves)
    for leaf in leaves:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cert = x509.load_pem_x509_certificate(leaf.pem.encode())
            except ValueError:
                continue
        assert cert.issuer == acme.certificate.subject, leaf.name


@pytest.mark.parametrize(
    "oid, value, allowed",
    [
        (NameOID.COMMON_NAME, "é" * 64, True),  # 64 characters, 128 UTF-8 bytes
        (NameOID.COMMON_NAME, "p" * 65, False),
        (NameOID.SERIAL_NUMBER, "S" * 64, True),
        (NameOID.SERIAL_NUMBER, "S" * 65, False),
        (NameOID.SERIAL_NUMBER, "", False),
    ],
    ids=["cn-64-chars", "cn-65-chars", "serial-64", "serial-65", "serial-empty"],
)
def test_name_attribute_bounds_are_rfc_5280_characters(
    oid: x509.ObjectIdentifier, value: str, allowed: bool
) -> None:
    # Given a name with one attribute at or over its RFC 5280 Appendix A upper bound
    # (ub-common-name, ub-serial-number: 64 characters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography warns of some bounds; the policy decides
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "pump-0001")] * (oid != NameOID.COMMON_NAME)
            + [x509.NameAttribute(oid, value, _validate=False)]
        )

    # When
    refusal = outcome(lambda: check_name_bounds(name))

    # Then: counted in characters, not bytes
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.reason == RejectionReason.MALFORMED_CERTIFICATE
