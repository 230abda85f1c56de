"""Just-in-time registration against moto: accepted and refused certificates, end to end."""

from datetime import UTC, datetime, timedelta

import pytest

from fleetkey.adapters.iot import ThingConflict
from fleetkey.crypto.certificates import public_key_fingerprint
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import NotFound
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.iot import certificate_registered_event
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
    _key, cert = authority.issue_device(
        device_id, serial_number=kw.pop("serial_number", f"SN-{device_id}"), **kw
    )
    event = stack.first_connect(pem(cert), authority.pem)
    assert event is not None
    return cert, event


def test_allowlisted_device_is_registered_and_provisioned(stack, acme):
    # Given an allow-listed device with a factory certificate from a registered CA
    stack.allowlist.add(entry("pump-1", attributes={"site": "ward-7"}), actor="op")
    _cert, event = connect(stack, acme, "pump-1")
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
    assert counter.count() <= 8, counter.calls  # incl. the read that follows the device
    device = stack.devices.get("pump-2")
    assert device.state is DeviceState.ACTIVE
    assert device.certificate_id == event2["certificateId"]
    iot = stack.harness_iot
    assert stack.certificate_status(event2["certificateId"]) == "ACTIVE"
    thing = iot.describe_thing(thingName="pump-2")
    assert thing["thingTypeName"] == "fleetkey-telemetry-sensor"
    assert thing["attributes"]["serial_number"] == "SN-pump-2"
    arn = iot.describe_certificate(certificateId=event2["certificateId"])["certificateDescription"][
        "certificateArn"
    ]
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
    (
        "expired",
        "plain",
        {
            "not_before": datetime.now(UTC) - timedelta(days=20),
            "not_after": datetime.now(UTC) - timedelta(days=1),
        },
        RejectionReason.EXPIRED,
    ),
    (
        "not yet valid",
        "plain",
        {"not_before": datetime.now(UTC) + timedelta(days=2)},
        RejectionReason.NOT_YET_VALID,
    ),
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
    _cert, event = connect(stack, acme, device_id, **options)
    counter = AwsCallCounter().watch(*stack.service_clients())

    # When the registration runs
    outcome = stack.register(event)

    # Then it is refused for that reason, the certificate revoked, nothing provisioned
    assert not outcome.accepted
    assert outcome.reason is reason
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"
    assert stack.harness_iot.list_things()["things"] == []
    assert counter.count() <= 4, counter.calls
    decision = stack.store.certificates.get(event["certificateId"])
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
    _, expired = connect(
        stack,
        acme,
        "rogue-2",
        not_after=datetime.now(UTC) - timedelta(minutes=1),
        not_before=datetime.now(UTC) - timedelta(days=1),
    )
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
    _key, cert = other.issue_device("well-9", serial_number="SN-well-9")
    event = stack.first_connect(pem(cert), other.pem)
    # When its certificate comes from the other CA
    outcome = stack.register(event)
    # Then it is refused as the wrong issuer
    assert outcome.reason is RejectionReason.WRONG_ISSUER


def test_pinned_public_key_is_accepted(stack, acme):
    # Given an entry pinning the device's public key
    _key, cert = acme.issue_device("pinned-1", serial_number="SN-pinned-1")
    stack.allowlist.add(
        entry("pinned-1", public_key_fingerprint=public_key_fingerprint(cert)), actor="op"
    )
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


def test_unknown_certificate_is_a_mismatched_event_that_decides_nothing(stack, acme):
    # Given an event for a certificate AWS IoT does not have
    event = certificate_registered_event("f" * 64, "e" * 64, stack.account)
    # When it is processed
    outcome = stack.register(event)
    # Then it is audited as a mismatched event, and no decision pre-empts a later certificate
    assert outcome.reason is RejectionReason.MISMATCHED_EVENT and not outcome.decided
    assert stack.store.certificates.get("f" * 64) is None
    records, _ = stack.devices.audit("stream:registration-events")
    assert [(r.action, r.details["problem"]) for r in records] == [
        ("mismatched_event", "unknown_certificate")
    ]


