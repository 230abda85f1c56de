"""Import time of the Lambda handler modules (the init phase of a cold start), by
`python -X importtime`.

    .venv/bin/python benchmarks/importtime.py [--runs 5] [--top 12] [--json PATH]

For each function (functions/registration, functions/admin), a fresh interpreter runs
`import handler` with the function's directory as its working directory, the core package on
PYTHONPATH the way the Lambda layer puts it (/opt/python), and the function's environment. No
AWS endpoint is configured; a separate run first checks that importing opens no network
connection. Figures are medians over --runs interpreters, in two cases:

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
SERVICE_NAMES = {
    "registration": "fleetkey-registration",
    "admin": "fleetkey-admin",
    "token": "fleetkey-token",
    "discovery": "fleetkey-discovery",
}
FUNCTIONS = tuple(SERVICE_NAMES)
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


def environment(function: str, pycache: Path, write_bytecode: bool) -> dict:
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
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
        "POWERTOOLS_SERVICE_NAME": SERVICE_NAMES[function],
        "POWERTOOLS_LOG_LEVEL": "INFO",
    }
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def python(function: str, pycache: Path, args: list[str], write_bytecode: bool = False):
    cwd = ROOT / "functions" / function
    start = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - this interpreter, with the benchmark's own arguments
        [PYTHON, *args],
        cwd=cwd,
        env=environment(function, pycache, write_bytecode),
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


def measure(function: str, pycache: Path, runs: int) -> dict:
    totals, walls, packages = [], [], defaultdict(lambda: defaultdict(list))
    for _ in range(runs):
        done, wall = python(function, pycache, ["-X", "importtime", "-c", "import handler"])
        roots = [n for n in parse(done.stderr) if n.name == "handler"]
        if len(roots) != 1:
            raise SystemExit(f"{function}: no 'handler' import in -X importtime output")
        totals.append(roots[0].cumulative_us)
        walls.append(wall)
        for package, figures in breakdown(roots[0]).items():
            for key, value in figures.items():
                packages[package][key].append(value)
    plain = [python(function, pycache, ["-c", "import handler"])[1] for _ in range(runs)]
    baseline = [python(function, pycache, ["-c", "pass"])[1] for _ in range(runs)]
    return {
        "handler_cumulative_ms": statistics.median(totals) / 1000,
        "handler_cumulative_ms_runs": [t / 1000 for t in totals],
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


def run(runs: int) -> dict:
    results: dict = {
        "machine": {
            "nproc": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "runs": runs,
        "functions": {},
    }
    with tempfile.TemporaryDirectory(prefix="fleetkey-importtime-") as tmp:
        warm = Path(tmp) / "warm"
        for function in FUNCTIONS:
            # Importing must not touch the network (nothing is configured to answer).
            python(function, warm, ["-c", NO_NETWORK], write_bytecode=True)
            python(function, warm, ["-c", "import handler"], write_bytecode=True)  # warm-up
        # The same cache without the bytecode of site-packages and the repository's sources.
        cold = Path(tmp) / "stdlib-only"
        shutil.copytree(warm, cold)
        for path in (Path(sys.prefix), ROOT):
            shutil.rmtree(cold / path.relative_to(path.anchor), ignore_errors=True)
        for function in FUNCTIONS:
            print(f"measuring {function} ({runs} runs x 2 cases) ...", file=sys.stderr, flush=True)
            results["functions"][function] = {
                "bytecode_cached": measure(function, warm, runs),
                "no_dependency_bytecode": measure(function, cold, runs),
            }
    return results


def render(results: dict, top: int) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['nproc']} CPU(s), Python {m['python']}, {m['platform']}; "
        f"medians of {results['runs']} runs.",
        "",
        "| Function | `import handler` (-X importtime, cumulative) ms "
        '| process wall ms (`python -c "import handler"`) | interpreter alone ms |',
        "|---|---:|---:|---:|",
    ]
    cases = (
        ("bytecode_cached", "bytecode cached"),
        ("no_dependency_bytecode", "no .pyc for dependencies"),
    )
    for function, data in results["functions"].items():
        for key, label in cases:
            d = data[key]
            out.append(
                f"| {function} ({label}) | {d['handler_cumulative_ms']:.0f} | "
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
    args = parser.parse_args(argv)
    results = run(max(1, args.runs))
    print(render(results, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
