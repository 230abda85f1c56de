"""The benchmarks as their smoke tests run them: a script of benchmarks/ in a fresh interpreter,
its results also written as JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run_benchmark(
    script: str, *args: str, out: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/<script> <args> --json <out>` from the repository's root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
