"""The registration benchmark runs end to end and its AWS call budget holds (a few devices)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import ROOT
from tests.support.benchmarks import run_benchmark


def test_registration_benchmark_runs_within_budget(tmp_path):
    # Given a small run of the benchmark (the real handler against a moto server)
    out = tmp_path / "bench.json"
    done = run_benchmark(
        "registration.py", "--devices", "3", "--import-rows", "200", out=out, timeout=120
    )
    # Then it succeeds: every operation ended as expected and within the call budget
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    ops = results["operations"]
    assert ops["accepted"]["calls_max"] <= 8
    assert ops["refused_not_allowlisted"]["calls_max"] <= 3
    assert ops["refused_expired"]["calls_max"] <= 3
    # And the handler's stdout (logs, metrics) did not leak into the report
    assert "| Operation |" in done.stdout and '"_aws"' not in done.stdout


def test_token_timing_benchmark_runs_and_every_refusal_is_the_same_401(tmp_path):
    # Given a tiny run of the timing benchmark (the real token handler against a moto server);
    # its verdict on so few samples means nothing, so only that it ran is checked, never timing
    out = tmp_path / "timing.json"
    done = run_benchmark(
        "token_timing.py", "--requests", "6", "--devices", "2", out=out, timeout=180
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
    # and the verdict names its criterion, the band A must lie in, with the KS p-value shown
    assert results["overlap_band"] == [0.44, 0.56]
    assert "KS p" in done.stdout
    assert "(0.44, 0.56)" in done.stdout.splitlines()[-1]  # the verdict line


def load_token_timing():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "token_timing", ROOT / "benchmarks" / "token_timing.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_timing_verdict_calls_a_small_effect_a_difference():
    # Given the timing benchmark's judgement, and comparisons of unknown against a known kind
    timing = load_token_timing()

    def verdict(own_a, cpu_a, wall_a=0.1):
        return timing.judge(
            {"bad-signature": {"own": {"A": own_a}, "cpu": {"A": cpu_a}, "wall": {"A": wall_a}}}
        )

    # When an unknown device is faster in 65% of pairs (A = 0.35, what the review measured),
    # or slower in 57%, Then that is a difference
    assert verdict(0.5, 0.35) and verdict(0.57, 0.5) and verdict(0.44, 0.5)
    # and when A stays within (0.44, 0.56) on the judged metrics, overlap (wall is not judged)
    assert verdict(0.47, 0.53) == []
    assert timing.OVERLAP_BAND == (0.44, 0.56)


def test_kolmogorov_smirnov_p_value_is_kolmogorovs_distribution():
    # Given the benchmark's KS p-value, Then it matches tabulated values of Kolmogorov's
    # distribution (Q(1.36) = 0.049, Q(1.63) = 0.0098) and is 1 for identical samples
    timing = load_token_timing()
    n = 10_000_000  # large: the small-sample correction vanishes
    d_for = lambda t: t / math.sqrt(n * n / (2 * n))  # noqa: E731
    assert abs(timing.kolmogorov_smirnov_p(d_for(1.36), n, n) - 0.049) < 0.001
    assert abs(timing.kolmogorov_smirnov_p(d_for(1.63), n, n) - 0.0098) < 0.0005
    assert timing.kolmogorov_smirnov_p(0.0, 600, 600) == 1.0


def load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("initialization", ["on-demand", "snap-start"])
def test_importtime_benchmark_reports_each_ratio_to_the_reference_measured_beside_it(
    initialization, tmp_path
):
    # Given one run of the import-time benchmark for the token function (as deployed: tracing on),
    # initialized on demand (`make importtime`) or ahead of requests (`--initialization
    # snap-start`); its verdict on one run of a shared machine means nothing, so only that it
    # judged is checked
    out = tmp_path / "importtime.json"
    done = run_benchmark(
        "importtime.py",
        "--runs",
        "1",
        "--functions",
        "token",
        "--initialization",
        initialization,
        out=out,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    # Then each case has the handler's import, the reference's, and their ratio
    assert results["tracing"] is True and results["initialization"] == initialization
    assert results["reference"] == "import boto3, cryptography.x509, jwt"
    for case in ("bytecode_cached", "no_dependency_bytecode"):
        figures = results["functions"]["token"][case]
        handler, reference = figures["handler_cumulative_ms_runs"], figures["reference_ms_runs"]
        assert figures["ratio"] == pytest.approx(handler[0] / reference[0]) and reference[0] > 0
    # and the exit status is the verdict it prints
    assert ("Above 1.3x the reference" in done.stdout) == (done.returncode == 1)
    assert "| ratio |" in done.stdout


def test_importtime_benchmark_fails_a_function_above_the_ratio_in_either_case():
    importtime = load_benchmark("importtime")
    cases = ("bytecode_cached", "no_dependency_bytecode")
    results = {
        "functions": {
            "token": dict(zip(cases, ({"ratio": 1.29}, {"ratio": 1.31}), strict=True)),
            "admin": dict(zip(cases, ({"ratio": 1.0}, {"ratio": 1.3}), strict=True)),
        }
    }
    assert importtime.over_limit(results, 1.3) == ["token (no .pyc for dependencies): 1.31"]
    assert importtime.over_limit(results, 1.4) == []


def test_importtime_reference_is_the_outermost_imports_of_its_three_packages():
    # Given -X importtime output of `import boto3, cryptography.x509, jwt` (start-up first)
    importtime = load_benchmark("importtime")
    stderr = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |   encodings.utf_8",
            "import time:       200 |        300 | site",
            "import time:        50 |         50 |     botocore.compat",
            "import time:       100 |        150 |   botocore",
            "import time:        10 |        160 | boto3",
            "import time:        20 |         20 | cryptography",
            "import time:        30 |         30 | cryptography.x509",
            "import time:         5 |          5 | jwt",
        ]
    )
    # Then the reference is theirs alone (what they import included), not the interpreter's
    assert importtime.reference_us(stderr) == 160 + 20 + 30 + 5


def test_snapstart_benchmark_answers_every_request_each_way_it_starts(tmp_path):
    # Given one sample of each way to start the token function (fresh interpreters, moto server)
    out = tmp_path / "snapstart.json"
    done = run_benchmark("snapstart.py", "--samples", "1", out=out, timeout=300)
    # Then every request got its token, and each way reports what a cold start waited for
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["problems"] == []
    assert set(results["modes"]) == {"on-demand", "snapshot", "snapshot-primed"}
    for clock in ("wall", "cpu"):
        on_demand = {key: value[clock] for key, value in results["modes"]["on-demand"].items()}
        assert on_demand["cold_start_ms"] == pytest.approx(
            on_demand["init_ms"] + on_demand["first_request_ms"]
        )
        for mode in ("snapshot", "snapshot-primed"):
            figures = results["modes"][mode]
            assert figures["cold_start_ms"][clock] == figures["first_request_ms"][clock]
    assert "| Start |" in done.stdout and '"_aws"' not in done.stdout
