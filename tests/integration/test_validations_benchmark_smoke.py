"""The validation benchmark runs end to end through the local stack (HTTP, MQTT/TLS) and its AWS
call budget holds (a few pumps)."""

from __future__ import annotations

import json

from tests.support.benchmarks import run_benchmark


def test_validation_benchmark_runs_within_budget(tmp_path):
    # Given a small run of the benchmark (the real functions behind the local gateway, pumps
    # answering their validate commands over MQTT)
    out = tmp_path / "validations.json"
    done = run_benchmark(
        "validations.py", "--devices", "2", "--rounds", "3", "--latency", "4", out=out, timeout=180
    )
    # Then it succeeds: every validation ended validated and verified, within the call budget
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == [] and results["over_budget"] == []
    ops = results["operations"]
    assert (ops["request, cold invocation"]["n"], ops["request"]["n"]) == (1, 5)
    assert ops["request, cold invocation"]["calls_max"] == ops["request"]["calls_max"] == 3
    assert ops["answer, warm"]["n"] == 4 and ops["answer, warm"]["calls_max"] == 2
    assert ops["answer, warm"]["by_operation"] == {
        "dynamodb.TransactWriteItems": 4,
        "kms.Sign": 4,
    }
    assert ops["answer, device's first (warm function)"]["calls_max"] == 3
    assert (ops["read"]["n"], ops["read"]["calls_max"]) == (6, 1)
    assert results["end_to_end"]["n"] == 4
    assert results["end_to_end"]["ms_p95"] >= results["end_to_end"]["ms_p50"] > 0
    # and the functions' output did not leak into the report
    assert "| step | n | AWS calls |" in done.stdout and '"_aws"' not in done.stdout
