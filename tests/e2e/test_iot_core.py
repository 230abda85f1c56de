"""The local AWS IoT Core emulator end to end: real paho-mqtt clients over mutual TLS against the
embedded stack (moto server in-process), with the real registration function behind the
just-in-time registration rule."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.lifecycle import DeviceState
from fleetkey_local import iot
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.rules import (
    DEVICE_EVENTS_RULE_SQL,
    PRESENCE_CONNECTED_RULE_SQL,
    REGISTRATION_RULE_SQL,
    RULES,
    Rule,
    RulesEngine,
    topic_filter_of,
    topic_matches,
)
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory
from tests.support.recorder import Recorder

pytestmark = pytest.mark.xdist_group("iot-core")

TIMEOUT = 10.0


@dataclass
class World:
    stack: EmbeddedStack
    emulator: IotCoreEmulator
    acme: CertificateAuthority
    tmp: Path
    device_events: Recorder
    presence: Recorder
    clients: list = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iot-core")
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        acme = CertificateAuthority.create("acme-2026")
        stack.register_ca(acme)
        device_events, presence = Recorder(), Recorder()
        rules = [
            *RULES,
            Rule.select_all("device_events_double", DEVICE_EVENTS_RULE_SQL, device_events),
            Rule.select_all("presence_double", PRESENCE_CONNECTED_RULE_SQL, presence),
            Rule.select_all(
                "presence_disconnected_double",
                "SELECT * FROM '$aws/events/presence/disconnected/+'",
                presence,
            ),
        ]
        emulator = IotCoreEmulator(tmp / "state", port=0, rules=rules, endpoint_url=endpoint)
        emulator.start()
        world = World(stack, emulator, acme, tmp, device_events, presence)
        try:
            yield world
        finally:
            for client in world.clients:
                client.close()
            emulator.stop()


class Device(MqttDevice):
    """A device of the test world: every client it opens is closed when the world ends."""

    def __init__(self, world: World, name: str, certfile: Path, keyfile: Path) -> None:
        super().__init__(
            name, certfile, keyfile, world.emulator.endpoint_ca_path, world.emulator.address
        )
        self.world = world
        self.name = name

    def connect(
        self, client_id: str | None = None, timeout: float = TIMEOUT, clean_session: bool = True
    ) -> str:
        outcome = super().connect(client_id, timeout, clean_session)
        if self.client is not None:
            self.world.clients.append(self)
        return outcome


def eventually(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def allowlist(world: World, device_id: str, profile: str = "telemetry-sensor") -> None:
    world.stack.allowlist.add(
        AllowlistEntry(
            device_id=device_id,
            serial_number=f"SN-{device_id}",
            manufacturer_ca="acme-2026",
            profile=profile,
        ),
        actor="test",
    )


def factory_device(
    world: World, device_id: str, authority: CertificateAuthority | None = None
) -> Device:
    authority = authority or world.acme
    key, certificate = authority.issue_device(device_id, serial_number=f"SN-{device_id}")
    base = world.tmp / device_id
    certfile, keyfile = base.with_suffix(".crt"), base.with_suffix(".key")
    # AWS IoT wants the CA certificate after the device's on a first connection (JITR).
    certfile.write_text(pem(certificate) + authority.pem)
    keyfile.write_text(key_pem(key))
    return Device(world, device_id, certfile, keyfile)


def registration_invocations(world: World, certificate_id: str):
    return [
        i
        for i in world.emulator.invocations
        if i.rule == "registration" and i.event["certificateId"] == certificate_id
    ]


def certificate_id(device: Device) -> str:
    end = "-----END CERTIFICATE-----"
    return iot.certificate_id(device.certfile.read_text().split(end)[0] + end + "\n")


def onboard(world: World, device_id: str, profile: str = "telemetry-sensor") -> Device:
    """Allow-list a device and let it register just in time; connected as itself."""
    allowlist(world, device_id, profile)
    device = factory_device(world, device_id)
    assert device.connect().startswith("refused")
    assert world.emulator.drain(TIMEOUT)
    assert device.connect() == "accepted"
    return device


# ---- just-in-time registration ----------------------------------------------------------------


def test_first_connection_registers_the_device_just_in_time_then_it_connects(world):
    # Given an allow-listed device with a factory certificate from the registered manufacturer CA
    allowlist(world, "pump-0001", profile="infusion-pump")
    device = factory_device(world, "pump-0001")
    cert_id = certificate_id(device)

    # When it connects for the first time
    outcome = device.connect()

    # Then AWS IoT registers its certificate and refuses the connection...
    assert outcome.startswith("refused"), outcome
    assert world.stack.certificate_status(cert_id) in ("PENDING_ACTIVATION", "ACTIVE")
    # ...and the registration rule delivers the event to the real registration function
    assert world.emulator.drain(TIMEOUT)
    [invocation] = registration_invocations(world, cert_id)
    assert invocation.status == "succeeded", invocation.error
    assert invocation.result == {"status": "accepted", "device_id": "pump-0001"}
    assert invocation.event["caCertificateId"] == iot.certificate_id(world.acme.pem)
    assert world.stack.devices.get("pump-0001").state == DeviceState.ACTIVE
    assert world.stack.certificate_status(cert_id) == "ACTIVE"

    # When it connects again with its thing name as client id, it is let in
    assert device.connect() == "accepted"
    # And the presence event reached its rule, in AWS's shape
    event = world.presence.wait_for(lambda e: e["clientId"] == "pump-0001")
    assert event["eventType"] == "connected"
    assert event["principalIdentifier"] == cert_id
    assert event["ipAddress"] == "127.0.0.1"
    assert event["sessionIdentifier"] and isinstance(event["versionNumber"], int)
    assert isinstance(event["timestamp"], int)
    stats = world.emulator.statistics()
    assert stats["connections"]["refused"].get("certificate_registered_just_in_time", 0) >= 1
    assert stats["just_in_time_registrations"] >= 1


def test_the_same_certificate_with_another_client_id_is_refused_the_device_undisturbed(world):
    device = onboard(world, "well-0101")
    assert device.subscribe("fleetkey/well-0101/commands/#") == [1]
    # A clone presents the device's certificate with another client id: not authorized
    clone = Device(world, "well-0101-clone", device.certfile, device.keyfile)
    assert clone.connect(client_id="well-0102").startswith("refused")
    # The device is undisturbed:
    world.emulator.publish_command("well-0101", "reset", {"why": "check"})
    assert device.pump(lambda: device.messages)
    assert device.messages[0].topic == "fleetkey/well-0101/commands/reset"
    assert world.emulator.statistics()["connections"]["refused"].get("not_authorized", 0) >= 1


def test_a_refused_connection_with_a_victims_client_id_leaves_the_victim_alone(world):
    victim = onboard(world, "well-0201")
    assert victim.subscribe("fleetkey/well-0201/commands/#") == [1]
    intruder = onboard(world, "well-0202")
    # The intruder's certificate is not attached to the victim's thing: refused...
    assert intruder.connect(client_id="well-0201").startswith("refused")
    # ...and the victim keeps its connection and its subscriptions (amqtt alone would have
    # dropped the victim's session before refusing the intruder)
    world.emulator.publish_command("well-0201", "rotate", {"reason": "test"})
    assert victim.pump(lambda: victim.messages), victim.outcome
    assert victim.outcome == "accepted"


# ---- messages and policies --------------------------------------------------------------------


def test_a_device_event_reaches_its_rule(world):
    device = onboard(world, "well-0301")
    device.publish("fleetkey/well-0301/events/alarm", {"level": "high"})
    event = world.device_events.wait_for(lambda e: e.get("level") == "high")
    assert event == {"level": "high"}
    assert world.emulator.drain(TIMEOUT)
    [invocation] = [
        i
        for i in world.emulator.invocations
        if i.rule == "device_events_double" and i.topic == "fleetkey/well-0301/events/alarm"
    ]
    assert invocation.status == "succeeded" and invocation.attempts == 1
    assert device.outcome == "accepted"


def test_commands_reach_the_subscribed_device_and_no_other(world):
    device = onboard(world, "well-0401")
    other = onboard(world, "well-0402")
    # The device subscribes to its commands; the other device may not subscribe to them
    assert device.subscribe("fleetkey/well-0401/commands/+") == [1]
    assert other.subscribe("fleetkey/well-0401/commands/#") == [0x80]
    assert other.subscribe("fleetkey/+/commands/#") == [0x80]
    assert other.subscribe("fleetkey/well-0402/commands/#") == [1]

    # When a command is published (iot-data Publish)
    topic = world.emulator.publish_command("well-0401", "rotate", {"deadline": 60})

    # Then the device receives it, and the other device does not
    assert device.pump(lambda: device.messages)
    assert device.messages[0].topic == topic == "fleetkey/well-0401/commands/rotate"
    assert json.loads(device.messages[0].payload) == {"deadline": 60}
    other.pump(lambda: False, 0.3)
    assert other.messages == []

    # boto3's iot-data Publish against the local endpoint reaches the device too
    iot_data = world.stack.make_client("iot-data")
    iot_data.publish(topic="fleetkey/well-0401/commands/reset", qos=1, payload=b'{"n": 2}')
    assert device.pump(lambda: len(device.messages) == 2)
    assert device.messages[1].topic == "fleetkey/well-0401/commands/reset"


def test_publishing_outside_its_topics_disconnects_the_device(world):
    device = onboard(world, "well-0501")
    device.client.publish("fleetkey/well-0999/events/alarm", "{}", 1)
    assert device.pump(lambda: device.outcome != "accepted")
    assert device.outcome.startswith("disconnected")
    assert world.emulator.statistics()["publishes"].get("denied", 0) >= 1
    assert eventually(
        lambda: world.emulator.statistics()["connections"]["disconnected"].get("AUTH_ERROR", 0) >= 1
    )


# ---- refused devices --------------------------------------------------------------------------


def test_a_rogue_device_is_refused_then_refused_again_with_its_certificate_revoked(world):
    rogue = factory_device(world, "rogue-0001")  # not allow-listed
    cert_id = certificate_id(rogue)
    assert rogue.connect().startswith("refused")
    assert world.emulator.drain(TIMEOUT)
    [invocation] = registration_invocations(world, cert_id)
    assert invocation.result["status"] == "refused"
    assert invocation.result["reason"] == "not_allowlisted"
    assert world.stack.certificate_status(cert_id) == "REVOKED"

    assert rogue.connect().startswith("refused")
    assert world.emulator.statistics()["connections"]["refused"].get("certificate_revoked", 0) >= 1
    assert len(registration_invocations(world, cert_id)) == 1  # no second registration event


def test_a_certificate_from_an_unregistered_ca_is_refused_at_tls(world):
    unknown = CertificateAuthority.create("unknown-ca")
    allowlist(world, "well-0601")
    device = factory_device(world, "well-0601", authority=unknown)
    refused = world.emulator.statistics()["connections"]["refused"]
    before = refused.get("tls_untrusted_certificate", 0)
    assert device.connect().startswith("refused")
    assert eventually(
        lambda: (
            world.emulator.statistics()["connections"]["refused"].get(
                "tls_untrusted_certificate", 0
            )
            == before + 1
        )
    )
    # Nothing reached AWS IoT
    assert not registration_invocations(world, certificate_id(device))


def test_a_second_connection_with_the_same_identity_takes_over_the_first(world):
    first = onboard(world, "well-0701")
    second = Device(world, "well-0701", first.certfile, first.keyfile)
    assert second.connect() == "accepted"
    # AWS IoT disconnects the client already connected with that client id
    assert first.pump(lambda: first.outcome != "accepted")
    event = world.presence.wait_for(
        lambda e: e["clientId"] == "well-0701" and e["eventType"] == "disconnected"
    )
    assert event["disconnectReason"] == "DUPLICATE_CLIENTID"
    assert event["clientInitiatedDisconnect"] is False
    assert event["principalIdentifier"] == certificate_id(first)
    assert second.subscribe("fleetkey/well-0701/commands/#", qos=2) == [1]  # AWS IoT: QoS <= 1
    second.close()
    event = world.presence.wait_for(
        lambda e: (
            e["clientId"] == "well-0701"
            and e.get("disconnectReason") == "CLIENT_INITIATED_DISCONNECT"
        )
    )
    assert event["clientInitiatedDisconnect"] is True


def test_a_persistent_session_keeps_its_subscriptions_across_reconnections(world):
    first = onboard(world, "well-0751")
    first.close()  # its clean session is still stored for a moment...
    assert first.connect(clean_session=False) == "accepted"  # ...and becomes persistent
    assert first.subscribe("fleetkey/well-0751/commands/#") == [1]
    first.close()
    time.sleep(1.2)  # amqtt's session monitor (every second) sweeps clean sessions only
    # A new connection with the same identity takes over the persistent session: its
    # subscription carries over, although this connection never subscribed
    second = Device(world, "well-0751", first.certfile, first.keyfile)
    assert second.connect(clean_session=False) == "accepted"
    world.emulator.publish_command("well-0751", "reset", {"n": 1}, qos=1)
    assert second.pump(lambda: second.messages), second.outcome
    assert second.messages[0].topic == "fleetkey/well-0751/commands/reset"
    # ...and a third one takes it over from the connected second (DUPLICATE_CLIENTID)
    third = Device(world, "well-0751", first.certfile, first.keyfile)
    assert third.connect(clean_session=False) == "accepted"
    assert second.pump(lambda: second.outcome != "accepted")
    world.emulator.publish_command("well-0751", "rotate", {"n": 2}, qos=1)
    assert third.pump(lambda: third.messages), third.outcome
    assert "well-0751" in world.emulator.connected_clients()
    # (left connected: the emulator's shutdown closes it)


def test_a_ca_registered_while_the_emulator_runs_is_trusted_at_once(world):
    globex = CertificateAuthority.create("globex-2026")
    world.stack.register_ca(globex)
    world.stack.allowlist.add(
        AllowlistEntry(
            device_id="well-0801",
            serial_number="SN-well-0801",
            manufacturer_ca="globex-2026",
            profile="telemetry-sensor",
        ),
        actor="test",
    )
    device = factory_device(world, "well-0801", authority=globex)
    assert device.connect() == "refused: Not authorized"  # registered just in time, not TLS
    assert world.emulator.drain(TIMEOUT)
    assert device.connect() == "accepted"


# ---- the rules engine alone -------------------------------------------------------------------


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, event, context):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"transient {self.calls}")
        return {"ok": event["n"], "request": context.aws_request_id}


@pytest.mark.parametrize(
    "failures, status, attempts", [(0, "succeeded", 1), (2, "succeeded", 3), (5, "failed", 3)]
)
def test_functions_are_retried_twice_like_lambda_async_invocations(failures, status, attempts):
    function = Flaky(failures)
    engine = RulesEngine(
        [Rule.select_all("r", "SELECT * FROM 'a/+/b'", function)], retry_delays=(0, 0)
    )
    try:
        assert [r.name for r in engine.dispatch("a/1/b", b'{"n": 1}')] == ["r"]
        assert engine.dispatch("a/1/c", b'{"n": 2}') == []
        assert engine.drain(5)
        [invocation] = engine.invocations
        assert (invocation.status, invocation.attempts) == (status, attempts)
        assert function.calls == attempts
        if status == "succeeded":
            assert invocation.result == {"ok": 1, "request": invocation.request_id}
        else:
            assert invocation.error == "RuntimeError: transient 3"
    finally:
        engine.close()


def test_rules_read_their_sql_and_match_topics_as_aws_iot_does():
    assert topic_filter_of(REGISTRATION_RULE_SQL) == "$aws/events/certificates/registered/+"
    with pytest.raises(ValueError):
        Rule("r", "SELECT a FROM 'x'", "x")
    with pytest.raises(ValueError):
        Rule("r", "SELECT * FROM 'x/#'", "y/#")
    assert topic_matches("$aws/events/presence/connected/+", "$aws/events/presence/connected/c1")
    assert not topic_matches("#", "$aws/events/presence/connected/c1")
    assert topic_matches("fleetkey/+/events/#", "fleetkey/d/events/a/b")
    assert topic_matches("fleetkey/+/events/#", "fleetkey/d/events")
    assert not topic_matches("fleetkey/+/events/#", "fleetkey/d/telemetry/x")
    registration = next(r for r in RULES if r.name == "registration")
    assert registration.function == "registration" and registration.sql == REGISTRATION_RULE_SQL
    # Events that are not JSON objects never reach a function
    engine = RulesEngine([Rule.select_all("r", "SELECT * FROM 'x'", Flaky(0))])
    engine.dispatch("x", b"\x00binary")
    assert engine.drain(1) and engine.invocations == []
    assert engine.statistics()["not_json"] == 1
    engine.close()
