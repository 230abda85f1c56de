"""Commands to devices and closing their connections (iot-data Publish and DeleteConnection)
end to end: fleetkey's DeviceChannel against the local stack's endpoint, real paho-mqtt devices
over mutual TLS to the local AWS IoT Core emulator, onboarded by just-in-time registration."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleetkey.adapters.iot import IotRegistry
from fleetkey.adapters.iot_data import DeviceChannel
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey_local import iot
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.rules import PRESENCE_CONNECTED_RULE_SQL, RULES, Rule
from fleetkey_local.server import local_aws
from fleetkey_local.stack import REGION, EmbeddedStack, client_factory
from tests.support.recorder import Recorder

pytestmark = pytest.mark.xdist_group("iot-core")

TIMEOUT = 10.0
PRESENCE_DISCONNECTED_RULE_SQL = "SELECT * FROM '$aws/events/presence/disconnected/+'"


@dataclass
class World:
    stack: EmbeddedStack
    emulator: IotCoreEmulator
    channel: DeviceChannel
    registry: IotRegistry
    acme: CertificateAuthority
    tmp: Path
    presence: Recorder
    devices: list[MqttDevice] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iot-connection-control")
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        acme = CertificateAuthority.create("acme-connection-control")
        stack.register_ca(acme)
        presence = Recorder()
        rules = [
            *RULES,
            Rule.select_all("presence_double", PRESENCE_CONNECTED_RULE_SQL, presence),
            Rule.select_all(
                "presence_disconnected_double", PRESENCE_DISCONNECTED_RULE_SQL, presence
            ),
        ]
        emulator = IotCoreEmulator(tmp / "state", port=0, rules=rules, endpoint_url=endpoint)
        emulator.start()
        # What a function builds from its settings (FLEETKEY_IOT_DATA_ENDPOINT = the endpoint)
        channel = DeviceChannel(endpoint_url=endpoint, region=REGION)
        registry = IotRegistry(client=stack.make_client("iot"))
        world = World(stack, emulator, channel, registry, acme, tmp, presence)
        try:
            yield world
        finally:
            for device in world.devices:
                device.close()
            emulator.stop()


def onboard(world: World, device_id: str) -> MqttDevice:
    """An allow-listed device, registered just in time on its first connection; connected."""
    world.stack.allowlist.add(
        AllowlistEntry(
            device_id=device_id,
            serial_number=f"SN-{device_id}",
            manufacturer_ca=world.acme.name,
            profile="telemetry-sensor",
        ),
        actor="test",
    )
    key, certificate = world.acme.issue_device(device_id, serial_number=f"SN-{device_id}")
    certfile = world.tmp / f"{device_id}.crt"
    keyfile = world.tmp / f"{device_id}.key"
    certfile.write_text(pem(certificate) + world.acme.pem)  # JITR wants the CA after it
    keyfile.write_text(key_pem(key))
    device = MqttDevice(
        device_id, certfile, keyfile, world.emulator.endpoint_ca_path, world.emulator.address
    )
    world.devices.append(device)
    assert device.connect().startswith("refused")
    assert world.emulator.drain(TIMEOUT)
    assert device.connect() == "accepted"
    return device


def certificate_id(device: MqttDevice) -> str:
    end = "-----END CERTIFICATE-----"
    return iot.certificate_id(device.certfile.read_text().split(end)[0] + end + "\n")


def test_a_command_reaches_the_device_subscribed_to_its_commands(world):
    device = onboard(world, "gauge-0001")
    assert device.subscribe("fleetkey/gauge-0001/commands/+") == [1]

    world.channel.send_command("gauge-0001", "reset", {"reason": "decommissioned"})
    world.channel.send_command("gauge-0001", "validate", {"nonce": "n-1"})

    assert device.pump(lambda: len(device.messages) == 2), device.outcome
    received = {m.topic: json.loads(m.payload) for m in device.messages}
    assert received == {
        "fleetkey/gauge-0001/commands/reset": {"reason": "decommissioned"},
        "fleetkey/gauge-0001/commands/validate": {"nonce": "n-1"},
    }
    assert {m.qos for m in device.messages} == {1}


def test_disconnect_closes_the_devices_connection_at_once(world):
    device = onboard(world, "gauge-0002")

    started = time.monotonic()
    assert world.channel.disconnect("gauge-0002") is True

    assert device.pump(lambda: device.outcome != "accepted", 2.0)
    assert time.monotonic() - started < 2.0
    assert device.outcome.startswith("disconnected"), device.outcome
    assert "gauge-0002" not in world.emulator.connected_clients()
    event = world.presence.wait_for(
        lambda e: e["clientId"] == "gauge-0002" and e["eventType"] == "disconnected"
    )
    assert event["disconnectReason"] == "API_INITIATED_DISCONNECT"
    assert event["clientInitiatedDisconnect"] is False
    assert event["principalIdentifier"] == certificate_id(device)
    # Not connected any more: AWS IoT's ResourceNotFoundException
    assert world.channel.disconnect("gauge-0002") is False


def test_a_device_that_is_not_connected_is_not_disconnected(world):
    assert world.channel.disconnect("gauge-nobody") is False


def test_a_suspended_device_is_cut_off_at_once_and_cannot_reconnect_until_resumed(world):
    device = onboard(world, "gauge-0003")
    cert_id = certificate_id(device)

    # Suspend on the AWS IoT side: the certificate INACTIVE (AWS IoT closes the connections of a
    # certificate moved out of ACTIVE only within minutes), then the connection closed now
    assert world.registry.set_certificate_status(cert_id, "INACTIVE")
    assert world.channel.disconnect("gauge-0003") is True
    assert device.pump(lambda: device.outcome != "accepted", 2.0)

    assert device.connect().startswith("refused")
    assert world.emulator.statistics()["connections"]["refused"].get("certificate_inactive", 0)

    # Resume: the certificate ACTIVE again, and the device connects
    assert world.registry.set_certificate_status(cert_id, "ACTIVE")
    assert device.connect() == "accepted"


def test_disconnect_discards_a_persistent_session(world):
    device = onboard(world, "gauge-0004")
    device.close()
    assert device.connect(clean_session=False) == "accepted"
    assert device.subscribe("fleetkey/gauge-0004/commands/#") == [1]

    # Control: a connection closed with its session kept (cleanSession=False) gets the command
    # queued meanwhile on reconnecting, without subscribing again
    assert world.emulator.disconnect("gauge-0004", clean_session=False)
    assert device.pump(lambda: device.outcome != "accepted", 2.0)
    world.channel.send_command("gauge-0004", "rotate", {"n": 1})
    assert device.connect(clean_session=False) == "accepted"
    assert device.pump(lambda: device.messages), device.outcome
    assert device.messages[-1].topic == "fleetkey/gauge-0004/commands/rotate"

    # fleetkey's disconnect discards the session: nothing queued for the device in its old
    # standing reaches it later, and its subscriptions are gone
    assert world.channel.disconnect("gauge-0004") is True
    assert device.pump(lambda: device.outcome != "accepted", 2.0)
    world.channel.send_command("gauge-0004", "reset", {"n": 2})
    device.messages.clear()
    assert device.connect(clean_session=False) == "accepted"
    world.channel.send_command("gauge-0004", "rotate", {"n": 3})
    assert not device.pump(lambda: device.messages, 0.5)
