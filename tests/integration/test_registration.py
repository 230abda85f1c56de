"""Just-in-time registration against moto: accepted and refused certificates, end to end."""

from datetime import datetime, timedelta, timezone

import pytest

from fleetkey.crypto.certificates import public_key_fingerprint
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.rejection import RejectionReason
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.pki import CertificateAuthority, pem
from tests.support.pki_cache import ca as cached_ca


def entry(device_id, ca_name="acme", profile="telemetry-sensor", **kw):
    return AllowlistEntry(
        device_id=device_id,
        serial_number=kw.pop("serial_number", f"SN-{device_id}"),
        manufacturer_ca=ca_name,
        profile=profile,
        **kw,
    )


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    registered = stack.register_ca(authority)
    stack.anchors.get(registered.iot_ca_id)  # a running function has its trust anchors cached
    return authority


def connect(stack, authority, device_id, **kw):
    key, cert = authority.issue_device(device_id, serial_number=kw.pop("serial_number", f"SN-{device_id}"), **kw)
    event = stack.first_connect(pem(cert), authority.pem)
    assert event is not None
    return cert, event


def test_allowlisted_device_is_registered_and_provisioned(stack, acme):
    # Given an allow-listed device with a factory certificate from a registered CA
    stack.allowlist.add(entry("pump-1", attributes={"site": "ward-7"}), actor="op")
    cert, event = connect(stack, acme, "pump-1")
    counter = AwsCallCounter().watch(*stack.service_clients())
    stack.register(event)  # warm the trust-anchor cache, as a running function has it
    stack.devices.get("pump-1")

    # When AWS IoT delivers the certificate-registered event
    counter.reset()
    # (a fresh device for the measured run)
    stack.allowlist.add(entry("pump-2"), actor="op")
    _, event2 = connect(stack, acme, "pump-2")
    counter.reset()
    outcome = stack.register(event2)

    # Then the device is ACTIVE, provisioned in AWS IoT, within the call budget
    assert outcome.accepted and outcome.device_id == "pump-2"
    assert counter.count() <= 7, counter.calls
    device = stack.devices.get("pump-2")
    assert device.state is DeviceState.ACTIVE
    assert device.certificate_id == event2["certificateId"]
    iot = stack.harness_iot
    assert stack.certificate_status(event2["certificateId"]) == "ACTIVE"
    thing = iot.describe_thing(thingName="pump-2")
    assert thing["thingTypeName"] == "fleetkey-telemetry-sensor"
    assert thing["attributes"]["serial_number"] == "SN-pump-2"
    arn = iot.describe_certificate(certificateId=event2["certificateId"])["certificateDescription"]["certificateArn"]
    assert iot.list_thing_principals(thingName="pump-2")["principals"] == [arn]
    assert [p["policyName"] for p in iot.list_attached_policies(target=arn)["policies"]] == [
        "fleetkey-telemetry-sensor"
    ]
    records, verification = stack.devices.audit("device:pump-2")
    assert [r.action for r in records] == ["allowlisted", "registered"]
    assert verification.records == 2


REFUSALS = [
    # (name, allow-list entry factory or None, certificate options, expected reason)
    ("not allow-listed", None, {}, RejectionReason.NOT_ALLOWLISTED),
    ("expired", "plain", {"not_before": datetime.now(timezone.utc) - timedelta(days=20),
                          "not_after": datetime.now(timezone.utc) - timedelta(days=1)}, RejectionReason.EXPIRED),
    ("not yet valid", "plain", {"not_before": datetime.now(timezone.utc) + timedelta(days=2)},
     RejectionReason.NOT_YET_VALID),
    ("weak key", "plain", {"key_kind": "rsa:1024"}, RejectionReason.WEAK_KEY),
    ("secp256k1", "plain", {"key_kind": "ec:secp256k1"}, RejectionReason.WEAK_KEY),
    ("rsa for an EC-only profile", "pump", {"key_kind": "rsa:2048"}, RejectionReason.WEAK_KEY),
    ("no client auth", "plain", {"client_auth": False}, RejectionReason.INVALID_CHAIN),
    ("no digital signature", "plain", {"digital_signature": False}, RejectionReason.INVALID_CHAIN),
    ("serial mismatch", "plain", {"serial_number": "SN-OTHER"}, RejectionReason.SERIAL_MISMATCH),
    ("unexpected key", "pinned", {}, RejectionReason.UNEXPECTED_PUBLIC_KEY),
]


