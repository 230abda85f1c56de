"""What Lambda SnapStart could take off a cold start of the token function, emulated on this
machine: the same first request, after an on-demand init and after a restore.

    .venv/bin/python benchmarks/snapstart.py [--samples 10] [--tracing on|off] [--json PATH]

The real token function (functions/token/handler.py) answers a real token request (a registered
device's client assertion, as API Gateway delivers it) against moto on 127.0.0.1, each sample in a
fresh interpreter (the function's directory as working directory, the layer on PYTHONPATH, the
local stack's function environment). With `--tracing on` (the default) it runs as in Lambda with
active tracing: LAMBDA_TASK_ROOT and an invocation's trace header are set, so the X-Ray SDK is
imported, patches botocore and sends each subsegment (to 127.0.0.1:2000, where nothing listens);
`--tracing off` is the local stack's environment. Three ways to start, interleaved sample by
sample:

  * on-demand: `import handler` (Lambda's init phase), then the first request. Its cold start is
    both. A second request on the same interpreter is the warm figure.
  * snapshot: `import handler`, then `os.fork()`; the child answers the first request. The fork
    stands in for SnapStart's snapshot after init and restore before the first request: the
    child starts with every module imported, as a restored environment does.
  * snapshot, primed: as snapshot, with the function's services built before the fork
    (`handler.service()`: its boto3 clients, endpoint rules and service models loaded), what a
    `register_before_snapshot` hook would do. Nothing read from AWS is kept in the snapshot.

What the emulation leaves out is SnapStart's own cost: the restore (Lambda loads the snapshot's
memory, reported as "Restore Duration"), which only a deployed function can measure. So the
snapshot figures are a floor: SnapStart helps when the restore costs less than what it removes
(the on-demand cold start minus the snapshot's first request).

Every request must be answered 200 with a token (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import CertificateAuthority
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_DIR = ROOT / "functions" / "token"
MODES = ("on-demand", "snapshot", "snapshot-primed")
MARK = "SNAPSTART-RESULT "
# An invocation's trace header, as Lambda sets it with active tracing (sampled).
TRACE_HEADER = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"

# Run in a fresh interpreter: argv[1] the mode; stdin the two requests (first, second). Each
# figure is [wall ms, CPU ms of this process]: the CPU time is what the function's own code cost,
# whatever else the machine (or moto, in the benchmark's process) was doing.
CHILD = f"""
import json, os, sys, time

class Context:
    function_name = "fleetkey-token"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-token"
    aws_request_id = "00000000-0000-4000-8000-000000000000"

def now():
    return time.perf_counter(), time.process_time()

def since(then):
    wall, cpu = now()
    return [(wall - then[0]) * 1000, (cpu - then[1]) * 1000]

mode = sys.argv[1]
first, second = json.loads(sys.stdin.read())
started = now()
import handler
init = since(started)
if mode == "on-demand":
    answering = now()
    answer = handler.handler(first, Context())
    first_request = since(answering)
    answering = now()
    warm = handler.handler(second, Context())
    result = {{
        "init_ms": init,
        "first_request_ms": first_request,
        "warm_request_ms": since(answering),
        "statuses": [answer["statusCode"], warm["statusCode"]],
    }}
