"""The onboarding benchmark runs end to end under AWS IoT's rate limits: a small fleet connects at
once, is throttled, goes through Lambda's retries and the retry queue's event source mapping, and
every device ends registered with nothing stuck and nothing left for a person."""

from __future__ import annotations

import json

from tests.support.benchmarks import run_benchmark

# docs/load.md shows this command: 40 devices, the documented rates halved, no SDK retries, one
# Lambda retry after 0.2 s and the retry queue's visibility timeout a second, so that throttling
# reaches every stage of the backpressure.
SMOKE = [
    "--devices",
    "40",
    "--environments",
    "4",
    "--quota-scale",
    "0.5",
    "--sdk-attempts",
    "1",
    "--async-retry-delays",
    "0.2",
    "--retry-visibility-timeout",
    "1",
]


def test_onboarding_benchmark_registers_every_device_under_the_rate_limits(tmp_path):
    # Given a small fleet onboarding at once under the documented rates, halved
    out = tmp_path / "onboarding.json"
    done = run_benchmark("onboarding.py", *SMOKE, out=out, timeout=180)
    # Then every device ended registered and nothing is stuck
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert results["registered"] == 40
    assert results["lambda"]["handler_results"].get("accepted", 0) >= 40
    # and the binding quota is DescribeCertificate's (with UpdateCertificate's, one call each)
    throughput = results["throughput"]
    assert "DescribeCertificate" in throughput["binding_apis"]
    assert throughput["binding_quota_per_s"] <= 5.0
    assert results["apis"]["DescribeCertificate"]["rate_limit_per_s"] == 5.0
    assert results["apis"]["UpdateCertificate"]["rate_limit_per_s"] == 5.0
    # which the run did not beat (a bucket holds one second of its rate at the start)
    assert throughput["overall_per_s"] <= 1.5 * throughput["binding_quota_per_s"]
    # And the backpressure went all the way: throttled attempts, Lambda's retries, the retry
    # queue, whose event source mapping finished every record it got (none for a person)
    assert results["apis"]["DescribeCertificate"]["throttled_attempts"] > 0
    assert results["devices"]["refused_by_jitr_rate"] > 0
    lam, retries = results["lambda"], results["retry_queue"]
    assert lam["function_errors"] > 0 and lam["async_retries"] > 0
    assert retries["records_in"] == lam["to_retry_queue"] > 0
    assert retries["succeeded"] == retries["records_in"]
    assert retries["deliveries"] == retries["succeeded"] + retries["failed_again"]
    assert retries["dead_lettered"] == 0
    # And it printed its tables (nothing the handlers logged mixed into them)
    assert "| Throughput | registrations/s |" in done.stdout
    assert "| DescribeCertificate | 5 |" in done.stdout
    assert "Every device registered (40); nothing stuck." in done.stdout
    assert '"_aws"' not in done.stdout and '"level"' not in done.stdout
