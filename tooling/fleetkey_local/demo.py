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
from pathlib import Path

from fleetkey_cli.client import AdminClient, SigV4Transport, local_credentials
from fleetkey_local.api_gateway import LocalApiGateway
from fleetkey_local.fleet import IotTransport, SimulatedDevice, build_fleet, lifecycle_phases
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.iot import connect_refusal
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import key_pem
from fleetkey_local.server import local_aws
from fleetkey_local.simulator import Simulation
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory


class EmulatedIot(IotTransport):
    """AWS IoT's side of a connection, emulated in-process: just-in-time registration delivers
    the certificate-registered event to the registration function, as the IoT rule would."""

    def __init__(self, stack: EmbeddedStack) -> None:
        self._stack = stack
        self._registration = load_function("registration")

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

    def first_connect(self, device: SimulatedDevice) -> dict | None:
        connection = self._device(device)
        outcome = connection.connect()
        connection.close()
        if outcome == "accepted":
            return {"status": "already registered"}
        self._emulator.drain(timeout=60)
        for invocation in reversed(self._emulator.invocations):
            if invocation.event.get("certificateId") == device.certificate_id:
                return invocation.result
        return None  # refused at connection, no registration event

    def connect(self, device: SimulatedDevice, client_id: str | None = None) -> str | None:
        connection = self._device(device)
        outcome = connection.connect(client_id)
        connection.close()
        return None if outcome == "accepted" else outcome


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
        with LocalApiGateway(port=0) as api, tempfile.TemporaryDirectory() as state:
            print(f"local API at {api.url}")
            # The issuer is the API's address; functions read it when they first run.
            os.environ["FLEETKEY_ISSUER"] = api.url
            # The operator uses the admin API over HTTP, signed with SigV4, like the CLI.
            admin = AdminClient(SigV4Transport(api.url, REGION, credentials=local_credentials()))
            simulation = Simulation(progress=not args.no_progress)
            if args.in_process_iot:
                return simulation.run(lifecycle_phases(admin, EmulatedIot(stack), fleet, api.url))
            emulator = IotCoreEmulator(Path(state), port=0, account=ACCOUNT, region=REGION)
            emulator.start()
            try:
                host, port = emulator.address[0], emulator.address[1]
                print(f"local AWS IoT Core (MQTT over TLS) at {host}:{port}")
                devices_dir = Path(state) / "devices"
                devices_dir.mkdir()
                transport = MqttIot(emulator, devices_dir)
                return simulation.run(lifecycle_phases(admin, transport, fleet, api.url))
            finally:
                emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