def test_two_serial_numbers_are_malformed(stack, acme):
    # Given a certificate whose subject carries two serial numbers, neither the entry's
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from fleetkey_local.pki import generate_key

    stack.allowlist.add(entry("dev-s"), actor="op")
    key = generate_key()
    template = acme.issue_device("dev-s", serial_number="SN-dev-s")[1]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-s"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "WRONG-1"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "WRONG-2"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(template.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
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
        caCertificate=other.pem,
        verificationCertificate=pem(other.verification_certificate(code)),
        setAsActive=True,
        allowAutoRegistration=True,
    )
    _, cert = other.issue_device("theirs-1")
    event = stack.first_connect(pem(cert), other.pem)
    # When its certificate-registered event reaches fleetkey
    outcome = stack.register(event)
    # Then fleetkey records that it is not its CA, and does not revoke someone else's certificate
    assert outcome.reason is RejectionReason.UNKNOWN_CA
    assert stack.certificate_status(event["certificateId"]) == "PENDING_ACTIVATION"
    records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
    assert records[0].details["reason"] == "unknown_ca"


def test_events_of_a_ca_fleetkey_does_not_manage_never_query_every_ca(stack, acme):
    # Given a warm trust-anchor snapshot and another team's CA, auto-registering in the account
    other = CertificateAuthority.create("elsewhere-2")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    stack.harness_iot.register_ca_certificate(
        caCertificate=other.pem,
        verificationCertificate=pem(other.verification_certificate(code)),
        setAsActive=True,
        allowAutoRegistration=True,
    )
    events = [
        stack.first_connect(pem(other.issue_device(f"theirs-q{i}")[1]), other.pem) for i in range(3)
    ]
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When its devices' events arrive, one after the other
    outcomes = [stack.register(event) for event in events]
    # Then each is refused unknown_ca after one point read of the CA id, never a Query of every
    # CA (that Query ran once per such event before)
    assert [o.reason for o in outcomes] == [RejectionReason.UNKNOWN_CA] * 3
    assert "dynamodb.Query" not in counter.calls, counter.calls
    assert counter.calls.count("dynamodb.GetItem") == 3, counter.calls


def test_a_ca_registered_after_the_snapshot_admits_its_devices_at_once(stack, acme):
    # Given a function whose warm snapshot predates a CA registered a moment ago
    globex = CertificateAuthority.create("globex-new")
    stack.register_ca(globex, name="globex-new")
    stack.allowlist.add(entry("pump-g", ca_name="globex-new"), actor="op")
    _, event = connect(stack, globex, "pump-g")
    # When its first device's event arrives
    outcome = stack.register(event)
    # Then the CA is found (no stale "unknown CA", which would be a final refusal)
    assert outcome.accepted, outcome


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
    arn = iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"][
        "certificateArn"
    ]
    iot.detach_thing_principal(thingName="pump-x", principal=arn)
    iot.detach_policy(policyName="fleetkey-telemetry-sensor", target=arn)
    iot.update_certificate(certificateId=event["certificateId"], newStatus="INACTIVE")
    iot.delete_certificate(certificateId=event["certificateId"])
    # When the event is delivered once more
    outcome = stack.register(event)
    # Then the earlier decision stands and nothing fails
    assert outcome.accepted and outcome.device_id == "pump-x"


