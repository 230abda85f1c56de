"""The issuing CA's X.509, with a software DigestSigner (a local EC key that signs prehashed
digests as KMS does with MessageType=DIGEST): what it signs verifies, is what fleetkey's own
verifiers accept, and a signer with the wrong key fails loudly; rotation CSRs are refused for
anything fleetkey would not issue; `pki install` refuses chains that do not hold."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from fleetkey.crypto import issuing
from fleetkey.crypto.certificates import (
    check_ca_profile,
    validate_device_certificate,
    verify_proof_of_possession,
)
from fleetkey.crypto.issuing import (
    CsrNotIssuable,
    IssuingKeyMismatch,
    RevokedEntry,
    certs_only,
    check_issuing_ca,
    check_requested,
    device_certificate,
    issuing_ca_certificate,
    issuing_ca_request,
    load_rotation_csr,
    random_serial,
    revocation_list,
    sign_certificate,
    sign_crl,
    sign_csr,
    spki_sha256,
    verification_certificate,
)
from fleetkey.crypto.x509_policy import check_certificate, check_csr
from fleetkey.domain.profiles import KeyPolicy
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import InvalidCertificate, InvalidRequest

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetkey issuing CA")])
CRL_URL = "https://fleetkey.example/v1/pki/crl"
CURVES = [ec.SECP256R1(), ec.SECP384R1()]
_HASH_OF = {"secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384}


@dataclass
class SoftwareSigner:
    """A DigestSigner around a local EC key, counting its signatures. `signing_key`, when set,
    signs instead of `key` while `public_key()` still reports `key` (a signer whose KMS key is
    not the one it claims)."""

    key: ec.EllipticCurvePrivateKey
    signing_key: ec.EllipticCurvePrivateKey | None = None
    digests: list[bytes] = field(default_factory=list)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        self.digests.append(digest)
        algorithm = _HASH_OF[self.key.curve.name]()
        assert len(digest) == algorithm.digest_size
        return (self.signing_key or self.key).sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))


def make_signer(curve: ec.EllipticCurve | None = None) -> SoftwareSigner:
    return SoftwareSigner(ec.generate_private_key(curve or ec.SECP256R1()))


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def key_usage(*, cert_sign: bool = True, crl_sign: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class SoftwareCa:
    """A customer's CA with its key in hand (a root or an intermediate), for `pki install`."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def ca_certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: SoftwareCa | None,
    *,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool = True,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    not_before: datetime = NOW - timedelta(days=1),
    not_after: datetime = NOW + timedelta(days=365),
) -> x509.Certificate:
    """A CA certificate for `public_key` issued by `issuer` (self-signed with `signing_key` when
    `issuer` is None)."""
    if issuer is None:
        assert signing_key is not None
        issuer_name, key, issuer_public = subject, signing_key, signing_key.public_key()
    else:
        issuer_name = issuer.certificate.subject
        key, issuer_public = issuer.key, issuer.key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage or key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
        .sign(key, hashes.SHA384())
    )


def make_root(common_name: str = "customer root", **kwargs: object) -> SoftwareCa:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = ca_certificate(name(common_name), key.public_key(), None, signing_key=key, **kwargs)  # type: ignore[arg-type]
    return SoftwareCa(key, cert)


def make_intermediate(parent: SoftwareCa, **kwargs: object) -> SoftwareCa:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = ca_certificate(name("customer intermediate"), key.public_key(), parent, **kwargs)  # type: ignore[arg-type]
    return SoftwareCa(key, cert)


