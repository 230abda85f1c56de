"""Rotation benchmark: AWS calls and CPU time per rotation request, commit (by the connected event
and by call) and scheduled sweep, and proof that the sweep's work follows the certificates that
are due, not the size of the fleet.

    .venv/bin/python benchmarks/rotation.py [--devices M] [--not-due 100,1000] [--due D]
                                            [--json PATH] [--moto-server]

Runs the core service the rotation functions call (`RotationService`, as the embedded stack
composes it; the functions only parse events around it) against moto in this process
(`mock_aws`), as benchmarks/lifecycle.py does, and measures per operation the AWS calls of the
services' own clients (the harness's are not counted), CPU time (`time.process_time`: moto's
emulation included, an upper bound; `--moto-server` runs moto on its own threads and counts the
calling thread only, `time.thread_time`) and wall time (indicative). A device's own work (its new
key, the CSR, the assertions) is done before timing.

1. M devices (registered through JITR with factory certificates) rotate twice: request (CSR +
   assertion by the current key), then commit, alternately by the presence `connected` event
   (`on_connected`) and by call (`commit`, an assertion by the new key). The first commit retires
   a factory certificate; the second retires one fleetkey issued, which is revoked and the CRL
   published again.
2. The fleet is filled to the first `--not-due` size with devices that rotated once (nothing due
   for months: renewal at two thirds of a year, their retired factory certificate deleted after 7
   days). Then, per size, the scheduled sweep (`sweep(now)`) is measured with nothing due, and
   with D devices due for each kind of work, each kind alone:
   - renewal: D devices with their factory certificate (due at once: their profile replaces
     it), swept now: a `rotate` command each;
   - rollback: D devices with a pending rotation, swept past its commit deadline: the rotation
     rolled back (revoked, the certificate deleted from AWS IoT) and the CRL published;
   - deletion: D devices (infusion pumps: one day of grace) with a retired factory certificate,
     swept a day and an hour later: the certificate detached and deleted.
   The fleet then grows to the next size, and the same sweeps run with D new devices.

Exit status 1 when an operation exceeds its AWS call budget (`BUDGET`, `SWEEP_BUDGET`), a sweep
with the same work costs a different number of calls in a larger fleet, or anything did not end
as expected (roles, counts, AWS IoT, the CRL).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

# benchmarks/ is the script's directory: its timing helpers are the lifecycle benchmark's.
from lifecycle import Meter, Operation, frozen_heap

# AWS calls per operation (a warm process: the issuing CA and its public key already read).
# Measured + 1 (the calls are listed by the benchmark; the steps are RotationService's).
BUDGET: dict[str, int] = {
    # 11: 3 GetItem (credential, device, device after registering), 2 TransactWriteItems (the
    # assertion; the pending certificate with its key claim and audit record), Sign,
    # RegisterCertificate, AttachPolicy, DescribeCertificate, AttachThingPrincipal,
    # UpdateCertificate (ACTIVE); 12 from a factory certificate (+ its manufacturer CA's GetItem,
    # checked active in the same transaction)
    "request": 13,
    # 4: GetItem (device), TransactWriteItems (the commit, with the old certificate's
    # revocation when fleetkey issued it), DescribeCertificate + UpdateCertificate (the old one
    # INACTIVE). The CRL is published by the next sweep, never in the commit.
    "commit_event_factory": 5,
    # 7: + the credential, the assertion's TransactWriteItems, a second GetItem
    "commit_call_factory": 8,
    # 5 and 8: + the retired factory certificate described again (still INACTIVE)
    "commit_event_issued": 6,
    "commit_call_issued": 9,
}
# A sweep: fixed + per_due * D, D devices due for that kind of work alone; measured: idle 17 (8
# shard Queries of each of the two indexes, the CRL's GetItem), renewal 17 + 3 (GetItem, Publish,
# TransactWriteItems), rollback 20 (+ the CRL: Query, Sign, TransactWriteItems) + 10 (GetItem,
# TransactWriteItems, 6 calls taking the certificate out of AWS IoT, TransactWriteItems),
# deletion 17 + 8.
SWEEP_BUDGET: dict[str, tuple[int, int]] = {
    "idle": (18, 0),
    "renewal": (18, 4),
    "rollback": (21, 11),
    "deletion": (18, 9),
}
TITLES = {
    "request": "rotation request (CSR, assertion by the current key)",
    "commit_event_factory": "commit by the connected event, factory certificate retired",
    "commit_call_factory": "commit by call (new key's assertion), factory certificate retired",
    "commit_event_issued": "commit by the connected event, issued certificate retired (revoked)",
    "commit_call_issued": "commit by call, issued certificate retired (revoked)",
}
SWEEP_TITLES = {
    "idle": "nothing due",
    "renewal": "renewal due (factory certificate): a rotate command each",
    "rollback": "pending past its deadline: rolled back, deleted, CRL published",
    "deletion": "retired certificate past its grace: detached, deleted",
}
PUMP_FIRMWARE = ("2.4.1", "7981a0c2a8f3203495d07847ee27eb5eb31d68545fd04cd4a76842099d64054f")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(devices: int, sizes: list[int], due: int, moto_server: bool = False) -> dict[str, Any]:
    # Offline: fake credentials, no endpoint or profile of the machine's (as the tests do).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.setdefault(name, "testing")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)
    # moto's TransactWriteItems copies the whole table (to undo a failed transaction), which
    # DynamoDB does not: in a fleet of 1,000 each one takes moto a large fraction of a second,
    # and the sweep's time limit (which keeps it within the function's timeout) would end the
    # batch early. The limit is lifted here; the calls and the work are the sweep's.
    from fleetkey.services import rotation

    rotation.SWEEP_SECONDS = float("inf")
    if moto_server:
        from fleetkey_local.server import local_aws

        with local_aws() as endpoint:
            return Bench(devices, sizes, due, endpoint, time.thread_time).run()
    from moto import mock_aws

    # use_valid_cert: certificate ids are SHA-256 of the DER, as in AWS IoT.
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        return Bench(devices, sizes, due, None, time.process_time).run()


class Bench:
    def __init__(
        self,
        devices: int,
        sizes: list[int],
        due: int,
        endpoint: str | None,
        cpu_clock: Callable[[], float],
    ) -> None:
        from fleetkey_local.instrument import AwsCallCounter
        from fleetkey_local.pki import CertificateAuthority
        from fleetkey_local.stack import EmbeddedStack, client_factory

        self.devices, self.sizes, self.due = devices, sizes, due
        self.endpoint = endpoint
        self.stack = EmbeddedStack(client_factory(endpoint)).provision()
        self.acme = CertificateAuthority.create("acme")
        self.stack.register_ca(self.acme)
        self.rotation = self.stack.components.rotation
        self.issuer = self.stack.settings.issuer
        counter = AwsCallCounter().watch(*self.stack.service_clients())
        self.meter = Meter(counter, cpu_clock)
        self.operations = {key: Operation(key, title) for key, title in TITLES.items()}
        self.sweeps: dict[str, dict[int, Operation]] = {kind: {} for kind in SWEEP_TITLES}
        self.sweep_counts: dict[str, dict[int, dict[str, int]]] = {k: {} for k in SWEEP_TITLES}
        # device id -> (its key, its current certificate id, its profile)
        self.held: dict[str, tuple[Any, str, str]] = {}
        self.problems: list[str] = []
        self._serial = 0

    def expect(self, condition: bool, message: str) -> None:
        if not condition and message not in self.problems:
            self.problems.append(message)

    # ---- what a device does -----------------------------------------------------------------

    def onboard(self, prefix: str, profile: str = "telemetry-sensor") -> str:
        self._serial += 1
        device_id = f"{prefix}-{self._serial:05d}"
        key, _, event = self.stack.manufacture(self.acme, device_id, profile=profile, actor="bench")
        if not self.stack.register(event).accepted:
            raise SystemExit(f"registration of {device_id} refused")
        self.held[device_id] = (key, event["certificateId"], profile)
        return device_id

    def _claims(self, profile: str) -> dict[str, str]:
        if profile == "infusion-pump":  # a pump attests its firmware in every assertion
            return {"firmware_version": PUMP_FIRMWARE[0], "firmware_sha256": PUMP_FIRMWARE[1]}
        return {}

    def prepare_request(self, device_id: str) -> tuple[Any, dict[str, str]]:
        """The device's new key and its request body (CSR + assertion by the current key)."""
        from fleetkey_local.device import rotation_assertion, rotation_csr, rotation_request
        from fleetkey_local.pki import generate_key

        key, certificate_id, profile = self.held[device_id]
        new_key = generate_key("ec:secp256r1")
        csr = rotation_csr(new_key, device_id)
        assertion = rotation_assertion(
            key, certificate_id, device_id, self.issuer, csr, **self._claims(profile)
        )
        return new_key, rotation_request(csr, assertion)

    def request(self, device_id: str, operation: Operation | None = None) -> tuple[Any, str]:
        """A rotation request (measured under `operation`): the new key and certificate id."""
        new_key, body = self.prepare_request(device_id)

        def call() -> tuple[int, dict[str, Any]]:
            return self.rotation.request(device_id, body)

        status, answer = self.meter.measure(operation, call) if operation else call()
        self.expect(status == 201, f"a rotation request was answered {status}")
        return new_key, answer["certificate_id"]

    def commit(
        self,
        device_id: str,
        new_key: Any,
        certificate_id: str,
        by: str,
        operation: Operation | None = None,
    ) -> None:
        """Commit by the presence `connected` event ("event") or by call ("call")."""
        from fleetkey_local.device import client_assertion

        profile = self.held[device_id][2]
        if by == "event":
            event = {
                "clientId": device_id,
                "timestamp": int(time.time() * 1000),
                "eventType": "connected",
                "sessionIdentifier": f"bench-{certificate_id[:8]}",
                "principalIdentifier": certificate_id,
                "ipAddress": "192.0.2.1",
                "versionNumber": 1,
            }

            def call() -> Any:
                return self.rotation.on_connected(event)

        else:
            assertion = client_assertion(
                new_key, certificate_id, device_id, self.issuer, **self._claims(profile)
            )

            def call() -> Any:
                return self.rotation.commit(
                    device_id, certificate_id, {"client_assertion": assertion}
                )

        result = self.meter.measure(operation, call) if operation else call()
        committed = result == "committed" if by == "event" else result.get("committed") is True
        self.expect(committed, f"a commit by {by} did not commit: {result}")
        self.held[device_id] = (new_key, certificate_id, profile)

    def rotate(self, device_id: str) -> None:
        """An unmeasured rotation, committed by the connected event."""
        new_key, certificate_id = self.request(device_id)
        self.commit(device_id, new_key, certificate_id, "event")

    # ---- checks -----------------------------------------------------------------------------

    def in_iot(self, certificate_id: str) -> bool:
        iot = self.stack.harness_iot
        try:
            iot.describe_certificate(certificateId=certificate_id)
        except iot.exceptions.ResourceNotFoundException:
            return False
        return True

    def roles(self, device_id: str) -> dict[str, list[str]]:
        device = self.stack.store.devices.get(device_id)
        roles: dict[str, list[str]] = {}
        for certificate in device.certificates:
            roles.setdefault(certificate.role.value, []).append(certificate.certificate_id)
        return roles

    # ---- the benchmark ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        # A first rotation warms the process (the issuing CA read, its public key from KMS),
        # as the first request of a function's instance does.
        self.rotate(self.onboard("warm"))
        self.measure_rotations()
        for size in self.sizes:
            self.fill(size)
            self.measure_sweeps(size)
        return {
            "devices": self.devices,
            "not_due": self.sizes,
            "due": self.due,
            "moto": "server" if self.endpoint else "mock_aws",
            "operations": {k: op.summary() for k, op in self.operations.items()},
            "sweeps": {
                kind: {
                    size: {**op.summary(), "counts": self.sweep_counts[kind][size]}
                    for size, op in per_size.items()
                }
                for kind, per_size in self.sweeps.items()
            },
            "problems": self.problems,
        }

    def measure_rotations(self) -> None:
        log(f"onboarding {self.devices} devices; measuring two rotations each ...")
        fleet = [self.onboard("bench") for _ in range(self.devices)]
        for round_, retired in ((1, "factory"), (2, "issued")):
            prepared = {d: self.prepare_request(d) for d in fleet}
            issued: dict[str, str] = {}
            with frozen_heap():
                for d in fleet:
                    body = prepared[d][1]
                    status, answer = self.meter.measure(
                        self.operations["request"],
                        lambda d=d, body=body: self.rotation.request(d, body),
                    )
                    self.expect(status == 201, f"rotation {round_}: a request answered {status}")
                    issued[d] = answer["certificate_id"]
            with frozen_heap():
                for index, d in enumerate(fleet):
                    # Each device commits once each way over its two rotations.
                    by = "event" if (index + round_) % 2 == 0 else "call"
                    self.commit(
                        d,
                        prepared[d][0],
                        issued[d],
                        by,
                        self.operations[f"commit_{by}_{retired}"],
                    )
        for d in fleet:
            roles = self.roles(d)
            self.expect(
                roles.get("current") == [self.held[d][1]] and len(roles.get("retired", [])) == 2,
                "after two rotations a device should hold its newest certificate current and "
                "two retired",
            )
        self.rotation.sweep()  # publishes the CRL (the schedule does, within a minute)
        crl = self.stack.components.pki.crl_der()
        from cryptography import x509

        revoked = len(x509.load_der_x509_crl(crl))
        self.expect(revoked >= self.devices, f"the CRL lists {revoked} < {self.devices} revoked")

    def fill(self, size: int) -> None:
        """Devices with nothing due for months, up to `size` besides the groups of the sweeps."""
        background = sum(1 for d in self.held if d.startswith(("bench-", "idle-")))
        missing = size - background
        if missing > 0:
            log(f"filling the fleet to {size} devices with nothing due (+{missing}) ...")
        for _ in range(max(0, missing)):
            self.rotate(self.onboard("idle"))

    def sweep(self, kind: str, size: int, now: Any) -> dict[str, int]:
        operation = self.sweeps[kind].setdefault(size, Operation(kind, SWEEP_TITLES[kind]))
        with frozen_heap():
            counts = self.meter.measure(operation, lambda: self.rotation.sweep(now))
        self.sweep_counts[kind][size] = counts
        return counts

    def measure_sweeps(self, size: int) -> None:
        from fleetkey.clock import utc_now

        d = self.due
        log(f"measuring sweeps: {size} devices not due, {d} due ...")
        self.rotation.sweep()  # the CRL published after the fill's revocations
        counts = self.sweep("idle", size, utc_now())
        self.expect(counts["due"] == 0, f"{size} not due: an idle sweep found {counts['due']} due")

        # Renewal: D devices with their factory certificate, due at once.
        group = [self.onboard("renew") for _ in range(d)]
        counts = self.sweep("renewal", size, utc_now())
        self.expect(
            counts["due"] == d and counts["renewals_requested"] == d,
            f"renewal sweep ({size} not due): {counts}",
        )
        for device_id in group:  # the devices heard the command: they rotate
            self.rotate(device_id)

        # Rollback: D devices (rotated once) with a second rotation never committed.
        group = [self.onboard("roll") for _ in range(d)]
        abandoned = []
        for device_id in group:
            self.rotate(device_id)
            abandoned.append(self.request(device_id)[1])
        late = utc_now() + timedelta(seconds=self.stack.settings.rotation_commit_seconds + 120)
        counts = self.sweep("rollback", size, late)
        self.expect(
            counts["due"] == d and counts["rolled_back"] == d and counts["deleted"] == d,
            f"rollback sweep ({size} not due): {counts}",
        )
        self.expect(
            not any(self.in_iot(c) for c in abandoned),
            "a rolled-back certificate is still in AWS IoT",
        )
        self.expect(
            all(self.roles(x).get("current") == [self.held[x][1]] for x in group),
            "a rolled-back device does not hold its old certificate current",
        )

        # Deletion: D pumps (one day of grace) whose factory certificate a rotation retired.
        group = [self.onboard("pump", profile="infusion-pump") for _ in range(d)]
        factory = {x: self.held[x][1] for x in group}
        for device_id in group:
            self.rotate(device_id)
        counts = self.sweep("deletion", size, utc_now() + timedelta(days=1, hours=1))
        self.expect(
            counts["due"] == d and counts["deleted"] == d and counts["renewals_requested"] == 0,
            f"deletion sweep ({size} not due): {counts}",
        )
        self.expect(
            not any(self.in_iot(c) for c in factory.values())
            and all(not self.roles(x).get("retired") for x in group),
            "a retired certificate past its grace is still in AWS IoT or the device's set",
        )


