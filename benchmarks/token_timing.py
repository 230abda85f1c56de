"""Token refusal timing: is an unknown device refused as fast as a known one?

    .venv/bin/python benchmarks/token_timing.py [--requests N] [--devices D] [--seed S]
                                                [--json FILE]

Runs the real token function (functions/token/handler.py) as API Gateway would invoke it, against
moto on 127.0.0.1 (as benchmarks/tokens.py does), with N requests of each kind, interleaved in a
shuffled order so that drift (caches, CPU frequency, moto's growing state) hits every kind alike:

- `unknown`: an assertion for a device that does not exist;
- `bad-signature`: an ACTIVE device, its current certificate id, signed by another key;
- `wrong-kid`: an ACTIVE device, signed by its own key, naming a certificate that is not its own.

Every answer must be the same 401 body. Per request it measures the handler's wall time, the
part of it spent in HTTP round trips to AWS (botocore's `Endpoint._send`: moto's own work for the
call, which is not DynamoDB's), the handler's own wall time (the difference) and its CPU time
(`time.thread_time()` of the calling thread: moto runs in its own threads). For each kind it
prints p50/p95/p99, and for `unknown` against each known-device kind three overlap statistics
computed here (no scipy):

- Vargha-Delaney A = P(X > Y) + P(X = Y)/2, from the Mann-Whitney U: 0.5 when neither is faster;
- the Kolmogorov-Smirnov D, the largest gap between the two empirical distribution functions,
  with its asymptotic p-value (two-sided; small when the distributions differ);
- the difference of medians relative to the pooled interquartile range.

Verdict, on the handler's own wall time and its CPU time: the distributions overlap when every
A of `unknown` against a known-device kind lies within (0.44, 0.56), below Vargha and Delaney's
"small effect" (A = 0.56, i.e. one kind slower in at most 56% of random pairs). With 600
requests of each kind the standard error of A is ~0.017, so an A outside that band is a
difference, not noise; with a few requests the verdict means nothing (the smoke test's run).
Exit status: 0 when they overlap, 1 when a difference shows (A outside the band), 2 when a
request was not answered as expected. The total wall time is reported too but not judged: it
includes moto answering GetItem, which takes longer for a present item than for an absent one,
a trait of the emulator (DynamoDB's answer differs by a few hundred bytes of projected item).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import math
import os
import random
import statistics
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.pki import CertificateAuthority, generate_key
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory

KINDS = ("unknown", "bad-signature", "wrong-kid")
# Vargha & Delaney (2000): A >= 0.56 (or <= 0.44) is at least a small effect. The old bound,
# 0.71 ("large"), let an unknown device be refused faster in 65% of pairs and still pass.
OVERLAP_BAND = (0.44, 0.56)
WARMUP = 20
EXPECTED_BODY = {"error": "invalid_client", "error_description": "client authentication failed"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def vargha_delaney_a(xs: list[float], ys: list[float]) -> float:
    """P(X > Y) + P(X = Y) / 2, from the Mann-Whitney U with mid-ranks for ties."""
    pooled = sorted([(v, 0) for v in xs] + [(v, 1) for v in ys])
    rank_sum_x, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid_rank = (i + j) / 2 + 1  # ranks are 1-based
        rank_sum_x += mid_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        i = j + 1
    u_x = rank_sum_x - len(xs) * (len(xs) + 1) / 2
    return u_x / (len(xs) * len(ys))


def kolmogorov_smirnov_d(xs: list[float], ys: list[float]) -> float:
    """sup |F_x(t) - F_y(t)| over every observed t."""
    a, b = sorted(xs), sorted(ys)
    i = j = 0
    d = 0.0
    while i < len(a) and j < len(b):
        t = min(a[i], b[j])
        while i < len(a) and a[i] == t:
            i += 1
        while j < len(b) and b[j] == t:
            j += 1
        d = max(d, abs(i / len(a) - j / len(b)))
    return d


def kolmogorov_smirnov_p(d: float, n: int, m: int) -> float:
    """The asymptotic two-sided p-value of a two-sample KS statistic `d` (Kolmogorov's
    distribution, Q(t) = 2 sum (-1)^(k-1) exp(-2 k^2 t^2), with Stephens' small-sample term)."""
    effective = math.sqrt(n * m / (n + m))
    t = (effective + 0.12 + 0.11 / effective) * d
    if t < 0.2:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * t * t) for k in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def iqr(values: list[float]) -> float:
    return percentile(values, 0.75) - percentile(values, 0.25)


