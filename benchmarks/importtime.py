"""Import time of the Lambda handler modules (the init phase of a cold start), by
`python -X importtime`, against the import of what any handler needs anyway.

    .venv/bin/python benchmarks/importtime.py [--runs 5] [--top 12] [--json PATH]
        [--functions token,admin ...] [--tracing on|off] [--max-ratio 1.3]

For each function (functions/<name>), a fresh interpreter runs `import handler` with the
function's directory as its working directory, the core package on PYTHONPATH the way the Lambda
layer puts it (/opt/python), and the function's environment. No AWS endpoint is configured; a
separate run first checks that importing opens no network connection.

The environment is the deployed one (`--tracing on`, the default): LAMBDA_TASK_ROOT is set and
tracing is not disabled, so Powertools' Tracer imports the X-Ray SDK and patches botocore, as it
does in AWS with active tracing (the X-Ray SDK then touches /tmp/.aws-xray/initialized, as in
Lambda). `--tracing off` measures the local stack's and the tests' environment instead
(POWERTOOLS_TRACE_DISABLED=true, not in Lambda).

The reference is `import boto3, cryptography.x509, jwt` (the AWS SDK, X.509 and JWT: what the
functions cannot do without), measured in the same interpreter setup, interleaved run by run
with each function's. The ratio is the median over runs of the handler's import over the
reference's measured right after it; the benchmark exits 1 when a function's ratio exceeds
--max-ratio (1.3) in either case below.

Figures are medians over --runs interpreters, in two cases:

  * bytecode cached: every module has its .pyc (after one discarded warm-up run),
  * no bytecode for dependencies: the standard library has its .pyc but site-packages and the
    fleetkey sources do not, so they are compiled on import. This is what a Lambda cold start
    pays when the layer and function code ship without .pyc files for the runtime's Python
    version (Lambda's code directories are read-only, so nothing is cached between cold starts).

Bytecode goes to a private PYTHONPYCACHEPREFIX, so nothing is written into the repository.
Per package, "self" is the sum of the modules' own import times (these add up to the total);
"inclusive" is the cumulative time of the package's outermost imports, i.e. including the other
packages it was the first to import (so these overlap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Every function: a directory of functions/ with a handler. Its POWERTOOLS_SERVICE_NAME is
# `fleetkey-<function>` (infra/fleetkey_infra/constants.py).
FUNCTIONS = tuple(
    sorted(d.name for d in (ROOT / "functions").iterdir() if (d / "handler.py").is_file())
)
SERVICE_NAMES = {name: f"fleetkey-{name}" for name in FUNCTIONS}
# What every function needs anyway: the AWS SDK, X.509 and JWT. Its import is the reference.
REFERENCE = "import boto3, cryptography.x509, jwt"
REFERENCE_PACKAGES = ("boto3", "cryptography", "jwt")
MAX_RATIO = 1.3
LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")

NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise RuntimeError("network access during import: %r" % (args,))
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
import handler
"""