def test_an_existing_thing_is_taken_over_without_its_other_certificates(stack, acme):
    # Given a thing of fleetkey's named like the device already exists (one of its profiles'
    # thing types, e.g. left by an earlier life of the device), with a stale active certificate
    iot = stack.harness_iot
    iot.create_thing(
        thingName="pump-h",
        thingTypeName="fleetkey-infusion-pump",
        attributePayload={"attributes": {"owner": "legacy"}},
    )
    stale = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(thingName="pump-h", principal=stale["certificateArn"])
    stack.allowlist.add(entry("pump-h"), actor="op")
    _, event = connect(stack, acme, "pump-h")
    # When the device registers
    assert stack.register(event).accepted
    # Then only its own certificate is attached to its thing, and the thing is fleetkey's
    arn = iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"][
        "certificateArn"
    ]
    assert iot.list_thing_principals(thingName="pump-h")["principals"] == [arn]
    thing = iot.describe_thing(thingName="pump-h")
    assert thing["attributes"]["certificate_id"] == event["certificateId"]
    assert "owner" not in thing["attributes"]
    assert thing["thingTypeName"] == "fleetkey-telemetry-sensor"
    # And a duplicate delivery changes nothing
    assert stack.register(event).accepted
    assert iot.list_thing_principals(thingName="pump-h")["principals"] == [arn]


@pytest.mark.parametrize("thing_type", [None, "other-team-sensor"], ids=["untyped", "other-type"])
def test_a_thing_that_is_not_fleetkeys_is_never_taken_over(stack, acme, thing_type):
    # Given another team's thing named like the device (no thing type, or one that is not a
    # fleetkey profile's), with their active certificate attached
    iot = stack.harness_iot
    typed = {}
    if thing_type:
        iot.create_thing_type(thingTypeName=thing_type)
        typed = {"thingTypeName": thing_type}
    iot.create_thing(
        thingName="pump-o", attributePayload={"attributes": {"owner": "other-team"}}, **typed
    )
    theirs = iot.create_keys_and_certificate(setAsActive=True)["certificateArn"]
    iot.attach_thing_principal(thingName="pump-o", principal=theirs)
    before = iot.describe_thing(thingName="pump-o")
    stack.allowlist.add(entry("pump-o"), actor="op")
    _, event = connect(stack, acme, "pump-o")
    # When the device registers / Then the registration fails with a typed, permanent conflict
    # (the function lets it propagate: Lambda retries, then the failure queue keeps the event)
    with pytest.raises(ThingConflict):
        stack.register(event)
    # And AWS IoT is untouched: their thing, its certificate; ours still pending, no policy
    after = iot.describe_thing(thingName="pump-o")
    assert (after.get("thingTypeName"), after["attributes"], after["version"]) == (
        before.get("thingTypeName"),
        {"owner": "other-team"},
        before["version"],
    )
    assert iot.list_thing_principals(thingName="pump-o")["principals"] == [theirs]
    assert stack.certificate_status(event["certificateId"]) == "PENDING_ACTIVATION"
    ours = iot.describe_certificate(certificateId=event["certificateId"])
    arn = ours["certificateDescription"]["certificateArn"]
    assert iot.list_attached_policies(target=arn)["policies"] == []
    # And the clash is audited, naming the device and the foreign thing type
    records, _ = stack.devices.audit("stream:registration-events")
    assert [(r.action, r.details["device_id"], r.details["thing_type"]) for r in records] == [
        ("thing_conflict", "pump-o", thing_type)
    ]
    # When the operator resolves the clash (their thing renamed away) and redrives the event
    iot.detach_thing_principal(thingName="pump-o", principal=theirs)
    iot.delete_thing(thingName="pump-o")
    outcome = stack.register(event)
    # Then the registration is finished
    assert outcome.accepted
    assert stack.certificate_status(event["certificateId"]) == "ACTIVE"
    assert iot.list_thing_principals(thingName="pump-o")["principals"] == [arn]


# ---- JITR acts only on what AWS IoT says (DescribeCertificate's CA and status) ---------------


def _mismatches(stack):
    try:
        records, _ = stack.devices.audit("stream:registration-events")
    except NotFound:  # no stream yet
        return []
    return [r.details["problem"] for r in records if r.action == "mismatched_event"]


