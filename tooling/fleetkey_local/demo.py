"""`make demo`: a fleet lives through its lifecycle on the local stack, with the real functions.

    python -m fleetkey_local.demo [--devices N] [--no-progress]

Everything runs on this machine against moto on 127.0.0.1. Exits non-zero if any expectation of
any phase failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from botocore.credentials import Credentials

from fleetkey_cli.client import AdminClient, SigV4Transport, local_credentials
from fleetkey_local.api_gateway import LocalApiGateway, local_relying_party
from fleetkey_local.fleet import (
    IotTransport,
    LocalCloud,
    Operator,
    RelyingParty,
    SimulatedDevice,
    TamperReport,
    build_fleet,
    lifecycle_phases,
    tamper_topic,
)
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.iot import connect_refusal
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import key_pem
from fleetkey_local.rules import RULES, Invocation
from fleetkey_local.server import local_aws
from fleetkey_local.simulator import Simulation
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory

# What a device reports when its enclosure is opened.
TAMPER_PAYLOAD = {"sensor": "enclosure", "state": "opened"}
RULE_TIMEOUT = 60.0
# The rule AWS IoT's presence `connected` events go to (rotation commits on it).
PRESENCE_RULE = "presence_connected"


def presence_connected_event(client_id: str, certificate_id: str) -> dict:
    """The event AWS IoT publishes on `$aws/events/presence/connected/<clientId>`."""
    return {
        "clientId": client_id,
        "timestamp": int(time.time() * 1000),
        "eventType": "connected",
        "sessionIdentifier": str(uuid.uuid4()),
        "principalIdentifier": certificate_id,
        "ipAddress": "127.0.0.1",
        "versionNumber": 0,
    }


class EmulatedIot(IotTransport):
    """AWS IoT's side of a connection, emulated in-process: just-in-time registration delivers
    the certificate-registered event to the registration function, as the IoT rule would."""

    def __init__(self, stack: EmbeddedStack) -> None:
        self._stack = stack
        self._registration = load_function("registration")
        self._device_events = load_function("device_events")
        self._tamper_rule = next(rule for rule in RULES if rule.name == "tamper")
        self._presence_rule = next(rule for rule in RULES if rule.name == PRESENCE_RULE)
        self._rotation_events = load_function("rotation_events")

    def first_connect(self, device: SimulatedDevice) -> dict | None:
        event = self._stack.first_connect(device.certificate_pem, device.authority.pem)
        if event is None:
            return None
        return self._registration.handler(event, LambdaContext())

    def connect(self, device: SimulatedDevice, client_id: str | None = None) -> str | None:
        try:
            return connect_refusal(
                self._stack.harness_iot, device.certificate_id, client_id or device.device_id
            )
        except self._stack.harness_iot.exceptions.ResourceNotFoundException:
            return "unknown certificate"

    def connect_and_settle(self, device: SimulatedDevice) -> tuple[str | None, Any]:
        """As `connect`; an accepted connection's presence event goes to the rotation_events
        function, as AWS IoT's presence rule delivers it."""
        refusal = self.connect(device)
        if refusal is not None:
            return refusal, None
        event = self._presence_rule.event(
            f"$aws/events/presence/connected/{device.device_id}",
            presence_connected_event(device.device_id, device.certificate_id),
        )
        return None, self._rotation_events.handler(event, LambdaContext())

    def report_tamper(self, device: SimulatedDevice) -> TamperReport:
        """The tamper rule's event (its SQL applied to the report), to the device_events
        function, as AWS IoT's rule would deliver it."""
        topic = tamper_topic(device.device_id)
        event = self._tamper_rule.event(topic, TAMPER_PAYLOAD)
        return TamperReport(self._device_events.handler(event, LambdaContext()))


