"""Validation benchmark: AWS calls per validation request, per validated token (the device's
answer) and per result read, and end-to-end validation latency, through the local stack.

    .venv/bin/python benchmarks/validations.py [--devices N] [--rounds R] [--latency L]
                                               [--json FILE]

Runs the local stack as `make demo` does: moto on 127.0.0.1, the real functions behind the local
API gateway (HTTP; the relying party signs with SigV4), pumps connected to the local AWS IoT Core
over MQTT/TLS. First, per device and round, one step at a time so that each step's AWS calls are
its own (botocore's before-call events on the functions' session):

- request: `POST /v1/validations` (the device's credential, the record, the iot-data Publish);
- answer: the pump hears the command over MQTT and answers at `POST /v1/token` (a warm token:
  KMS Sign and the one transaction; a device's first on the warm function also reads the device;
  the function's very first invocation is cold and reported apart);
- read: `GET /v1/validations/{id}` once decided.

Then end to end, as an application runs it: `POST`, then `GET ?wait=20` while the pump answers
in a thread of its own; the latency from the request to the validated result, over `--latency`
validations. Exits 1 if a request costs more than 3 AWS calls, a warm answer more than 2, a read
more than 1, or any validation did not end validated.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fleetkey_local.api_gateway import LocalApiGateway, local_relying_party
from fleetkey_local.fleet import PUMP_FIRMWARE
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.iot import certificate_id
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory
from fleetkey_local.validation_phase import (
    DOSE_CHANGE,
    THERAPY,
    AnsweringDevice,
    Application,
    MqttCommands,
    NotVerified,
    percentile,
    signed_transport,
)

BUDGETS = {"request, cold invocation": 3, "request": 3, "answer, warm": 2, "read": 1}
ORDER = [
    "request, cold invocation",
    "request",
    "answer, cold invocation",
    "answer, device's first (warm function)",
    "answer, warm",
    "read",
]
RUNNING = {"firmware_version": PUMP_FIRMWARE[0], "firmware_sha256": PUMP_FIRMWARE[1]}
COMMAND_TIMEOUT = 10.0
# The AWS IoT rule that delivers a connection's presence event (to rotation_events).
PRESENCE_RULE = "presence_connected"


class Pump:
    def __init__(self, device_id: str, key: Any, certificate_pem: str, files: Path) -> None:
        self.device_id = device_id
        self.key = key
        self.certificate_id = certificate_id(certificate_pem)
        self.certfile, self.keyfile = files / f"{device_id}.crt", files / f"{device_id}.key"
        self.certfile.write_text(certificate_pem)
        self.keyfile.write_text(key_pem(key))


class Steps:
    """Each step's samples: wall milliseconds and the AWS calls made, by step name."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, list[str]]]] = {}

    def add(self, name: str, milliseconds: float, calls: list[str]) -> None:
        self.samples.setdefault(name, []).append((milliseconds, calls))

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, rows in self.samples.items():
            counts = [len(calls) for _, calls in rows]
            wall = [ms for ms, _ in rows]
            out[name] = {
                "n": len(rows),
                "calls_min": min(counts),
                "calls_max": max(counts),
                "ms_p50": statistics.median(wall),
                "ms_p95": percentile(wall, 0.95),
                "by_operation": dict(Counter(c for _, calls in rows for c in calls)),
            }
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="validations per device, by step")
    parser.add_argument("--latency", type=int, default=50, help="validations end to end")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sink = io.StringIO()  # the handlers' own output (logs) stays out of the report
    with local_aws() as endpoint, tempfile.TemporaryDirectory() as state:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        os.environ.update(stack.environment())
        acme = CertificateAuthority.create("acme")
        stack.register_ca(acme)
        files = Path(state)
        pumps = []
        for i in range(args.devices):
            device_id = f"pump-{i:04d}"
            key, certificate, event = stack.manufacture(
                acme, device_id, profile="infusion-pump", actor="bench"
            )
            assert stack.register(event).accepted
            pumps.append(Pump(device_id, key, pem(certificate), files))
        with LocalApiGateway(0) as api, contextlib.redirect_stdout(sink):
            os.environ["FLEETKEY_ISSUER"] = api.url
            emulator = IotCoreEmulator(files / "iot", port=0, endpoint_url=endpoint)
            emulator.start()
            try:
                results = _run(args, api, emulator, pumps)
            finally:
                emulator.stop()
    return _report(results, args.json)


