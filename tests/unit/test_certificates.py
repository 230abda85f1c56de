"""X.509 checks for device certificates, manufacturer CAs and CA proof of possession."""

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from fleetkey.crypto.certificates import (
    MAX_PEM_BYTES,
    load_certificate,
    validate_device_certificate,
    validate_manufacturer_ca,
    verify_proof_of_possession,
)
from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate, InvalidRequest
from fleetkey_local.pki import CertificateAuthority, generate_key, key_pem, pem
from tests.support.hostile_x509 import der_element, resign

# Key generation dominates run time: every CA and RSA key is made once for the module.
NOW = datetime.now(UTC)
ACME = CertificateAuthority.create("acme")
# Same subject name as ACME (the name is derived from "acme"), different key: an impostor.
IMPOSTOR = CertificateAuthority.create("acme")
GLOBEX = CertificateAuthority.create("globex", key_kind="ec:secp256r1")
RSA_CA = CertificateAuthority.create("rsa-works", key_kind="rsa:2048")
RSA_2048 = generate_key("rsa:2048")
RSA_1024 = generate_key("rsa:1024")
BASELINE = KeyPolicy()
REGISTRATION_CODE = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"


def parsed(cert: x509.Certificate) -> x509.Certificate:
    """A certificate as the registration path sees it: round-tripped through PEM."""
    return load_certificate(pem(cert))


def refused(cert, anchor=ACME, *, policy=BASELINE, now=NOW) -> InvalidCertificate:
    with pytest.raises(InvalidCertificate) as caught:
        validate_device_certificate(parsed(cert), anchor.certificate, now, policy)
    return caught.value


def leaf_builder(
    issuer: CertificateAuthority,
    *,
    subject: list[x509.NameAttribute] | None = None,
    key=None,
    ca: bool = False,
    key_cert_sign: bool = False,
    digital_signature: bool = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.CertificateBuilder:
    """For shapes fleetkey_local.pki does not make (CA-flagged leaves, odd subjects)."""
    key = key or generate_key("ec:secp256r1")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject or [x509.NameAttribute(NameOID.COMMON_NAME, "pump-0001")]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(hours=1))
        .not_valid_after(not_after or NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )


def sign(builder: x509.CertificateBuilder, signer: CertificateAuthority) -> x509.Certificate:
    return builder.sign(signer.key, hashes.SHA384())


# --- validate_device_certificate: accepted --------------------------------------------------------


@pytest.mark.parametrize(
    "key, description",
    [
        (generate_key("ec:secp256r1"), "ec:secp256r1"),
        (generate_key("ec:secp384r1"), "ec:secp384r1"),
        (RSA_2048, "rsa:2048"),
    ],
    ids=["p256", "p384", "rsa2048"],
)
def test_valid_device_certificate_is_accepted(key, description):
    # Given a device certificate issued by the manufacturer CA with an allowed key
    _, cert = ACME.issue_device("pump-0001", serial_number="SN-0001", key=key)

    # When it is validated
    result = validate_device_certificate(parsed(cert), ACME.certificate, NOW, BASELINE)

    # Then what fleetkey records about it is derived from the certificate itself
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert result.certificate_id == hashlib.sha256(der).hexdigest()
    assert result.device_id == "pump-0001"
    assert result.serial_number == "SN-0001"
    assert result.public_key_fingerprint == hashlib.sha256(spki).hexdigest()
    assert result.key_description == description
    assert (result.not_before, result.not_after) == (
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )


def test_certificate_from_an_rsa_manufacturer_ca_is_accepted():
    # Given a CA with an RSA key (signs with RSA/SHA-256)
    _, cert = RSA_CA.issue_device("pump-0001")

    # When / Then
    result = validate_device_certificate(parsed(cert), RSA_CA.certificate, NOW, BASELINE)
    assert result.device_id == "pump-0001"


def test_certificate_without_subject_serial_has_no_serial_number():
    # Given a certificate whose subject carries only a CN
    _, cert = ACME.issue_device("pump-0001")

    # When / Then
    result = validate_device_certificate(parsed(cert), ACME.certificate, NOW, BASELINE)
    assert result.serial_number is None


# --- validate_device_certificate: refused ---------------------------------------------------------