else:
    priming = now()
    if mode == "snapshot-primed":
        handler.service()
    primed = since(priming)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        restored = now()
        answer = handler.handler(first, Context())
        done = {{"first_request_ms": since(restored), "statuses": [answer["statusCode"]]}}
        os.write(writer, json.dumps(done).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        result = json.loads(pipe.read())
    result["init_ms"] = init
    result["priming_ms"] = primed
print({MARK!r} + json.dumps(result), flush=True)
"""


def token_event(key: Any, certificate_id: str, device_id: str, issuer: str) -> dict[str, Any]:
    return proxy_event(
        "POST",
        "/v1/token",
        resource="/v1/token",
        headers={"content-type": "application/x-www-form-urlencoded"},
        body=urlencode(token_request(client_assertion(key, certificate_id, device_id, issuer))),
    )


def start(mode: str, events: list[dict[str, Any]], env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(  # noqa: S603 - this interpreter, with the benchmark's own script
        [sys.executable, "-c", CHILD, mode],
        cwd=FUNCTION_DIR,
        env=env,
        input=json.dumps(events),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or len(lines) != 1:
        raise SystemExit(f"{mode}: the function did not answer:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[0][len(MARK) :])
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per figure, the medians of its wall and CPU times."""
    keys = sorted({k for run in runs for k in run if k.endswith("_ms")})
    summary = {
        key: {
            "wall": statistics.median(run[key][0] for run in runs),
            "cpu": statistics.median(run[key][1] for run in runs),
        }
        for key in keys
    }
    # What a request waits for on a cold start: on demand, the init and the first request;
    # from a snapshot, the first request (plus the restore, which is not measured here).
    on_demand = "priming_ms" not in summary
    summary["cold_start_ms"] = {
        clock: statistics.median(
            run["first_request_ms"][index] + (run["init_ms"][index] if on_demand else 0.0)
            for run in runs
        )
        for index, clock in enumerate(("wall", "cpu"))
    }
    return summary


def run(samples: int, tracing: bool = True) -> dict[str, Any]:
    with local_aws() as endpoint, tempfile.TemporaryDirectory(prefix="fleetkey-snap-") as tmp:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        acme = CertificateAuthority.create("acme")
        stack.register_ca(acme)
        key, _, registered = stack.manufacture(acme, "sensor-0001", serial_number="SN-1")
        assert stack.register(registered).accepted
        certificate_id = registered["certificateId"]
        issuer = os.environ["FLEETKEY_ISSUER"]
        env = {
            **os.environ,
            **stack.environment(),
            "PYTHONPATH": str(ROOT / "layers" / "core" / "python"),
            "PYTHONPYCACHEPREFIX": tmp,  # bytecode cached (warm-up below), not in the repository
            "POWERTOOLS_SERVICE_NAME": "fleetkey-token",
        }
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if tracing:
            env.pop("POWERTOOLS_TRACE_DISABLED", None)
            env["LAMBDA_TASK_ROOT"] = str(FUNCTION_DIR)
            env["AWS_LAMBDA_FUNCTION_NAME"] = "fleetkey-token"
            env["_X_AMZN_TRACE_ID"] = TRACE_HEADER
        requests = [
            [token_event(key, certificate_id, "sensor-0001", issuer) for _ in range(2)]
            for _ in range(samples * len(MODES) + 1)
        ]
        start("on-demand", requests.pop(), env)  # writes the bytecode; not counted
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for _ in range(samples):
            for mode in MODES:
                runs[mode].append(start(mode, requests.pop(), env))
    problems = [
        f"{mode}: answered {run['statuses']}"
        for mode, mode_runs in runs.items()
        for run in mode_runs
        if any(status != 200 for status in run["statuses"])
    ]
    return {
        "samples": samples,
        "tracing": tracing,
        "python": sys.version.split()[0],
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "modes": {mode: summarize(mode_runs) for mode, mode_runs in runs.items()},
        "runs": runs,
        "problems": problems,
    }


def render(results: dict[str, Any]) -> str:
    labels = {
        "on-demand": "on-demand (init, then the request)",
        "snapshot": "snapshot after init (fork), no priming",
        "snapshot-primed": "snapshot after init and priming (fork)",
    }
    tracing = "on (as deployed)" if results["tracing"] else "off (local stack)"
    out = [
        f"Token function, medians of {results['samples']} fresh interpreters per row "
        f"(Python {results['python']}, {results['nproc']} CPUs, tracing {tracing}); "
        "milliseconds, wall / CPU of the function's process.",
        "",
        "| Start | init | priming | first request | cold start (what the request waits) "
        "| warm request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, m in results["modes"].items():

        def cell(key: str, m: dict[str, dict[str, float]] = m) -> str:
            return f"{m[key]['wall']:.0f} / {m[key]['cpu']:.0f}" if key in m else "-"

        out.append(
            f"| {labels[mode]} | {cell('init_ms')} | {cell('priming_ms')} | "
            f"{cell('first_request_ms')} | {cell('cold_start_ms')} | {cell('warm_request_ms')} |"
        )
    on_demand = results["modes"]["on-demand"]["cold_start_ms"]
    for mode in ("snapshot", "snapshot-primed"):
        cold = results["modes"][mode]["cold_start_ms"]
        out.append(
            f"\n{labels[mode]}: {on_demand['wall'] - cold['wall']:.0f} ms less wall "
            f"({on_demand['cpu'] - cold['cpu']:.0f} ms less CPU) than on demand, before the "
            "restore's own cost."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10, help="interpreters per way to start")
    parser.add_argument(
        "--tracing",
        choices=("on", "off"),
        default="on",
        help="on: as in Lambda with active tracing; off: the local stack's environment",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    results = run(max(1, args.samples), args.tracing == "on")
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if results["problems"]:
        print("\n".join(results["problems"]), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
