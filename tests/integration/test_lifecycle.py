"""The device lifecycle after registration, through the services and against AWS IoT (moto):
suspend, resume, decommission with its teardown, recommission and ownership transfer, and what
each grants or refuses afterwards (tokens, introspection, data keys, JITR)."""

from __future__ import annotations

import base64
import threading
import time

import pytest
from botocore.exceptions import ClientError

from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import TeardownStatus
from fleetkey.domain.oauth import InvalidClient
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import Conflict, IllegalTransition, InvalidRequest, NotFound
from fleetkey_local.data_keys import (
    backend_decrypt_telemetry,
    device_open,
    encrypt_telemetry,
)
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import generate_key, pem
from tests.support.pki_cache import ca as cached_ca


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


class Device:
    """A registered device: its key and certificate, and what it asks fleetkey."""

    def __init__(self, stack, acme, device_id: str, **issue) -> None:
        self.device_id = device_id
        self.key, self.certificate, event = stack.manufacture(acme, device_id, **issue)
        self.certificate_id = certificate_id(self.certificate)
        self.event = event
        outcome = stack.register(event)
        assert outcome.accepted, outcome

    def assertion(self, stack) -> str:
        return client_assertion(
            self.key, self.certificate_id, self.device_id, stack.settings.issuer
        )

    def token(self, stack) -> str:
        return stack.tokens.issue(token_request(self.assertion(stack)))["access_token"]

    def data_key(self, stack) -> dict:
        return stack.data_keys.for_device(
            self.device_id, {"client_assertion": self.assertion(stack)}
        )


def cert_status(stack, cert_id: str) -> str | None:
    try:
        return stack.certificate_status(cert_id)
    except ClientError:
        return None


def active(stack, token: str) -> bool:
    return stack.introspection.introspect(token)["active"]


def aws_iot_leftovers(stack, device: Device) -> dict:
    """Everything AWS IoT still holds for the device: its thing, its certificate, and the
    certificate's attachments."""
    iot = stack.harness_iot
    things = [t["thingName"] for t in iot.list_things()["things"]]
    certificates = [c["certificateId"] for c in iot.list_certificates()["certificates"]]
    arn = f"arn:aws:iot:{stack.settings.region}:{stack.account}:cert/{device.certificate_id}"
    leftovers = {
        "thing": device.device_id in things,
        "certificate": device.certificate_id in certificates,
    }
    if leftovers["certificate"]:
        leftovers["policies"] = iot.list_attached_policies(target=arn)["policies"]
        leftovers["things"] = iot.list_principal_things(principal=arn)["things"]
    return leftovers


def wait_past_tokens_not_before(stack, device_id: str) -> None:
    """Tokens are granted from the second after a suspension or decommission (whole seconds)."""
    not_before = stack.store.devices.get(device_id).tokens_not_before or 0
    time.sleep(max(0.0, not_before - time.time()))


def decommissioned(stack, device: Device, reason: str = "retired") -> None:
    stack.lifecycle.decommission(device.device_id, reason=reason, actor="op")
    assert stack.drain_lifecycle(30)


# ---- suspend and resume ----------------------------------------------------------------------


def test_suspend_cuts_a_device_off_and_resume_restores_it(stack, acme):
    # Given a registered device with a token
    pump = Device(stack, acme, "pump-susp")
    before = pump.token(stack)
    assert active(stack, before)

    # When an operator suspends it
    device = stack.lifecycle.suspend(pump.device_id, reason="stolen", actor="op")

    # Then it is SUSPENDED, its certificate INACTIVE in AWS IoT, no token is granted, and the
    # token issued before is inactive
    assert device.state is DeviceState.SUSPENDED
    assert cert_status(stack, pump.certificate_id) == "INACTIVE"
    with pytest.raises(InvalidClient):
        pump.token(stack)
    with pytest.raises(InvalidClient):
        pump.data_key(stack)
    assert not active(stack, before)

    # When it is resumed
    device = stack.lifecycle.resume(pump.device_id, actor="op")

    # Then it is ACTIVE with its certificate ACTIVE; new tokens are active (from the second after
    # the suspension's), the old one stays not
    assert device.state is DeviceState.ACTIVE
    time.sleep(max(0.0, device.tokens_not_before - time.time()))
    assert cert_status(stack, pump.certificate_id) == "ACTIVE"
    assert active(stack, pump.token(stack))
    assert not active(stack, before)
    actions = [r.action for r in stack.devices.audit(f"device:{pump.device_id}")[0]]
    assert actions[-2:] == ["suspended", "resumed"]