def test_expired_certificate_is_refused():
    # Given a certificate whose validity ended yesterday
    _, cert = ACME.issue_device(
        "pump-0001", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )

    # When / Then
    assert refused(cert).reason == RejectionReason.EXPIRED


def test_not_yet_valid_certificate_is_refused():
    # Given a certificate whose validity starts tomorrow
    _, cert = ACME.issue_device("pump-0001", not_before=NOW + timedelta(days=1))

    # When / Then
    assert refused(cert).reason == RejectionReason.NOT_YET_VALID


def test_certificate_from_an_impostor_ca_with_the_same_name_is_refused():
    # Given a CA with the manufacturer CA's exact subject name but another key
    assert IMPOSTOR.certificate.subject == ACME.certificate.subject
    _, cert = IMPOSTOR.issue_device("pump-0001")

    # When / Then: the names match, the signature does not
    error = refused(cert)
    assert error.reason == RejectionReason.INVALID_CHAIN
    assert "signature" in error.details["error"]


def test_certificate_from_another_named_ca_is_refused():
    # Given a certificate from a different manufacturer CA
    _, cert = GLOBEX.issue_device("pump-0001")

    # When / Then
    assert refused(cert).reason == RejectionReason.WRONG_ISSUER


def test_validity_is_checked_before_the_issuer():
    # Given an expired certificate from the wrong CA
    _, cert = GLOBEX.issue_device(
        "pump-0001", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )

    # When / Then: the first failing check names the reason
    assert refused(cert).reason == RejectionReason.EXPIRED


@pytest.mark.parametrize(
    "key",
    [
        RSA_1024,
        generate_key("ec:secp256k1"),
        generate_key("ec:secp521r1"),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa1024", "secp256k1", "secp521r1", "ed25519"],
)
def test_weak_or_disallowed_keys_are_refused(key):
    # Given a correctly signed certificate whose key the baseline policy does not allow
    _, cert = ACME.issue_device("pump-0001", key=key)

    # When / Then: the chain verifier (device extension policy built on permit_all) does not look at
    # the leaf's key algorithm or size, so these get through the chain check and are refused by
    # fleetkey's own key policy, as WEAK_KEY. Whatever the reason, they must never be accepted.
    error = refused(cert)
    assert error.reason == RejectionReason.WEAK_KEY
    assert error.details["key"].split(":")[0] in {"rsa", "ec", "other"}


def test_profile_policy_without_rsa_refuses_rsa_2048():
    # Given an EC-only policy (as the infusion-pump profile has) and an RSA-2048 device
    _, cert = ACME.issue_device("pump-0001", key=RSA_2048)

    # When / Then
    error = refused(cert, policy=KeyPolicy(rsa_min_bits=None))
    assert error.reason == RejectionReason.WEAK_KEY
    assert error.details == {"key": "rsa:2048"}


def test_certificate_without_digital_signature_key_usage_is_refused():
    # Given a device certificate whose key usage is keyEncipherment only
    _, cert = ACME.issue_device("pump-0001", digital_signature=False)

    # When / Then
    error = refused(cert)
    assert error.reason == RejectionReason.INVALID_CHAIN
    assert "digitalSignature" in error.details["error"]


def test_certificate_with_server_auth_only_is_refused():
    # Given a device certificate whose extended key usage is serverAuth only
    _, cert = ACME.issue_device("pump-0001", client_auth=False)

    # When / Then
    error = refused(cert)
    assert error.reason == RejectionReason.INVALID_CHAIN
    assert "clientAuth" in error.details["error"]


def test_certificate_without_key_usage_is_refused():
    # Given a leaf with no key usage extension at all
    key = generate_key("ec:secp256r1")
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pump-0001")]))
        .issuer_name(ACME.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ACME.key, hashes.SHA384())
    )

    # When / Then
    assert refused(cert).reason == RejectionReason.INVALID_CHAIN


@pytest.mark.parametrize("key_cert_sign", [True, False], ids=["with-keyCertSign", "without"])
def test_leaf_that_is_itself_a_ca_is_refused(key_cert_sign):
    # Given a certificate from the manufacturer CA that is itself a CA (BasicConstraints ca=True)
    cert = sign(leaf_builder(ACME, ca=True, key_cert_sign=key_cert_sign), ACME)

    # When / Then: it can sign further certificates, so it must never be a device identity
    refused(cert)


