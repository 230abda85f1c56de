"""The operator CLI's issuing-CA and rotation commands (`fleetkey pki ...`, `fleetkey rotation
status`) against the real functions, each request routed as the API routes it: `/v1/admin/pki*`
to the rotation function, the rest of `/v1/admin/*` to the admin function."""

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleetkey.crypto.certificates import certificate_id
from fleetkey_cli.client import AdminClient, InProcessTransport
from fleetkey_cli.main import main
from fleetkey_local.device import rotation_assertion, rotation_csr, rotation_request
from fleetkey_local.pki import generate_key, pem
from fleetkey_local.provision import create_iot_profiles, create_table
from fleetkey_local.stack import (
    ACCOUNT,
    LOCAL_ISSUING_CA_KEY_SPEC,
    LOCAL_ISSUING_CA_SUBJECT,
    LOCAL_ISSUING_CA_VALIDITY_DAYS,
    REGION,
    TABLE,
    EmbeddedStack,
    client_factory,
)
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

OPERATOR = "arn:aws:iam::123456789012:user/ops"


def _client(stack, monkeypatch) -> AdminClient:
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", "https://data-ats.iot.eu-west-1.amazonaws.com")
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    admin, rotation = load_handler("admin"), load_handler("rotation")
    admin.services.cache_clear()
    rotation.components.cache_clear()
    functions = {"admin": admin.handler, "rotation": rotation.handler}
    return AdminClient(InProcessTransport(None, OPERATOR, LambdaContext(), functions=functions))


@pytest.fixture
def client(stack, monkeypatch):
    """The operator's CLI client on the local stack, whose issuing CA was made at provisioning
    (as `fleetkey pki init` with the local stack's arguments)."""
    return _client(stack, monkeypatch)


@pytest.fixture
def bare_stack(moto):
    """A stack as deployed, before any `pki` command: its table and IoT profiles, no issuing CA."""
    stack = EmbeddedStack(client_factory())
    create_table(stack.make_client("dynamodb"), stack.settings.table_name)
    create_iot_profiles(stack.harness_iot, REGION, ACCOUNT)
    return stack


def cli(capsys, *argv: str, client: AdminClient) -> tuple[int, dict | None, str]:
    """Run the CLI: its exit status, its output read as JSON (None if empty), its stderr."""
    code = main(list(argv), client=client)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def registered(stack, device_id: str):
    """A device of the acme factory registered through JITR: its key and certificate id."""
    authority = cached_ca("acme")
    stack.register_ca(authority)
    key, certificate, event = stack.manufacture(authority, device_id)
    assert stack.register(event).accepted
    return key, certificate_id(certificate)


def rotate(stack, device_id: str, key, current: str):
    """The device's rotation request (through the stack's service): its new key and answer."""
    new_key = generate_key()
    csr = rotation_csr(new_key, device_id)
    assertion = rotation_assertion(key, current, device_id, stack.settings.issuer, csr)
    status, answer = stack.rotation.request(device_id, rotation_request(csr, assertion))
    assert status == 201, answer
    return new_key, answer


# ---- pki ----------------------------------------------------------------------------------------


def test_pki_show_prints_the_issuing_ca(client, capsys):
    # When the operator reads the issuing CA the local stack made at provisioning
    code, ca, _ = cli(capsys, "pki", "show", client=client)
    # Then it is active, with its KMS key, its certificate and its (empty) CRL
    assert code == 0
    assert (ca["status"], ca["key_spec"], ca["subject"]) == (
        "active",
        LOCAL_ISSUING_CA_KEY_SPEC,
        LOCAL_ISSUING_CA_SUBJECT,
    )
    certificate = x509.load_pem_x509_certificate(ca["certificate_pem"].encode())
    assert certificate.subject.rfc4514_string() == LOCAL_ISSUING_CA_SUBJECT
    assert ca["key_id"] and ca["crl"]["revocations"] == 0