def test_an_event_naming_another_teams_active_certificate_changes_nothing(stack, acme):
    # Given another team's ACTIVE certificate in the account (registered without a CA), whose
    # subject names an allow-listed device
    stack.allowlist.add(entry("pump-t"), actor="op")
    _, theirs = acme.issue_device("pump-t", serial_number="SN-pump-t")
    iot = stack.harness_iot
    registered = iot.register_certificate_without_ca(certificatePem=pem(theirs), status="ACTIVE")
    acme_id = stack.cas.get("acme").iot_ca_id
    event = certificate_registered_event(registered["certificateId"], acme_id, stack.account)
    # When an event naming it (and fleetkey's CA) reaches the registration function
    outcome = stack.register(event)
    # Then nothing changes anywhere: still ACTIVE, no thing, no decision, the device untouched
    assert outcome.reason is RejectionReason.MISMATCHED_EVENT and not outcome.accepted
    assert stack.certificate_status(registered["certificateId"]) == "ACTIVE"
    assert iot.list_things()["things"] == []
    assert stack.store.certificates.get(registered["certificateId"]) is None
    assert stack.devices.get("pump-t").state is DeviceState.ALLOWLISTED
    # And it is audited as a mismatched event
    assert _mismatches(stack) == ["no_ca"]


def test_an_event_naming_a_ca_that_did_not_issue_the_certificate_does_not_block_the_real_one(
    stack, acme
):
    # Given a pending certificate of acme, and another registered CA
    globex = cached_ca("globex")
    globex_id = stack.register_ca(globex).iot_ca_id
    stack.allowlist.add(entry("pump-m"), actor="op")
    _, genuine = connect(stack, acme, "pump-m")
    forged = {**genuine, "caCertificateId": globex_id}
    # When an event names the certificate with the other CA
    outcome = stack.register(forged)
    # Then nothing is decided or changed, and it is audited as a mismatch
    assert outcome.reason is RejectionReason.MISMATCHED_EVENT
    assert stack.certificate_status(genuine["certificateId"]) == "PENDING_ACTIVATION"
    assert stack.store.certificates.get(genuine["certificateId"]) is None
    assert _mismatches(stack) == ["ca_mismatch"]
    # And the genuine event, arriving later, registers the device
    outcome = stack.register(genuine)
    assert outcome.accepted and outcome.decided
    assert stack.certificate_status(genuine["certificateId"]) == "ACTIVE"


def test_the_ca_is_the_one_aws_iot_reports_not_the_one_the_event_names(stack, acme):
    # Given an ACTIVE certificate of a CA fleetkey does not manage, named by an event as acme's
    other = CertificateAuthority.create("elsewhere-2")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    stack.harness_iot.register_ca_certificate(
        caCertificate=other.pem,
        verificationCertificate=pem(other.verification_certificate(code)),
        setAsActive=True,
        allowAutoRegistration=True,
    )
    _, cert = other.issue_device("theirs-2")
    registered = stack.harness_iot.register_certificate(
        certificatePem=pem(cert), caCertificatePem=other.pem, setAsActive=True
    )
    event = certificate_registered_event(
        registered["certificateId"], stack.cas.get("acme").iot_ca_id, stack.account
    )
    # When it is processed
    outcome = stack.register(event)
    # Then it is left alone: not revoked (as an acme chain check would have it)
    assert outcome.reason is RejectionReason.MISMATCHED_EVENT
    assert stack.certificate_status(registered["certificateId"]) == "ACTIVE"
    assert stack.store.certificates.get(registered["certificateId"]) is None


def test_a_pending_certificate_without_a_ca_is_left_alone(stack, acme):
    # Given a PENDING_ACTIVATION certificate registered without a CA
    _, cert = acme.issue_device("loose-1", serial_number="SN-loose-1")
    registered = stack.harness_iot.register_certificate_without_ca(
        certificatePem=pem(cert), status="PENDING_ACTIVATION"
    )
    event = certificate_registered_event(
        registered["certificateId"], stack.cas.get("acme").iot_ca_id, stack.account
    )
    # When an event names it
    outcome = stack.register(event)
    # Then nothing happens to it
    assert outcome.reason is RejectionReason.MISMATCHED_EVENT
    assert stack.certificate_status(registered["certificateId"]) == "PENDING_ACTIVATION"