def test_expired_manufacturer_ca_invalidates_its_device_certificates():
    # Given a CA that expired yesterday and a device certificate still inside its own window
    old = CertificateAuthority.create("old", not_before=NOW - timedelta(days=20), days=19)
    _, cert = old.issue_device(
        "pump-0001", not_before=NOW - timedelta(days=10), not_after=NOW + timedelta(days=10)
    )

    # When / Then
    error = refused(cert, anchor=old)
    assert error.reason == RejectionReason.INVALID_CHAIN


@pytest.mark.parametrize(
    "subject",
    [
        [x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")],
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "a"),
            x509.NameAttribute(NameOID.COMMON_NAME, "b"),
        ],
    ],
    ids=["no-cn", "two-cns"],
)
def test_certificate_without_a_single_common_name_is_refused(subject):
    # Given a certificate that does not name exactly one device
    cert = sign(leaf_builder(ACME, subject=subject), ACME)

    # When / Then
    assert refused(cert).reason == RejectionReason.MALFORMED_CERTIFICATE


# --- load_certificate -----------------------------------------------------------------------------


def test_load_certificate_accepts_str_and_bytes():
    _, cert = ACME.issue_device("pump-0001")
    assert load_certificate(pem(cert)) == cert
    assert load_certificate(pem(cert).encode()) == cert


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        pem(ACME.certificate) + pem(GLOBEX.certificate),
        key_pem(generate_key("ec:secp256r1")),
        ACME.certificate.public_bytes(serialization.Encoding.DER),
        "A" * (MAX_PEM_BYTES + 1),
        pem(ACME.certificate) + "#" * MAX_PEM_BYTES,
    ],
    ids=[
        "empty",
        "garbage",
        "bad-base64-body",
        "two-certs",
        "private-key",
        "der",
        "oversized",
        "valid-but-padded-over-limit",
    ],
)
def test_load_certificate_rejects_anything_but_one_pem_certificate(data):
    # Given input that is not exactly one PEM certificate
    # When / Then: always the same typed error, never a ValueError from the parser
    with pytest.raises(InvalidCertificate) as caught:
        load_certificate(data)
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.status == 400


# --- validate_manufacturer_ca ---------------------------------------------------------------------


def test_valid_manufacturer_ca_is_accepted():
    # Given / When / Then: a self-signed CA allowed to sign certificates
    assert validate_manufacturer_ca(ACME.pem, NOW) == ACME.certificate
    assert validate_manufacturer_ca(RSA_CA.pem.encode(), NOW) == RSA_CA.certificate


def test_intermediate_manufacturer_ca_is_accepted():
    # Given a CA certificate issued by another CA (not self-signed)
    cert = sign(leaf_builder(GLOBEX, ca=True, key_cert_sign=True), GLOBEX)

    # When / Then
    assert validate_manufacturer_ca(pem(cert), NOW) == cert


def test_leaf_certificate_is_not_a_manufacturer_ca():
    # Given a device certificate
    _, cert = ACME.issue_device("pump-0001")

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(pem(cert), NOW)
    assert caught.value.reason == RejectionReason.INVALID_CHAIN


def test_expired_manufacturer_ca_is_refused():
    # Given a CA whose validity ended yesterday
    old = CertificateAuthority.create("old", not_before=NOW - timedelta(days=20), days=19)

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(old.pem, NOW)
    assert caught.value.reason == RejectionReason.EXPIRED


def test_not_yet_valid_manufacturer_ca_is_refused():
    # Given a CA valid from tomorrow (reported with the EXPIRED reason: "not currently valid")
    future = CertificateAuthority.create("future", not_before=NOW + timedelta(days=1))

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(future.pem, NOW)
    assert caught.value.reason == RejectionReason.EXPIRED


def test_ca_without_key_cert_sign_is_refused():
    # Given a certificate with BasicConstraints ca=True but no keyCertSign key usage
    cert = sign(leaf_builder(GLOBEX, ca=True, key_cert_sign=False), GLOBEX)

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(pem(cert), NOW)
    assert caught.value.reason == RejectionReason.INVALID_CHAIN


def test_ca_without_basic_constraints_is_refused():
    # Given a self-issued certificate with key usage but no BasicConstraints
    key = generate_key("ec:secp256r1")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(pem(cert), NOW)
    assert caught.value.reason == RejectionReason.INVALID_CHAIN