def test_pki_init_again_answers_the_same_ca_and_another_one_is_refused(client, capsys):
    # When init runs again with the CA's own parameters
    code, ca, _ = cli(
        capsys,
        "pki",
        "init",
        "--key-spec",
        LOCAL_ISSUING_CA_KEY_SPEC,
        "--subject",
        LOCAL_ISSUING_CA_SUBJECT,
        "--validity-days",
        str(LOCAL_ISSUING_CA_VALIDITY_DAYS),
        client=client,
    )
    # Then it answers the same CA (idempotent)
    assert code == 0 and ca["status"] == "active"
    code, shown, _ = cli(capsys, "pki", "show", client=client)
    assert shown["key_id"] == ca["key_id"]
    # When it asks for another CA
    code, out, err = cli(capsys, "pki", "init", "--key-spec", "ECC_NIST_P384", client=client)
    # Then the API refuses it, and the CA is unchanged
    assert (code, out) == (1, None) and "409 conflict" in err
    assert cli(capsys, "pki", "show", client=client)[1]["key_id"] == ca["key_id"]


def test_pki_init_refused_by_the_api_prints_why(client, capsys):
    code, out, err = cli(capsys, "pki", "init", "--validity-days", "10", client=client)
    assert (code, out) == (1, None)
    assert "400 invalid_request" in err and "validity_days" in err


def test_pki_init_on_a_stack_without_a_ca(bare_stack, monkeypatch, capsys):
    client = _client(bare_stack, monkeypatch)
    # Given a stack without an issuing CA: show says so, with the command to run
    code, _, err = cli(capsys, "pki", "show", client=client)
    assert code == 1 and "503" in err and "pki init" in err
    # When the operator creates one with the defaults
    code, ca, _ = cli(capsys, "pki", "init", client=client)
    # Then it is a self-signed P-256 CA, registered with AWS IoT with auto-registration off
    assert (code, ca["status"], ca["key_spec"], ca["self_signed"]) == (
        0,
        "active",
        "ECC_NIST_P256",
        True,
    )
    iot_ca = bare_stack.harness_iot.describe_ca_certificate(certificateId=ca["iot_ca_id"])
    description = iot_ca["certificateDescription"]
    assert (description["status"], description["autoRegistrationStatus"]) == (
        "ACTIVE",
        "DISABLE",
    )


def _root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The operator's own (offline) root: it may have one CA below it."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Example offline root")])
    start = datetime.now(UTC) - timedelta(days=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=7000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
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


def _sign_ca(csr: x509.CertificateSigningRequest, root_key, root: x509.Certificate):
    """What the operator's root does with fleetkey's CSR: a CA certificate below it."""
    start = datetime.now(UTC) - timedelta(hours=1)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA384())
    )


def test_pki_csr_then_install_makes_a_ca_below_the_operators_root(
    bare_stack, monkeypatch, capsys, tmp_path
):
    client = _client(bare_stack, monkeypatch)
    subject = "CN=fleetkey issuing CA,O=Example Utilities"
    # When the operator asks for a CSR, written to a file
    out = tmp_path / "issuing-ca.csr"
    code, answer, _err = cli(
        capsys,
        "pki",
        "csr",
        "--key-spec",
        "ECC_NIST_P384",
        "--subject",
        subject,
        "--out",
        str(out),
        client=client,
    )
    # Then the file holds a CSR signed by the new KMS key, and the rest of the answer is printed
    assert code == 0, _err
    assert answer["csr_file"] == str(out) and "csr_pem" not in answer
    csr = x509.load_pem_x509_csr(out.read_bytes())
    assert csr.is_signature_valid and csr.subject.rfc4514_string() == subject
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp384r1"
    public = bare_stack.kms.get_public_key(KeyId=answer["key_id"])["PublicKey"]
    assert public == csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # And the CSR comes again without --out (the same key, nothing new in KMS)
    code, again, _ = cli(
        capsys, "pki", "csr", "--key-spec", "ECC_NIST_P384", "--subject", subject, client=client
    )
    assert code == 0 and again["key_id"] == answer["key_id"]
    assert "CERTIFICATE REQUEST" in again["csr_pem"]

    # When the operator's root signs it, and the certificate is installed with a wrong chain
    root_key, root = _root()
    _, stranger = _root()
    certificate = _sign_ca(csr, root_key, root)
    (tmp_path / "ca.pem").write_text(pem(certificate))
    (tmp_path / "root.pem").write_text(pem(root))
    (tmp_path / "stranger.pem").write_text(pem(stranger))
    code, out_, err = cli(
        capsys,
        "pki",
        "install",
        "--certificate",
        str(tmp_path / "ca.pem"),
        "--chain",
        str(tmp_path / "stranger.pem"),
        client=client,
    )
    # Then it is refused
    assert (code, out_) == (1, None) and "400" in err
    # With its root as the chain, it is installed and active
    code, ca, _ = cli(
        capsys,
        "pki",
        "install",
        "--certificate",
        str(tmp_path / "ca.pem"),
        "--chain",
        str(tmp_path / "root.pem"),
        client=client,
    )
    assert (code, ca["status"], ca["self_signed"], ca["subject"]) == (0, "active", False, subject)
    code, shown, _ = cli(capsys, "pki", "show", client=client)
    assert shown["certificate_pem"] == pem(certificate)
    # And a device's rotated certificate chains through it to the operator's root
    key, current = registered(bare_stack, "sensor-cli-sub")
    _, answer = rotate(bare_stack, "sensor-cli-sub", key, current)
    issued = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
    chain = x509.load_pem_x509_certificates(answer["ca_chain_pem"].encode())
    assert chain == [certificate, root]
    issued.verify_directly_issued_by(certificate)
    certificate.verify_directly_issued_by(root)