def test_a_late_duplicate_of_a_decided_event_reports_the_decision_quietly(stack, acme):
    # Given an accepted registration (its certificate now ACTIVE)
    stack.allowlist.add(entry("pump-q"), actor="op")
    _, event = connect(stack, acme, "pump-q")
    first = stack.register(event)
    assert first.accepted and first.decided
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When the event is delivered again
    again = stack.register(event)
    # Then the decision is reported, not made again, with two reads and nothing audited
    assert again.accepted and not again.decided and again.device_id == "pump-q"
    assert counter.count() == 2, counter.calls
    assert _mismatches(stack) == []


# ---- hostile certificates: refused as malformed, exactly once --------------------------------


def _tlv(der: bytes, at: int) -> tuple[int, int]:
    """(start of content, end) of the DER TLV at `at`."""
    length, start = der[at + 1], at + 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(der[start : start + count], "big"), start + count
    return start, start + length


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def resigned(authority, cert, old: bytes, new: bytes) -> str:
    """`cert` with `old` replaced by `new` (same length) in its TBSCertificate, signed again by
    `authority`: a certificate the CA really issued, with a field that does not decode."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    der = cert.public_bytes(Encoding.DER)
    body, _ = _tlv(der, 0)
    _, tbs_end = _tlv(der, body)
    tbs = der[body:tbs_end]
    assert len(old) == len(new) and tbs.count(old) == 1, (old, tbs.count(old))
    tbs = tbs.replace(old, new)
    _, algorithm_end = _tlv(der, tbs_end)
    signature = authority.key.sign(tbs, ec.ECDSA(cert.signature_hash_algorithm))
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    content = tbs + der[tbs_end:algorithm_end] + bits
    out = b"\x30" + _der_length(len(content)) + content
    return (
        "-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(out).decode()
        + "-----END CERTIFICATE-----\n"
    )


def _negative_serial(authority, cert) -> str:
    tbs = cert.tbs_certificate_bytes
    at = tbs.index(b"\xa0\x03\x02\x01\x02\x02")  # version [0] v3, then the serial INTEGER
    old = tbs[at : at + 8]  # through the serial's length and its first content byte
    # The first content byte becomes 0x80 exactly: negative, and still minimal DER whatever
    # byte follows. Setting only its top bit made 0xFF out of a 0x7F (about 1 serial in 256,
    # with a next byte >= 0x80): a non-minimal INTEGER that no parser reads, so the case tested
    # something else than a negative serial, at random.
    return resigned(authority, cert, old, old[:-1] + b"\x80")


HOSTILE = {
    # name: how to spoil a certificate issued to "hostile-x1"
    "subject-not-utf8": lambda a, c: resigned(
        a, c, b"\x0c\x0ahostile-x1", b"\x0c\x0a\xff\xfe\xfd\xfc-x1\xc0\xc1\xc2"
    ),
    "duplicate-extension": lambda a, c: resigned(
        a, c, bytes.fromhex("0603551d25"), bytes.fromhex("0603551d0f")
    ),
    "unknown-curve": lambda a, c: resigned(
        a, c, bytes.fromhex("2a8648ce3d030107"), bytes.fromhex("2a8648ce3d030163")
    ),
    "unknown-key-type": lambda a, c: resigned(
        a, c, bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209")
    ),
    "key-usage-bad-bit-string": lambda a, c: resigned(
        a, c, bytes.fromhex("0303020780")[1:], bytes.fromhex("0303020980")[1:]
    ),
    "negative-serial": _negative_serial,
}


class MetricsRecorder:
    """Stands in for Powertools' metrics in the handler module: what it would have emitted."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, float]] = []
        self.dimensions: list[tuple[str, str]] = []

    def add_metric(self, name: str, unit: object, value: float) -> None:
        self.metrics.append((name, value))

    def add_dimension(self, name: str, value: str) -> None:
        self.dimensions.append((name, value))

    def decisions(self) -> list[tuple[str, float]]:
        return [
            m for m in self.metrics if m[0] in ("RegistrationsAccepted", "RegistrationsRefused")
        ]


