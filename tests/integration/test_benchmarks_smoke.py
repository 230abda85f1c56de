"""The registration benchmark runs end to end and its AWS call budget holds (a few devices)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_registration_benchmark_runs_within_budget(tmp_path):
    # Given a small run of the benchmark (the real handler against a moto server)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "registration.py"),
            "--devices",
            "3",
            "--import-rows",
            "200",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it succeeds: every operation ended as expected and within the call budget
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    ops = results["operations"]
    assert ops["accepted"]["calls_max"] <= 7
    assert ops["refused_not_allowlisted"]["calls_max"] <= 3
    assert ops["refused_expired"]["calls_max"] <= 3
    # And the handler's stdout (logs, metrics) did not leak into the report
    assert "| Operation |" in done.stdout and '"_aws"' not in done.stdout


def test_token_timing_benchmark_runs_and_every_refusal_is_the_same_401(tmp_path):
    # Given a tiny run of the timing benchmark (the real token handler against a moto server);
    # its verdict on so few samples means nothing, so only that it ran is checked, never timing
    out = tmp_path / "timing.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "token_timing.py"),
            "--requests",
            "6",
            "--devices",
            "2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    # Then it finished with a verdict (0 overlap, 1 separated), not a broken run (2 or a crash)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    # and every request of every kind got the one invalid_client answer, and was measured
    assert results["problems"] == []
    assert {kind: len(s["cpu"]) for kind, s in results["samples"].items()} == {
        "unknown": 6,
        "bad-signature": 6,
        "wrong-kid": 6,
    }
    assert "| unknown vs |" in done.stdout and '"_aws"' not in done.stdout