def environment(
    function: str,
    pycache: Path,
    write_bytecode: bool,
    tracing: bool,
    initialization: str = "on-demand",
) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", tempfile.gettempdir()),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT / "layers" / "core" / "python"),
        "PYTHONPYCACHEPREFIX": str(pycache),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-west-1",
        "FLEETKEY_TABLE": "fleetkey-local",
        "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
        "POWERTOOLS_SERVICE_NAME": SERVICE_NAMES[function],
        "POWERTOOLS_LOG_LEVEL": "INFO",
        # on-demand: the handlers defer what their first request imports; snap-start (or
        # provisioned-concurrency): they import it at init (fleetkey.init_phase).
        "AWS_LAMBDA_INITIALIZATION_TYPE": initialization,
    }
    if tracing:
        # As in Lambda with active tracing: Powertools' Tracer and the X-Ray SDK see a Lambda
        # environment (the X-Ray SDK samples locally then, with no client of its own).
        env["LAMBDA_TASK_ROOT"] = str(ROOT / "functions" / function)
        env["AWS_LAMBDA_FUNCTION_NAME"] = SERVICE_NAMES[function]
    else:
        env["POWERTOOLS_TRACE_DISABLED"] = "true"
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def python(
    function: str,
    pycache: Path,
    args: list[str],
    tracing: bool,
    write_bytecode: bool = False,
    initialization: str = "on-demand",
):
    cwd = ROOT / "functions" / function
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - this interpreter, with the benchmark's own arguments
        [PYTHON, *args],
        cwd=cwd,
        env=environment(function, pycache, write_bytecode, tracing, initialization),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{function}: python {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done, wall


# ---- parsing -importtime output ---------------------------------------------------------------


@dataclass
class Node:
    name: str
    self_us: int
    cumulative_us: int
    children: list[Node] = field(default_factory=list)


def parse(stderr: str) -> list[Node]:
    """The import tree (roots in order). -X importtime prints a module after its children,
    indented two spaces per level."""
    pending: dict[int, list[Node]] = defaultdict(list)
    for line in stderr.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        self_us, cumulative_us, indent, name = match.groups()
        depth = (len(indent) - 1) // 2
        node = Node(name, int(self_us), int(cumulative_us), pending.pop(depth + 1, []))
        pending[depth].append(node)
    return pending[0]


def package_of(module: str) -> str:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "(standard library)"
    if top.startswith("_cffi") or top == "_rust":
        return "cryptography"
    if top == "pydantic_core":
        return "pydantic_core"
    return top


def breakdown(root: Node) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = defaultdict(lambda: {"self_us": 0, "inclusive_us": 0})

    def walk(node: Node, parent_package: str | None) -> None:
        package = package_of(node.name)
        result[package]["self_us"] += node.self_us
        if package != parent_package:
            result[package]["inclusive_us"] += node.cumulative_us
        for child in node.children:
            walk(child, package)

    walk(root, None)
    return dict(result)


# ---- measuring ------------------------------------------------------------------------------


def reference_us(stderr: str) -> int:
    """The reference's import time: its packages' outermost imports (the interpreter's own
    start-up, `site` and the encodings, is left out)."""
    roots = [n for n in parse(stderr) if n.name.split(".")[0] in REFERENCE_PACKAGES]
    if {n.name.split(".")[0] for n in roots} != set(REFERENCE_PACKAGES):
        raise SystemExit(f"no import of {REFERENCE_PACKAGES} in -X importtime output")
    return sum(n.cumulative_us for n in roots)


def measure(
    function: str, pycache: Path, runs: int, tracing: bool, initialization: str = "on-demand"
) -> dict:
    totals, references, packages = [], [], defaultdict(lambda: defaultdict(list))
    importtime = ["-X", "importtime", "-c", "import handler"]
    for _ in range(runs):
        # The handler and the reference alternate, so both see the same machine load.
        done, _ = python(function, pycache, importtime, tracing, initialization=initialization)
        roots = [n for n in parse(done.stderr) if n.name == "handler"]
        if len(roots) != 1:
            raise SystemExit(f"{function}: no 'handler' import in -X importtime output")
        totals.append(roots[0].cumulative_us)
        for package, figures in breakdown(roots[0]).items():
            for key, value in figures.items():
                packages[package][key].append(value)
        done, _ = python(function, pycache, ["-X", "importtime", "-c", REFERENCE], tracing)
        references.append(reference_us(done.stderr))
    plain = [
        python(function, pycache, ["-c", "import handler"], tracing, False, initialization)[1]
        for _ in range(runs)
    ]
    baseline = [python(function, pycache, ["-c", "pass"], tracing)[1] for _ in range(runs)]
    handler_ms = statistics.median(totals) / 1000
    reference_ms = statistics.median(references) / 1000
    return {
        "handler_cumulative_ms": handler_ms,
        "handler_cumulative_ms_runs": [t / 1000 for t in totals],
        "reference_ms": reference_ms,
        "reference_ms_runs": [t / 1000 for t in references],
        # Each run's handler over the reference measured right after it: the machine's load
        # drifts between runs, much less within a pair.
        "ratio": statistics.median(t / r for t, r in zip(totals, references, strict=True)),
        "process_wall_ms": statistics.median(plain) * 1000,
        "interpreter_only_wall_ms": statistics.median(baseline) * 1000,
        "packages": {
            package: {
                "self_ms": statistics.median(f["self_us"] + [0] * (runs - len(f["self_us"])))
                / 1000,
                "inclusive_ms": statistics.median(
                    f["inclusive_us"] + [0] * (runs - len(f["inclusive_us"]))
                )
                / 1000,
            }
            for package, f in packages.items()
        },
    }


CASES = (
    ("bytecode_cached", "bytecode cached"),
    ("no_dependency_bytecode", "no .pyc for dependencies"),
)


def run(
    runs: int,
    functions: tuple[str, ...] = FUNCTIONS,
    tracing: bool = True,
    initialization: str = "on-demand",
) -> dict:
    results: dict = {
        "machine": {
            "nproc": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": runs,
        "tracing": tracing,
        "initialization": initialization,
        "reference": REFERENCE,
        "functions": {},
    }
    with tempfile.TemporaryDirectory(prefix="fleetkey-importtime-") as tmp:
        warm = Path(tmp) / "warm"
        for function in functions:
            # Importing must not touch the network (nothing is configured to answer).
            python(function, warm, ["-c", NO_NETWORK], tracing, True, initialization)
            python(function, warm, ["-c", "import handler"], tracing, True, initialization)
        python(functions[0], warm, ["-c", REFERENCE], tracing, write_bytecode=True)
        # The same cache without the bytecode of site-packages and the repository's sources.
        cold = Path(tmp) / "stdlib-only"
        shutil.copytree(warm, cold)
        for path in (Path(sys.prefix), ROOT):
            shutil.rmtree(cold / path.relative_to(path.anchor), ignore_errors=True)
        for function in functions:
            print(f"measuring {function} ({runs} runs x 2 cases) ...", file=sys.stderr, flush=True)
            results["functions"][function] = {
                "bytecode_cached": measure(function, warm, runs, tracing, initialization),
                "no_dependency_bytecode": measure(function, cold, runs, tracing, initialization),
            }
    return results


def over_limit(results: dict, max_ratio: float) -> list[str]:
    """The functions (and cases) whose handler import exceeds max_ratio times the reference."""
    return [
        f"{function} ({label}): {data[key]['ratio']:.2f}"
        for function, data in results["functions"].items()
        for key, label in CASES
        if data[key]["ratio"] > max_ratio
    ]


def render(results: dict, top: int) -> str:
    m = results["machine"]
    tracing = "on (as deployed)" if results["tracing"] else "off (local stack, tests)"
    out = [
        f"Machine: {m['nproc']} CPU(s), Python {m['python']}, {m['platform']}; "
        f"medians of {results['runs']} runs; tracing {tracing}; "
        f"initialization {results['initialization']}.",
        f"Reference: `{results['reference']}`, measured alongside each function.",
        "",
        "| Function | `import handler` (-X importtime, cumulative) ms | reference ms | ratio "
        '| process wall ms (`python -c "import handler"`) | interpreter alone ms |',
        "|---|---:|---:|---:|---:|---:|",
    ]
    for function, data in results["functions"].items():
        for key, label in CASES:
            d = data[key]
            out.append(
                f"| {function} ({label}) | {d['handler_cumulative_ms']:.0f} | "
                f"{d['reference_ms']:.0f} | {d['ratio']:.2f} | "
                f"{d['process_wall_ms']:.0f} | {d['interpreter_only_wall_ms']:.0f} |"
            )
    for function, data in results["functions"].items():
        d = data["bytecode_cached"]
        ranked = sorted(
            ((k, v) for k, v in d["packages"].items() if k != "handler"),
            key=lambda kv: kv[1]["inclusive_ms"],
            reverse=True,
        )
        out += [
            "",
            f"{function}: top {top} packages, bytecode cached "
            f"(total {d['handler_cumulative_ms']:.0f} ms)",
            "",
            "| Package | inclusive ms (first import, with what it pulls in) "
            "| self ms (own modules only) |",
            "|---|---:|---:|",
        ]
        for package, figures in ranked[:top]:
            out.append(f"| {package} | {figures['inclusive_ms']:.1f} | {figures['self_ms']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interpreters per case (default 5)")
    parser.add_argument("--top", type=int, default=12, help="packages listed per function")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--functions",
        default=",".join(FUNCTIONS),
        help="comma-separated functions to measure (default: all)",
    )
    parser.add_argument(
        "--tracing",
        choices=("on", "off"),
        default="on",
        help="on: the deployed environment (X-Ray active); off: the local stack's",
    )
    parser.add_argument(
        "--initialization",
        choices=("on-demand", "snap-start"),
        default="on-demand",
        help="on-demand: what a cold start's init imports; snap-start: with what the handlers "
        "defer to their first request (imported at init when init is ahead of requests)",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=MAX_RATIO,
        help=f"exit 1 above this ratio to the reference (default {MAX_RATIO})",
    )
    args = parser.parse_args(argv)
    functions = tuple(f for f in args.functions.split(",") if f)
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown or not functions:
        parser.error(f"unknown functions {unknown}; known: {', '.join(FUNCTIONS)}")
    results = run(max(1, args.runs), functions, args.tracing == "on", args.initialization)
    over = over_limit(results, args.max_ratio)
    results["max_ratio"] = args.max_ratio
    results["over_limit"] = over
    print(render(results, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if over:
        print(f"\nAbove {args.max_ratio}x the reference: {'; '.join(over)}")
        return 1
    print(f"\nEvery function within {args.max_ratio}x the reference.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