@pytest.fixture
def jitr(stack, monkeypatch):
    """The registration function as Lambda runs it, with its metrics recorded."""
    from fleetkey_local.stack import TABLE
    from tests.support.handlers import load_handler

    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    function = load_handler("registration")
    recorder = MetricsRecorder()
    monkeypatch.setattr(function, "metrics", recorder)
    yield function, recorder
    function.service.cache_clear()


def _invoke(function, event):
    from tests.support.handlers import LambdaContext

    return function.handler(event, LambdaContext())


def _hostile_event(stack, acme, name):
    _, cert = acme.issue_device("hostile-x1", serial_number="SN-hostile-x1")
    event = stack.first_connect(HOSTILE[name](acme, cert), acme.pem)
    assert event is not None
    return event


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_certificate_is_refused_as_malformed_exactly_once(stack, acme, jitr, name):
    function, recorder = jitr
    # Given a certificate the CA signed with a field that does not decode, auto-registered
    stack.allowlist.add(entry("hostile-x1"), actor="op")
    event = _hostile_event(stack, acme, name)
    # When the registration function runs on its event
    result = _invoke(function, event)
    # Then it is refused as malformed: decided, audited once, revoked, counted once
    assert result["status"] == "refused" and result["reason"] == "malformed_certificate"
    cert_id = event["certificateId"]
    decision = stack.store.certificates.get(cert_id)
    assert (decision.outcome.value, decision.reason) == ("refused", "malformed_certificate")
    records, _ = stack.devices.audit(f"certificate:{cert_id}")
    assert [r.details["reason"] for r in records] == ["malformed_certificate"]
    assert stack.certificate_status(cert_id) == "REVOKED"
    assert recorder.metrics == [("RegistrationsRefused", 1)]
    assert recorder.dimensions == [("reason", "malformed_certificate")]
    assert stack.devices.get("hostile-x1").state is DeviceState.ALLOWLISTED
    # When the same event is redriven
    again = _invoke(function, event)
    # Then it ends cleanly, with no second audit record and no second count
    assert again == result
    assert len(stack.devices.audit(f"certificate:{cert_id}")[0]) == 1
    assert recorder.decisions() == [("RegistrationsRefused", 1)]
    assert recorder.metrics[-1] == ("RegistrationEventsRepeated", 1)


def test_a_malformed_refusal_whose_revocation_failed_is_finished_by_the_redrive(stack, acme, jitr):
    from botocore.exceptions import ClientError

    from tests.support.faults import FaultInjector

    function, recorder = jitr
    # Given a hostile certificate, and AWS IoT failing the revocation
    event = _hostile_event(stack, acme, "duplicate-extension")
    service = function.service()
    faults = FaultInjector().watch(service._registry._client, service._devices._table.client)
    faults.arm(None)
    _invoke(function, _hostile_event(stack, acme, "unknown-curve"))  # warm, and learn the calls
    clean = [call for call in faults.calls if call != "Query"]  # the anchor cache is warm now
    recorder.metrics.clear()
    recorder.dimensions.clear()
    faults.arm(clean.index("UpdateCertificate") + 1)
    # When the first invocation fails after recording the decision
    with pytest.raises(ClientError):
        _invoke(function, event)
    # Then the decision is counted by the invocation that made it
    assert recorder.metrics == [("RegistrationsRefused", 1)]
    assert stack.certificate_status(event["certificateId"]) == "PENDING_ACTIVATION"
    # When the event is redriven
    faults.arm(None)
    result = _invoke(function, event)
    # Then the certificate is revoked, with one record and one count in all
    assert result["reason"] == "malformed_certificate"
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"
    assert len(stack.devices.audit(f"certificate:{event['certificateId']}")[0]) == 1
    assert recorder.decisions() == [("RegistrationsRefused", 1)]


