"""Lifecycle benchmark: AWS calls and CPU time per lifecycle operation, and how the calls of
suspend, resume and teardown grow with the certificates a device holds.

    .venv/bin/python benchmarks/lifecycle.py [--devices N] [--cert-devices M] [--json PATH]

Runs the core services the lifecycle functions call (`LifecycleService`, `DataKeyService`, as the
embedded stack composes them) against moto in this process (`mock_aws`), for N devices that are
manufactured, registered through JITR and given their assertions before timing. Per operation:

  * AWS calls the services make (`AwsCallCounter` on the services' own clients; the harness's
    clients, which set up and check AWS IoT, are not counted),
  * CPU time (`time.process_time`): moto answers in the calling thread, so this includes moto's
    emulation of AWS and is an upper bound of the service's own CPU; the relative figures and the
    call counts are what this benchmark is for,
  * wall time (perf_counter), indicative only.

Operations, in this order over the same N devices: data key (first request of a life, then a
warm one, both device-side `for_device`), the backend's data-key read (`for_backend`), suspend,
resume, decommission (the admin side: transition + queued teardown), teardown (`converge` of the
decommissioned device: the converge function's work), recommission.

Certificates: a device today holds its factory certificate. For 2 and 3 certificates, M devices
per count are given extra certificates as a rotation will: issued by another CA, registered in
AWS IoT (ACTIVE, the profile's policy attached, attached to the thing) and recorded in the
device's set by the device repository (`DeviceChange(certificates=...)`, role pending, origin
issued). Their suspend, resume and teardown are measured (these devices hold no data key: the
teardown's data-key step is one Query, + 1 DeleteItem per key).

Exit status 1 when an operation exceeds its AWS call budget (`BUDGET`, `PER_CERTIFICATE`) or did
not end as expected (state, AWS IoT, data key).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetkey_local.benchmarking import percentile

# AWS calls of a device holding n certificates: fixed + per_certificate * n, as measured (the
# steps are fleetkey.services.lifecycle's; the calls per step, fleetkey.adapters.iot's):
#   suspend:  GetItem, TransactWriteItems (decide); converge: GetItem, per certificate
#             DescribeCertificate + UpdateCertificate, DeleteConnection, GetItem (moved
#             meanwhile?); GetItem (the device returned)                            -> 6 + 2n
#   resume:   as suspend without DeleteConnection                                  -> 5 + 2n
#   teardown: round 1: GetItem; fence (GetItem: still this teardown?); Publish (reset); per
#             certificate DescribeCertificate + UpdateCertificate (to INACTIVE); DeleteConnection;
#             per certificate a fence GetItem, then DescribeCertificate, ListAttachedPolicies,
#             DetachPolicy, ListPrincipalThings, DetachThingPrincipal, DeleteCertificate; fence,
#             DescribeThing, ListThingPrincipals, DeleteThing; fence, Query (data keys) +
#             DeleteItem per key; TransactWriteItems (teardown_completed); round 2: GetItem,
#             GetItem (moved meanwhile?)                                          -> 13 + 9n
#             (+1 DeleteItem per data key held)
PER_CERTIFICATE: dict[str, tuple[int, int]] = {
    "suspend": (6, 2),
    "resume": (5, 2),
    "teardown": (13, 9),
}
# Per operation, for a device with one certificate (its factory one) and, for the teardown, one
# data key.
BUDGET: dict[str, int] = {
    # credential GetItem, assertion TransactWriteItems, key GetItem (miss), GenerateDataKey,
    # device GetItem, TransactWriteItems (key + data_key_created)
    "data_key_first": 6,
    # credential GetItem, assertion TransactWriteItems, key GetItem, Decrypt
    "data_key_warm": 4,
    # device GetItem, key GetItem, TransactWriteItems (the read's data_key_read audit record)
    "data_key_backend": 3,
    "suspend": PER_CERTIFICATE["suspend"][0] + PER_CERTIFICATE["suspend"][1],
    "resume": PER_CERTIFICATE["resume"][0] + PER_CERTIFICATE["resume"][1],
    # GetItem, TransactWriteItems, SendMessage
    "decommission": 3,
    "teardown": PER_CERTIFICATE["teardown"][0] + PER_CERTIFICATE["teardown"][1] + 1,
    # GetItem, DescribeCertificate (the factory certificate's status, for the audit record),
    # TransactWriteItems, DescribeCertificate (its release: gone already after the teardown)
    "recommission": 4,
}
CERTIFICATE_COUNTS = (1, 2, 3)
OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/bench"
BACKEND = "arn:aws:sts::123456789012:assumed-role/telemetry-backend/bench"

TITLES = {
    "data_key_first": "data key, first request of a life (device)",
    "data_key_warm": "data key, warm request (device)",
    "data_key_backend": "data key, backend read (admin)",
    "suspend": "suspend (admin)",
    "resume": "resume (admin)",
    "decommission": "decommission (admin: decide + queue)",
    "teardown": "teardown (converge of a decommissioned device)",
    "recommission": "recommission (admin)",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Operation:
    key: str
    title: str
    calls: list[list[str]] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = [len(c) for c in self.calls]
        sequences = Counter(tuple(sorted(Counter(c).items())) for c in self.calls)
        return {
            "operation": self.title,
            "n": len(self.calls),
            "calls_min": min(counts),
            "calls_max": max(counts),
            "calls_by_operation": [
                {"count": n, "calls": dict(seq)} for seq, n in sequences.most_common()
            ],
            "cpu_ms_p50": percentile(self.cpu_ms, 50),
            "cpu_ms_p95": percentile(self.cpu_ms, 95),
            "cpu_ms_mean": statistics.fmean(self.cpu_ms),
            "wall_ms_p50": percentile(self.wall_ms, 50),
            "wall_ms_p95": percentile(self.wall_ms, 95),
        }


class Meter:
    """Times one call and collects the AWS calls the services' clients made during it."""

    def __init__(self, counter: Any, cpu_clock: Callable[[], float]) -> None:
        self._counter = counter
        self._cpu_clock = cpu_clock

    def measure(self, operation: Operation, call: Callable[[], Any]) -> Any:
        self._counter.reset()
        wall0, cpu0 = time.perf_counter(), self._cpu_clock()
        result = call()
        cpu1, wall1 = self._cpu_clock(), time.perf_counter()
        operation.calls.append(self._counter.reset())
        operation.cpu_ms.append((cpu1 - cpu0) * 1000)
        operation.wall_ms.append((wall1 - wall0) * 1000)
        return result


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """What setup allocated (moto's state, keys, the harness) is kept out of the garbage
    collector's scans while a phase is timed, as it would not be in the function's heap."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---- the benchmark ---------------------------------------------------------------------------


def run(devices: int, cert_devices: int, moto_server: bool = False) -> dict[str, Any]:
    # Offline: fake credentials, no endpoint or profile of the machine's (as the tests do).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.setdefault(name, "testing")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)
    if moto_server:
        from fleetkey_local.server import local_aws

        # moto answers on its own threads: the calling thread's CPU is the services' own
        # (botocore's serialization, HTTP and parsing included, as in Lambda).
        with local_aws() as endpoint:
            return _run(devices, cert_devices, endpoint, time.thread_time)
    from moto import mock_aws

    # use_valid_cert: certificate ids are SHA-256 of the DER, as in AWS IoT.
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        return _run(devices, cert_devices, None, time.process_time)


def _run(
    devices: int,
    cert_devices: int,
    endpoint: str | None,
    cpu_clock: Callable[[], float],
) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from fleetkey.clock import timestamp, utc_now
    from fleetkey.crypto.certificates import certificate_id, describe_key
    from fleetkey.domain.lifecycle import DeviceState
    from fleetkey.domain.models import (
        CertificateOrigin,
        CertificateRole,
        HeldCertificate,
        TeardownStatus,
    )
    from fleetkey.ports import DeviceChange
    from fleetkey_local.data_keys import device_open
    from fleetkey_local.device import client_assertion
    from fleetkey_local.instrument import AwsCallCounter
    from fleetkey_local.pki import CertificateAuthority, pem
    from fleetkey_local.stack import EmbeddedStack, client_factory

    stack = EmbeddedStack(client_factory(endpoint)).provision()
    acme = CertificateAuthority.create("acme")
    stack.register_ca(acme)
    # fleetkey's own issuing CA stands in for the rotation's issuer of operational certificates.
    issuing = CertificateAuthority.create("fleetkey-issuing")
    issuer = stack.settings.issuer
    problems: list[str] = []

    def expect(condition: bool, message: str) -> None:
        if not condition and message not in problems:
            problems.append(message)

    def onboard(device_id: str) -> tuple[Any, str]:
        key, cert, event = stack.manufacture(acme, device_id, actor="bench")
        outcome = stack.register(event)
        if not outcome.accepted:
            raise SystemExit(f"registration of {device_id} refused: {outcome}")
        return key, certificate_id(cert)

    def add_certificates(device_id: str, extra: int) -> list[str]:
        """`extra` more certificates, as a rotation leaves them: in AWS IoT (ACTIVE, policy and
        thing attached) and in the device's set (through the device repository)."""
        factory_arn = stack.store.devices.get(device_id).certificates[0].arn
        policies = [
            p["policyName"]
            for p in stack.harness_iot.list_attached_policies(target=factory_arn)["policies"]
        ]
        held = []
        for index in range(extra):
            _, cert = issuing.issue_device(device_id, serial_number=f"OP-{device_id}-{index}")
            registered = stack.harness_iot.register_certificate_without_ca(
                certificatePem=pem(cert), status="ACTIVE"
            )
            arn = registered["certificateArn"]
            for policy in policies:
                stack.harness_iot.attach_policy(policyName=policy, target=arn)
            stack.harness_iot.attach_thing_principal(thingName=device_id, principal=arn)
            public_key = cert.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            held.append(
                HeldCertificate(
                    certificate_id=registered["certificateId"],
                    role=CertificateRole.PENDING,
                    origin=CertificateOrigin.ISSUED,
                    public_key_pem=public_key.decode(),
                    key=describe_key(cert),
                    not_after=cert.not_valid_after_utc.isoformat(),
                    arn=arn,
                )
            )
        device = stack.store.devices.get(device_id)
        stack.store.devices.apply(
            device,
            DeviceChange(  # the benchmark's stand-in for a rotation's issuance record
                action="certificate_issued",
                actor="bench",
                at=timestamp(utc_now()),
                details={"certificates": [h.certificate_id for h in held]},
                certificates=(*device.certificates, *held),
            ),
        )
        return [c.certificate_id for c in stack.store.devices.get(device_id).certificates]

    def statuses(certificates: list[str]) -> set[str]:
        return {stack.certificate_status(c) for c in certificates}

    def gone_from_iot(device_id: str, certificates: list[str]) -> bool:
        for call, kwargs in [
            (stack.harness_iot.describe_thing, {"thingName": device_id}),
            *((stack.harness_iot.describe_certificate, {"certificateId": c}) for c in certificates),
        ]:
            try:
                call(**kwargs)
            except stack.harness_iot.exceptions.ResourceNotFoundException:
                continue
            return False
        return True

    counter = AwsCallCounter().watch(*stack.service_clients())
    meter = Meter(counter, cpu_clock)
    operations = {key: Operation(key, title) for key, title in TITLES.items()}

    # ---- the fleet: N devices through every operation --------------------------------------
    log(f"manufacturing and registering {devices} devices ...")
    fleet = [f"dev-{i:05d}" for i in range(devices)]
    keys: dict[str, tuple[Any, str]] = {d: onboard(d) for d in fleet}

    def assertions() -> dict[str, str]:
        return {d: client_assertion(k, c, d, issuer) for d, (k, c) in keys.items()}

    log("measuring: data keys")
    for key in ("data_key_first", "data_key_warm"):
        signed = assertions()  # the device's work, before timing
        sealed: dict[str, dict[str, Any]] = {}
        with frozen_heap():
            for d in fleet:
                body = {"client_assertion": signed[d]}
                sealed[d] = meter.measure(
                    operations[key],
                    lambda d=d, body=body: stack.data_keys.for_device(d, body),
                )
        opened = {
            d: device_open(keys[d][0], sealed[d], device_id=d, epoch=1, owner=None) for d in fleet
        }
        expect(all(len(k) == 32 for k in opened.values()), f"{key}: a sealed key did not open")
        if key == "data_key_first":
            first_keys = opened
        else:
            expect(opened == first_keys, "data_key_warm: another key than the first request's")
    with frozen_heap():
        grants = {
            d: meter.measure(
                operations["data_key_backend"],
                lambda d=d: stack.data_keys.for_backend(d, actor=BACKEND),
            )
            for d in fleet
        }
    expect(
        all(g["epoch"] == 1 and g["ciphertext_blob"] for g in grants.values()),
        "data_key_backend: a grant without its blob",
    )

    log("measuring: suspend, resume, decommission, teardown, recommission")
    certificates = {d: [keys[d][1]] for d in fleet}
    lifecycle = stack.lifecycle
    plan: list[tuple[str, Callable[[str], Any], Callable[[str, Any], bool], str]] = [
        (
            "suspend",
            lambda d: lifecycle.suspend(d, reason="benchmark", actor=OPERATOR),
            lambda d, r: (
                r.state is DeviceState.SUSPENDED and statuses(certificates[d]) == {"INACTIVE"}
            ),
            "suspend: device not SUSPENDED with its certificates INACTIVE",
        ),
        (
            "resume",
            lambda d: lifecycle.resume(d, actor=OPERATOR),
            lambda d, r: r.state is DeviceState.ACTIVE and statuses(certificates[d]) == {"ACTIVE"},
            "resume: device not ACTIVE with its certificates ACTIVE",
        ),
        (
            "decommission",
            lambda d: lifecycle.decommission(d, reason="benchmark", actor=OPERATOR),
            lambda d, r: (
                r.state is DeviceState.DECOMMISSIONED
                and r.teardown is not None
                and r.teardown.status is TeardownStatus.PENDING
            ),
            "decommission: device not DECOMMISSIONED with its teardown pending",
        ),
        (
            "teardown",
            lambda d: lifecycle.converge(d),
            lambda d, r: (
                r is True
                and stack.store.devices.get(d).teardown.status is TeardownStatus.COMPLETED
                and gone_from_iot(d, certificates[d])
                and stack.store.data_keys.get(d, 1) is None
            ),
            "teardown: not completed, or something of the device left in AWS IoT or data keys",
        ),
        (
            "recommission",
            lambda d: lifecycle.recommission(d, actor=OPERATOR),
            lambda d, r: r.state is DeviceState.ALLOWLISTED and r.epoch == 2,
            "recommission: device not ALLOWLISTED in epoch 2",
        ),
    ]
    for key, call, check, failure in plan:
        with frozen_heap():
            results = {
                d: meter.measure(operations[key], lambda d=d, call=call: call(d)) for d in fleet
            }
        expect(all(check(d, results[d]) for d in fleet), failure)

    # ---- calls vs certificates held -----------------------------------------------------------
    log(f"measuring: suspend, resume, teardown for {cert_devices} devices x {CERTIFICATE_COUNTS}")
    by_count: dict[str, dict[int, Operation]] = {
        key: {n: Operation(key, f"{key}, {n} certificates") for n in CERTIFICATE_COUNTS}
        for key in PER_CERTIFICATE
    }
    for n in CERTIFICATE_COUNTS:
        group = [f"crt{n}-{i:05d}" for i in range(cert_devices)]
        held = {}
        for d in group:
            onboard(d)
            held[d] = add_certificates(d, n - 1)
            expect(len(held[d]) == n, f"{n} certificates: the device holds {len(held[d])}")
            expect(statuses(held[d]) == {"ACTIVE"}, f"{n} certificates: not all ACTIVE")
        for key, call, check, failure in plan:
            if key == "recommission":
                continue
            certificates.update(held)
            with frozen_heap():
                results = {}
                for d in group:
                    if key in by_count:
                        results[d] = meter.measure(by_count[key][n], lambda d=d, call=call: call(d))
                    else:
                        results[d] = call(d)
            expect(all(check(d, results[d]) for d in group), f"{n} certificates: {failure}")

    counts = {key: {n: op.summary() for n, op in per_n.items()} for key, per_n in by_count.items()}
    return {
        "devices": devices,
        "cert_devices": cert_devices,
        "moto": "server" if endpoint else "mock_aws",
        "operations": {k: op.summary() for k, op in operations.items()},
        "by_certificates": counts,
        "formulas": {key: formula(per_n) for key, per_n in counts.items()},
        "problems": problems,
    }