def test_pki_install_of_an_unreadable_file_is_a_local_problem(client, capsys, tmp_path):
    code = main(
        [
            "pki",
            "install",
            "--certificate",
            str(tmp_path / "missing.pem"),
            "--chain",
            str(tmp_path / "missing.pem"),
        ],
        client=client,
    )
    assert code == 2 and "missing.pem" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["pki", "init", "--key-spec", "RSA_2048"],
        ["pki", "init", "--validity-days", "0"],
        ["pki", "init", "--validity-days", "ten"],
        ["pki", "csr", "--key-spec", "ECC_NIST_P521"],
        ["pki", "install", "--certificate", "ca.pem"],
        ["rotation", "status"],
    ],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


# ---- rotation status ------------------------------------------------------------------------


def test_rotation_status_follows_a_rotation(stack, client, capsys):
    # Given a device registered with its factory certificate
    key, factory = registered(stack, "sensor-cli-rot")
    code, status, _ = cli(capsys, "rotation", "status", "sensor-cli-rot", client=client)
    # Then its factory certificate is current, nothing pending, and its renewal due at once
    # (its profile replaces factory certificates)
    assert code == 0
    assert (status["state"], status["current"]["certificate_id"], status["pending"]) == (
        "ACTIVE",
        factory,
        None,
    )
    assert status["current"]["origin"] == "factory" and status["retired"] == []
    assert datetime.fromisoformat(status["renewal_due_at"]) <= datetime.now(UTC)

    # When the device asks for a new certificate
    _, answer = rotate(stack, "sensor-cli-rot", key, factory)
    code, status, _ = cli(capsys, "rotation", "status", "sensor-cli-rot", client=client)
    # Then it is pending until its commit deadline, and no renewal is due meanwhile
    pending = status["pending"]
    assert (pending["certificate_id"], pending["origin"], pending["commit_deadline"]) == (
        answer["certificate_id"],
        "issued",
        answer["commit_deadline"],
    )
    assert pending["serial"] == answer["serial_number"]
    assert status["current"]["certificate_id"] == factory and status["renewal_due_at"] is None

    # When it connects with the new certificate (AWS IoT's connected event commits it)
    event = {
        "clientId": "sensor-cli-rot",
        "timestamp": int(time.time() * 1000),
        "eventType": "connected",
        "principalIdentifier": answer["certificate_id"],
    }
    assert stack.rotation.on_connected(event) == "committed"
    code, status, _ = cli(capsys, "rotation", "status", "sensor-cli-rot", client=client)
    # Then the new certificate is current, the factory one retired until its deletion, and the
    # next renewal is due within the new certificate's lifetime
    assert status["current"]["certificate_id"] == answer["certificate_id"]
    assert status["pending"] is None
    [retired] = status["retired"]
    assert retired["certificate_id"] == factory and retired["delete_after"]
    renewal = datetime.fromisoformat(status["renewal_due_at"])
    assert datetime.now(UTC) < renewal < datetime.fromisoformat(answer["not_after"])


def test_rotation_status_of_an_unknown_device_is_refused(client, capsys):
    code, out, err = cli(capsys, "rotation", "status", "nope", client=client)
    assert (code, out) == (1, None) and "404 not_found" in err