class MqttIot(IotTransport):
    """Devices connect to the local AWS IoT Core over MQTT with mutual TLS, as firmware would."""

    def __init__(self, emulator: IotCoreEmulator, files: Path) -> None:
        self._emulator = emulator
        self._files = files

    def _device(self, device: SimulatedDevice) -> MqttDevice:
        stem = self._files / f"{device.device_id}-{device.certificate_id[:12]}"
        certfile, keyfile = stem.with_suffix(".crt"), stem.with_suffix(".key")
        if not certfile.exists():
            certfile.write_text(device.certificate_pem)
            keyfile.write_text(key_pem(device.key))
        return MqttDevice(
            device.device_id,
            certfile,
            keyfile,
            self._emulator.endpoint_ca_path,
            self._emulator.address,
        )

    def connection(self, device: SimulatedDevice) -> MqttDevice:
        """A new MQTT connection of the device with its current certificate (not yet open)."""
        return self._device(device)

    def first_connect(self, device: SimulatedDevice) -> dict | None:
        seen = len(self._emulator.invocations)
        connection = self._device(device)
        outcome = connection.connect()
        connection.close()
        if outcome == "accepted":
            return {"status": "already registered"}
        self._emulator.drain(timeout=RULE_TIMEOUT)
        # Only this connection's event: a recommissioned device registered before.
        for invocation in reversed(self._emulator.invocations[seen:]):
            if invocation.event.get("certificateId") == device.certificate_id:
                return invocation.result
        return None  # refused at connection, no registration event

    def report_tamper(self, device: SimulatedDevice) -> TamperReport:
        """The device connects and publishes its report; AWS IoT's tamper rule invokes the
        device_events function, which suspends the device and closes this very connection."""
        seen = len(self._emulator.invocations)
        connection = self._device(device)
        if connection.connect() != "accepted":
            connection.close()
            return TamperReport(None, False)
        connection.publish(tamper_topic(device.device_id), TAMPER_PAYLOAD)
        invocation = self._invocation(
            seen, lambda i: i.rule == "tamper" and i.event.get("device_id") == device.device_id
        )
        cut_off = HeldMqtt(connection).cut_off()
        connection.close()
        return TamperReport(invocation.result if invocation else None, cut_off)

    def _invocation(self, seen: int, match: Callable[[Invocation], bool]) -> Invocation | None:
        """The rules' invocation matching `match` among those after the first `seen`, once
        every queued invocation finished (the broker hands a message to the rules after
        acknowledging it, so it may not be queued yet)."""
        deadline = time.monotonic() + RULE_TIMEOUT
        while time.monotonic() < deadline:
            found = [i for i in self._emulator.invocations[seen:] if match(i)]
            if found:
                self._emulator.drain(timeout=RULE_TIMEOUT)
                return found[-1]
            time.sleep(0.005)
        return None

    def hold(self, device: SimulatedDevice) -> HeldMqtt:
        """The device connected and subscribed to its commands, until `close`."""
        connection = self._device(device)
        if connection.connect() == "accepted":
            connection.subscribe(f"fleetkey/{device.device_id}/commands/#")
        return HeldMqtt(connection)

    def connect(self, device: SimulatedDevice, client_id: str | None = None) -> str | None:
        connection = self._device(device)
        outcome = connection.connect(client_id)
        connection.close()
        return None if outcome == "accepted" else outcome

    def connect_and_settle(self, device: SimulatedDevice) -> tuple[str | None, Any]:
        """As `connect`, then the presence rule's invocation for this connection (its
        `connected` event names the certificate), once finished: its result."""
        seen = len(self._emulator.invocations)
        refusal = self.connect(device)
        rule = next((r for r in self._emulator.rules.rules if r.name == PRESENCE_RULE), None)
        if refusal is not None or rule is None or rule.function is None:
            return refusal, None
        invocation = self._invocation(
            seen,
            lambda i: (
                i.rule == PRESENCE_RULE
                and i.event.get("principalIdentifier") == device.certificate_id
            ),
        )
        return None, invocation.result if invocation else None


class HeldMqtt:
    """An open MQTT connection of a device (`fleet.HeldConnection`)."""

    def __init__(self, connection: MqttDevice) -> None:
        self._connection = connection

    def cut_off(self, timeout: float = 5.0) -> bool:
        connection = self._connection
        connection.pump(lambda: connection.outcome != "accepted", timeout)
        return (connection.outcome or "").startswith("disconnected")

    def commands(self) -> list[str]:
        return [message.topic for message in self._connection.messages]

    def close(self) -> None:
        self._connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetkey-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="fleet size (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--in-process-iot",
        action="store_true",
        help="emulate AWS IoT's side without MQTT (faster, no network)",
    )
    args = parser.parse_args(argv)
    print(f"fleetkey demo: manufacturing {args.devices} devices ...", flush=True)
    fleet = build_fleet(args.devices)
    with local_aws() as endpoint:
        print(f"local AWS (moto) at {endpoint}")
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        # The functions read the provisioned queue and data-key KMS key from their environment.
        os.environ.update(stack.environment())
        with LocalApiGateway(port=0) as api, tempfile.TemporaryDirectory() as state:
            print(f"local API at {api.url}")
            # The issuer is the API's address; functions read it when they first run.
            os.environ["FLEETKEY_ISSUER"] = api.url
            # The operator uses the admin API over HTTP, signed with SigV4, like the CLI; a
            # relying party introspects with its own IAM identity.
            operator = SigV4Transport(api.url, REGION, credentials=local_credentials())
            admin = AdminClient(operator)
            relying_party = local_relying_party()
            simulation = Simulation(progress=not args.no_progress)
            cloud = LocalCloud(
                Operator(operator),
                RelyingParty(
                    SigV4Transport(
                        api.url,
                        REGION,
                        credentials=Credentials(relying_party.access_key, relying_party.secret_key),
                    )
                ),
                stack,
                # A backend's own KMS client, from boto3's default session: made after the
                # simulation started counting that session's calls, so its calls count.
                boto3.client("kms"),
            )
            if args.in_process_iot:
                return simulation.run(
                    lifecycle_phases(admin, EmulatedIot(stack), fleet, api.url, cloud)
                )
            emulator = IotCoreEmulator(Path(state), port=0, account=ACCOUNT, region=REGION)
            emulator.start()
            try:
                host, port = emulator.address[0], emulator.address[1]
                print(f"local AWS IoT Core (MQTT over TLS) at {host}:{port}")
                devices_dir = Path(state) / "devices"
                devices_dir.mkdir()
                transport = MqttIot(emulator, devices_dir)
                return simulation.run(lifecycle_phases(admin, transport, fleet, api.url, cloud))
            finally:
                emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
