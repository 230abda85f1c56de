"""The lifecycle benchmark runs end to end and its AWS call budgets hold (a tiny fleet)."""

from __future__ import annotations

import json

from tests.support.benchmarks import run_benchmark


def test_lifecycle_benchmark_runs_within_budget(tmp_path):
    # Given a tiny run of the benchmark (the lifecycle and data-key services against moto)
    out = tmp_path / "lifecycle.json"
    done = run_benchmark(
        "lifecycle.py", "--devices", "2", "--cert-devices", "1", out=out, timeout=180
    )
    # Then it succeeds: every operation ended as expected and within its call budget
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert set(results["operations"]) == {
        "data_key_first",
        "data_key_warm",
        "data_key_backend",
        "suspend",
        "resume",
        "decommission",
        "teardown",
        "recommission",
    }
    assert all(op["n"] == 2 for op in results["operations"].values())
    # and the calls grow linearly with the certificates a device holds, within the budgets
    for key, (fixed, per_certificate) in results["per_certificate_budget"].items():
        measured = results["formulas"][key]
        assert measured["linear"], (key, measured)
        assert measured["per_certificate"] <= per_certificate, (key, measured)
        assert measured["fixed"] <= fixed, (key, measured)
    # And it printed its tables (nothing the services logged mixed into them)
    assert "| Operation | n | AWS calls | Budget |" in done.stdout
    assert "| AWS calls vs certificates held |" in done.stdout
    assert "| teardown |" in done.stdout and "Budget check: OK" in done.stdout
    assert '"_aws"' not in done.stdout and '"level"' not in done.stdout