def test_self_signed_ca_with_a_bad_signature_is_refused():
    # Given a certificate that claims to be self-signed (issuer == subject) but was signed with
    # another key than its own
    builder = leaf_builder(
        ACME, subject=list(ACME.certificate.subject), ca=True, key_cert_sign=True
    )
    cert = sign(builder, GLOBEX)
    assert cert.issuer == cert.subject

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(pem(cert), NOW)
    assert caught.value.reason == RejectionReason.INVALID_CHAIN


def test_malformed_manufacturer_ca_is_refused():
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca("not a certificate", NOW)
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE


# --- verify_proof_of_possession -------------------------------------------------------------------
# A verification certificate is valid from 5 minutes before it is made: it is checked at the
# current time, not at the module's import-time NOW (a slow run reaches these tests later).


def test_proof_of_possession_signed_by_the_ca_is_accepted():
    # Given a verification certificate with the registration code as CN, signed by the CA's key
    proof = pem(ACME.verification_certificate(REGISTRATION_CODE))

    # When / Then: no error
    verify_proof_of_possession(ACME.certificate, proof, REGISTRATION_CODE, datetime.now(UTC))


def test_proof_of_possession_with_another_code_is_refused():
    # Given a verification certificate made for another account's registration code
    proof = pem(ACME.verification_certificate("f" * 64))

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        verify_proof_of_possession(ACME.certificate, proof, REGISTRATION_CODE, datetime.now(UTC))
    assert caught.value.reason == RejectionReason.INVALID_CHAIN
    assert "common name" in caught.value.message


@pytest.mark.parametrize("signer", [IMPOSTOR, GLOBEX], ids=["same-name-other-key", "other-ca"])
def test_proof_of_possession_signed_by_another_key_is_refused(signer):
    # Given a verification certificate with the right code, signed by a key that is not the CA's
    proof = pem(signer.verification_certificate(REGISTRATION_CODE))

    # When / Then: whoever registers the CA must hold its private key
    with pytest.raises(InvalidCertificate) as caught:
        verify_proof_of_possession(ACME.certificate, proof, REGISTRATION_CODE, datetime.now(UTC))
    assert caught.value.reason == RejectionReason.INVALID_CHAIN
    assert "does not verify against the CA" in caught.value.message


def _version_1(proof: x509.Certificate, signer_key) -> x509.Certificate:
    # The version field patched out of a v3 certificate's TBS, then re-signed: what OpenSSL
    # 3.0's `x509 -req` without extensions makes (AWS IoT's documented recipe).
    der = proof.public_bytes(serialization.Encoding.DER)
    tbs = proof.tbs_certificate_bytes
    version = b"\xa0\x03\x02\x01\x02"
    assert version in tbs[:10]
    content = tbs[tbs.index(version) + len(version) :]
    v1 = x509.load_der_x509_certificate(resign(der, der_element(b"\x30", content), signer_key))
    assert v1.version is x509.Version.v1
    return v1


def test_version_1_proof_of_possession_signed_by_the_ca_is_accepted():
    # Given a v1 verification certificate with the right code, signed by the CA's key
    v1 = _version_1(ACME.verification_certificate(REGISTRATION_CODE), ACME.key)

    # When / Then: the proof holds (no exception)
    verify_proof_of_possession(ACME.certificate, pem(v1), REGISTRATION_CODE, datetime.now(UTC))


def test_version_1_proof_of_possession_signed_by_another_key_is_refused():
    # Given a v1 verification certificate naming the CA as issuer, signed by an impostor's key
    v1 = _version_1(ACME.verification_certificate(REGISTRATION_CODE), IMPOSTOR.key)

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        verify_proof_of_possession(ACME.certificate, pem(v1), REGISTRATION_CODE, datetime.now(UTC))
    assert caught.value.reason == RejectionReason.INVALID_CHAIN


def test_expired_proof_of_possession_is_refused():
    # Given a valid proof checked two days later (it is valid for one day)
    proof = pem(ACME.verification_certificate(REGISTRATION_CODE))

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        verify_proof_of_possession(
            ACME.certificate, proof, REGISTRATION_CODE, NOW + timedelta(days=2)
        )
    assert caught.value.reason == RejectionReason.EXPIRED