def test_suspend_and_resume_are_idempotent(stack, acme):
    pump = Device(stack, acme, "pump-idem")
    first = stack.lifecycle.suspend(pump.device_id, reason="stolen", actor="op")
    again = stack.lifecycle.suspend(pump.device_id, reason="stolen", actor="op")
    assert again.audit_head == first.audit_head
    stack.lifecycle.resume(pump.device_id, actor="op")
    resumed = stack.lifecycle.resume(pump.device_id, actor="op")
    assert resumed.state is DeviceState.ACTIVE
    assert cert_status(stack, pump.certificate_id) == "ACTIVE"


@pytest.mark.parametrize("reason", ["", "x" * 257, "line\nbreak", 7])
def test_a_bad_reason_changes_nothing(stack, acme, reason):
    pump = Device(stack, acme, f"pump-reason-{len(str(reason))}")
    before = stack.store.devices.get(pump.device_id)
    with pytest.raises(InvalidRequest):
        stack.lifecycle.suspend(pump.device_id, reason=reason, actor="op")
    assert stack.store.devices.get(pump.device_id) == before
    assert cert_status(stack, pump.certificate_id) == "ACTIVE"


def test_operations_on_unknown_or_wrong_state_devices_are_refused(stack, acme):
    with pytest.raises(NotFound):
        stack.lifecycle.suspend("ghost", reason="x", actor="op")
    with pytest.raises(NotFound):
        stack.lifecycle.suspend("bad/id", reason="x", actor="op")
    stack.allowlist.add(
        __import__("fleetkey.domain.allowlist", fromlist=["AllowlistEntry"]).AllowlistEntry(
            device_id="listed-only",
            serial_number="S",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    with pytest.raises(IllegalTransition):
        stack.lifecycle.suspend("listed-only", reason="x", actor="op")
    with pytest.raises(IllegalTransition):
        stack.lifecycle.recommission("listed-only", actor="op")


def test_a_token_request_racing_a_suspension_is_refused_after_it(stack, acme, monkeypatch):
    # Given a device whose token request has read it (ACTIVE) when the suspension commits
    pump = Device(stack, acme, "pump-race")
    devices = stack.store.devices
    original = devices.credential

    def read_then_suspend(device_id):
        credential = original(device_id)
        stack.lifecycle.suspend(device_id, reason="stolen", actor="op")
        return credential

    monkeypatch.setattr(devices, "credential", read_then_suspend)
    # When the request goes on, Then no token: the grant's write checks the device again
    with pytest.raises(InvalidClient) as refused:
        pump.token(stack)
    assert refused.value.reason == "device not active"
    monkeypatch.setattr(devices, "credential", original)
    # and a data-key request racing the same way is refused too
    stack.lifecycle.resume(pump.device_id, actor="op")
    monkeypatch.setattr(devices, "credential", read_then_suspend)
    with pytest.raises(InvalidClient):
        pump.data_key(stack)


def test_a_token_signed_while_a_suspension_commits_is_inactive(stack, acme, monkeypatch):
    # Given a token request that recorded its assertion just before the suspension committed
    pump = Device(stack, acme, "pump-late")
    records = stack.store.token_records
    original = records.use_assertion

    def recorded_then_suspended(*args, **kwargs):
        original(*args, **kwargs)
        stack.lifecycle.suspend(pump.device_id, reason="stolen", actor="op")

    monkeypatch.setattr(records, "use_assertion", recorded_then_suspended)
    token = pump.token(stack)
    # Then the token it still received is inactive from the suspension on, also after a resume
    assert not active(stack, token)
    monkeypatch.setattr(records, "use_assertion", original)
    stack.lifecycle.resume(pump.device_id, actor="op")
    assert not active(stack, token)


def test_concurrent_suspends_and_resumes_leave_aws_iot_as_the_device(stack, acme):
    # Given a device, and operators suspending and resuming it at once
    pump = Device(stack, acme, "pump-storm")
    errors: list[BaseException] = []

    def run(action):
        try:
            if action == "suspend":
                stack.lifecycle.suspend(pump.device_id, reason="storm", actor="op")
            else:
                stack.lifecycle.resume(pump.device_id, actor="op")
        except (IllegalTransition, Conflict) as exc:  # a lost race, reported
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("suspend" if i % 2 == 0 else "resume",))
        for i in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stack.drain_lifecycle(30)
    # Then AWS IoT follows the device's final state
    device = stack.store.devices.get(pump.device_id)
    expected = "ACTIVE" if device.state is DeviceState.ACTIVE else "INACTIVE"
    assert cert_status(stack, pump.certificate_id) == expected
    assert stack.lifecycle.converge(pump.device_id)


# ---- decommission --------------------------------------------------------------------------------


def test_decommission_tears_everything_down_and_keeps_the_record(stack, acme):
    # Given a device with a token and a data key
    well = Device(stack, acme, "well-decom")
    token = well.token(stack)
    well.data_key(stack)

    # When it is decommissioned
    device = stack.lifecycle.decommission(well.device_id, reason="retired", actor="op")

    # Then it is DECOMMISSIONED at once, its teardown pending; nothing is granted any more
    assert device.state is DeviceState.DECOMMISSIONED
    assert device.teardown.status is TeardownStatus.PENDING
    assert not active(stack, token)
    with pytest.raises(InvalidClient):
        well.token(stack)
    with pytest.raises(InvalidClient):
        well.data_key(stack)

    # When the queue has run the teardown
    assert stack.drain_lifecycle(30)

    # Then AWS IoT holds nothing of it, its data key is gone, and its record and trail remain
    assert aws_iot_leftovers(stack, well) == {"thing": False, "certificate": False}
    assert stack.store.data_keys.get(well.device_id, device.epoch) is None
    device = stack.devices.get(well.device_id)
    assert device.state is DeviceState.DECOMMISSIONED
    assert device.teardown.status is TeardownStatus.COMPLETED
    records, verification = stack.devices.audit(f"device:{well.device_id}")
    assert [r.action for r in records][-2:] == ["decommissioned", "teardown_completed"]
    assert verification.head == device.audit_head
    # and a repeated decommission changes nothing
    again = stack.lifecycle.decommission(well.device_id, reason="retired", actor="op")
    assert again.audit_head == device.audit_head


def test_a_suspended_device_can_be_decommissioned(stack, acme):
    well = Device(stack, acme, "well-susp-decom")
    stack.lifecycle.suspend(well.device_id, reason="stolen", actor="op")
    decommissioned(stack, well)
    assert aws_iot_leftovers(stack, well) == {"thing": False, "certificate": False}


def test_recommission_waits_for_the_teardown(stack, acme):
    well = Device(stack, acme, "well-wait")
    stack.lifecycle.decommission(well.device_id, reason="retired", actor="op")
    with pytest.raises(Conflict):
        stack.lifecycle.recommission(well.device_id, actor="op")


# ---- recommission, transfer, re-onboarding ----------------------------------------------------


def test_recommission_gives_a_fresh_life_through_jitr(stack, acme):
    # Given a decommissioned device
    well = Device(stack, acme, "well-life")
    decommissioned(stack, well)

    # When it is recommissioned to a new owner
    device = stack.lifecycle.recommission(well.device_id, actor="op", owner="tenant-b")

    # Then it is ALLOWLISTED in its next life, with no certificate
    assert device.state is DeviceState.ALLOWLISTED
    assert (device.epoch, device.owner, device.certificates) == (2, "tenant-b", ())

    # When it connects again with its factory certificate
    event = stack.first_connect(pem(well.certificate), acme.pem)
    outcome = stack.register(event)

    # Then it registers afresh: ACTIVE, provisioned, and gets tokens
    assert outcome.accepted and outcome.decided
    assert stack.devices.get(well.device_id).state is DeviceState.ACTIVE
    assert cert_status(stack, well.certificate_id) == "ACTIVE"
    wait_past_tokens_not_before(stack, well.device_id)
    assert active(stack, well.token(stack))
    # And the trail shows the handover: from, to, who
    records, _ = stack.devices.audit(f"device:{well.device_id}")
    handover = next(r for r in records if r.action == "recommissioned")
    assert handover.actor == "op"
    assert handover.details["previous_owner"] is None
    assert handover.details["owner"] == "tenant-b" and handover.details["transfer"] is True


def test_a_decommissioned_device_that_connects_is_set_aside_not_burnt(stack, acme):
    # Given a decommissioned device (torn down)
    pump = Device(stack, acme, "pump-storage")
    decommissioned(stack, pump)

    # When it powers up in storage and connects
    event = stack.first_connect(pem(pump.certificate), acme.pem)
    outcome = stack.register(event)

    # Then it is refused, its certificate not revoked but removed from AWS IoT
    assert not outcome.accepted and outcome.reason is RejectionReason.DECOMMISSIONED
    assert cert_status(stack, pump.certificate_id) is None
    # and after a recommission its factory certificate registers again
    stack.lifecycle.recommission(pump.device_id, actor="op")
    outcome = stack.register(stack.first_connect(pem(pump.certificate), acme.pem))
    assert outcome.accepted
    assert stack.devices.get(pump.device_id).state is DeviceState.ACTIVE


def test_a_certificate_aws_iot_revoked_meanwhile_registers_again_after_recommission(stack, acme):
    # Given a decommissioned device whose factory certificate AWS IoT holds as REVOKED
    pump = Device(stack, acme, "pump-revoked")
    decommissioned(stack, pump)
    stack.first_connect(pem(pump.certificate), acme.pem)  # back in AWS IoT, pending
    stack.harness_iot.update_certificate(certificateId=pump.certificate_id, newStatus="REVOKED")

    # When it is recommissioned and connects
    stack.lifecycle.recommission(pump.device_id, actor="op")
    outcome = stack.register(stack.first_connect(pem(pump.certificate), acme.pem))

    # Then it registers afresh
    assert outcome.accepted
    assert cert_status(stack, pump.certificate_id) == "ACTIVE"


def test_a_clone_refused_before_stays_refused_in_every_later_life(stack, acme):
    # Given a device, and a clone of its identity refused as such
    pump = Device(stack, acme, "pump-cloned")
    _, clone_cert = acme.issue_device(pump.device_id, serial_number=f"SN-{pump.device_id}")
    refused = stack.register(stack.first_connect(pem(clone_cert), acme.pem))
    assert refused.reason is RejectionReason.CLONE_SUSPECTED

    # When the device is decommissioned and recommissioned
    decommissioned(stack, pump)
    stack.lifecycle.recommission(pump.device_id, actor="op")

    # Then the clone's certificate is still refused, and the genuine one registers
    clone_id = certificate_id(clone_cert)
    decision = stack.store.certificates.get(clone_id)
    assert decision.outcome.value == "refused"
    again = stack.register(stack.first_connect(pem(pump.certificate), acme.pem))
    assert again.accepted
    assert stack.devices.get(pump.device_id).certificate_id == pump.certificate_id


@pytest.mark.parametrize("owner", ["-", "", "a" * 129, "x y", "ünïcode"])
def test_a_bad_owner_is_refused(stack, acme, owner):
    well = Device(stack, acme, f"well-owner-{abs(hash(owner)) % 1000}")
    decommissioned(stack, well)
    before = stack.store.devices.get(well.device_id)
    with pytest.raises(InvalidRequest):
        stack.lifecycle.recommission(well.device_id, actor="op", owner=owner)
    assert stack.store.devices.get(well.device_id) == before


# ---- data keys ----------------------------------------------------------------------------------


def test_a_data_key_round_trip_between_a_device_and_the_backend(stack, acme):
    # Given a device that obtains its data key, sealed to its own key
    sensor = Device(stack, acme, "sensor-dk")
    sealed = sensor.data_key(stack)
    key = device_open(
        sensor.key, sealed, device_id=sensor.device_id, epoch=sealed["epoch"], owner=None
    )
    # When it encrypts telemetry, Then the backend reads it with the KMS-wrapped key
    envelope = encrypt_telemetry(key, b"pressure=41.2", device_id=sensor.device_id, epoch=1)
    grant = stack.data_keys.for_backend(sensor.device_id, actor="backend")
    assert backend_decrypt_telemetry(stack.kms, grant, envelope) == b"pressure=41.2"
    # And the same key comes back on the next request
    again = device_open(
        sensor.key,
        sensor.data_key(stack),
        device_id=sensor.device_id,
        epoch=1,
        owner=None,
    )
    assert again == key


def test_a_data_key_opens_only_with_its_devices_key(stack, acme):
    sensor = Device(stack, acme, "sensor-dk-own")
    sealed = sensor.data_key(stack)
    with pytest.raises(ValueError):
        device_open(
            generate_key("ec:secp256r1"), sealed, device_id=sensor.device_id, epoch=1, owner=None
        )


def test_after_decommission_the_data_key_is_gone(stack, acme):
    # Given a device's telemetry encrypted under its data key
    sensor = Device(stack, acme, "sensor-dk-gone")
    sealed = sensor.data_key(stack)
    key = device_open(sensor.key, sealed, device_id=sensor.device_id, epoch=1, owner=None)
    envelope = encrypt_telemetry(key, b"secret", device_id=sensor.device_id, epoch=1)
    grant = stack.data_keys.for_backend(sensor.device_id, actor="backend")

    # When it is decommissioned
    decommissioned(stack, sensor)

    # Then no one can obtain the key any more, and nothing fleetkey holds can decrypt the data
    with pytest.raises(InvalidClient):
        sensor.data_key(stack)
    with pytest.raises(Conflict):
        stack.data_keys.for_backend(sensor.device_id, actor="backend")
    assert stack.store.data_keys.get(sensor.device_id, 1) is None
    assert stack.store.table.query(f"DATAKEY#{sensor.device_id}") == []
    assert base64.b64decode(grant["ciphertext_blob"])  # (a backend's copy: docs/lifecycle.md)
    del envelope


def test_a_transfer_gives_the_new_owner_another_key(stack, acme):
    sensor = Device(stack, acme, "sensor-transfer")
    first = sensor.data_key(stack)
    decommissioned(stack, sensor)
    stack.lifecycle.recommission(sensor.device_id, actor="op", owner="tenant-b")
    stack.register(stack.first_connect(pem(sensor.certificate), acme.pem))
    wait_past_tokens_not_before(stack, sensor.device_id)
    second = sensor.data_key(stack)
    assert (second["epoch"], second["owner"]) == (2, "tenant-b")
    assert second["key_ref"] != first["key_ref"]
    opened = device_open(sensor.key, second, device_id=sensor.device_id, epoch=2, owner="tenant-b")
    assert len(opened) == 32


# ---- what a hostile read found ----------------------------------------------------------------


def test_a_late_copy_of_a_teardown_never_touches_the_next_life(stack, acme):
    # Given a teardown that a late copy still holds (SQS delivers at least once)
    from fleetkey.converge import converge
    from fleetkey.services.lifecycle import Superseded

    well = Device(stack, acme, "well-late-copy")
    stack.lifecycle.decommission(well.device_id, reason="retired", actor="op")
    stale = stack.store.devices.get(well.device_id)
    assert stack.drain_lifecycle(30)
    # and the device's next life: recommissioned, registered again, with a data key
    stack.lifecycle.recommission(well.device_id, actor="op", owner="tenant-b")
    assert stack.register(stack.first_connect(pem(well.certificate), acme.pem)).accepted
    wait_past_tokens_not_before(stack, well.device_id)
    well.data_key(stack)

    # When the late copy runs its teardown steps
    with pytest.raises(Superseded):
        converge(stack.lifecycle._steps(stale))

    # Then it stopped at its first deletion: the new life's certificate, thing and key remain
    assert cert_status(stack, well.certificate_id) == "ACTIVE"
    assert aws_iot_leftovers(stack, well)["thing"]
    assert stack.store.data_keys.get(well.device_id, 2) is not None


def test_a_profile_the_factory_key_cannot_meet_is_refused_at_recommission(stack, acme):
    # Given a decommissioned RSA sensor (pumps accept EC keys only)
    sensor = Device(stack, acme, "sensor-rsa", key_kind="rsa:2048")
    decommissioned(stack, sensor)
    before = stack.store.devices.get(sensor.device_id)
    # When it is recommissioned as a pump, Then refused, nothing changed, identity intact
    with pytest.raises(InvalidRequest):
        stack.lifecycle.recommission(sensor.device_id, actor="op", profile="infusion-pump")
    assert stack.store.devices.get(sensor.device_id) == before


def test_a_recommissioned_device_re_onboards_only_with_its_factory_certificate(stack, acme):
    # Given a recommissioned device, and another certificate of its manufacturer in its name
    pump = Device(stack, acme, "pump-pinned")
    decommissioned(stack, pump)
    stack.lifecycle.recommission(pump.device_id, actor="op")
    _, rogue = acme.issue_device(pump.device_id, serial_number=f"SN-{pump.device_id}")
    # When the rogue connects first, Then it is refused as a clone, and the genuine one registers
    refused = stack.register(stack.first_connect(pem(rogue), acme.pem))
    assert refused.reason is RejectionReason.CLONE_SUSPECTED
    assert stack.register(stack.first_connect(pem(pump.certificate), acme.pem)).accepted


def test_an_assertion_signed_before_a_suspension_is_not_honoured_after_it(stack, acme):
    pump = Device(stack, acme, "pump-old-assertion")
    old = pump.assertion(stack)
    stack.lifecycle.suspend(pump.device_id, reason="stolen", actor="op")
    stack.lifecycle.resume(pump.device_id, actor="op")
    wait_past_tokens_not_before(stack, pump.device_id)
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(old))
    assert active(stack, pump.token(stack))


def test_a_backend_read_of_a_data_key_is_audited(stack, acme):
    sensor = Device(stack, acme, "sensor-read-audit")
    sensor.data_key(stack)
    stack.data_keys.for_backend(sensor.device_id, actor="arn:aws:iam::1:role/analytics")
    records, _ = stack.devices.audit(f"device:{sensor.device_id}")
    assert (records[-1].action, records[-1].actor) == (
        "data_key_read",
        "arn:aws:iam::1:role/analytics",
    )
