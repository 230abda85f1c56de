"""The rotation benchmark runs end to end and its budgets hold (a tiny fleet), and its sweeps cost
the same AWS calls in a larger fleet."""

from __future__ import annotations

import json

from tests.support.benchmarks import run_benchmark


def test_rotation_benchmark_runs_within_budget(tmp_path):
    # Given a tiny run of the benchmark: 4 devices rotating twice, sweeps with 2 due among 6
    # and then 16 devices with nothing due
    out = tmp_path / "rotation.json"
    done = run_benchmark(
        "rotation.py", "--devices", "4", "--not-due", "6,16", "--due", "2", out=out, timeout=300
    )
    # Then it succeeds: everything ended as expected and within its call budget
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert set(results["operations"]) == set(results["budget"])
    # two requests per device; each device commits once by event and once by call, one of
    # them retiring its factory certificate, the other the certificate fleetkey issued
    assert results["operations"]["request"]["n"] == 8
    assert all(op["n"] == 2 for k, op in results["operations"].items() if k != "request")
    # And each sweep did its work, with the same AWS calls whatever the fleet's size
    sweeps = results["sweeps"]
    assert set(sweeps) == {"idle", "renewal", "rollback", "deletion"}
    for kind, per_size in sweeps.items():
        assert set(per_size) == {"6", "16"}, kind
        calls = {size: op["calls_max"] for size, op in per_size.items()}
        assert len(set(calls.values())) == 1, (kind, calls)
    assert sweeps["renewal"]["16"]["counts"]["renewals_requested"] == 2
    assert sweeps["rollback"]["16"]["counts"]["rolled_back"] == 2
    assert sweeps["deletion"]["16"]["counts"]["deleted"] == 2
    assert sweeps["idle"]["16"]["counts"]["due"] == 0
    # And it printed its tables (nothing the services logged mixed into them)
    assert "| Operation | n | AWS calls | Budget |" in done.stdout
    assert "| Scheduled sweep (one batch, 2 due) |" in done.stdout
    assert "Budget check: OK" in done.stdout
    assert '"_aws"' not in done.stdout and '"level"' not in done.stdout