def test_malformed_proof_of_possession_is_refused():
    with pytest.raises(InvalidCertificate) as caught:
        verify_proof_of_possession(ACME.certificate, "junk", REGISTRATION_CODE, NOW)
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE


def test_weak_manufacturer_ca_is_refused_at_registration():
    # Given a manufacturer CA with an RSA-1024 key
    weak = CertificateAuthority.create("weak", key_kind="rsa:1024")

    # When / Then: the baseline key policy applies to CA certificates too
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(weak.pem, NOW)
    assert caught.value.reason == RejectionReason.WEAK_KEY


def test_devices_of_a_weak_anchor_registered_before_the_policy_are_refused():
    # Given a weak CA already stored as a trust anchor (registered before the baseline policy)
    weak = CertificateAuthority.create("weak", key_kind="rsa:1024")
    _, cert = weak.issue_device("pump-0001")

    # When / Then: every device certificate it issues is still refused, by the chain verifier
    error = refused(cert, anchor=weak)
    assert error.reason == RejectionReason.INVALID_CHAIN
    assert "too weak" in error.details["error"]


# --- parse failures never escape ------------------------------------------------------------------


class _LazilyBrokenCertificate:
    """Stands for a certificate whose lazily parsed fields fail when read (cryptography parses
    extensions, names and keys on first access)."""

    def __init__(self, real: x509.Certificate, broken: str, error: Exception) -> None:
        self._real, self._broken, self._error = real, broken, error

    def __getattr__(self, name: str) -> object:
        if name == self._broken:
            raise self._error
        return getattr(self._real, name)

    def public_key(self) -> object:
        if self._broken == "public_key":
            raise self._error
        return self._real.public_key()


@pytest.mark.parametrize(
    "field, error",
    [
        (
            "extensions",
            x509.DuplicateExtension("Duplicate 2.5.29.15 extension found", x509.OID_KEY_USAGE),
        ),
        ("extensions", x509.UnsupportedGeneralNameType("x400Address")),
        ("subject", ValueError("error parsing asn1 value")),
        ("issuer", TypeError("bad name")),
        ("public_key", UnsupportedAlgorithm("unknown key type")),
        ("signature_hash_algorithm", UnsupportedAlgorithm("unknown hash")),
        ("serial_number", ValueError("bad serial")),
    ],
    ids=[
        "duplicate-extension",
        "general-name",
        "subject",
        "issuer",
        "public-key",
        "hash",
        "serial",
    ],
)
def test_a_field_that_fails_to_decode_is_a_malformed_certificate(field, error):
    # Given a certificate object whose `field` raises when read, as cryptography's lazy parsers do
    _, real = ACME.issue_device("pump-0001")
    cert = _LazilyBrokenCertificate(real, field, error)

    # When it is validated
    with pytest.raises(InvalidCertificate) as caught:
        validate_device_certificate(cert, ACME.certificate, NOW, BASELINE)  # type: ignore[arg-type]

    # Then the parser's exception is the typed refusal
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE
    assert caught.value.details["error"] == type(error).__name__


def test_manufacturer_ca_with_a_malformed_extension_is_a_400_not_a_crash():
    # Given a CA certificate whose subjectAltName does not decode (DER surgery, re-signed)
    key = generate_key("ec:secp256r1")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd CA")])
    der = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("2.5.29.113"), b"\x30\x03\x82\x05\x41"
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    tbs = x509.load_der_x509_certificate(der).tbs_certificate_bytes
    patched = tbs.replace(b"\x06\x03\x55\x1d\x71", b"\x06\x03\x55\x1d\x11")  # -> 2.5.29.17
    broken = x509.load_der_x509_certificate(resign(der, patched, key))

    # When / Then
    with pytest.raises(InvalidCertificate) as caught:
        validate_manufacturer_ca(pem(broken), NOW)
    assert caught.value.reason == RejectionReason.MALFORMED_CERTIFICATE
    assert caught.value.status == 400


# ---- the manufacturer CA meets the device verifier's CA policy, whatever its proof ------------

