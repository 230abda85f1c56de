"""Token benchmark: AWS calls and the token handler's own CPU time per issued token.

    .venv/bin/python benchmarks/tokens.py [--devices N] [--rounds R]

Runs the real token function (functions/token/handler.py) as API Gateway would invoke it, against
moto on 127.0.0.1 (its own threads: `time.thread_time()` of the calling thread excludes moto's
CPU, and includes botocore's and pyjwt's work in the handler). Devices are registered and their
assertions signed before timing. Each device's first token on the warm function reads the
device (3 AWS calls); its later ones are served from the credential cached by certificate id
(2: KMS Sign and the conditional write). Exits 1 if a warm token costs more than 2 AWS calls,
a device's first more than 3 (the first, cold invocation also reads the signing-key registry,
reported separately), or if any KMS GetPublicKey happens on a warm request.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
from collections import Counter
from urllib.parse import urlencode

from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.pki import CertificateAuthority
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory

BUDGET = 2
FIRST_BUDGET = 3  # a device's first token on a warm function also reads the device


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4, help="tokens per device")
    args = parser.parse_args(argv)
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        acme = CertificateAuthority.create("acme")
        stack.register_ca(acme)
        devices = []
        for i in range(args.devices):
            device_id = f"sensor-{i:04d}"
            key, _, event = stack.manufacture(
                acme, device_id, serial_number=f"SN-{i}", actor="bench"
            )
            assert stack.register(event).accepted
            devices.append((device_id, key, event["certificateId"]))
        issuer = os.environ["FLEETKEY_ISSUER"]
        requests = [
            proxy_event(
                "POST",
                "/v1/token",
                resource="/v1/token",
                headers={"content-type": "application/x-www-form-urlencoded"},
                body=urlencode(token_request(client_assertion(key, cert_id, device_id, issuer))),
            )
            for _ in range(args.rounds)
            for device_id, key, cert_id in devices
        ]
        counter = AwsCallCounter().watch_default_session()
        token = load_function("token")
        samples: list[tuple[float, float, list[str]]] = []
        sink = io.StringIO()
        for event in requests:
            counter.reset()
            gc.collect()
            gc.freeze()
            with contextlib.redirect_stdout(sink):
                wall0, cpu0 = time.perf_counter(), time.thread_time()
                response = token.handler(event, LambdaContext())
                cpu1, wall1 = time.thread_time(), time.perf_counter()
            gc.unfreeze()
            if response["statusCode"] != 200:
                print(f"unexpected answer: {response}", file=sys.stderr)
                return 1
            samples.append(((cpu1 - cpu0) * 1000, (wall1 - wall0) * 1000, counter.reset()))
    # Requests go device by device, round by round: the first round's are each device's first.
    cold, first, warm = samples[0], samples[1 : len(devices)], samples[len(devices) :]
    print("| operation | n | AWS calls | handler CPU ms p50 / p95 | wall ms p50 / p95 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| token, cold invocation | 1 | {len(cold[2])} | {cold[0]:.1f} | {cold[1]:.1f} |")
    for label, rows in (("token, device's first (warm function)", first), ("token, warm", warm)):
        if not rows:
            continue
        calls = Counter(len(s[2]) for s in rows)
        cpu, wall = [s[0] for s in rows], [s[1] for s in rows]
        print(
            f"| {label} | {len(rows)} | {min(calls)}-{max(calls)} | "
            f"{statistics.median(cpu):.2f} / {percentile(cpu, 0.95):.2f} | "
            f"{statistics.median(wall):.2f} / {percentile(wall, 0.95):.2f} |"
        )
    names = Counter(name for s in warm for name in s[2])
    print(f"cold calls: {', '.join(cold[2])}")
    print(
        f"warm calls per token: {json.dumps(dict(Counter(len(s[2]) for s in warm)))}; "
        f"by operation: {dict(names)}"
    )
    failed = (
        any(len(s[2]) > BUDGET for s in warm)
        or any(len(s[2]) > FIRST_BUDGET for s in first)
        or bool(names.get("kms.GetPublicKey"))
    )
    print(
        "budget: "
        + (
            "EXCEEDED"
            if failed
            else f"ok (warm at most {BUDGET} calls, a device's first {FIRST_BUDGET}, "
            "no GetPublicKey)"
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
