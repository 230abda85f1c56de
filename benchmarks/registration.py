"""Registration benchmark: AWS calls and the handler's own CPU time per operation.

Runs the real registration Lambda handler (functions/registration/handler.py) exactly as Lambda
would call it, against a moto server on 127.0.0.1 (in this process, on its own threads), with
AWS IoT's just-in-time registration emulated in front of it by the embedded stack.

    .venv/bin/python benchmarks/registration.py [--devices N] [--json PATH]

What is measured, per operation, over N devices:
  * AWS calls the handler makes (botocore `before-call` events; SDK retries would count once,
    HTTP attempts are counted separately from `before-send`),
  * the handler's CPU time: `time.thread_time()` of the calling thread. moto answers on other
    threads, so its CPU is excluded; botocore's serialization, HTTP and parsing in the handler's
    thread are included, as they are in Lambda,
  * wall time (perf_counter), which includes moto's time and is only indicative.
Keys and certificates are generated, and devices "connect" (AWS IoT's side), before timing.
The first invocation (the handler builds its clients and loads the trust-anchor cache) is
reported separately as "cold". moto and the harness share the handler's heap here, which Lambda
would not: before each invocation their objects are frozen out of the garbage collector
(gc.freeze; --no-gc-freeze to see the difference, about 3x on the cold invocation). The
handler's stdout (Powertools logs and EMF metrics, as in Lambda) goes to a temporary file, whose
size per invocation is reported.

Exit status 1 when the AWS call budget is exceeded (accepted registration > 8 calls; refusal of
an unknown device or of a certificate on its own merits, malformed included, > 3; a mismatched
event > 3) or an operation did not end as expected; the known-device refusal (clone) costs 4 by
design and is reported, not checked.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleetkey_local.benchmarking import percentile, stdout_to

ROOT = Path(__file__).resolve().parents[1]
HANDLER_PATH = ROOT / "functions" / "registration" / "handler.py"

# The function's environment (see infra/fleetkey_infra/constants.py), offline credentials.
ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "eu-west-1",
    "AWS_REGION": "eu-west-1",
    "FLEETKEY_TABLE": "fleetkey-local",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
    "POWERTOOLS_SERVICE_NAME": "fleetkey-registration",
    "POWERTOOLS_DEV": "false",
}

BUDGET = {
    "accepted": 8,
    "refused_not_allowlisted": 3,
    "refused_expired": 3,
    "refused_malformed": 3,
    "mismatched": 3,
}
CLONE_NOTE = (
    "A refusal of a known device (here: a second certificate for an ACTIVE device, suspected "
    "clone) costs 4 calls by design: the device's audit-chain head must be read (the failed "
    "lookup-and-record transaction returns the device item) before its refusal record can be "
    "appended to the device's chain in a second transaction."
)
COLD_STARTS = 5
# The only Query the handler makes: the trust-anchor (manufacturer CA) snapshot.
ANCHOR_QUERY = "dynamodb.Query"


@dataclass
class LambdaContext:
    function_name: str = "fleetkey-registration"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = (
        "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-registration"
    )
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/fleetkey-registration"
    log_stream_name: str = "2026/01/01/[$LATEST]bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


# ---- call counting ---------------------------------------------------------------------------


class SessionCallRecorder:
    """Hooks on boto3's default session, so every client created afterwards (the handler's)
    reports its calls; only calls made on the recording thread while recording count."""

    def __init__(self) -> None:
        self._active: list[str] | None = None
        self._http: list[str] | None = None
        self._thread: int | None = None

    def install(self, session) -> None:
        session.events.register("before-call.*.*", self._on_call)
        session.events.register("before-send.*.*", self._on_send)

    def _on_call(self, model, **_: object) -> None:
        if self._active is not None and threading.get_ident() == self._thread:
            self._active.append(f"{model.service_model.service_name}.{model.name}")

    def _on_send(self, request, **_: object) -> None:
        if self._http is not None and threading.get_ident() == self._thread:
            self._http.append(request.url)

    @contextlib.contextmanager
    def recording(self):
        calls: list[str] = []
        http: list[str] = []
        self._active, self._http, self._thread = calls, http, threading.get_ident()
        try:
            yield calls, http
        finally:
            self._active = self._http = self._thread = None


# ---- statistics ------------------------------------------------------------------------------


@dataclass
class Sample:
    calls: list[str]
    http_requests: int
    cpu_ms: float
    wall_ms: float
    stdout_bytes: int
    result: dict
    warnings: list[str] = field(default_factory=list)


@dataclass
class Operation:
    key: str
    title: str
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        counts = [len(s.calls) for s in self.samples]
        sequences = Counter(tuple(s.calls) for s in self.samples)
        cpu = [s.cpu_ms for s in self.samples]
        wall = [s.wall_ms for s in self.samples]
        return {
            "operation": self.title,
            "n": len(self.samples),
            "calls_min": min(counts),
            "calls_max": max(counts),
            "http_requests_max": max(s.http_requests for s in self.samples),
            # The trust-anchor snapshot (one Query) is re-read once its TTL (60 s) has passed.
            "anchor_refreshes": sum(ANCHOR_QUERY in s.calls for s in self.samples),
            "calls_max_warm_cache": max(
                len(s.calls) - s.calls.count(ANCHOR_QUERY) for s in self.samples
            ),
            "call_sequences": [
                {"count": n, "calls": list(seq)} for seq, n in sequences.most_common()
            ],
            "cpu_ms_p50": percentile(cpu, 50),
            "cpu_ms_p95": percentile(cpu, 95),
            "cpu_ms_mean": statistics.fmean(cpu),
            "wall_ms_p50": percentile(wall, 50),
            "wall_ms_p95": percentile(wall, 95),
            "stdout_bytes_mean": statistics.fmean(s.stdout_bytes for s in self.samples),
            "results": dict(Counter(json.dumps(s.result, sort_keys=True) for s in self.samples)),
            "warnings": dict(Counter(w for s in self.samples for w in s.warnings)),
        }


# ---- harness ---------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto 5.2.1's POST /moto-api/config ignores "iot"; the server runs in this process, so set
    # use_valid_cert there: certificate ids are SHA-256 of the DER, as in AWS IoT.
    from moto import settings as moto_settings

    from fleetkey_local import moto_patches

    moto_patches.use_aws_certificate_ids()
    if not moto_settings.iot_use_valid_cert():
        raise SystemExit("could not configure moto IoT with use_valid_cert")
    return server, endpoint


def load_handler():
    spec = importlib.util.spec_from_file_location("registration_handler", HANDLER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict:
    from importlib.metadata import version

    return {
        p: version(p)
        for p in ("boto3", "botocore", "aws-lambda-powertools", "pydantic", "cryptography", "moto")
    }


# ---- the benchmark ---------------------------------------------------------------------------


def run(
    devices: int,
    log_level: str,
    import_rows: int,
    handler_stdout: str | None = None,
    freeze_gc: bool = True,
) -> dict:
    os.environ.update(ENVIRONMENT)
    os.environ["POWERTOOLS_LOG_LEVEL"] = log_level
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        return _run(devices, log_level, endpoint, import_rows, handler_stdout, freeze_gc)
    finally:
        server.stop()


def _run(
    devices: int,
    log_level: str,
    endpoint: str,
    import_rows: int,
    handler_stdout: str | None,
    freeze_gc: bool,
) -> dict:
    import boto3

    from fleetkey.domain.allowlist import CSV_COLUMNS
    from fleetkey_local import moto_patches
    from fleetkey_local.instrument import AwsCallCounter
    from fleetkey_local.pki import CertificateAuthority, pem
    from fleetkey_local.stack import EmbeddedStack, client_factory

    moto_patches.apply()
    stack = EmbeddedStack(client_factory(endpoint)).provision()

    recorder = SessionCallRecorder()

    def fresh_session() -> None:
        """The handler's clients come from a fresh default session, as in a new Lambda process
        (no service model loaded yet), which carries the counting hooks; the harness keeps its
        own clients."""
        boto3.setup_default_session()
        recorder.install(boto3.DEFAULT_SESSION)

    fresh_session()

    acme = CertificateAuthority.create("acme")
    stack.register_ca(acme)
    now = datetime.now(UTC)

    def manifest(ids: list[str]) -> str:
        lines = [",".join(CSV_COLUMNS)]
        lines += [f"{d},SN-{d},acme,,telemetry-sensor" for d in ids]
        return "\n".join(lines) + "\n"

    log(f"generating keys and certificates for {devices} devices x 4 ...")
    cold_ids = [f"cold-{i}" for i in range(COLD_STARTS)]
    accepted_ids = [f"ok-{i:05d}" for i in range(devices)]
    expired_ids = [f"exp-{i:05d}" for i in range(devices)]
    unknown_ids = [f"unk-{i:05d}" for i in range(devices)]
    listed = cold_ids + accepted_ids + expired_ids
    report = stack.allowlist.import_manifest(manifest(listed), "csv", actor="bench")
    assert report.imported == len(listed), report

    def device_cert(device_id: str, **kwargs) -> str:
        _, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}", **kwargs)
        return pem(cert)

    def malformed_cert(device_id: str) -> str:
        """A certificate acme signed whose extendedKeyUsage is a second keyUsage: its extensions
        do not parse (refused as malformed_certificate)."""
        import base64

        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding

        _, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
        extended_key_usage, key_usage = bytes.fromhex("0603551d25"), bytes.fromhex("0603551d0f")
        tbs = cert.tbs_certificate_bytes.replace(extended_key_usage, key_usage)
        signature = acme.key.sign(tbs, ec.ECDSA(cert.signature_hash_algorithm))
        der = cert.public_bytes(Encoding.DER)
        algorithm = der[der.index(cert.tbs_certificate_bytes) + len(cert.tbs_certificate_bytes) :]
        algorithm = algorithm[: 2 + algorithm[1]]  # the signatureAlgorithm SEQUENCE (short form)

        def tlv(tag: int, content: bytes) -> bytes:
            n = len(content)
            if n < 0x80:
                return bytes([tag, n]) + content
            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return bytes([tag, 0x80 | len(raw)]) + raw + content

        der = tlv(0x30, tbs + algorithm + tlv(0x03, b"\x00" + signature))
        body = base64.encodebytes(der).decode()
        return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"

    certs = {
        "cold": [device_cert(d) for d in cold_ids],
        "accepted": [device_cert(d) for d in accepted_ids],
        "refused_not_allowlisted": [device_cert(d) for d in unknown_ids],
        "refused_expired": [
            device_cert(d, not_before=now - timedelta(days=400), not_after=now - timedelta(days=1))
            for d in expired_ids
        ],
        # A second certificate (new key) for each device the accepted phase activates.
        "refused_clone": [device_cert(d) for d in accepted_ids],
        "refused_malformed": [malformed_cert(f"bad-{i:05d}") for i in range(devices)],
        # Events naming a CA that did not issue the certificate (AWS IoT reports acme).
        "mismatched": [device_cert(f"mis-{i:05d}") for i in range(devices)],
    }

    registration = load_handler()
    if handler_stdout:
        stdout_file = Path(handler_stdout)
    else:
        fd, name = tempfile.mkstemp(prefix="fleetkey-bench-stdout-")
        os.close(fd)
        stdout_file = Path(name)
    written = 0

    def invoke(event: dict) -> Sample:
        nonlocal written
        context = LambdaContext()
        if freeze_gc:
            # What the harness and moto (same process) allocated is not the handler's heap: keep
            # the garbage collector from scanning it during the handler's collections.
            gc.collect()
            gc.freeze()
        with warnings.catch_warnings(record=True) as caught, recorder.recording() as (calls, http):
            warnings.simplefilter("always")
            wall0 = time.perf_counter()
            cpu0 = time.thread_time()
            result = registration.handler(event, context)
            cpu1 = time.thread_time()
            wall1 = time.perf_counter()
        sys.stdout.flush()
        size = stdout_file.stat().st_size
        sample = Sample(
            calls=list(calls),
            http_requests=len(http),
            cpu_ms=(cpu1 - cpu0) * 1000,
            wall_ms=(wall1 - wall0) * 1000,
            stdout_bytes=size - written,
            result=result,
            warnings=[f"{w.category.__name__}: {str(w.message).split('.')[0]}" for w in caught],
        )
        written = size
        return sample

    def connect(pems: list[str]) -> list[dict]:
        events = [stack.first_connect(p, acme.pem) for p in pems]
        assert all(events), "AWS IoT emulation published no event"
        return events

    operations: dict[str, Operation] = {}
    cross_check: list[tuple[int, int]] = []

    def phase(key: str, title: str, events: list[dict], counter: AwsCallCounter) -> Operation:
        log(f"measuring: {title} x {len(events)}")
        op = operations[key] = Operation(key, title)
        for event in events:
            counter.reset()
            sample = invoke(event)
            cross_check.append((len(sample.calls), counter.count()))
            op.samples.append(sample)
        return op

    with stdout_to(stdout_file):
        # Cold: the first invocation of the process. Then "re-cold" ones: a fresh boto3 session
        # and an empty service cache (clients and trust anchors built again), but Python-level
        # one-time work (lazy imports, first use of models) already done.
        colds = []
        for event in connect(certs["cold"]):
            if colds:
                fresh_session()
                registration.service.cache_clear()
            colds.append(invoke(event))
        cold = colds[0]
        accepted_events = connect(certs["accepted"])
        # A second view of the same calls: counters on the handler's cached clients.
        service = registration.service()
        counter = AwsCallCounter().watch(service._devices._table.client, service._registry._client)

        phase("accepted", "accepted registration (allow-listed device)", accepted_events, counter)
        phase(
            "refused_not_allowlisted",
            "refused: not allow-listed",
            connect(certs["refused_not_allowlisted"]),
            counter,
        )
        phase(
            "refused_expired",
            "refused: expired certificate",
            connect(certs["refused_expired"]),
            counter,
        )
        phase(
            "refused_clone",
            "refused: suspected clone (2nd certificate, ACTIVE device)",
            connect(certs["refused_clone"]),
            counter,
        )
        phase(
            "refused_malformed",
            "refused: malformed certificate (extensions do not parse)",
            connect(certs["refused_malformed"]),
            counter,
        )
        phase(
            "mismatched",
            "mismatched event (names a CA that did not issue the certificate)",
            [{**e, "caCertificateId": "0" * 64} for e in connect(certs["mismatched"])],
            counter,
        )
        phase("duplicate", "duplicate delivery of an accepted event", accepted_events, counter)

        log(f"measuring: allow-list import of {import_rows:,} rows")
        import_ids = [f"imp-{i:05d}" for i in range(import_rows)]
        text = manifest(import_ids)
        import_counter = AwsCallCounter().watch(*stack.service_clients())
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        import_report = stack.allowlist.import_manifest(text, "csv", actor="bench")
        import_wall, import_cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        import_calls = import_counter.by_operation()
        import_counter.reset()
        wall0 = time.perf_counter()
        rerun_report = stack.allowlist.import_manifest(text, "csv", actor="bench")
        rerun_wall = time.perf_counter() - wall0
        rerun_calls = import_counter.by_operation()

    if not handler_stdout:
        stdout_file.unlink(missing_ok=True)

    mismatches = [pair for pair in cross_check if pair[0] != pair[1]]
    return {
        "machine": machine(),
        "versions": versions(),
        "devices": devices,
        "log_level": log_level,
        "gc_freeze": freeze_gc,
        "cold": {
            "operation": "cold start: first invocation (accepted registration)",
            "calls": cold.calls,
            "http_requests": cold.http_requests,
            "cpu_ms": cold.cpu_ms,
            "wall_ms": cold.wall_ms,
            "stdout_bytes": cold.stdout_bytes,
            "result": cold.result,
            "warnings": cold.warnings,
        },
        "recold": {
            "operation": f"re-cold: new clients + trust-anchor load (median of {len(colds) - 1})",
            "n": len(colds) - 1,
            "calls": sorted({len(c.calls) for c in colds[1:]}),
            "cpu_ms_median": statistics.median(c.cpu_ms for c in colds[1:]),
            "wall_ms_median": statistics.median(c.wall_ms for c in colds[1:]),
            "results": [c.result for c in colds[1:]],
        },
        "operations": {k: op.summary() for k, op in operations.items()},
        "counter_cross_check_mismatches": len(mismatches),
        "import": {
            "rows": import_rows,
            "wall_s": import_wall,
            "caller_cpu_s": import_cpu,
            "calls": sum(import_calls.values()),
            "calls_by_operation": dict(import_calls),
            "report": {k: v for k, v in import_report.to_public().items() if k != "rejected"}
            | {"rejected": len(import_report.rejected)},
            "rerun_wall_s": rerun_wall,
            "rerun_calls": sum(rerun_calls.values()),
            "rerun_report": {k: v for k, v in rerun_report.to_public().items() if k != "rejected"},
        },
    }


# ---- checks and output ----------------------------------------------------------------------

EXPECTED = {
    "accepted": ("accepted", None),
    "refused_not_allowlisted": ("refused", "not_allowlisted"),
    "refused_expired": ("refused", "expired"),
    "refused_clone": ("refused", "clone_suspected"),
    "refused_malformed": ("refused", "malformed_certificate"),
    "mismatched": ("mismatched", None),
    "duplicate": ("accepted", None),
}


def check(results: dict) -> list[str]:
    problems = []
    for key, budget in BUDGET.items():
        op = results["operations"][key]
        # The budget is for a warm trust-anchor cache (see fleetkey.services.registration).
        if op["calls_max_warm_cache"] > budget:
            problems.append(
                f"{op['operation']}: {op['calls_max_warm_cache']} AWS calls > budget {budget}"
            )
    for key, (status, reason) in EXPECTED.items():
        for result in results["operations"][key]["results"]:
            parsed = json.loads(result)
            if parsed.get("status") != status or parsed.get("reason") != reason:
                problems.append(f"{key}: unexpected handler result {parsed}")
    for result in [results["cold"]["result"], *results["recold"]["results"]]:
        if result.get("status") != "accepted":
            problems.append(f"cold invocation: unexpected result {result}")
    if results["counter_cross_check_mismatches"]:
        problems.append("session-hook and client-counter call counts disagree")
    imp = results["import"]
    if imp["report"]["imported"] != imp["rows"] or imp["rerun_report"]["unchanged"] != imp["rows"]:
        problems.append(f"allow-list import did not import every row: {imp}")
    return problems


def render(results: dict) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['nproc']} CPU(s) ({m['cpu']}), Python {m['python']}, {m['platform']}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"Devices per operation: {results['devices']}; handler log level {results['log_level']}; "
        "moto server on 127.0.0.1 in-process (its CPU is not in the handler CPU figures).",
        "",
        "| Operation | n | AWS calls (min-max) | Budget | Handler CPU ms p50 / p95 "
        "| Wall ms p50 / p95 | stdout B/inv |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    cold = results["cold"]
    out.append(
        f"| {cold['operation']} | 1 | {len(cold['calls'])} | - | {cold['cpu_ms']:.1f} | "
        f"{cold['wall_ms']:.1f} | {cold['stdout_bytes']} |"
    )
    recold = results["recold"]
    out.append(
        f"| {recold['operation']} | {recold['n']} | {'/'.join(map(str, recold['calls']))} | - | "
        f"{recold['cpu_ms_median']:.1f} | {recold['wall_ms_median']:.1f} | - |"
    )
    for key, op in results["operations"].items():
        budget = BUDGET.get(key, "-")
        calls = (
            f"{op['calls_min']}"
            if op["calls_min"] == op["calls_max"]
            else f"{op['calls_min']}-{op['calls_max']}"
        )
        out.append(
            f"| {op['operation']} | {op['n']} | {calls} | {budget} | "
            f"{op['cpu_ms_p50']:.2f} / {op['cpu_ms_p95']:.2f} | "
            f"{op['wall_ms_p50']:.2f} / {op['wall_ms_p95']:.2f} | {op['stdout_bytes_mean']:.0f} |"
        )
    imp = results["import"]
    out += [
        "",
        "| Allow-list import (core service, direct) | Rows | AWS calls | Wall s "
        "| Caller-thread CPU s |",
        "|---|---:|---:|---:|---:|",
        f"| first import | {imp['rows']:,} | {imp['calls']} "
        f"({', '.join(f'{n} {k}' for k, n in imp['calls_by_operation'].items())}) | "
        f"{imp['wall_s']:.2f} | {imp['caller_cpu_s']:.2f} |",
        f"| re-run (all rows unchanged) | {imp['rows']:,} | {imp['rerun_calls']} "
        f"| {imp['rerun_wall_s']:.2f} | - |",
        "",
        "AWS calls per operation:",
        f"- cold start: {', '.join(cold['calls'])}",
    ]
    for op in results["operations"].values():
        for variant in op["call_sequences"]:
            share = "" if len(op["call_sequences"]) == 1 else f" ({variant['count']} of {op['n']})"
            out.append(f"- {op['operation']}{share}: {', '.join(variant['calls'])}")
    warned = [
        (op["operation"], w, n)
        for op in results["operations"].values()
        for w, n in op["warnings"].items()
    ]
    warned += [(cold["operation"], w, 1) for w in cold["warnings"]]
    if warned:
        out += [
            "",
            "Python warnings raised inside the handler (Lambda would write them to stderr):",
        ]
        out += [f"- {name}: {w} ({n} invocations)" for name, w, n in warned]
    refreshed = sum(op["anchor_refreshes"] for op in results["operations"].values())
    if refreshed:
        out += [
            "",
            f"{refreshed} warm invocation(s) also re-read the trust-anchor snapshot "
            "(+1 dynamodb.Query, once its TTL of "
            f"{os.environ.get('FLEETKEY_TRUST_ANCHOR_CACHE_SECONDS', '60')} s passes); "
            "the budget check excludes it.",
        ]
    out += ["", f"Note: {CLONE_NOTE}"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--devices", type=int, default=200, help="devices per operation (default 200)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--import-rows",
        type=int,
        default=10_000,
        help="rows of the allow-list import (default 10000)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="POWERTOOLS_LOG_LEVEL for the handler (default INFO, as deployed); "
        "output is discarded",
    )
    parser.add_argument(
        "--handler-stdout", metavar="PATH", help="keep what the handler wrote to stdout (logs, EMF)"
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="let the handler's garbage collections scan the harness's and moto's objects too",
    )
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if not 1 <= args.import_rows <= 10_000:
        parser.error("--import-rows must be 1..10000 (the service's manifest limit)")
    results = run(
        args.devices, args.log_level, args.import_rows, args.handler_stdout, not args.no_gc_freeze
    )
    problems = check(results)
    results["budget"] = BUDGET
    results["problems"] = problems
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if problems:
        print("\nFAILED:\n" + "\n".join(f"- {p}" for p in problems), file=sys.stderr)
        return 1
    print(
        "\nBudget check: OK (accepted <= 8, unknown device / certificate on its own merits,"
        " malformed included, <= 3, mismatched event <= 3)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