@pytest.mark.parametrize("name,kind,options,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_certificates_are_revoked_and_audited(stack, acme, name, kind, options, reason):
    # Given a device (allow-listed or not) and a certificate with one defect
    device_id = "dev-" + name.replace(" ", "-").replace("/", "-")
    if kind == "plain":
        stack.allowlist.add(entry(device_id), actor="op")
    elif kind == "pump":
        stack.allowlist.add(entry(device_id, profile="infusion-pump"), actor="op")
    elif kind == "pinned":
        stack.allowlist.add(entry(device_id, public_key_fingerprint="ab" * 32), actor="op")
    options = dict(options)
    options.setdefault("serial_number", f"SN-{device_id}")
    cert, event = connect(stack, acme, device_id, **options)
    counter = AwsCallCounter().watch(*stack.service_clients())

    # When the registration runs
    outcome = stack.register(event)

    # Then it is refused for that reason, the certificate revoked, nothing provisioned
    assert not outcome.accepted
    assert outcome.reason is reason
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"
    assert stack.harness_iot.list_things()["things"] == []
    assert counter.count() <= 4, counter.calls
    decision = stack.store.get_certificate(event["certificateId"])
    assert decision.outcome.value == "refused" and decision.reason == reason.value
    device = stack.devices.get(device_id) if kind else None
    if device:
        assert device.state is DeviceState.ALLOWLISTED
        records, _ = stack.devices.audit(f"device:{device_id}")
        if records[-1].action == "registration_refused":
            assert records[-1].details["reason"] == reason.value
        else:
            records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
            assert records[-1].details["reason"] == reason.value
    else:
        records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
        assert records[0].details["reason"] == reason.value


def test_refusals_that_need_no_device_cost_three_calls(stack, acme):
    # Given the trust-anchor cache is warm
    stack.allowlist.add(entry("warm"), actor="op")
    _, warm = connect(stack, acme, "warm")
    stack.register(warm)
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When an unknown device and an expired certificate arrive
    _, unknown = connect(stack, acme, "rogue-1")
    _, expired = connect(stack, acme, "rogue-2", not_after=datetime.now(timezone.utc) - timedelta(minutes=1),
                         not_before=datetime.now(timezone.utc) - timedelta(days=1))
    counter.reset()
    stack.register(unknown)
    unknown_calls = counter.reset()
    stack.register(expired)
    expired_calls = counter.reset()
    # Then each costs at most three AWS calls
    assert len(unknown_calls) <= 3, unknown_calls
    assert len(expired_calls) <= 3, expired_calls


def test_wrong_ca_and_pinned_key(stack, acme):
    # Given a device allow-listed for acme, and another registered CA
    other = cached_ca("globex")
    stack.register_ca(other)
    stack.allowlist.add(entry("well-9"), actor="op")
    key, cert = other.issue_device("well-9", serial_number="SN-well-9")
    event = stack.first_connect(pem(cert), other.pem)
    # When its certificate comes from the other CA
    outcome = stack.register(event)
    # Then it is refused as the wrong issuer
    assert outcome.reason is RejectionReason.WRONG_ISSUER


def test_pinned_public_key_is_accepted(stack, acme):
    # Given an entry pinning the device's public key
    key, cert = acme.issue_device("pinned-1", serial_number="SN-pinned-1")
    stack.allowlist.add(entry("pinned-1", public_key_fingerprint=public_key_fingerprint(cert)), actor="op")
    # When it registers
    outcome = stack.register(stack.first_connect(pem(cert), acme.pem))
    # Then it is accepted
    assert outcome.accepted


def test_clone_and_decommissioned(stack, acme):
    # Given an ACTIVE device
    stack.allowlist.add(entry("pump-c"), actor="op")
    _, first = connect(stack, acme, "pump-c")
    assert stack.register(first).accepted
    # When a second certificate with the same identity registers
    _, second = connect(stack, acme, "pump-c")
    outcome = stack.register(second)
    # Then it is refused as a suspected clone and the first stays active
    assert outcome.reason is RejectionReason.CLONE_SUSPECTED
    assert stack.certificate_status(second["certificateId"]) == "REVOKED"
    assert stack.certificate_status(first["certificateId"]) == "ACTIVE"
    records, _ = stack.devices.audit("device:pump-c")
    assert [r.action for r in records] == ["allowlisted", "registered", "registration_refused"]


def test_disabled_ca_refuses_its_devices(stack, acme):
    # Given a disabled CA
    stack.allowlist.add(entry("pump-d"), actor="op")
    _, event = connect(stack, acme, "pump-d")
    stack.cas.set_enabled("acme", False, actor="op")
    # When a device of it registers (the event was already in flight)
    outcome = stack.register(event)
    # Then it is refused
    assert outcome.reason is RejectionReason.CA_DISABLED
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"


def test_unknown_certificate_is_audited_not_retried(stack, acme):
    # Given an event for a certificate AWS IoT does not have
    event = {
        "certificateId": "f" * 64, "caCertificateId": "e" * 64, "timestamp": 1,
        "certificateStatus": "PENDING_ACTIVATION", "awsAccountId": "123456789012",
    }
    # When it is processed
    outcome = stack.register(event)
    # Then it is refused and recorded against the certificate
    assert outcome.reason is RejectionReason.UNKNOWN_CERTIFICATE
    records, _ = stack.devices.audit("certificate:" + "f" * 64)
    assert records[0].details["reason"] == "unknown_certificate"


def test_two_serial_numbers_are_malformed(stack, acme):
    # Given a certificate whose subject carries two serial numbers, neither the entry's
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from fleetkey_local.pki import generate_key

    stack.allowlist.add(entry("dev-s"), actor="op")
    key = generate_key()
    template = acme.issue_device("dev-s", serial_number="SN-dev-s")[1]
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "dev-s"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "WRONG-1"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "WRONG-2"),
    ])
    builder = x509.CertificateBuilder().subject_name(subject).issuer_name(template.issuer) \
        .public_key(key.public_key()).serial_number(x509.random_serial_number()) \
        .not_valid_before(template.not_valid_before_utc).not_valid_after(template.not_valid_after_utc)
    for extension in template.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(acme.key, hashes.SHA384())
    # When it registers
    outcome = stack.register(stack.first_connect(pem(cert), acme.pem))
    # Then it is refused, not let through the serial check
    assert outcome.reason is RejectionReason.MALFORMED_CERTIFICATE