@pytest.mark.parametrize(
    "error",
    [
        "ValueError",
        "UnsupportedAlgorithm",
        "DuplicateExtension",
        "UnsupportedGeneralNameType",
        "TypeError",
    ],
)
def test_the_registration_edge_survives_any_parse_error_by_itself(stack, acme, monkeypatch, error):
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    from fleetkey.services import registration

    # Given certificate validation that fails with a raw parser error (not InvalidCertificate)
    errors = {
        "ValueError": ValueError("error parsing asn1 value"),
        "UnsupportedAlgorithm": UnsupportedAlgorithm("unknown curve"),
        "DuplicateExtension": x509.DuplicateExtension("dup", x509.oid.ExtensionOID.KEY_USAGE),
        "UnsupportedGeneralNameType": x509.UnsupportedGeneralNameType("odd name"),
        "TypeError": TypeError("odd key"),
    }

    def failing(*_args, **_kwargs):
        raise errors[error]

    monkeypatch.setattr(registration, "validate_device_certificate", failing)
    stack.allowlist.add(entry("edge-1"), actor="op")
    _, event = connect(stack, acme, "edge-1")
    # When it registers
    outcome = stack.register(event)
    # Then it is refused as malformed, decided and revoked, naming the error
    assert outcome.reason is RejectionReason.MALFORMED_CERTIFICATE and outcome.decided
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"
    records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
    assert records[0].details["error"] == error
    assert records[0].details["claimed_device_id"] == "edge-1"


def test_the_handler_acknowledges_a_mismatched_event(stack, acme, jitr):
    function, recorder = jitr
    # Given an event naming a certificate AWS IoT does not have
    event = certificate_registered_event("a" * 64, stack.cas.get("acme").iot_ca_id, stack.account)
    # When the function runs
    result = _invoke(function, event)
    # Then it returns normally (not retried), counted as a mismatched delivery, not a decision
    assert result == {"status": "mismatched"}
    assert recorder.metrics == [("RegistrationEventsMismatched", 1)]


# ---- the shared hostile set (tests/support/hostile_x509.py) through JITR --------------------


@pytest.fixture(scope="module")
def hostile_leaves(tmp_path_factory):
    from tests.support.hostile_x509 import HostileX509

    factory = HostileX509(tmp_path_factory.mktemp("hostile"))
    return {case.name: case for case in factory.leaf_cases(cached_ca("acme"))}


def _leaf_case_names():
    from tests.support.hostile_x509 import LEAF_CASES

    return sorted(LEAF_CASES)


def _aws_iot_holds(stack, text: str, ca_id: str) -> str:
    """Put a certificate AWS IoT accepted but `cryptography` may not load into moto's registry,
    PENDING_ACTIVATION, as JITR leaves it; returns its id (SHA-256 of the PEM text here)."""
    import hashlib

    from moto.iot.models import FakeCertificate, iot_backends

    from fleetkey_local.stack import ACCOUNT, REGION

    backend = iot_backends[ACCOUNT][REGION]
    _, valid = cached_ca("acme").issue_device("placeholder")
    cert = FakeCertificate(pem(valid), "PENDING_ACTIVATION", ACCOUNT, REGION, ca_id)
    cert.certificate_id = hashlib.sha256(text.encode()).hexdigest()
    cert.arn = cert.arn.rsplit("/", 1)[0] + "/" + cert.certificate_id
    cert.certificate_pem = text
    backend.certificates[cert.certificate_id] = cert
    return cert.certificate_id


def _registered_event(stack, text: str, acme_id: str) -> dict:
    """The certificate-registered event for `text`: auto-registered as AWS IoT would, or, where
    moto itself cannot load the certificate, placed in its registry directly."""

    try:
        event = stack.first_connect(text, cached_ca("acme").pem)
    except Exception:  # noqa: BLE001 - moto could not parse it; AWS IoT's parser may
        event = None
    if event is None:
        event = certificate_registered_event(
            _aws_iot_holds(stack, text, acme_id), acme_id, stack.account
        )
    return event