# ---- checks and output ----------------------------------------------------------------------


def check(results: dict[str, Any]) -> list[str]:
    problems = list(results["problems"])
    for key, budget in BUDGET.items():
        op = results["operations"][key]
        if op["n"] and op["calls_max"] > budget:
            problems.append(f"{op['operation']}: {op['calls_max']} AWS calls > budget {budget}")
    due = results["due"]
    for kind, per_size in results["sweeps"].items():
        fixed, per_due = SWEEP_BUDGET[kind]
        budget = fixed + (per_due * due if kind != "idle" else 0)
        calls = {size: op["calls_max"] for size, op in per_size.items()}
        for size, n in calls.items():
            if n > budget:
                problems.append(
                    f"sweep, {SWEEP_TITLES[kind]} ({size} not due): {n} AWS calls > budget "
                    f"{budget} ({fixed} + {per_due} x {due})"
                )
        if len(set(calls.values())) > 1:
            problems.append(
                f"sweep, {SWEEP_TITLES[kind]}: the AWS calls grow with the fleet: "
                + ", ".join(f"{n} with {size} not due" for size, n in calls.items())
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
    sizes, due = results["not_due"], results["due"]
    out = [
        f"Devices rotating twice: {results['devices']}; sweeps with {due} due among "
        f"{' and '.join(str(s) for s in sizes)} not due; {where}.",
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
    head = " | ".join(f"AWS calls, {s} not due" for s in sizes)
    cpu = " / ".join(str(s) for s in sizes)
    out += [
        "",
        f"| Scheduled sweep (one batch, {due} due) | {head} | Per due device | Budget | "
        f"CPU ms ({cpu} not due) |",
        "|---|" + "---:|" * len(sizes) + "---:|---:|---:|",
    ]
    idle = results["sweeps"]["idle"]
    for kind, per_size in results["sweeps"].items():
        fixed, per_due = SWEEP_BUDGET[kind]
        first = per_size[sizes[0]]
        base = idle[sizes[0]]["calls_max"]
        each = "-" if kind == "idle" else f"{(first['calls_max'] - base) / due:g}"
        budget = f"{fixed}" if kind == "idle" else f"{fixed} + {per_due}/due"
        out.append(
            f"| {SWEEP_TITLES[kind]} | "
            + " | ".join(_calls(per_size[s]) for s in sizes)
            + f" | {each} | {budget} | "
            + " / ".join(f"{per_size[s]['cpu_ms_p50']:.1f}" for s in sizes)
            + " |"
        )
    out += [
        "",
        "Per due device = (the sweep's calls - the idle sweep's) / due. The same work costs the "
        "same calls whatever the number of devices not due: the sweep reads the sparse `due` "
        "index (8 shards), never the fleet.",
        "",
        "AWS calls per operation (one device, or one sweep):",
    ]
    listed = list(results["operations"].values()) + [
        {**per_size[sizes[-1]], "operation": f"sweep, {SWEEP_TITLES[kind]}"}
        for kind, per_size in results["sweeps"].items()
    ]
    for op in listed:
        for variant in op["calls_by_operation"]:
            share = (
                "" if len(op["calls_by_operation"]) == 1 else f" ({variant['count']} of {op['n']})"
            )
            calls = ", ".join(f"{n} {name}" for name, n in variant["calls"].items())
            out.append(f"- {op['operation']}{share}: {calls}")
    return "\n".join(out)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes: {text!r}") from None
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 0:
        raise argparse.ArgumentTypeError("sizes must increase, e.g. 100,1000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--devices", type=int, default=100, help="devices rotating twice (default 100)"
    )
    parser.add_argument(
        "--not-due",
        type=_sizes,
        default=[100, 1000],
        metavar="N,N",
        help="fleet sizes (devices with nothing due) the sweeps run in (default 100,1000)",
    )
    parser.add_argument("--due", type=int, default=10, help="devices due per sweep (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--moto-server",
        action="store_true",
        help="run moto as a server on its own threads and time the calling thread only "
        "(time.thread_time), leaving moto's CPU out",
    )
    args = parser.parse_args(argv)
    if args.devices < 2 or args.due < 1:
        parser.error("--devices must be at least 2 and --due at least 1")
    if args.not_due[0] < args.devices:
        parser.error("the first --not-due size includes the --devices: at least as large")
    with contextlib.redirect_stdout(io.StringIO()):  # logs the services print are not the table
        results = run(args.devices, args.not_due, args.due, args.moto_server)
    problems = check(results)
    results["budget"] = BUDGET
    results["sweep_budget"] = {k: list(v) for k, v in SWEEP_BUDGET.items()}
    results["problems"] = problems
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if problems:
        print("\nFAILED:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
        return 1
    print(
        "\nBudget check: OK (every operation within its AWS call budget, the sweeps' calls the "
        "same in every fleet size, and everything as expected)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