def test_certificates_of_a_ca_fleetkey_does_not_manage_are_left_alone(stack, acme):
    # Given a CA registered with AWS IoT outside fleetkey (another JITR user in the account)
    other = CertificateAuthority.create("elsewhere")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    stack.harness_iot.register_ca_certificate(
        caCertificate=other.pem, verificationCertificate=pem(other.verification_certificate(code)),
        setAsActive=True, allowAutoRegistration=True)
    _, cert = other.issue_device("theirs-1")
    event = stack.first_connect(pem(cert), other.pem)
    # When its certificate-registered event reaches fleetkey
    outcome = stack.register(event)
    # Then fleetkey records that it is not its CA, and does not revoke someone else's certificate
    assert outcome.reason is RejectionReason.UNKNOWN_CA
    assert stack.certificate_status(event["certificateId"]) == "PENDING_ACTIVATION"
    records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
    assert records[0].details["reason"] == "unknown_ca"


def test_ca_re_enabled_since_the_snapshot_admits_its_devices(stack, acme):
    # Given the function's snapshot says the CA is disabled, but an operator re-enabled it
    stack.cas.set_enabled("acme", False, actor="op")
    stack.anchors.refresh()
    stack.anchors.get(stack.cas.get("acme").iot_ca_id)
    stack.cas.set_enabled("acme", True, actor="op")
    stack.allowlist.add(entry("pump-r"), actor="op")
    _, event = connect(stack, acme, "pump-r")
    # When a device of it registers
    outcome = stack.register(event)
    # Then it is accepted: a refusal would have revoked it for good
    assert outcome.accepted


def test_late_duplicate_after_the_certificate_was_deleted(stack, acme):
    # Given an accepted registration whose certificate was later deleted from AWS IoT
    stack.allowlist.add(entry("pump-x"), actor="op")
    _, event = connect(stack, acme, "pump-x")
    assert stack.register(event).accepted
    iot = stack.harness_iot
    arn = iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]["certificateArn"]
    iot.detach_thing_principal(thingName="pump-x", principal=arn)
    iot.detach_policy(policyName="fleetkey-telemetry-sensor", target=arn)
    iot.update_certificate(certificateId=event["certificateId"], newStatus="INACTIVE")
    iot.delete_certificate(certificateId=event["certificateId"])
    # When the event is delivered once more
    outcome = stack.register(event)
    # Then the earlier decision stands and nothing fails
    assert outcome.accepted and outcome.device_id == "pump-x"


def test_an_existing_thing_is_taken_over_without_its_other_certificates(stack, acme):
    # Given a thing named like the device already exists, with a stale active certificate on it
    iot = stack.harness_iot
    iot.create_thing(thingName="pump-h", attributePayload={"attributes": {"owner": "legacy"}})
    stale = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(thingName="pump-h", principal=stale["certificateArn"])
    stack.allowlist.add(entry("pump-h"), actor="op")
    _, event = connect(stack, acme, "pump-h")
    # When the device registers
    assert stack.register(event).accepted
    # Then only its own certificate is attached to its thing, and the thing is fleetkey's
    arn = iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"]["certificateArn"]
    assert iot.list_thing_principals(thingName="pump-h")["principals"] == [arn]
    thing = iot.describe_thing(thingName="pump-h")
    assert thing["attributes"]["certificate_id"] == event["certificateId"]
    assert "owner" not in thing["attributes"]
    # And a duplicate delivery changes nothing
    assert stack.register(event).accepted
    assert iot.list_thing_principals(thingName="pump-h")["principals"] == [arn]