def _run(
    args: argparse.Namespace, api: LocalApiGateway, emulator: IotCoreEmulator, pumps: list[Pump]
) -> dict[str, Any]:
    app = Application(signed_transport(api.url, local_relying_party()), api.url)
    listeners = {
        pump.device_id: MqttCommands(
            MqttDevice(
                pump.device_id,
                pump.certfile,
                pump.keyfile,
                emulator.endpoint_ca_path,
                emulator.address,
            ),
            pump.device_id,
        ).open()
        for pump in pumps
    }
    _settle(emulator, pumps)
    counter = AwsCallCounter().watch_default_session()
    steps, problems = Steps(), []
    answered: set[str] = set()
    for round_number in range(args.rounds):
        for pump in pumps:
            listener = listeners[pump.device_id]
            counter.reset()
            started = time.perf_counter()
            created = app.request(pump.device_id)
            kind = "request" if answered or round_number else "request, cold invocation"
            steps.add(kind, (time.perf_counter() - started) * 1000, counter.reset())
            if created.status != 201:
                problems.append(f"{pump.device_id}: request answered {created.status}")
                continue
            validation_id = created.body["validation_id"]
            command = listener.next_command(COMMAND_TIMEOUT)
            if command is None or command.get("validation_id") != validation_id:
                problems.append(f"{pump.device_id}: no command over MQTT")
                continue
            device = AnsweringDevice(pump, api.url, listener, RUNNING)
            counter.reset()
            started = time.perf_counter()
            answer = device.answer(command)
            elapsed, calls = (time.perf_counter() - started) * 1000, counter.reset()
            if round_number == 0 and not answered:
                kind = "answer, cold invocation"
            elif pump.device_id not in answered:
                kind = "answer, device's first (warm function)"
            else:
                kind = "answer, warm"
            steps.add(kind, elapsed, calls)
            answered.add(pump.device_id)
            if answer.status != 200:
                problems.append(f"{pump.device_id}: answer {answer.status} {answer.body}")
            started = time.perf_counter()
            result = app.result(validation_id)
            steps.add("read", (time.perf_counter() - started) * 1000, counter.reset())
            if result.body.get("status") != "validated":
                problems.append(f"{pump.device_id}: result {result.body.get('status')}")
    end_to_end: list[float] = []
    e2e_calls: list[int] = []
    devices = [
        AnsweringDevice(pump, api.url, listeners[pump.device_id], RUNNING).start() for pump in pumps
    ]
    try:
        for number in range(args.latency):
            device = devices[number % len(devices)]
            counter.reset()
            done = app.validate(device.device_id, within=20)
            e2e_calls.append(len(counter.reset()))
            if done.status != "validated":
                problems.append(f"{device.device_id}: end to end {done.status}")
                continue
            end_to_end.append(done.seconds * 1000)
            try:
                app.verify(
                    done.result.body["token"],
                    validation_id=done.validation_id,
                    device_id=device.device_id,
                    purpose=DOSE_CHANGE,
                    audience=THERAPY,
                )
            except NotVerified as exc:
                problems.append(f"{device.device_id}: the token did not verify: {exc}")
    finally:
        for device in devices:
            device.stop()
    return {
        "operations": steps.summary(),
        "end_to_end": {
            "n": len(end_to_end),
            "ms_p50": statistics.median(end_to_end) if end_to_end else None,
            "ms_p95": percentile(end_to_end, 0.95) if end_to_end else None,
            "calls_min": min(e2e_calls, default=0),
            "calls_max": max(e2e_calls, default=0),
        },
        "problems": problems,
    }


def _settle(emulator: IotCoreEmulator, pumps: list[Pump], timeout: float = 30.0) -> None:
    """Wait until AWS IoT's presence rule has handled every pump's `connected` event (the
    rotation_events function reads the device): its calls are not the validations'."""
    certificates = {pump.certificate_id for pump in pumps}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {
            i.event.get("principalIdentifier")
            for i in list(emulator.invocations)
            if i.rule == PRESENCE_RULE
        }
        if certificates <= seen:
            break
        time.sleep(0.01)
    emulator.drain(timeout)


def _report(results: dict[str, Any], out: Path | None) -> int:
    operations = results["operations"]
    over = [
        f"{name}: {operations[name]['calls_max']} AWS calls (budget {budget})"
        for name, budget in BUDGETS.items()
        if name in operations and operations[name]["calls_max"] > budget
    ]
    missing = [name for name in ("request", "answer, warm", "read") if name not in operations]
    results["over_budget"] = over + [f"{name}: not measured" for name in missing]
    print("| step | n | AWS calls | budget | wall ms p50 / p95 | calls |")
    print("|---|---:|---:|---:|---:|---|")
    for name in sorted(operations, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        row = operations[name]
        calls = (
            str(row["calls_min"])
            if row["calls_min"] == row["calls_max"]
            else f"{row['calls_min']}-{row['calls_max']}"
        )
        by = ", ".join(f"{op} {n / row['n']:g}" for op, n in sorted(row["by_operation"].items()))
        print(
            f"| {name} | {row['n']} | {calls} | {BUDGETS.get(name, '-')} | "
            f"{row['ms_p50']:.1f} / {row['ms_p95']:.1f} | {by} |"
        )
    e2e = results["end_to_end"]
    if e2e["n"]:
        print(
            f"| end to end (POST, MQTT command, answer, GET ?wait=20) | {e2e['n']} | "
            f"{e2e['calls_min']}-{e2e['calls_max']} | - | "
            f"{e2e['ms_p50']:.1f} / {e2e['ms_p95']:.1f} | all functions |"
        )
    for problem in results["problems"]:
        print(f"problem: {problem}")
    failed = bool(results["over_budget"] or results["problems"])
    print(
        "budget: "
        + (
            "EXCEEDED: " + "; ".join(results["over_budget"])
            if results["over_budget"]
            else "ok (request at most 3 calls, warm answer 2, read 1)"
        )
    )
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
