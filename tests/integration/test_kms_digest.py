"""The issuing CA with its key in (moto's) KMS, signing with MessageType=DIGEST as
`fleetkey_local.moto_kms_patches` makes moto do it as AWS does: what it signs passes OpenSSL
(certificates, CRLs, PKCS#7, the subordinate round trip with a root OpenSSL made), devices'
OpenSSL CSRs are read, and the patched KMS refuses what AWS refuses."""

from __future__ import annotations

import hashlib
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetkey.adapters.kms import KmsDigestSigner, KmsKeys
from fleetkey.crypto.certificates import verify_proof_of_possession
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
    verification_certificate,
)
from fleetkey.errors import InvalidCertificate
from fleetkey_local import moto_kms_patches
from fleetkey_local.instrument import AwsCallCounter

REGION = "eu-west-1"
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetkey issuing CA")])
CRL_URL = "http://127.0.0.1:8080/v1/pki/crl"
SPECS = [
    pytest.param("ECC_NIST_P256", "ECDSA_SHA_256", hashes.SHA256(), "P-256", id="p256"),
    pytest.param("ECC_NIST_P384", "ECDSA_SHA_384", hashes.SHA384(), "P-384", id="p384"),
]


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=check, timeout=60
    )


def write_pem(path: Path, *items: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(b"".join(item.public_bytes(serialization.Encoding.PEM) for item in items))
    return path


@pytest.fixture
def kms(moto):
    # The plain `moto` fixture does not patch moto: the tests that need DIGEST apply it.
    moto_kms_patches.apply()
    return boto3.client("kms", region_name=REGION)


def ca_key(kms, spec: str) -> str:
    return KmsKeys(client=kms).create_signing_key(
        "fleetkey issuing CA", {"fleetkey:purpose": "issuing-ca:test"}, key_spec=spec
    )


def device_csr(tmp_path: Path, curve: str = "P-256", cn: str = "dev-1", *extra: str) -> Path:
    """A device's request as a stock client makes it: OpenSSL generates the key."""
    csr = tmp_path / f"{cn}.csr"
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{curve}", "-nodes",
        "-subj", f"/CN={cn}", "-keyout", tmp_path / f"{cn}.key", "-out", csr, *extra,
    )  # fmt: skip
    return csr


def issue(signer, ca, csr, *, serial: int | None = None) -> x509.Certificate:
    now = datetime.now(UTC)
    return device_certificate(
        signer,
        ca,
        public_key=csr.public_key(),
        device_id="dev-1",
        serial=serial or random_serial(),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=30),
        crl_url=CRL_URL,
    )


# ---- the patched KMS ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec,algorithm,digest,_curve", SPECS)
def test_a_digest_signature_verifies_over_the_message(kms, spec, algorithm, digest, _curve):
    # Given a KMS key of the spec, created as the issuing CA's is
    key_id = ca_key(kms, spec)
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeySpec"] == spec
    counter = AwsCallCounter().watch(kms)
    signer = KmsDigestSigner(key_id, client=kms)
    message = b"the to-be-signed bytes" * 500  # over RAW's 4,096 bytes
    message_digest = hashlib.new(digest.name, message).digest()

    # When it signs the message's hash, and then another
    signature = signer.sign_digest(message_digest)
    signer.sign_digest(hashlib.new(digest.name, b"another").digest())

    # Then the signature verifies over the message itself (KMS did not hash the hash again)
    signer.public_key().verify(signature, message, ec.ECDSA(digest))
    # and KMS's Verify with the digest agrees
    assert kms.verify(
        KeyId=key_id,
        Message=message_digest,
        MessageType="DIGEST",
        Signature=signature,
        SigningAlgorithm=algorithm,
    )["SignatureValid"]
    # the public key was asked for once, each signature is one Sign
    assert counter.calls.count("kms.GetPublicKey") == 1
    assert counter.calls.count("kms.Sign") == 2


