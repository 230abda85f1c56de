"""Certificate rotation through the services against moto (AWS IoT, KMS with DIGEST signing,
DynamoDB): request, commit by the connected event and by call, rollback at the deadline,
retirement and deletion, the CRL, renewal by the sweep, and every refusal the issue lists."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.models import CertificateRole
from fleetkey.domain.oauth import InvalidClient, InvalidGrant, OAuthInvalidRequest
from fleetkey.services.rotation import EstRefused, RotationPending
from fleetkey_local.device import (
    client_assertion,
    rotation_assertion,
    rotation_csr,
    rotation_request,
    token_request,
)
from fleetkey_local.pki import generate_key, pem
from tests.support.pki_cache import ca as cached_ca


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


class Device:
    """A registered device that rotates: its current key and certificate, and a new key."""

    def __init__(self, stack, acme, device_id: str, **issue) -> None:
        self.stack = stack
        self.device_id = device_id
        self.key, certificate, event = stack.manufacture(acme, device_id, **issue)
        self.certificate_id = certificate_id(certificate)
        assert stack.register(event).accepted

    def request(self, new_key=None, *, csr=None, **options) -> tuple[int, dict]:
        self.new_key = new_key or ec.generate_private_key(ec.SECP256R1())
        csr = csr or rotation_csr(self.new_key, self.device_id)
        assertion = rotation_assertion(
            self.key,
            self.certificate_id,
            self.device_id,
            self.stack.settings.issuer,
            csr,
            **options,
        )
        return self.stack.components.rotation.request(
            self.device_id, rotation_request(csr, assertion)
        )

    def connected(self, cert_id: str, *, at: datetime | None = None) -> str:
        moment = at or datetime.now(UTC)
        return self.stack.components.rotation.on_connected(
            {
                "clientId": self.device_id,
                "timestamp": int(moment.timestamp() * 1000),
                "eventType": "connected",
                "sessionIdentifier": "00000000-0000-0000-0000-000000000000",
                "principalIdentifier": cert_id,
                "ipAddress": "192.0.2.1",
                "versionNumber": 1,
            }
        )

    def adopt(self, answer: dict) -> None:
        """The device now uses the new key and certificate."""
        self.key, self.certificate_id = self.new_key, answer["certificate_id"]

    def token(self) -> dict:
        return self.stack.tokens.issue(
            token_request(
                client_assertion(
                    self.key, self.certificate_id, self.device_id, self.stack.settings.issuer
                )
            )
        )

    def device(self):
        return self.stack.devices.get(self.device_id)


def iot_status(stack, cert_id: str) -> str | None:
    return stack.registry.certificate_status(cert_id)


def openssl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=False)


def test_a_rotation_issues_a_certificate_that_openssl_verifies(stack, acme, tmp_path):
    device = Device(stack, acme, "rot-0001")
    status, answer = device.request()
    assert status == 201
    issued = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
    assert issued.subject.rfc4514_string() == "CN=rot-0001"
    assert issued.serial_number.bit_length() <= 128
    assert answer["certificate_id"] == certificate_id(issued)
    assert answer["commit_deadline"] > answer["not_before"]
    assert issued.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == (
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH])
    )
    points = issued.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name[0].value == f"{stack.settings.issuer}/v1/pki/crl"
    (tmp_path / "leaf.pem").write_text(answer["certificate_pem"])
    (tmp_path / "chain.pem").write_text(answer["ca_chain_pem"])
    verified = openssl("verify", "-CAfile", str(tmp_path / "chain.pem"), str(tmp_path / "leaf.pem"))
    assert verified.returncode == 0, verified.stderr
    # Pending beside the current one: registered and ACTIVE in AWS IoT, attached to the thing.
    held = device.device().holds(answer["certificate_id"])
    assert held.role is CertificateRole.PENDING
    assert iot_status(stack, answer["certificate_id"]) == "ACTIVE"
    assert iot_status(stack, device.certificate_id) == "ACTIVE"
    things = stack.harness_iot.list_principal_things(
        principal=stack.harness_iot.describe_certificate(certificateId=answer["certificate_id"])[
            "certificateDescription"
        ]["certificateArn"]
    )["things"]
    assert things == ["rot-0001"]


def test_a_csr_made_by_openssl_req_is_accepted(stack, acme, tmp_path):
    device = Device(stack, acme, "rot-openssl")
    made = openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(tmp_path / "new.key"),
        "-subj",
        "/CN=rot-openssl",
        "-out",
        str(tmp_path / "csr.pem"),
    )
    assert made.returncode == 0, made.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "csr.pem").read_bytes())
    new_key = serialization.load_pem_private_key((tmp_path / "new.key").read_bytes(), None)
    status, answer = device.request(new_key, csr=csr)
    assert status == 201
    issued = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
    assert issued.public_key() == new_key.public_key()


def test_commit_by_the_connected_event_retires_and_revokes_the_old(stack, acme):
    device = Device(stack, acme, "rot-0002")
    factory_id = device.certificate_id
    old_token = device.token()["access_token"]
    _, answer = device.request()
    assert device.connected(answer["certificate_id"]) == "committed"
    # Presence events come late and twice: nothing more happens.
    assert device.connected(answer["certificate_id"]) == "current"
    assert device.connected(factory_id) == "retired"  # set INACTIVE (again)
    record = device.device()
    assert record.current_certificate.certificate_id == answer["certificate_id"]
    [retired] = record.retired_certificates
    assert retired.certificate_id == factory_id and retired.delete_after
    assert iot_status(stack, factory_id) == "INACTIVE"
    assert iot_status(stack, answer["certificate_id"]) == "ACTIVE"
    # The token bound to the old certificate is no longer active; the old key is refused.
    assert stack.introspection.introspect(old_token) == {"active": False}
    with pytest.raises(InvalidClient):
        device.token()
    device.adopt(answer)
    token = device.token()
    assert stack.introspection.introspect(token["access_token"])["active"] is True


def test_a_second_rotation_lists_the_first_issued_certificate_in_the_crl(stack, acme, tmp_path):
    device = Device(stack, acme, "rot-0003")
    _, first = device.request()
    device.connected(first["certificate_id"])
    device.adopt(first)
    _, second = device.request()
    assert device.connected(second["certificate_id"]) == "committed"
    # The sweep publishes the CRL the next minute (never signed on a caller's request)
    assert stack.sweep_rotations()["crl_published"] == 1
    der = stack.components.pki.crl_der()
    crl = x509.load_der_x509_crl(der)
    serials = {entry.serial_number for entry in crl}
    assert int(first["serial_number"], 16) in serials
    assert int(second["serial_number"], 16) not in serials
    (tmp_path / "crl.der").write_bytes(der)
    (tmp_path / "chain.pem").write_text(stack.components.pki.chain_pem())
    verified = openssl(
        "crl",
        "-inform",
        "DER",
        "-in",
        str(tmp_path / "crl.der"),
        "-noout",
        "-verify",
        "-CAfile",
        str(tmp_path / "chain.pem"),
    )
    assert verified.returncode == 0 and b"verify OK" in verified.stdout + verified.stderr
    # CRL numbers only grow.
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    stack.components.pki.refresh_crl(force=True)
    again = x509.load_der_x509_crl(stack.components.pki.crl_der())
    assert again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number


def test_commit_by_call_with_the_new_key(stack, acme):
    device = Device(stack, acme, "rot-0004")
    _, answer = device.request()
    new_id = answer["certificate_id"]
    commit = client_assertion(device.new_key, new_id, device.device_id, stack.settings.issuer)
    result = stack.components.rotation.commit(
        device.device_id, new_id, {"client_assertion": commit}
    )
    assert result["committed"] is True
    assert device.device().current_certificate.certificate_id == new_id
    # A repeated commit (with a fresh assertion by the now-current key) answers the same.
    again = client_assertion(device.new_key, new_id, device.device_id, stack.settings.issuer)
    assert stack.components.rotation.commit(device.device_id, new_id, {"client_assertion": again})[
        "committed"
    ]
    # The replayed assertion is refused.
    with pytest.raises(InvalidGrant):
        stack.components.rotation.commit(device.device_id, new_id, {"client_assertion": again})


def test_a_commit_signed_by_the_old_key_is_refused(stack, acme):
    device = Device(stack, acme, "rot-0005")
    _, answer = device.request()
    forged = client_assertion(
        device.key, answer["certificate_id"], device.device_id, stack.settings.issuer
    )
    with pytest.raises(InvalidClient):
        stack.components.rotation.commit(
            device.device_id, answer["certificate_id"], {"client_assertion": forged}
        )
    assert device.device().pending_certificate.certificate_id == answer["certificate_id"]


def test_rollback_at_the_deadline(stack, acme):
    device = Device(stack, acme, "rot-0006")
    _, answer = device.request()
    new_id = answer["certificate_id"]
    before = stack.sweep_rotations()
    assert before["rolled_back"] == 0
    deadline = datetime.fromisoformat(answer["commit_deadline"])
    late = deadline + timedelta(seconds=1)
    assert device.connected(new_id, at=late) == "late"
    counts = stack.sweep_rotations(late)
    assert counts["rolled_back"] == 1 and counts["deleted"] == 1
    record = device.device()
    assert record.current_certificate.certificate_id == device.certificate_id
    assert record.pending_certificate is None and record.retired_certificates == ()
    assert iot_status(stack, new_id) is None  # revoked, detached, deleted
    assert iot_status(stack, device.certificate_id) == "ACTIVE"
    assert device.token()["token_type"] == "Bearer"  # the old one stays current
    crl = x509.load_der_x509_crl(stack.components.pki.crl_der())
    assert int(answer["serial_number"], 16) in {e.serial_number for e in crl}
    # A connection with it after the rollback changes nothing.
    assert device.connected(new_id) == "ignored"
    # The next rotation waits a day (each rollback leaves an entry in the CRL), and the device
    # is not asked to renew before
    held = datetime.fromisoformat(device.device().rotation_held_until)
    assert held >= late + timedelta(days=1)
    with pytest.raises(RotationPending):
        device.request()
    stack.components.channel.send_command = lambda *args: pytest.fail("asked to renew")
    assert stack.sweep_rotations(late + timedelta(hours=1))["renewals_requested"] == 0


def test_the_retired_certificate_is_deleted_after_the_grace(stack, acme):
    device = Device(stack, acme, "rot-0007")
    factory_id = device.certificate_id
    _, answer = device.request()
    device.connected(answer["certificate_id"])
    [retired] = device.device().retired_certificates
    assert stack.sweep_rotations()["deleted"] == 0
    after = datetime.fromisoformat(retired.delete_after) + timedelta(seconds=1)
    assert stack.sweep_rotations(after)["deleted"] == 1
    assert iot_status(stack, factory_id) is None
    assert device.device().retired_certificates == ()


def test_one_pending_rotation_per_device_and_a_repeat_answers_the_same(stack, acme):
    device = Device(stack, acme, "rot-0008")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = rotation_csr(key, device.device_id)
    status, first = device.request(key, csr=csr)
    assert status == 201
    status, again = device.request(key, csr=csr)  # its answer was lost: asks again
    assert status == 200 and again == first
    with pytest.raises(RotationPending):
        device.request()


@pytest.mark.parametrize(
    "problem",
    ["broken_signature", "other_device", "weak_key", "reused_key", "extra_extension"],
)
def test_bad_csrs_are_refused_and_change_nothing(stack, acme, problem):
    device = Device(stack, acme, f"rot-bad-{problem.replace('_', '-')}")
    before = device.device()
    key = ec.generate_private_key(ec.SECP256R1())
    if problem == "broken_signature":
        csr = rotation_csr(key, device.device_id)
        der = bytearray(csr.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0xFF
        csr = x509.load_der_x509_csr(bytes(der))
    elif problem == "other_device":
        csr = rotation_csr(key, "someone-else")
    elif problem == "weak_key":
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
        csr = rotation_csr(key, device.device_id)
    elif problem == "reused_key":
        key = device.key  # the factory key
        csr = rotation_csr(key, device.device_id)
    else:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device.device_id)])
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
    expected = InvalidGrant if problem == "reused_key" else OAuthInvalidRequest
    with pytest.raises(expected):
        device.request(key, csr=csr)
    assert device.device() == before


def test_assertion_refusals(stack, acme):
    device = Device(stack, acme, "rot-0009")
    before = device.device()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = rotation_csr(key, device.device_id)
    other = rotation_csr(ec.generate_private_key(ec.SECP256R1()), device.device_id)
    # csr_sha256 names another CSR
    assertion = rotation_assertion(
        device.key, device.certificate_id, device.device_id, stack.settings.issuer, other
    )
    with pytest.raises(InvalidGrant):
        stack.components.rotation.request(device.device_id, rotation_request(csr, assertion))
    # an assertion by a key that is not the device's current one
    stranger = generate_key()
    assertion = rotation_assertion(
        stranger, device.certificate_id, device.device_id, stack.settings.issuer, csr
    )
    with pytest.raises(InvalidClient):
        stack.components.rotation.request(device.device_id, rotation_request(csr, assertion))
    # another device's path
    assertion = rotation_assertion(
        device.key, device.certificate_id, device.device_id, stack.settings.issuer, csr
    )
    with pytest.raises((InvalidClient, OAuthInvalidRequest)):
        stack.components.rotation.request("rot-other", rotation_request(csr, assertion))
    assert device.device() == before
    # a replayed assertion
    status, _ = stack.components.rotation.request(
        device.device_id, rotation_request(csr, assertion)
    )
    assert status == 201
    with pytest.raises(InvalidGrant):
        stack.components.rotation.request(device.device_id, rotation_request(csr, assertion))


@pytest.mark.parametrize("state", ["suspended", "decommissioned"])
def test_no_rotation_for_a_device_out_of_service(stack, acme, state):
    device = Device(stack, acme, f"rot-{state}")
    if state == "suspended":
        stack.lifecycle.suspend(device.device_id, reason="test", actor="operator")
    else:
        stack.lifecycle.decommission(device.device_id, reason="test", actor="operator")
    before = device.device()
    with pytest.raises(InvalidClient):
        device.request()
    assert device.device() == before


def test_decommission_revokes_the_issued_certificates(stack, acme):
    device = Device(stack, acme, "rot-0010")
    _, answer = device.request()
    device.connected(answer["certificate_id"])
    stack.lifecycle.decommission(device.device_id, reason="end of life", actor="operator")
    stack.sweep_rotations()
    crl = x509.load_der_x509_crl(stack.components.pki.crl_der())
    assert int(answer["serial_number"], 16) in {e.serial_number for e in crl}


def test_est_reenroll_uses_the_same_pending_rotation(stack, acme):
    device = Device(stack, acme, "rot-est")
    factory_pem = stack.harness_iot.describe_certificate(certificateId=device.certificate_id)[
        "certificateDescription"
    ]["certificatePem"]
    key = ec.generate_private_key(ec.SECP256R1())
    csr = rotation_csr(key, device.device_id)
    der = csr.public_bytes(serialization.Encoding.DER)
    p7 = stack.components.rotation.reenroll(factory_pem, der)
    from cryptography.hazmat.primitives.serialization import pkcs7

    [issued] = pkcs7.load_der_pkcs7_certificates(p7)
    assert issued.public_key() == key.public_key()
    assert device.device().pending_certificate.certificate_id == certificate_id(issued)
    # No certificate, or one that is not the device's current: refused.
    with pytest.raises(EstRefused) as refused:
        stack.components.rotation.reenroll(None, der)
    assert refused.value.status == 401
    with pytest.raises(EstRefused) as refused:
        stack.components.rotation.reenroll(pem(issued), der)
    assert refused.value.status == 401


def test_the_sweep_asks_due_devices_to_renew_once_per_retry_period(stack, acme):
    device = Device(stack, acme, "rot-renew")
    published = []
    stack.components.channel.send_command = lambda d, c, p: published.append((d, c, p))
    counts = stack.sweep_rotations()
    assert counts["renewals_requested"] == 1
    assert published == [
        (
            "rot-renew",
            "rotate",
            {
                "reason": "renewal",
                "certificate_id": device.certificate_id,
                "not_after": device.device().current_certificate.not_after,
            },
        )
    ]
    assert stack.sweep_rotations()["renewals_requested"] == 0
    later = datetime.now(UTC) + timedelta(hours=7)
    assert stack.sweep_rotations(later)["renewals_requested"] == 1


def test_crl_and_ca_endpoints_without_revocations(stack):
    der = stack.components.pki.crl_der()
    crl = x509.load_der_x509_crl(der)
    assert len(crl) == 0 and crl.next_update_utc > datetime.now(UTC)
    chain = stack.components.pki.chain_pem()
    assert chain.startswith("-----BEGIN CERTIFICATE-----")
    assert base64.b64encode(stack.components.pki.cacerts_pkcs7())


def test_a_replaced_factory_certificate_presented_again_is_revoked(stack, acme):
    device = Device(stack, acme, "rot-return")
    factory_id = device.certificate_id
    factory_pem = stack.harness_iot.describe_certificate(certificateId=factory_id)[
        "certificateDescription"
    ]["certificatePem"]
    _, answer = device.request()
    device.connected(answer["certificate_id"])
    [retired] = device.device().retired_certificates
    stack.sweep_rotations(datetime.fromisoformat(retired.delete_after) + timedelta(seconds=1))
    assert iot_status(stack, factory_id) is None
    # The old certificate connects again: AWS IoT registers it anew, JITR sees it
    event = stack.first_connect(factory_pem, acme.pem)
    outcome = stack.register(event)
    assert not outcome.accepted and outcome.reason.value == "certificate_retired"
    assert iot_status(stack, factory_id) == "REVOKED"
    assert device.device().current_certificate.certificate_id == answer["certificate_id"]


def test_a_device_on_a_disabled_manufacturers_certificate_does_not_rotate(stack, acme):
    device = Device(stack, acme, "rot-disabled-ca")
    stack.cas.set_enabled(acme.name, False, actor="operator")
    before = device.device()
    with pytest.raises(InvalidClient):
        device.request()
    assert device.device() == before


def test_a_connected_event_racing_a_suspension_is_ignored_not_failed(stack, acme, monkeypatch):
    # Given a pending rotation, and a suspension that lands after the event read the device
    device = Device(stack, acme, "rot-race-suspend")
    _, answer = device.request()
    rotation = stack.components.rotation
    stale = device.device()
    stack.lifecycle.suspend(device.device_id, reason="stolen", actor="operator")
    reads = iter([stale])
    original = rotation._devices.get
    monkeypatch.setattr(rotation._devices, "get", lambda d: next(reads, None) or original(d))
    # When the connected event arrives: Then nothing is committed, and the event is not an error
    # (Lambda would only retry it to the same end)
    assert device.connected(answer["certificate_id"]) == "ignored"
    record = device.device()
    assert record.pending_certificate.certificate_id == answer["certificate_id"]
    assert record.current_certificate.certificate_id == device.certificate_id