def _assert_refused_once(stack, function, recorder, event, expected_reason=None):
    result = _invoke(function, event)
    cert_id = event["certificateId"]
    assert result["status"] == "refused", result
    if expected_reason is not None:
        assert result["reason"] == expected_reason.value, result
    decision = stack.store.certificates.get(cert_id)
    assert decision.outcome.value == "refused" and decision.reason == result["reason"]
    records, _ = stack.devices.audit(f"certificate:{cert_id}")
    assert len(records) == 1
    assert stack.certificate_status(cert_id) == "REVOKED"
    assert recorder.metrics == [("RegistrationsRefused", 1)]
    # A redrive ends cleanly: same answer, no second record, no second count
    assert _invoke(function, event) == result
    assert len(stack.devices.audit(f"certificate:{cert_id}")[0]) == 1
    assert recorder.decisions() == [("RegistrationsRefused", 1)]
    return result


@pytest.mark.parametrize("name", _leaf_case_names())
def test_every_hostile_leaf_is_refused_once_through_the_function(
    stack, acme, jitr, hostile_leaves, name
):
    function, recorder = jitr
    case = hostile_leaves.get(name)
    if case is None:
        pytest.skip("needs the openssl CLI")
    # Given the hostile certificate, auto-registered under acme
    event = _registered_event(stack, case.pem, stack.cas.get("acme").iot_ca_id)
    # When the function runs on its event, and again (a redrive)
    # Then it is refused with the case's reason (any reason for odd but legal encodings: the
    # device is not allow-listed), recorded, revoked and counted once
    _assert_refused_once(stack, function, recorder, event, case.reason)


def test_certificates_aws_iot_holds_but_cryptography_cannot_load_are_refused_once(
    stack, acme, jitr
):
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.support.hostile_x509 import mutants, pem_text

    function, recorder = jitr
    acme_id = stack.cas.get("acme").iot_ca_id
    _, valid = acme.issue_device("mutant-1", serial_number="SN-mutant-1")
    texts = [pem_text(der) for der in mutants(valid.public_bytes(Encoding.DER), count=25, seed=7)]
    unreadable = [
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "not a PEM at all",
    ]
    for text in texts + unreadable:
        # Given whatever bytes AWS IoT might hold for a pending certificate
        recorder.metrics.clear()
        recorder.dimensions.clear()
        event = _registered_event(stack, text, acme_id)
        # When / Then the function refuses it once and a redrive is clean, never crashing
        expected = RejectionReason.MALFORMED_CERTIFICATE if text in unreadable else None
        _assert_refused_once(stack, function, recorder, event, expected)


@pytest.mark.parametrize(
    "common_name", ["a" * 3000, "pump 1/../x", "pümp-1"], ids=["huge", "path", "non-ascii"]
)
def test_a_subject_that_cannot_name_a_device_is_refused_without_a_lookup(stack, acme, common_name):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    # Given a certificate whose CN could never be an allow-listed device id (nor a table key)
    template = acme.issue_device("placeholder-1")[1]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(template.issuer)
        .public_key(template.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
    )
    for extension in template.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    event = stack.first_connect(pem(acme._sign(builder)), acme.pem)
    # When it registers
    outcome = stack.register(event)
    # Then it is refused once and revoked, never crashing on the device lookup
    assert not outcome.accepted and outcome.decided
    assert outcome.reason in (
        RejectionReason.NOT_ALLOWLISTED,
        RejectionReason.MALFORMED_CERTIFICATE,
    )
    assert stack.certificate_status(event["certificateId"]) == "REVOKED"
    records, _ = stack.devices.audit(f"certificate:{event['certificateId']}")
    assert len(records) == 1
    assert len(records[0].details.get("claimed_device_id") or "") <= 128