@pytest.mark.parametrize("spec,algorithm,digest,_curve", SPECS)
def test_a_digest_of_the_wrong_length_is_refused(kms, spec, algorithm, digest, _curve):
    # Given a key
    key_id = ca_key(kms, spec)
    wrong = b"\x01" * (digest.digest_size - 1)

    # Then KMS refuses a digest that is not the algorithm's hash size, in Sign and in Verify
    for call in (
        lambda: kms.sign(
            KeyId=key_id, Message=wrong, MessageType="DIGEST", SigningAlgorithm=algorithm
        ),
        lambda: kms.verify(
            KeyId=key_id,
            Message=wrong,
            MessageType="DIGEST",
            Signature=b"\x30\x00",
            SigningAlgorithm=algorithm,
        ),
    ):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "ValidationException"
        assert "Digest is invalid length" in refused.value.response["Error"]["Message"]
    # and the signer refuses it before asking KMS
    counter = AwsCallCounter().watch(kms)
    signer = KmsDigestSigner(key_id, client=kms)
    signer.public_key()
    with pytest.raises(ValueError):
        signer.sign_digest(wrong)
    assert "kms.Sign" not in counter.calls


def test_kms_refuses_what_aws_refuses_around_the_message_type(kms):
    key_id = ca_key(kms, "ECC_NIST_P256")
    for message, message_type in ((b"x" * 4097, "RAW"), (b"x" * 32, "PREHASHED")):
        with pytest.raises(ClientError) as refused:
            kms.sign(
                KeyId=key_id,
                Message=message,
                MessageType=message_type,
                SigningAlgorithm="ECDSA_SHA_256",
            )
        assert refused.value.response["Error"]["Code"] == "ValidationException"
    # RAW up to 4,096 bytes is still signed as before
    kms.sign(KeyId=key_id, Message=b"x" * 4096, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")


def test_only_p256_and_p384_signing_keys_are_created(kms):
    counter = AwsCallCounter().watch(kms)
    for spec in ("ECC_NIST_P521", "RSA_2048", "ECC_SECG_P256K1"):
        with pytest.raises(ValueError):
            KmsKeys(client=kms).create_signing_key("x", {}, key_spec=spec)
    assert counter.calls == []
    # the default is unchanged
    key_id = KmsKeys(client=kms).create_signing_key("x", {})
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeySpec"] == "ECC_NIST_P256"


def test_the_local_stacks_moto_server_signs_digests_too():
    # Given the moto server the local stack runs (in this process, patched by local_aws)
    from fleetkey_local.server import local_aws

    with local_aws() as endpoint:
        kms = boto3.client("kms", endpoint_url=endpoint, region_name=REGION)
        key_id = ca_key(kms, "ECC_NIST_P384")
        signer = KmsDigestSigner(key_id, client=kms)

        # When it signs a SHA-384 digest over the wire
        signature = signer.sign_digest(hashlib.sha384(b"crl").digest())

        # Then the signature verifies over the message, and a short digest is refused
        signer.public_key().verify(signature, b"crl", ec.ECDSA(hashes.SHA384()))
        with pytest.raises(ClientError, match="Digest is invalid length"):
            kms.sign(
                KeyId=key_id,
                Message=b"\x00" * 32,
                MessageType="DIGEST",
                SigningAlgorithm="ECDSA_SHA_384",
            )


# ---- what the issuing CA signs, through OpenSSL -------------------------------------------------


@pytest.mark.parametrize("spec,algorithm,digest,curve", SPECS)
def test_the_kms_issuing_ca_passes_openssl_end_to_end(
    kms, tmp_path, spec, algorithm, digest, curve
):
    # Given the issuing CA, self-signed with its KMS key
    signer = KmsDigestSigner(ca_key(kms, spec), client=kms)
    now = datetime.now(UTC)
    ca = issuing_ca_certificate(signer, CA_NAME, now=now, validity_days=3650)
    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    assert isinstance(ca.signature_hash_algorithm, type(digest))
    assert check_issuing_ca(ca_pem.read_text(), "", signer.public_key(), now)[0] == ca

    # When it issues certificates for two OpenSSL CSRs (a device key of the same curve), and a
    # CRL revoking the first
    csr = load_rotation_csr(device_csr(tmp_path, curve).read_text())
    check_requested(csr, "dev-1")
    revoked_cert = issue(signer, ca, csr)
    good_cert = issue(signer, ca, csr)
    revoked = [
        RevokedEntry(revoked_cert.serial_number, now, x509.ReasonFlags.superseded),
        RevokedEntry(0x1234, now - timedelta(hours=1), x509.ReasonFlags.key_compromise),
    ]
    crl = revocation_list(
        signer, ca, revoked, number=7, this_update=now, next_update=now + timedelta(hours=1)
    )

    # Then OpenSSL verifies both certificates against the CA, strictly
    for cert in (revoked_cert, good_cert):
        result = openssl(
            "verify", "-x509_strict", "-CAfile", ca_pem, write_pem(tmp_path / "d.pem", cert)
        )
        assert result.stdout.strip().endswith(": OK")
    # and the CRL: its signature, its number and its serials
    crl_der = tmp_path / "crl.der"
    crl_der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    result = openssl("crl", "-inform", "DER", "-in", crl_der, "-CAfile", ca_pem, "-noout")
    assert "verify OK" in result.stdout + result.stderr
    text = openssl("crl", "-inform", "DER", "-in", crl_der, "-noout", "-text").stdout
    serials = {int(s, 16) for s in re.findall(r"Serial Number: ([0-9A-F]+)", text)}
    assert serials == {revoked_cert.serial_number, 0x1234}
    assert re.search(r"X509v3 CRL Number:\s+7\b", text)
    # and with the CRL, OpenSSL refuses the revoked certificate and accepts the other
    crl_pem = write_pem(tmp_path / "crl.pem", crl)
    refused = openssl(
        "verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", ca_pem,
        write_pem(tmp_path / "revoked.pem", revoked_cert), check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    openssl(
        "verify", "-crl_check", "-CRLfile", crl_pem, "-CAfile", ca_pem,
        write_pem(tmp_path / "good.pem", good_cert),
    )  # fmt: skip
    # and the PKCS#7 certs-only bundle prints the CA
    p7 = tmp_path / "cacerts.p7"
    p7.write_bytes(certs_only([ca]))
    printed = openssl("pkcs7", "-inform", "DER", "-in", p7, "-print_certs", "-noout").stdout
    assert "CN = fleetkey issuing CA" in printed


def test_openssl_refuses_what_another_ca_signed(kms, tmp_path):
    # The OpenSSL checks above can fail: a CRL and a certificate under another KMS CA
    now = datetime.now(UTC)
    signer = KmsDigestSigner(ca_key(kms, "ECC_NIST_P256"), client=kms)
    other = KmsDigestSigner(ca_key(kms, "ECC_NIST_P256"), client=kms)
    ca = issuing_ca_certificate(signer, CA_NAME, now=now, validity_days=1)
    impostor = issuing_ca_certificate(other, CA_NAME, now=now, validity_days=1)
    crl = revocation_list(other, impostor, [], number=1, this_update=now, next_update=now)
    cert = issue(other, impostor, load_rotation_csr(device_csr(tmp_path).read_text()))
    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    crl_der = tmp_path / "crl.der"
    crl_der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    result = openssl(
        "crl", "-inform", "DER", "-in", crl_der, "-CAfile", ca_pem, "-noout", check=False
    )
    assert "verify OK" not in result.stdout + result.stderr
    result = openssl("verify", "-CAfile", ca_pem, write_pem(tmp_path / "d.pem", cert), check=False)
    assert result.returncode != 0


def test_a_kms_key_that_is_not_the_cas_fails_loudly(kms):
    # Given the CA of one KMS key, and a signer configured with another key id
    now = datetime.now(UTC)
    ca = issuing_ca_certificate(
        KmsDigestSigner(ca_key(kms, "ECC_NIST_P256"), client=kms), CA_NAME, now=now, validity_days=1
    )
    wrong = KmsDigestSigner(ca_key(kms, "ECC_NIST_P256"), client=kms)
    # Then nothing is issued with it
    with pytest.raises(IssuingKeyMismatch):
        revocation_list(wrong, ca, [], number=1, this_update=now, next_update=now)
    # nor with a signer that reports the CA's key but whose Sign is done by another key
    lying = KmsDigestSigner(wrong.key_id, client=kms, public_key=ca.public_key())
    with pytest.raises(IssuingKeyMismatch):
        revocation_list(lying, ca, [], number=1, this_update=now, next_update=now)


def test_a_crl_beyond_raws_limit_is_signed_with_a_digest(kms, tmp_path):
    # Given a CA and 300 revocations: the CRL's to-be-signed part is far over 4,096 bytes
    now = datetime.now(UTC)
    key_id = ca_key(kms, "ECC_NIST_P256")
    signer = KmsDigestSigner(key_id, client=kms)
    ca = issuing_ca_certificate(signer, CA_NAME, now=now, validity_days=1)
    revoked = [RevokedEntry(random_serial(), now, x509.ReasonFlags.superseded) for _ in range(300)]

    crl = revocation_list(
        signer, ca, revoked, number=2, this_update=now, next_update=now + timedelta(hours=1)
    )

    # Then RAW could not have signed it (KMS refuses it), and OpenSSL verifies what DIGEST did
    assert len(crl.tbs_certlist_bytes) > 4096
    with pytest.raises(ClientError):
        kms.sign(
            KeyId=key_id,
            Message=crl.tbs_certlist_bytes,
            MessageType="RAW",
            SigningAlgorithm="ECDSA_SHA_256",
        )
    crl_der = tmp_path / "crl.der"
    crl_der.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    result = openssl(
        "crl",
        "-inform",
        "DER",
        "-in",
        crl_der,
        "-CAfile",
        write_pem(tmp_path / "ca.pem", ca),
        "-noout",
    )
    assert "verify OK" in result.stdout + result.stderr
    assert len(crl) == 300


def test_the_verification_certificate_passes_openssl_and_fleetkeys_check(kms, tmp_path):
    now = datetime.now(UTC)
    signer = KmsDigestSigner(ca_key(kms, "ECC_NIST_P256"), client=kms)
    ca = issuing_ca_certificate(signer, CA_NAME, now=now, validity_days=1)
    code = hashlib.sha256(b"registration").hexdigest()
    proof = verification_certificate(signer, ca, code, now=now)
    proof_pem = write_pem(tmp_path / "proof.pem", proof)
    openssl("verify", "-x509_strict", "-CAfile", write_pem(tmp_path / "ca.pem", ca), proof_pem)
    verify_proof_of_possession(ca, proof_pem.read_text(), code, now)


@pytest.mark.parametrize("spec,algorithm,digest,curve", SPECS)
def test_the_subordinate_round_trip_with_an_openssl_root(
    kms, tmp_path, spec, algorithm, digest, curve
):
    # Given a customer root made with OpenSSL
    root_key, root_pem = tmp_path / "root.key", tmp_path / "root.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
        "-subj", "/O=Acme/CN=Acme root", "-days", "30", "-keyout", root_key, "-out", root_pem,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    # and the issuing CA's request for its KMS key, which OpenSSL finds self-signed
    signer = KmsDigestSigner(ca_key(kms, spec), client=kms)
    request = tmp_path / "issuing.csr"
    request.write_bytes(
        issuing_ca_request(signer, CA_NAME).public_bytes(serialization.Encoding.PEM)
    )
    checked = openssl("req", "-in", request, "-verify", "-noout")
    assert "verify OK" in checked.stdout + checked.stderr

    # When the root signs it, copying the requested extensions
    extensions = tmp_path / "ext.cnf"
    extensions.write_text("subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    issuing_pem = tmp_path / "issuing.pem"
    openssl(
        "x509", "-req", "-in", request, "-CA", root_pem, "-CAkey", root_key,
        "-set_serial", f"0x{random_serial():x}", "-days", "20", "-copy_extensions", "copy",
        "-extfile", extensions, "-out", issuing_pem,
    )  # fmt: skip

    # Then `pki install`'s check accepts it with the root as its chain
    now = datetime.now(UTC)
    ca, chain = check_issuing_ca(
        issuing_pem.read_text(), root_pem.read_text(), signer.public_key(), now
    )
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=Acme root,O=Acme"]
    # and a device certificate it issues verifies with the full chain, and partially
    device = issue(signer, ca, load_rotation_csr(device_csr(tmp_path, curve).read_text()))
    device_pem = write_pem(tmp_path / "device.pem", device)
    openssl("verify", "-x509_strict", "-CAfile", root_pem, "-untrusted", issuing_pem, device_pem)
    openssl("verify", "-x509_strict", "-partial_chain", "-CAfile", issuing_pem, device_pem)
    # while the root alone does not make the chain
    alone = openssl("verify", "-CAfile", root_pem, device_pem, check=False)
    assert alone.returncode != 0
    # and the request's certificate is refused for another KMS key
    other = KmsDigestSigner(ca_key(kms, spec), client=kms).public_key()
    with pytest.raises(InvalidCertificate):
        check_issuing_ca(issuing_pem.read_text(), root_pem.read_text(), other, now)


# ---- devices' CSRs from OpenSSL -----------------------------------------------------------------


def test_an_openssl_csr_loads_in_pem_and_der(tmp_path):
    pem_csr = device_csr(tmp_path)
    csr = load_rotation_csr(pem_csr.read_text())
    check_requested(csr, "dev-1")
    der = tmp_path / "dev-1.der"
    openssl("req", "-in", pem_csr, "-outform", "DER", "-out", der)
    assert load_rotation_csr(der.read_bytes()) == csr


@pytest.mark.parametrize(
    "extra,refused",
    [
        (("-addext", "subjectAltName=DNS:dev-1.example"), "SubjectAlternativeName"),
        (("-addext", "basicConstraints=critical,CA:TRUE"), "CA"),
        (("-addext", "keyUsage=critical,digitalSignature,keyCertSign"), "key usages"),
        (("-addext", "extendedKeyUsage=serverAuth"), "clientAuth"),
    ],
    ids=["subject alt name", "ca", "key cert sign", "server auth"],
)
def test_an_openssl_csr_asking_for_more_is_refused(tmp_path, extra, refused):
    csr = load_rotation_csr(device_csr(tmp_path, "P-256", "dev-1", *extra).read_text())
    with pytest.raises(CsrNotIssuable, match=refused):
        check_requested(csr, "dev-1")


def test_an_openssl_csr_for_another_device_or_subject_is_refused(tmp_path):
    with pytest.raises(CsrNotIssuable):
        check_requested(
            load_rotation_csr(device_csr(tmp_path, "P-256", "dev-2").read_text()), "dev-1"
        )
    csr = tmp_path / "o.csr"
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", "/CN=dev-1/O=Acme", "-keyout", tmp_path / "o.key", "-out", csr,
    )  # fmt: skip
    with pytest.raises(CsrNotIssuable):
        check_requested(load_rotation_csr(csr.read_text()), "dev-1")


@pytest.mark.parametrize(
    "key_args",
    [
        ("-newkey", "rsa:1024"),
        ("-newkey", "ed25519"),
        ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"),
    ],
    ids=["rsa-1024", "ed25519", "p-521"],
)
def test_an_openssl_csr_with_a_weak_or_foreign_key_is_refused(tmp_path, key_args):
    csr = tmp_path / "weak.csr"
    openssl(
        "req", "-new", *key_args, "-nodes", "-subj", "/CN=dev-1",
        "-keyout", tmp_path / "weak.key", "-out", csr,
    )  # fmt: skip
    with pytest.raises(InvalidCertificate) as refused:
        load_rotation_csr(csr.read_text())
    assert refused.value.reason == "weak_key"


def test_an_openssl_csr_with_a_flipped_signature_byte_is_refused(tmp_path):
    der = bytearray(
        x509.load_pem_x509_csr(device_csr(tmp_path).read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-5] ^= 0x40
    with pytest.raises(InvalidCertificate) as refused:
        load_rotation_csr(bytes(der))
    assert refused.value.reason == "invalid_chain"
