"""`make serve`: the local stack, running until interrupted.

    python -m fleetkey_local.serve [--api-port 8080] [--mqtt-port 8883] [--state-dir build/local]
        [--token-rate-limit N] [--discovery-rate-limit N] [--rate-limit-window S]
        [--no-rate-limits]

AWS (moto) on 127.0.0.1, the resources created from the definitions the CDK stack uses, the API
on a local API gateway, AWS IoT Core as an MQTT broker over TLS, the lifecycle queue's event source
mapping feeding the converge function, and a demo manufacturer CA whose files (certificate and
key) let you make devices that register just in time.

The API applies the deployed stack's per-client limits (cdk.json's context, else
`fleetkey_infra.edge`'s defaults) per client address; the options override them (any positive
numbers: small ones let a test trip them) or turn them off.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fleetkey_infra.edge import EdgeConfig, RateLimit
from fleetkey_local.api_gateway import (
    LOCAL_OPERATOR_ARN,
    LOCAL_RELYING_PARTY_ARN,
    LOCAL_RELYING_PARTY_KEY,
    LocalApiGateway,
    local_operator,
)
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.pki import CertificateAuthority, key_pem
from fleetkey_local.queues import QueueWorker
from fleetkey_local.server import local_aws
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory

DEMO_CA = "demo-factory"


def write_demo_ca(stack: EmbeddedStack, state_dir: Path) -> CertificateAuthority:
    """A manufacturer CA registered with the local stack; its key is written next to it so that
    a developer can issue factory certificates for test devices."""
    authority = CertificateAuthority.create(DEMO_CA)
    stack.register_ca(authority)
    (state_dir / f"{DEMO_CA}.pem").write_text(authority.pem)
    key_file = state_dir / f"{DEMO_CA}.key"
    key_file.write_text(key_pem(authority.key))
    key_file.chmod(0o600)
    return authority


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def rate_limits(args: argparse.Namespace) -> tuple[RateLimit, ...]:
    """The configured per-client limits, with the command line's overrides."""
    if args.no_rate_limits:
        return ()
    overrides = {"token": args.token_rate_limit, "discovery": args.discovery_rate_limit}
    limits = []
    for limit in EdgeConfig.from_cdk_json().rate_limits():
        limits.append(
            dataclasses.replace(
                limit,
                limit=overrides.get(limit.name) or limit.limit,
                window_seconds=args.rate_limit_window or limit.window_seconds,
            )
        )
    return tuple(limits)


def describe_rate_limits(limits: Sequence[RateLimit]) -> str:
    if not limits:
        return "off"
    parts = [
        f"{' + '.join(limit.path_fragments)} {limit.limit}/{limit.window_seconds}s"
        for limit in limits
    ]
    return "per client address: " + ", ".join(parts) + " (then 429 + Retry-After)"


def describe_redrive(worker: QueueWorker) -> str:
    policy = worker.redrive_policy()
    if policy is None:
        return "no dead-letter queue"
    dead_letters = policy["deadLetterTargetArn"].rsplit(":", 1)[-1]
    return f"dead letters to {dead_letters} after {policy['maxReceiveCount']} receives"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetkey-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--mqtt-port", type=int, default=8883)
    parser.add_argument("--state-dir", type=Path, default=Path("build/local"))
    parser.add_argument(
        "--token-rate-limit",
        type=_positive,
        default=None,
        help="requests per window per client to /v1/token and /v1/challenge",
    )
    parser.add_argument(
        "--discovery-rate-limit",
        type=_positive,
        default=None,
        help="requests per window per client to /.well-known/*",
    )
    parser.add_argument(
        "--rate-limit-window", type=_positive, default=None, help="the limits' window in seconds"
    )
    parser.add_argument(
        "--no-rate-limits",
        action="store_true",
        help="no per-client limits (e.g. to load-test from one address)",
    )
    args = parser.parse_args(argv)
    limits = rate_limits(args)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        settings = stack.settings
        # The functions read the provisioned resources' ids from their environment, as deployed.
        os.environ.update(stack.environment())
        write_demo_ca(stack, args.state_dir)
        api = LocalApiGateway(port=args.api_port, rate_limits=limits)
        iot = IotCoreEmulator(args.state_dir, port=args.mqtt_port, account=ACCOUNT, region=REGION)
        lifecycle = QueueWorker(
            stack.make_client("sqs"),
            settings.lifecycle_queue_url,
            "converge",
            region=REGION,
            account=ACCOUNT,
        )
        api.start()
        os.environ["FLEETKEY_ISSUER"] = api.url  # the functions' issuer is this API's address
        iot.start()
        lifecycle.start()
        print(
            f"fleetkey local stack\n"
            f"  API            {api.url}  (admin routes need SigV4: see README)\n"
            f"  rate limits    {describe_rate_limits(limits)}\n"
            f"  operator       {LOCAL_OPERATOR_ARN} (access key {local_operator().access_key})\n"
            f"  relying party  {LOCAL_RELYING_PARTY_ARN} (access key {LOCAL_RELYING_PARTY_KEY}; "
            f"introspection only)\n"
            f"  AWS IoT (MQTT) mqtts://{iot.address[0]}:{iot.address[1]}  "
            f"(client certificate required)\n"
            f"  lifecycle      {settings.lifecycle_queue_url} -> converge "
            f"({describe_redrive(lifecycle)})\n"
            f"  endpoint CA    {iot.endpoint_ca_path}\n"
            f"  demo factory   {args.state_dir / (DEMO_CA + '.pem')} and .key "
            f"(registered manufacturer CA)\n"
            f"  AWS (moto)     {endpoint}\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            lifecycle.stop()
            iot.stop()
            api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
