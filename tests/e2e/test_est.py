"""EST (RFC 7030) against `make serve` with stock tools: curl over mutual TLS, base64 and openssl.

One local stack for the module (its own free ports and state directory, stopped by its pid): a
device of the demo factory is allow-listed through the admin API and registers just in time over
MQTT, as a real one would; then it fetches the CA certificates, re-enrolls with a CSR made by
openssl, verifies what it got against `GET /v1/pki/ca`, connects to AWS IoT with it (which commits
it) and re-enrolls again with it. Requests without a client certificate, or with one that is not
the device's current certificate, are refused; the CRL verifies with openssl.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.serve import DEMO_CA
from fleetkey_local.stack import LOCAL_ISSUING_CA_SUBJECT
from tests.support.served import TIMEOUT, Served, send, serve, signed

pytestmark = [
    pytest.mark.skipif(
        not (shutil.which("curl") and shutil.which("openssl") and shutil.which("base64")),
        reason="needs curl, openssl and base64",
    ),
    pytest.mark.xdist_group("est"),
]

ISSUING_CA_CN = dict(part.split("=", 1) for part in LOCAL_ISSUING_CA_SUBJECT.split(","))["CN"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m fleetkey_local.serve` on free ports, until the module's tests are done."""
    with serve(tmp_path_factory.mktemp("est-serve")) as running:
        yield running


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A shell pipeline of stock tools (bash, pipefail), never through a proxy."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "NO_PROXY": "*", "no_proxy": "*"},
    )


def curl(served: Served, *args: str) -> str:
    return "curl --silent --show-error --noproxy '*' --cacert " + " ".join(
        [str(served.endpoint_ca), *args]
    )


@dataclass
class Device:
    device_id: str
    directory: Path

    @property
    def cert(self) -> str:
        return "--cert device.pem --key device.key"


def certificate_id_of(certificate_pem: str) -> str:
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def current_certificate(served: Served, device_id: str) -> str | None:
    status, body = send(signed("GET", f"{served.api}/v1/admin/devices/{device_id}"))
    assert status == 200, body
    return json.loads(body)["certificate_id"]


def onboard(served: Served, device_id: str, tmp: Path) -> Device:
    """A device of the demo factory, allow-listed through the admin API and registered just in
    time by connecting to AWS IoT; its files (device.pem, device.key) in its own directory."""
    directory = tmp / device_id
    directory.mkdir()
    entry = {
        "device_id": device_id,
        "serial_number": f"SN-{device_id}",
        "manufacturer_ca": DEMO_CA,
        "profile": "telemetry-sensor",
    }
    status, body = send(
        signed(
            "POST",
            f"{served.api}/v1/admin/allowlist",
            json.dumps(entry).encode(),
            {"content-type": "application/json"},
        )
    )
    assert status == 201, body
    factory = served.factory()
    key, certificate = factory.issue_device(device_id, serial_number=f"SN-{device_id}")
    (directory / "device.pem").write_text(pem(certificate))
    (directory / "device.key").write_text(key_pem(key))
    # A first connection presents the CA certificate after the device's (JITR).
    (directory / "first-connect.pem").write_text(pem(certificate) + factory.pem)
    mqtt = MqttDevice(
        device_id,
        directory / "first-connect.pem",
        directory / "device.key",
        served.endpoint_ca,
        served.mqtt,
    )
    try:
        assert mqtt.connect().startswith("refused")
    finally:
        mqtt.close()
    expected = certificate_id_of(pem(certificate))
    deadline = time.monotonic() + TIMEOUT
    while current_certificate(served, device_id) != expected:
        assert time.monotonic() < deadline, "".join(served.output)
        time.sleep(0.2)
    return Device(device_id, directory)


def new_csr(device: Device, name: str) -> None:
    """A new key made by openssl and its CSR (CN = the device id), base64 DER in <name>.b64."""
    made = run(
        f"openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {name}.key && "
        f"openssl req -new -key {name}.key -subj /CN={device.device_id} -outform DER "
        f"| base64 -w0 > {name}.b64",
        device.directory,
    )
    assert made.returncode == 0, made.stderr


def reenroll(served: Served, device: Device, csr: str, client: str) -> tuple[str, str]:
    """POST simplereenroll with curl: (HTTP status, body)."""
    done = run(
        curl(
            served,
            client,
            "-H 'Content-Type: application/pkcs10'",
            f"--data-binary @{csr}.b64",
            "--output response.b64",
            "--write-out '%{http_code}'",
            f"{served.est}/.well-known/est/simplereenroll",
        ),
        device.directory,
    )
    body = (device.directory / "response.b64").read_text() if done.returncode == 0 else ""
    return (done.stdout if done.returncode == 0 else f"curl {done.returncode}: {done.stderr}"), body