_CA_KEY = generate_key("ec:secp256r1")


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _variant_ca(variant: str) -> CertificateAuthority:
    """A self-signed CA, valid but for `variant` (one way to break web-PKI's CA policy)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"variant {variant} CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_CA_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
    )
    if variant != "no-basic-constraints":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=variant != "basic-constraints-not-ca", path_length=None),
            critical=variant != "basic-constraints-not-critical",
        )
    if variant != "no-key-usage":
        builder = builder.add_extension(
            _key_usage(key_cert_sign=variant != "no-key-cert-sign"), critical=True
        )
    if variant == "eku-server-auth-only":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if variant == "eku-critical":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True
        )
    if variant == "ski-critical":
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(_CA_KEY.public_key()), critical=True
        )
    if variant == "certificate-policies-critical":
        builder = builder.add_extension(
            x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]
            ),
            critical=True,
        )
    if variant == "aki-critical":
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(_CA_KEY.public_key()),
            critical=True,
        )
    if variant == "aki-without-key-id":
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=None,
                authority_cert_issuer=[x509.DirectoryName(name)],
                authority_cert_serial_number=1,
            ),
            critical=False,
        )
    if variant == "aki-with-issuer-serial":
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=b"\x01" * 20,
                authority_cert_issuer=[x509.DirectoryName(name)],
                authority_cert_serial_number=1,
            ),
            critical=False,
        )
    cert = builder.sign(_CA_KEY, hashes.SHA256())
    return CertificateAuthority(name=variant, key=_CA_KEY, certificate=cert)


CA_POLICY_VARIANTS = {
    "conforming": True,
    "basic-constraints-not-critical": False,
    "basic-constraints-not-ca": False,
    "no-basic-constraints": False,
    "no-key-usage": False,
    "no-key-cert-sign": False,
    "eku-server-auth-only": False,
    "eku-critical": False,
    "ski-critical": False,
    "certificate-policies-critical": False,
    "aki-with-issuer-serial": True,  # CA/B forbids it; cryptography 48 accepts it
    "aki-critical": False,
    "aki-without-key-id": False,
}


@pytest.mark.parametrize("variant, allowed", CA_POLICY_VARIANTS.items(), ids=CA_POLICY_VARIANTS)
def test_a_ca_is_admitted_exactly_when_the_device_verifier_would_accept_it(variant, allowed):
    # Given a CA that breaks the web-PKI CA policy in one way (or none), and a conforming device
    # certificate it issued
    authority = _variant_ca(variant)
    _, device = authority.issue_device("pump-0001")

    # When it is validated as a manufacturer CA, and its device verified against it
    try:
        validate_manufacturer_ca(authority.pem, NOW)
        admitted = True
    except InvalidCertificate as exc:
        assert exc.reason == RejectionReason.INVALID_CHAIN
        admitted = False
    try:
        validate_device_certificate(parsed(device), authority.certificate, NOW, BASELINE)
        verified = True
    except InvalidCertificate as exc:
        assert exc.reason == RejectionReason.INVALID_CHAIN
        verified = False

    # Then the CA is admitted exactly when the verifier would ever accept its devices
    assert admitted == verified == allowed


def test_a_version_1_proof_does_not_let_a_ca_with_a_non_critical_basic_constraints_in():
    # Given a CA whose basicConstraints is not critical (every device of it would be refused
    # invalid_chain) and a v1 proof of possession signed by its key
    authority = _variant_ca("basic-constraints-not-critical")
    proof = _version_1(authority.verification_certificate(REGISTRATION_CODE), authority.key)

    # When the CA and its proof are checked as CA registration checks them
    # Then the CA is refused, whatever the proof's version
    with pytest.raises(InvalidCertificate) as caught:
        ca = validate_manufacturer_ca(authority.pem, NOW)
        verify_proof_of_possession(ca, pem(proof), REGISTRATION_CODE, NOW)
    assert caught.value.reason == RejectionReason.INVALID_CHAIN
    assert "basicConstraints is not critical" in caught.value.message


def test_a_name_constraints_extension_in_a_device_certificate_is_refused():
    # Given a device certificate carrying nameConstraints (RFC 5280 §4.2.1.10: CA certificates
    # only)
    key = generate_key("ec:secp256r1")
    cert = sign(
        leaf_builder(ACME, key=key).add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
            ),
            critical=True,
        ),
        ACME,
    )

    # When / Then
    assert refused(cert).reason == RejectionReason.INVALID_CHAIN