def issue_from_request(
    csr: x509.CertificateSigningRequest, issuer: SoftwareCa, **overrides: object
) -> x509.Certificate:
    """What a customer's CA does with `issuing_ca_request`'s CSR: a certificate with the
    requested extensions."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(csr.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(overrides.get("not_before", NOW - timedelta(days=1)))  # type: ignore[arg-type]
        .not_valid_after(overrides.get("not_after", NOW + timedelta(days=365)))  # type: ignore[arg-type]
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(csr.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(issuer.key, hashes.SHA384())


def self_signed_ca(
    curve: ec.EllipticCurve | None = None,
) -> tuple[SoftwareSigner, x509.Certificate]:
    signer = make_signer(curve)
    return signer, issuing_ca_certificate(signer, CA_NAME, now=NOW, validity_days=3650)


def csr_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | None = None,
    subject: x509.Name | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
    attributes: list[tuple[x509.ObjectIdentifier, bytes]] = (),  # type: ignore[assignment]
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        name("dev-1") if subject is None else subject
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    for oid, attribute in attributes:
        builder = builder.add_attribute(oid, attribute)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


# ---- signing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_the_issuing_ca_is_self_signed_with_the_ca_profile(curve):
    # Given a signer on the curve
    signer = make_signer(curve)

    # When it makes its CA certificate
    ca = issuing_ca_certificate(signer, CA_NAME, now=NOW, validity_days=3650)

    # Then the certificate is for the signer's key, verifies with it, hashed as the curve wants
    assert spki_sha256(ca.public_key()) == spki_sha256(signer.public_key())
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.signature_hash_algorithm, _HASH_OF[curve.name])
    assert len(signer.digests) == 1
    # and carries the CA profile: pathLen 0, keyCertSign and cRLSign, both critical, key ids
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 0 < ca.serial_number < 2**128
    assert ca.not_valid_before_utc <= NOW < ca.not_valid_after_utc
    assert ca.not_valid_after_utc == NOW + timedelta(days=3650)
    # and passes the checks fleetkey applies to CAs, `pki install`'s included
    check_certificate(ca)
    check_ca_profile(ca)
    assert check_issuing_ca(pem(ca), "", signer.public_key(), NOW) == (ca, [])


@pytest.mark.parametrize(
    "subject,days", [(x509.Name([]), 10), (CA_NAME, 0)], ids=["empty subject", "no validity"]
)
def test_an_impossible_ca_is_refused_before_signing(subject, days):
    signer = make_signer()
    with pytest.raises(InvalidRequest):
        issuing_ca_certificate(signer, subject, now=NOW, validity_days=days)
    assert signer.digests == []


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "device_key",
    [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)],
    ids=["ec", "rsa"],
)
def test_a_device_certificate_is_what_fleetkey_verifies_devices_with(curve, device_key):
    # Given the issuing CA
    signer, ca = self_signed_ca(curve)

    # When it issues a device certificate
    cert = device_certificate(
        signer,
        ca,
        public_key=device_key.public_key(),
        device_id="dev-1",
        serial=12345,
        not_before=NOW - timedelta(minutes=1),
        not_after=NOW + timedelta(days=30),
        crl_url=CRL_URL,
    )

    # Then it passes fleetkey's own device verification with the CA as anchor
    device = validate_device_certificate(cert, ca, NOW, KeyPolicy())
    assert device.device_id == "dev-1"
    # and holds exactly the device profile
    assert cert.subject == name("dev-1") and cert.issuer == ca.subject
    assert cert.serial_number == 12345
    assert spki_sha256(cert.public_key()) == spki_sha256(device_key.public_key())
    extensions = {e.oid: e for e in cert.extensions}
    assert extensions[x509.BasicConstraints.oid].critical
    assert not extensions[x509.BasicConstraints.oid].value.ca
    usage = extensions[x509.KeyUsage.oid]
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert list(extensions[x509.ExtendedKeyUsage.oid].value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert extensions[x509.AuthorityKeyIdentifier.oid].value.key_identifier == ca_ski.digest
    assert extensions[
        x509.SubjectKeyIdentifier.oid
    ].value == x509.SubjectKeyIdentifier.from_public_key(device_key.public_key())
    (point,) = extensions[x509.CRLDistributionPoints.oid].value
    assert point.full_name == [x509.UniformResourceIdentifier(CRL_URL)]
    assert set(extensions) == {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.CRLDistributionPoints.oid,
    }


def test_a_device_id_that_cannot_be_a_common_name_is_refused():
    signer, ca = self_signed_ca()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidRequest):
        device_certificate(
            signer,
            ca,
            public_key=key,
            device_id="d" * 65,
            serial=1,
            not_before=NOW,
            not_after=NOW + timedelta(days=1),
            crl_url=CRL_URL,
        )


def test_the_verification_certificate_is_the_proof_aws_iot_asks_for():
    # Given the issuing CA and the account's registration code
    signer, ca = self_signed_ca()
    code = hashlib.sha256(b"account").hexdigest()

    # When the CA makes AWS IoT's proof of possession
    cert = verification_certificate(signer, ca, code, now=NOW)

    # Then fleetkey's check of that proof (the one it runs on manufacturer CAs) accepts it
    verify_proof_of_possession(ca, pem(cert), code, NOW)
    assert cert.subject == name(code)
    assert spki_sha256(cert.public_key()) != spki_sha256(ca.public_key())
    assert cert.not_valid_after_utc - NOW <= timedelta(days=1)


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_the_crl_lists_the_revoked_serials_and_verifies_with_the_ca(curve):
    # Given the issuing CA and three revocations, one serial twice
    signer, ca = self_signed_ca(curve)
    revoked = [
        RevokedEntry(7, NOW - timedelta(hours=2), x509.ReasonFlags.superseded),
        RevokedEntry(2**127 + 5, NOW - timedelta(hours=1), x509.ReasonFlags.unspecified),
        RevokedEntry(7, NOW - timedelta(hours=3), x509.ReasonFlags.key_compromise),
    ]

    # When it publishes a CRL
    crl = revocation_list(
        signer, ca, revoked, number=42, this_update=NOW, next_update=NOW + timedelta(hours=1)
    )

    # Then the CRL verifies with the CA's key and says who issued it
    assert crl.is_signature_valid(ca.public_key())
    assert crl.issuer == ca.subject
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + timedelta(hours=1)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    # and lists each serial once, the earliest revocation of a serial revoked twice
    entries = {entry.serial_number: entry for entry in crl}
    assert set(entries) == {7, 2**127 + 5}
    first = entries[7]
    assert first.revocation_date_utc == NOW - timedelta(hours=3)
    reason = first.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    # with no reasonCode for "unspecified" (RFC 5280 §5.3.1)
    assert len(entries[2**127 + 5].extensions) == 0


def test_an_empty_crl_is_signed_too():
    signer, ca = self_signed_ca()
    crl = revocation_list(
        signer, ca, [], number=1, this_update=NOW, next_update=NOW + timedelta(days=1)
    )
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_the_ca_request_is_for_the_signers_key_and_asks_for_a_ca(curve):
    # Given a signer
    signer = make_signer(curve)

    # When it makes the issuing CA's request
    csr = issuing_ca_request(signer, CA_NAME)

    # Then the request is for the signer's key (not the throwaway the builder signed with),
    # self-signed by it, and asks for a CA of path length 0 with keyCertSign and cRLSign
    assert spki_sha256(csr.public_key()) == spki_sha256(signer.public_key())
    assert csr.is_signature_valid
    check_csr(csr, KeyPolicy())
    assert csr.subject == CA_NAME
    constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, 0)
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    # and round-trips through PEM and DER
    der = csr.public_bytes(serialization.Encoding.DER)
    assert x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.DER) == der


def test_sign_csr_keeps_the_builders_attributes():
    signer = make_signer()
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(CA_NAME)
        .add_attribute(AttributeOID.UNSTRUCTURED_NAME, b"fleetkey")
    )
    csr = sign_csr(builder, signer)
    assert csr.is_signature_valid
    assert csr.attributes.get_attribute_for_oid(AttributeOID.UNSTRUCTURED_NAME).value == b"fleetkey"


# ---- a signer that is not the CA's key fails loudly ---------------------------------------------


def test_a_signer_that_signs_with_another_key_is_caught_by_the_verify_after_sign():
    # Given a CA and a signer that claims the CA's key but signs with another (a wrong KMS key)
    signer, ca = self_signed_ca()
    rogue = SoftwareSigner(signer.key, signing_key=ec.generate_private_key(ec.SECP256R1()))
    device_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name("dev-1"))
        .issuer_name(ca.subject)
        .public_key(device_key)
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    crl_builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + timedelta(days=1))
    )

    # Then everything it signs is refused after signing, never returned
    with pytest.raises(IssuingKeyMismatch):
        sign_certificate(builder, rogue)
    with pytest.raises(IssuingKeyMismatch):
        sign_crl(crl_builder, rogue)
    with pytest.raises(IssuingKeyMismatch):
        sign_csr(x509.CertificateSigningRequestBuilder().subject_name(CA_NAME), rogue)
    with pytest.raises(IssuingKeyMismatch):
        device_certificate(
            rogue,
            ca,
            public_key=device_key,
            device_id="dev-1",
            serial=1,
            not_before=NOW,
            not_after=NOW + timedelta(days=1),
            crl_url=CRL_URL,
        )
    with pytest.raises(IssuingKeyMismatch):
        issuing_ca_certificate(rogue, CA_NAME, now=NOW, validity_days=1)
    assert len(rogue.digests) == 5


def test_a_signer_whose_key_is_not_the_cas_is_refused_before_it_signs():
    # Given a CA and a signer holding another key (a misconfigured key id)
    _, ca = self_signed_ca()
    other = make_signer()

    # Then issuing with it is refused, and nothing is signed
    with pytest.raises(IssuingKeyMismatch):
        device_certificate(
            other,
            ca,
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            device_id="dev-1",
            serial=1,
            not_before=NOW,
            not_after=NOW + timedelta(days=1),
            crl_url=CRL_URL,
        )
    with pytest.raises(IssuingKeyMismatch):
        revocation_list(other, ca, [], number=1, this_update=NOW, next_update=NOW)
    with pytest.raises(IssuingKeyMismatch):
        verification_certificate(other, ca, "code", now=NOW)
    assert other.digests == []


def test_a_signer_whose_answer_is_not_a_signature_is_refused():
    signer, ca = self_signed_ca()

    class Garbage(SoftwareSigner):
        def sign_digest(self, digest: bytes) -> bytes:
            return b"\x30\x03\x02\x01\x01"

    with pytest.raises(IssuingKeyMismatch):
        revocation_list(Garbage(signer.key), ca, [], number=1, this_update=NOW, next_update=NOW)


def test_a_signer_on_another_curve_is_refused():
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(ValueError):
        issuing_ca_certificate(signer, CA_NAME, now=NOW, validity_days=1)


# ---- helpers ------------------------------------------------------------------------------------


def test_random_serials_are_positive_128_bit_and_distinct():
    serials = {random_serial() for _ in range(200)}
    assert len(serials) == 200
    assert all(0 < s < 2**128 for s in serials)
    assert max(s.bit_length() for s in serials) > 120


def test_spki_sha256_is_the_hash_of_the_subject_public_key_info():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki_sha256(key) == hashlib.sha256(der).hexdigest()


def test_certs_only_holds_the_certificates_in_order():
    _, ca = self_signed_ca()
    root = make_root()
    der = certs_only([ca, root.certificate])
    assert pkcs7.load_der_pkcs7_certificates(der) == [ca, root.certificate]


# ---- rotation CSRs -------------------------------------------------------------------------------


def test_a_plain_device_csr_loads_in_pem_and_der_and_is_issuable():
    text = csr_pem()
    csr = load_rotation_csr(text)
    check_requested(csr, "dev-1")
    der = csr.public_bytes(serialization.Encoding.DER)
    assert load_rotation_csr(der) == csr


def test_a_csr_that_requests_exactly_what_fleetkey_issues_is_issuable():
    # Given a CSR requesting the device profile's own extensions
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    text = csr_pem(
        extensions=[
            (usage, True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ]
    )
    # Then it is issuable
    check_requested(load_rotation_csr(text), "dev-1")


def _flip_signature(text: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(text.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature's last INTEGER
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _big_csr() -> str:
    # A valid CSR over 8 KiB: a non-critical extension the baseline policy lets through.
    padding = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x04\x82\x21\x00" + b"a" * 0x2100
    )
    return csr_pem(extensions=[(padding, False)])


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: _flip_signature(csr_pem()), RejectionReason.INVALID_CHAIN),
        (
            lambda: csr_pem(rsa.generate_private_key(65537, 1024)),  # noqa: S505 - the point
            RejectionReason.WEAK_KEY,
        ),
        (lambda: csr_pem(ed25519.Ed25519PrivateKey.generate()), RejectionReason.WEAK_KEY),
        (lambda: csr_pem(ec.generate_private_key(ec.SECP521R1())), RejectionReason.WEAK_KEY),
        (lambda: "garbage", RejectionReason.MALFORMED_CERTIFICATE),
        (lambda: csr_pem() + csr_pem(), RejectionReason.MALFORMED_CERTIFICATE),
        (lambda: _big_csr(), RejectionReason.MALFORMED_CERTIFICATE),
        (
            lambda: pem(make_root().certificate) + csr_pem(),
            RejectionReason.MALFORMED_CERTIFICATE,
        ),
        (
            lambda: csr_pem().replace("REQUEST-----\n", "REQUEST-----\n\u00e9"),
            RejectionReason.MALFORMED_CERTIFICATE,
        ),
    ],
    ids=[
        "broken signature",
        "rsa-1024",
        "ed25519",
        "p-521",
        "garbage",
        "two csrs",
        "over 8 KiB",
        "a certificate before the csr",
        "not ascii",
    ],
)
def test_a_csr_that_does_not_load_is_refused_with_its_reason(make, reason):
    with pytest.raises(InvalidCertificate) as refused:
        load_rotation_csr(make())
    assert refused.value.reason == reason


def test_the_size_limit_is_8_kib_and_holds_for_der_too():
    text = _big_csr()
    assert len(text) > issuing.MAX_CSR_BYTES
    der = x509.load_pem_x509_csr(text.encode()).public_bytes(serialization.Encoding.DER)
    assert len(der) > issuing.MAX_CSR_BYTES
    with pytest.raises(InvalidCertificate, match="larger"):
        load_rotation_csr(der)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30\x00", b"garbage", None],
    ids=["empty", "empty sequence", "garbage", "trailing bytes"],
)
def test_der_that_is_not_one_csr_is_refused(data):
    if data is None:
        data = (
            x509.load_pem_x509_csr(csr_pem().encode()).public_bytes(serialization.Encoding.DER)
            + b"\x00\x00"
        )
    with pytest.raises(InvalidCertificate) as refused:
        load_rotation_csr(data)
    assert refused.value.reason == RejectionReason.MALFORMED_CERTIFICATE


_ALL_USAGES = dict.fromkeys(
    (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ),
    False,
)


def _usage(**flags: bool) -> x509.KeyUsage:
    return x509.KeyUsage(**{**_ALL_USAGES, "digital_signature": True, **flags})


@pytest.mark.parametrize(
    "text,refused",
    [
        (lambda: csr_pem(subject=name("dev-2")), "not the device id"),
        (
            lambda: csr_pem(
                subject=x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme"),
                    ]
                )
            ),
            "one common name",
        ),
        (
            lambda: csr_pem(
                subject=x509.Name(
                    [
                        x509.RelativeDistinguishedName(
                            [
                                x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
                                x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
                            ]
                        )
                    ]
                )
            ),
            "one common name",
        ),
        (
            lambda: csr_pem(
                subject=x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "dev-1")])
            ),
            "one common name",
        ),
        (lambda: csr_pem(subject=x509.Name([])), "one common name"),
        (
            lambda: csr_pem(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
            "CA",
        ),
        (
            lambda: csr_pem(
                extensions=[(x509.BasicConstraints(ca=False, path_length=None), False)]
            ),
            None,
        ),
        (
            lambda: csr_pem(
                extensions=[(x509.SubjectAlternativeName([x509.DNSName("dev-1.example")]), False)]
            ),
            "SubjectAlternativeName",
        ),
        (lambda: csr_pem(extensions=[(_usage(key_cert_sign=True), True)]), "key usages"),
        (lambda: csr_pem(extensions=[(_usage(key_encipherment=True), True)]), "key usages"),
        (
            lambda: csr_pem(
                extensions=[(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]
            ),
            "clientAuth",
        ),
        (
            lambda: csr_pem(
                extensions=[
                    (
                        x509.ExtendedKeyUsage(
                            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]
                        ),
                        False,
                    )
                ]
            ),
            "clientAuth",
        ),
        (
            lambda: csr_pem(attributes=[(AttributeOID.CHALLENGE_PASSWORD, b"secret")]),
            "challengePassword",
        ),
        (lambda: csr_pem(attributes=[(AttributeOID.UNSTRUCTURED_NAME, b"x")]), "attribute"),
        (
            lambda: csr_pem(
                extensions=[
                    (
                        x509.UnrecognizedExtension(
                            x509.ObjectIdentifier("1.3.6.1.4.1.55555.2"), b"\x05\x00"
                        ),
                        False,
                    )
                ]
            ),
            "1.3.6.1.4.1.55555.2",
        ),
    ],
    ids=[
        "other cn",
        "extra subject attribute",
        "multi-valued rdn",
        "no cn",
        "empty subject",
        "ca true",
        "ca false is fine",
        "subject alt name",
        "key cert sign",
        "key encipherment",
        "server auth",
        "client auth and code signing",
        "challenge password",
        "unstructured name",
        "unknown extension",
    ],
)
def test_a_csr_asking_for_more_than_a_device_certificate_is_not_issuable(text, refused):
    csr = load_rotation_csr(text())
    if refused is None:
        check_requested(csr, "dev-1")
        return
    with pytest.raises(CsrNotIssuable, match=refused) as error:
        check_requested(csr, "dev-1")
    assert error.value.code == "invalid_csr" and error.value.status == 400


# ---- pki install: check_issuing_ca -------------------------------------------------------------


@pytest.fixture
def subordinate():
    """A KMS-like signer, its request signed by a customer root through an intermediate."""
    signer = make_signer()
    root = make_root()
    intermediate = make_intermediate(root, path_length=1)
    csr = issuing_ca_request(signer, CA_NAME)
    cert = issue_from_request(csr, intermediate)
    return signer, cert, intermediate, root


def _chain(*cas: SoftwareCa) -> str:
    return "".join(pem(ca.certificate) for ca in cas)


def test_the_subordinate_round_trip_installs(subordinate):
    # Given the customer's certificate for the CA's request, and the chain up to its root
    signer, cert, intermediate, root = subordinate

    # When it is checked for install
    certificate, chain = check_issuing_ca(
        pem(cert), _chain(intermediate, root), signer.public_key(), NOW
    )

    # Then it is accepted, and the CA issues devices that chain to the customer's root
    assert certificate == cert and chain == [intermediate.certificate, root.certificate]
    device = device_certificate(
        signer,
        certificate,
        public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        device_id="dev-1",
        serial=random_serial(),
        not_before=NOW,
        not_after=NOW + timedelta(days=1),
        crl_url=CRL_URL,
    )
    device.verify_directly_issued_by(certificate)
    validate_device_certificate(device, certificate, NOW, KeyPolicy())


def test_directly_under_the_root_installs():
    signer, root = make_signer(), make_root()
    cert = issue_from_request(issuing_ca_request(signer, CA_NAME), root)
    assert check_issuing_ca(pem(cert), _chain(root), signer.public_key(), NOW)[1] == [
        root.certificate
    ]


def _refusal(call) -> InvalidCertificate:
    with pytest.raises(InvalidCertificate) as refused:
        call()
    return refused.value


def test_a_certificate_for_another_key_is_refused(subordinate):
    _, cert, intermediate, root = subordinate
    other = make_signer().public_key()
    refused = _refusal(lambda: check_issuing_ca(pem(cert), _chain(intermediate, root), other, NOW))
    assert refused.reason == RejectionReason.UNEXPECTED_PUBLIC_KEY


def test_a_certificate_that_is_not_a_ca_is_refused():
    signer, root = make_signer(), make_root()
    cert = ca_certificate(CA_NAME, signer.public_key(), root, ca=False)
    refused = _refusal(lambda: check_issuing_ca(pem(cert), _chain(root), signer.public_key(), NOW))
    assert refused.reason == RejectionReason.INVALID_CHAIN and "not a CA" in refused.message


def test_a_ca_that_may_not_sign_crls_is_refused():
    signer, root = make_signer(), make_root()
    cert = ca_certificate(
        CA_NAME, signer.public_key(), root, path_length=0, usage=key_usage(crl_sign=False)
    )
    refused = _refusal(lambda: check_issuing_ca(pem(cert), _chain(root), signer.public_key(), NOW))
    assert refused.reason == RejectionReason.INVALID_CHAIN and "cRLSign" in refused.message


def test_a_chain_that_does_not_link_is_refused(subordinate):
    signer, cert, _, root = subordinate
    # the root alone: the certificate's issuer (the intermediate) is missing
    refused = _refusal(lambda: check_issuing_ca(pem(cert), _chain(root), signer.public_key(), NOW))
    assert refused.reason == RejectionReason.INVALID_CHAIN
    # another CA of the same name as the intermediate: names link, the signature does not
    impostor = make_intermediate(root, path_length=1)
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(impostor, root), signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN and "not issued by" in refused.message


def test_a_chain_out_of_order_is_refused(subordinate):
    signer, cert, intermediate, root = subordinate
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(root, intermediate), signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN


def test_a_chain_that_does_not_end_in_a_self_signed_root_is_refused(subordinate):
    signer, cert, intermediate, _ = subordinate
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(intermediate), signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN and "self-signed root" in refused.message
    # nor may a certificate that is not self-signed come without its chain
    refused = _refusal(lambda: check_issuing_ca(pem(cert), "", signer.public_key(), NOW))
    assert refused.reason == RejectionReason.INVALID_CHAIN


def test_a_chain_that_goes_on_past_the_root_is_refused(subordinate):
    signer, cert, intermediate, root = subordinate
    refused = _refusal(
        lambda: check_issuing_ca(
            pem(cert), _chain(intermediate, root, make_root()), signer.public_key(), NOW
        )
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN


@pytest.mark.parametrize("which", ["issuing CA", "intermediate", "root", "not yet valid"])
def test_an_expired_link_is_refused(which):
    signer = make_signer()
    old = {"not_before": NOW - timedelta(days=30), "not_after": NOW - timedelta(days=1)}
    future = {"not_before": NOW + timedelta(days=1), "not_after": NOW + timedelta(days=30)}
    root = make_root(**(old if which == "root" else {}))
    intermediate = make_intermediate(
        root, path_length=1, **(old if which == "intermediate" else {})
    )
    dates = old if which == "issuing CA" else future if which == "not yet valid" else {}
    cert = issue_from_request(issuing_ca_request(signer, CA_NAME), intermediate, **dates)
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(intermediate, root), signer.public_key(), NOW)
    )
    expected = (
        RejectionReason.NOT_YET_VALID if which == "not yet valid" else RejectionReason.EXPIRED
    )
    assert refused.reason == expected


def test_an_intermediate_whose_path_length_forbids_the_issuing_ca_is_refused():
    signer, root = make_signer(), make_root()
    # pathLen 0: the intermediate may issue end entities only, not the issuing CA
    intermediate = make_intermediate(root, path_length=0)
    cert = issue_from_request(issuing_ca_request(signer, CA_NAME), intermediate)
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(intermediate, root), signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN and "allows 0" in refused.message


def test_an_issuer_that_is_not_a_ca_is_refused():
    signer, root = make_signer(), make_root()
    not_ca = make_intermediate(root, ca=False)
    cert = issue_from_request(issuing_ca_request(signer, CA_NAME), not_ca)
    refused = _refusal(
        lambda: check_issuing_ca(pem(cert), _chain(not_ca, root), signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.INVALID_CHAIN and "not a CA" in refused.message


@pytest.mark.parametrize(
    "certificate,chain",
    [
        ("garbage", None),
        (None, "garbage"),
        (None, "PRIVATE KEY"),
        (None, "too long"),
        ("two", None),
    ],
    ids=[
        "certificate garbage",
        "chain garbage",
        "a key in the chain",
        "chain too long",
        "two certificates",
    ],
)
def test_what_does_not_parse_is_refused_as_malformed(subordinate, certificate, chain):
    signer, cert, intermediate, root = subordinate
    key_pem = intermediate.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    certificate_pem = {"garbage": "garbage", "two": pem(cert) + pem(cert), None: pem(cert)}[
        certificate
    ]
    chain_pem = {
        "garbage": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "PRIVATE KEY": _chain(intermediate) + key_pem + _chain(root),
        "too long": _chain(intermediate) * 5 + _chain(root),
        None: _chain(intermediate, root),
    }[chain]
    refused = _refusal(
        lambda: check_issuing_ca(certificate_pem, chain_pem, signer.public_key(), NOW)
    )
    assert refused.reason == RejectionReason.MALFORMED_CERTIFICATE


def test_certs_only_needs_a_certificate():
    with pytest.raises(ValueError):
        certs_only([])