def fetch_ca_chain(served: Served, directory: Path) -> None:
    done = run(
        curl(served, f"--fail --output ca.pem {served.api}/v1/pki/ca"),
        directory,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def device(served, tmp_path_factory) -> Device:
    """One registered device for the tests that change nothing."""
    return onboard(served, "est-0001", tmp_path_factory.mktemp("devices"))


# ---- cacerts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["with its certificate", "anonymously"])
def test_cacerts_with_curl_is_the_issuing_ca(served, device, client):
    # When the device fetches the CA certificates (RFC 7030 §4.1), with or without its
    # certificate, and decodes them with base64 and openssl
    auth = device.cert if client == "with its certificate" else ""
    done = run(
        curl(served, "--fail", auth, f"{served.est}/.well-known/est/cacerts")
        + " | base64 -d | openssl pkcs7 -inform DER -print_certs",
        device.directory,
    )
    # Then it is the issuing CA's certificate
    assert done.returncode == 0, done.stderr
    assert re.search(rf"subject=.*CN\s*=\s*{ISSUING_CA_CN}", done.stdout), done.stdout


# ---- simplereenroll ------------------------------------------------------------------------------


def test_a_device_reenrolls_with_stock_tools_and_then_with_the_new_certificate(
    served, tmp_path_factory
):
    # Given a device registered through the local stack, with a new key and its CSR
    device = onboard(served, "est-0002", tmp_path_factory.mktemp("devices"))
    new_csr(device, "next")

    # When it re-enrolls over mutual TLS with its current (factory) certificate
    status, _ = reenroll(served, device, "next", device.cert)

    # Then the answer is a PKCS#7 whose certificate openssl verifies against GET /v1/pki/ca
    assert status == "200", status
    decoded = run(
        "base64 -d response.b64 | openssl pkcs7 -inform DER -print_certs -out issued.pem",
        device.directory,
    )
    assert decoded.returncode == 0, decoded.stderr
    fetch_ca_chain(served, device.directory)
    verified = run("openssl verify -CAfile ca.pem issued.pem", device.directory)
    assert verified.returncode == 0 and "issued.pem: OK" in verified.stdout, verified
    # and it certifies the new key, for the device, with the CRL distribution point of this API
    issued = x509.load_pem_x509_certificate((device.directory / "issued.pem").read_bytes())
    new_key = serialization.load_pem_private_key(
        (device.directory / "next.key").read_bytes(), password=None
    )
    assert issued.public_key() == new_key.public_key()
    assert issued.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "est-0002"
    points = issued.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for p in points for n in p.full_name] == [f"{served.api}/v1/pki/crl"]
    # and a second CSR while this one is pending is refused (409)
    new_csr(device, "again")
    assert reenroll(served, device, "again", device.cert)[0] == "409"

    # When the device connects to AWS IoT with the new certificate
    (device.directory / "next.pem").write_text(pem(issued))
    mqtt = MqttDevice(
        "est-0002",
        device.directory / "next.pem",
        device.directory / "next.key",
        served.endpoint_ca,
        served.mqtt,
    )
    try:
        assert mqtt.connect() == "accepted"
    finally:
        mqtt.close()
    # Then the presence rule's rotation_events commits it: it is the device's current certificate
    deadline = time.monotonic() + TIMEOUT
    while current_certificate(served, "est-0002") != certificate_id_of(pem(issued)):
        assert time.monotonic() < deadline, "".join(served.output)
        time.sleep(0.2)
    # and the device re-enrolls with it (the issued certificate passes the EST truststore)
    new_csr(device, "third")
    status, _ = reenroll(served, device, "third", "--cert next.pem --key next.key")
    assert status == "200", status
    # while its factory certificate, no longer current, is refused
    new_csr(device, "stale")
    assert reenroll(served, device, "stale", device.cert)[0] == "401"


def test_reenroll_without_a_client_certificate_is_refused(served, device):
    new_csr(device, "anonymous")
    status, _ = reenroll(served, device, "anonymous", "")
    assert status == "401" or status.startswith("curl "), status


def test_reenroll_with_a_certificate_that_is_not_the_devices_current_one_is_refused(served, device):
    # Given a second factory certificate for the registered device (its CA is trusted), and one
    # of a CA nobody registered
    factory = served.factory()
    key, certificate = factory.issue_device(device.device_id, serial_number="SN-other")
    (device.directory / "other.pem").write_text(pem(certificate))
    (device.directory / "other.key").write_text(key_pem(key))
    rogue = CertificateAuthority.create("rogue-factory")
    key, certificate = rogue.issue_device(device.device_id)
    (device.directory / "rogue.pem").write_text(pem(certificate))
    (device.directory / "rogue.key").write_text(key_pem(key))
    new_csr(device, "intruder")
    # When each re-enrolls for the device
    other, _ = reenroll(served, device, "intruder", "--cert other.pem --key other.key")
    rogue_status, _ = reenroll(served, device, "intruder", "--cert rogue.pem --key rogue.key")
    # Then the first is refused by the function, the second in the TLS handshake
    assert other == "401", other
    assert rogue_status.startswith("curl "), rogue_status


# ---- the CRL -------------------------------------------------------------------------------------


def test_the_crl_verifies_with_openssl_against_the_ca_chain(served, device):
    # When a relying party fetches the CRL as DER and the CA chain
    fetch_ca_chain(served, device.directory)
    fetched = run(
        curl(
            served,
            "--fail -H 'Accept: application/pkix-crl' --output crl.der",
            f"{served.api}/v1/pki/crl",
        ),
        device.directory,
    )
    assert fetched.returncode == 0, fetched.stderr
    # Then openssl verifies its signature with the issuing CA
    verified = run(
        "openssl crl -inform DER -in crl.der -noout -verify -CAfile ca.pem", device.directory
    )
    assert verified.returncode == 0, verified.stderr
    assert "verify OK" in verified.stdout + verified.stderr