def formula(per_n: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """calls = fixed + per_certificate * n, from the measured maxima at 1 and 2 certificates,
    and whether 3 certificates fit it."""
    c = {n: s["calls_max"] for n, s in per_n.items()}
    per_certificate = c[2] - c[1]
    fixed = c[1] - per_certificate
    linear = all(
        s["calls_min"] == s["calls_max"] == fixed + per_certificate * n for n, s in per_n.items()
    )
    return {"fixed": fixed, "per_certificate": per_certificate, "linear": linear}


# ---- checks and output ----------------------------------------------------------------------


def check(results: dict[str, Any]) -> list[str]:
    problems = list(results["problems"])
    for key, budget in BUDGET.items():
        op = results["operations"][key]
        if op["calls_max"] > budget:
            problems.append(f"{op['operation']}: {op['calls_max']} AWS calls > budget {budget}")
    for key, (fixed, per_certificate) in PER_CERTIFICATE.items():
        for n, op in results["by_certificates"][key].items():
            budget = fixed + per_certificate * int(n)
            if op["calls_max"] > budget:
                problems.append(
                    f"{key} with {n} certificate(s): {op['calls_max']} AWS calls > budget "
                    f"{budget} ({fixed} + {per_certificate}n)"
                )
    return problems


def _calls(op: dict[str, Any]) -> str:
    low, high = op["calls_min"], op["calls_max"]
    return f"{low}" if low == high else f"{low}-{high}"


def render(results: dict[str, Any]) -> str:
    where = (
        "moto server on 127.0.0.1 (its own threads): CPU is the calling thread's, moto's excluded"
        if results["moto"] == "server"
        else "moto in-process (mock_aws): CPU is the process's, moto's emulation included"
    )
    out = [
        f"Devices: {results['devices']} (every operation), {results['cert_devices']} per "
        f"certificate count; {where}.",
        "",
        "| Operation | n | AWS calls | Budget | CPU ms p50 / p95 | Wall ms p50 / p95 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, op in results["operations"].items():
        out.append(
            f"| {op['operation']} | {op['n']} | {_calls(op)} | {BUDGET[key]} | "
            f"{op['cpu_ms_p50']:.2f} / {op['cpu_ms_p95']:.2f} | "
            f"{op['wall_ms_p50']:.2f} / {op['wall_ms_p95']:.2f} |"
        )
    counts = CERTIFICATE_COUNTS
    out += [
        "",
        "| AWS calls vs certificates held | "
        + " | ".join(f"{n} cert{'s' if n > 1 else ''}" for n in counts)
        + " | Measured formula | Budget |",
        "|---|" + "---:|" * len(counts) + "---|---|",
    ]
    for key, per_n in results["by_certificates"].items():
        f = results["formulas"][key]
        fixed, per_certificate = PER_CERTIFICATE[key]
        measured = f"{key} = {f['fixed']} + {f['per_certificate']}n" + (
            "" if f["linear"] else " (not linear)"
        )
        out.append(
            f"| {key} | "
            + " | ".join(_calls(per_n[n]) for n in counts)
            + f" | {measured} | {fixed} + {per_certificate}n |"
        )
    out += [
        "",
        "n = certificates the device holds (factory + issued). These devices hold no data key: "
        "the teardown's data-key step is 1 Query, + 1 DeleteItem per key (the first table's "
        "devices hold one).",
    ]
    out += ["", "AWS calls per operation (one device):"]
    for op in results["operations"].values():
        for variant in op["calls_by_operation"]:
            share = (
                "" if len(op["calls_by_operation"]) == 1 else f" ({variant['count']} of {op['n']})"
            )
            calls = ", ".join(f"{n} {name}" for name, n in variant["calls"].items())
            out.append(f"- {op['operation']}{share}: {calls}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100, help="devices (default 100)")
    parser.add_argument(
        "--cert-devices",
        type=int,
        default=10,
        help="devices per certificate count for the calls-vs-certificates table (default 10)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--moto-server",
        action="store_true",
        help="run moto as a server on its own threads and time the calling thread only "
        "(time.thread_time), leaving moto's CPU out",
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.cert_devices < 1:
        parser.error("--devices and --cert-devices must be at least 1")
    with contextlib.redirect_stdout(io.StringIO()):  # logs the services print are not the table
        results = run(args.devices, args.cert_devices, args.moto_server)
    problems = check(results)
    results["budget"] = BUDGET
    results["per_certificate_budget"] = {k: list(v) for k, v in PER_CERTIFICATE.items()}
    results["problems"] = problems
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if problems:
        print("\nFAILED:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
        return 1
    print("\nBudget check: OK (every operation within its AWS call budget, and as expected).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
