"""Registration converges: a failure at any single AWS call followed by a retry, duplicate
deliveries, and concurrent copies all end in exactly the state of one clean run."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey_local.pki import pem
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca

# What an injected fault surfaces as: the ClientError before a call, the timeout after it.
INJECTED = (ClientError, BotoCoreError)


def _entry(device_id: str) -> AllowlistEntry:
    return AllowlistEntry(
        device_id=device_id,
        serial_number=f"SN-{device_id}",
        manufacturer_ca="acme",
        profile="telemetry-sensor",
    )


def _prepare(stack, scenario: str):
    """Set up one scenario's starting state; return the event to process and the device id."""
    acme = cached_ca("acme")
    registered = stack.register_ca(acme)
    stack.anchors.get(registered.iot_ca_id)
    device_id = "dev-1"
    if scenario != "not-allowlisted":
        stack.allowlist.add(_entry(device_id), actor="op")
    if scenario == "clone":
        _, original = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
        assert stack.register(stack.first_connect(pem(original), acme.pem)).accepted
    options = {}
    if scenario == "expired":
        now = datetime.now(UTC)
        options = {"not_before": now - timedelta(days=9), "not_after": now - timedelta(days=1)}
    _, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}", **options)
    text = pem(cert)
    if scenario == "malformed":
        text = _duplicate_key_usage(cert, acme.key)
    event = stack.first_connect(text, acme.pem)
    return event, device_id


def _duplicate_key_usage(cert, key) -> str:
    """`cert` with its extendedKeyUsage turned into a second keyUsage, signed again by the CA:
    a certificate whose extensions do not parse."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from tests.support.hostile_x509 import pem_text, resign

    tbs = cert.tbs_certificate_bytes.replace(
        bytes.fromhex("0603551d25"), bytes.fromhex("0603551d0f")
    )
    return pem_text(resign(cert.public_bytes(Encoding.DER), tbs, key))


def snapshot(stack, event: dict, device_id: str) -> dict:
    """Everything a registration can change, with run-specific ids and times abstracted away."""
    cert_id = event["certificateId"]
    iot = stack.harness_iot
    cert = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]
    device = stack.store.devices.get(device_id)
    decision = stack.store.certificates.get(cert_id)
    try:
        thing = iot.describe_thing(thingName=device_id)
        principals = iot.list_thing_principals(thingName=device_id)["principals"]
        thing_state = (
            thing.get("thingTypeName"),
            sorted(thing.get("attributes", {})),
            ["this" if p == cert["certificateArn"] else "other" for p in principals],
        )
    except iot.exceptions.ResourceNotFoundException:
        thing_state = None
    policies = [
        p["policyName"]
        for p in iot.list_attached_policies(target=cert["certificateArn"])["policies"]
    ]

    def actions(subject):
        try:
            records, _ = stack.devices.audit(subject)  # also verifies the chain
        except Exception as exc:  # noqa: BLE001 - absence is part of the state
            return type(exc).__name__
        return [(r.action, r.details.get("reason")) for r in records]

    return {
        "certificate_status": cert["status"],
        "policies": policies,
        "thing": thing_state,
        "device": None
        if device is None
        else (device.state.value, device.certificate_id == cert_id, device.audit_head.seq),
        "decision": None
        if decision is None
        else (decision.outcome.value, decision.reason, decision.device_id),
        "device_audit": actions(f"device:{device_id}"),
        "certificate_audit": actions(f"certificate:{cert_id}"),
    }


SCENARIOS = ["accepted", "not-allowlisted", "clone", "expired", "malformed"]


def _clean_run(make_stack, scenario):
    stack = make_stack()
    event, device_id = _prepare(stack, scenario)
    faults = FaultInjector().watch(*stack.service_clients())
    faults.arm(None)
    stack.register(event)
    calls = list(faults.calls)
    stack.register(event)  # a duplicate delivery changes nothing
    return snapshot(stack, event, device_id), calls


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_duplicate_delivery_changes_nothing(make_stack, scenario):
    # Given one clean run of the scenario
    stack = make_stack()
    event, device_id = _prepare(stack, scenario)
    stack.register(event)
    before = snapshot(stack, event, device_id)
    # When the same event is delivered again
    stack.register(event)
    # Then nothing changes
    assert snapshot(stack, event, device_id) == before


@pytest.mark.parametrize("after", [False, True], ids=["fail-before-call", "fail-after-call"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_failure_at_every_call_then_retry_converges(make_stack, scenario, after):
    expected, clean_calls = _clean_run(make_stack, scenario)
    assert clean_calls, "the clean run made no AWS calls"
    for k in range(1, len(clean_calls) + 1):
        # Given a fresh start and a fault at the k-th AWS call
        stack = make_stack()
        event, device_id = _prepare(stack, scenario)
        faults = FaultInjector().watch(*stack.service_clients())
        faults.arm(k, after=after)
        # When the registration fails there (Lambda sees the error and retries the event)
        with pytest.raises(INJECTED):
            stack.register(event)
        assert faults.fired == clean_calls[k - 1], (k, faults.calls)
        faults.arm(None)
        stack.register(event)
        # Then the retry ends in the state of one clean run
        assert snapshot(stack, event, device_id) == expected, f"fault at call {k} ({faults.fired})"


@pytest.mark.parametrize("scenario", ["accepted", "not-allowlisted", "clone", "malformed"])
def test_ten_concurrent_copies_end_as_one_run(make_stack, scenario):
    expected, _ = _clean_run(make_stack, scenario)
    # Given the scenario's starting state
    stack = make_stack()
    event, device_id = _prepare(stack, scenario)
    # When ten copies of the event are processed at once
    barrier = threading.Barrier(10)
    errors: list[BaseException] = []
    outcomes = []

    def deliver():
        barrier.wait()
        try:
            outcomes.append(stack.register(event))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every copy succeeds, exactly one made the decision (so it is counted once), and the
    # state is that of one clean run
    assert errors == []
    assert sum(outcome.decided for outcome in outcomes) == 1
    assert snapshot(stack, event, device_id) == expected


def test_two_different_certificates_racing_for_one_device(make_stack):
    """A cloned identity registering at the same moment as the genuine device: exactly one
    certificate wins; the other is refused as a suspected clone and revoked."""
    stack = make_stack()
    acme = cached_ca("acme")
    stack.anchors.get(stack.register_ca(acme).iot_ca_id)
    stack.allowlist.add(_entry("dev-1"), actor="op")
    events = [
        stack.first_connect(pem(acme.issue_device("dev-1", serial_number="SN-dev-1")[1]), acme.pem)
        for _ in range(2)
    ] * 5  # each certificate's event delivered five times
    barrier = threading.Barrier(len(events))
    outcomes, errors = [], []

    def deliver(event):
        barrier.wait()
        try:
            outcomes.append(stack.register(event))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    winners = {o.certificate_id for o in outcomes if o.accepted}
    losers = {o.certificate_id for o in outcomes if not o.accepted}
    assert len(winners) == 1 and len(losers) == 1
    assert {o.reason.value for o in outcomes if not o.accepted} == {"clone_suspected"}
    assert stack.certificate_status(winners.pop()) == "ACTIVE"
    assert stack.certificate_status(losers.pop()) == "REVOKED"
    records, _ = stack.devices.audit("device:dev-1")
    assert [r.action for r in records] == ["allowlisted", "registered", "registration_refused"]