def compare(xs: list[float], ys: list[float]) -> dict[str, float]:
    pooled_iqr = (iqr(xs) + iqr(ys)) / 2 or 1e-9
    d = kolmogorov_smirnov_d(xs, ys)
    return {
        "A": vargha_delaney_a(xs, ys),
        "KS_D": d,
        "KS_p": kolmogorov_smirnov_p(d, len(xs), len(ys)),
        "median_diff_over_iqr": (statistics.median(xs) - statistics.median(ys)) / pooled_iqr,
    }


def overlaps(a: float) -> bool:
    """Whether a Vargha-Delaney A says the two distributions overlap (`OVERLAP_BAND`)."""
    low, high = OVERLAP_BAND
    return low < a < high


def judge(comparisons: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The judged comparisons ({other kind: {metric: stats}}) whose A is outside the band."""
    return [
        f"unknown vs {other} ({metric}): A = {by_metric[metric]['A']:.3f}"
        for other, by_metric in comparisons.items()
        for metric in JUDGED
        if metric in by_metric and not overlaps(by_metric[metric]["A"])
    ]


def _event(form: dict[str, str]) -> dict[str, Any]:
    return proxy_event(
        "POST",
        "/v1/token",
        resource="/v1/token",
        headers={"content-type": "application/x-www-form-urlencoded"},
        body=urlencode(form),
    )


def build_requests(
    stack: EmbeddedStack, devices: int, requests: int, rng: random.Random
) -> list[tuple[str, dict[str, Any]]]:
    """Register `devices` ACTIVE devices and sign `requests` assertions of every kind."""
    acme = CertificateAuthority.create("acme")
    stack.register_ca(acme)
    enrolled = []
    for i in range(devices):
        device_id = f"sensor-{i:04d}"
        key, _, event = stack.manufacture(acme, device_id, serial_number=f"SN-{i}", actor="bench")
        if not stack.register(event).accepted:
            raise SystemExit(f"registration of {device_id} was refused")
        enrolled.append((device_id, key, event["certificateId"]))
    issuer = os.environ["FLEETKEY_ISSUER"]
    impostor = generate_key("ec:secp256r1")
    made: list[tuple[str, dict[str, Any]]] = []
    for n in range(requests):
        device_id, key, certificate_id = enrolled[n % len(enrolled)]
        other_certificate = hashlib.sha256(f"not-a-certificate-{n}".encode()).hexdigest()
        assertions = {
            "unknown": client_assertion(impostor, other_certificate, f"ghost-{n:05d}", issuer),
            "bad-signature": client_assertion(impostor, certificate_id, device_id, issuer),
            "wrong-kid": client_assertion(key, other_certificate, device_id, issuer),
        }
        made += [(kind, _event(token_request(assertion))) for kind, assertion in assertions.items()]
    rng.shuffle(made)
    return made


METRICS = ("wall", "aws", "own", "cpu")  # own = wall - aws
JUDGED = ("own", "cpu")


class RoundTrips:
    """Wall time spent in botocore's HTTP exchanges (request sent, response read), in total."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self) -> None:
        from botocore.endpoint import Endpoint

        send = Endpoint._send

        def timed(endpoint: Endpoint, request: Any) -> Any:
            started = time.perf_counter()
            try:
                return send(endpoint, request)
            finally:
                self.seconds += time.perf_counter() - started

        Endpoint._send = timed  # type: ignore[method-assign]


def run(
    requests: list[tuple[str, dict[str, Any]]],
) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Invoke the token handler for each request; returns {kind: {metric: [ms, ...]}} for the
    METRICS, and the problems met (answers other than the one 401)."""
    token = load_function("token")
    round_trips = RoundTrips()
    round_trips.install()
    samples = {k: {m: [] for m in METRICS} for k in KINDS}
    problems: list[str] = []
    sink = io.StringIO()
    warmup = [requests[i % len(requests)] for i in range(WARMUP)]
    # No collection inside a timed call: everything alive now is frozen out of the collector's
    # sight, and each request's own garbage is collected between calls (cheap, untimed).
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        for index, (kind, event) in enumerate(warmup + requests):
            gc.collect()
            aws0 = round_trips.seconds
            with contextlib.redirect_stdout(sink):
                wall0, cpu0 = time.perf_counter(), time.thread_time()
                response = token.handler(event, LambdaContext())
                cpu1, wall1 = time.thread_time(), time.perf_counter()
            aws = round_trips.seconds - aws0
            sink.seek(0)
            sink.truncate()
            if response["statusCode"] != 401 or json.loads(response["body"]) != EXPECTED_BODY:
                problems.append(f"{kind}: {response['statusCode']} {response['body'][:200]}")
            if index >= WARMUP:
                measured = {
                    "wall": wall1 - wall0,
                    "aws": aws,
                    "own": wall1 - wall0 - aws,
                    "cpu": cpu1 - cpu0,
                }
                for metric, seconds in measured.items():
                    samples[kind][metric].append(seconds * 1000)
    finally:
        gc.enable()
        gc.unfreeze()
    return samples, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests of each kind")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7, help="seed of the interleaving")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        requests = build_requests(stack, args.devices, args.requests, random.Random(args.seed))
        samples, problems = run(requests)

    print("| kind | n | wall ms | AWS round trips ms | handler's own wall ms | handler CPU ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        row = [f"| {kind} | {len(samples[kind]['wall'])} "]
        for metric in METRICS:
            values = samples[kind][metric]
            row.append(" / ".join(f"{percentile(values, q):.2f}" for q in (0.5, 0.95, 0.99)))
        print(" | ".join(row) + " |")
    print("(each: p50 / p95 / p99)")
    print()
    print("| unknown vs | metric | A (0.5 = no difference) | KS D | KS p | (median diff) / IQR |")
    print("|---|---|---:|---:|---:|---:|")
    comparisons: dict[str, dict[str, dict[str, float]]] = {}
    for other in KINDS[1:]:
        for metric in METRICS:
            stats = compare(samples["unknown"][metric], samples[other][metric])
            comparisons.setdefault(other, {})[metric] = stats
            judged = "" if metric in JUDGED else " (not judged)"
            print(
                f"| {other} | {metric}{judged} | {stats['A']:.3f} | {stats['KS_D']:.3f} | "
                f"{stats['KS_p']:.3f} | {stats['median_diff_over_iqr']:+.2f} |"
            )
    separated = judge(comparisons)
    # The known-device kinds against each other, for scale: they are expected to overlap.
    for a, b in combinations(KINDS[1:], 2):
        for metric in JUDGED:
            stats = compare(samples[a][metric], samples[b][metric])
            print(
                f"| ({a} vs {b}) | {metric} | {stats['A']:.3f} | {stats['KS_D']:.3f} | "
                f"{stats['KS_p']:.3f} | {stats['median_diff_over_iqr']:+.2f} |"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "samples": samples,
                    "comparisons": comparisons,
                    "overlap_band": list(OVERLAP_BAND),
                    "separated": separated,
                    "problems": problems,
                }
            )
        )
    if problems:
        print(f"unexpected answers ({len(problems)}): {problems[:3]}")
        return 2
    band = f"({OVERLAP_BAND[0]:.2f}, {OVERLAP_BAND[1]:.2f})"
    if separated:
        print(f"verdict: SEPARATED (judged A outside {band}): " + "; ".join(separated))
        return 1
    print(f"verdict: overlap (every judged A within {band})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
