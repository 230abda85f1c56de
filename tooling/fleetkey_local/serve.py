"""`make serve`: the local stack, running until interrupted.

    python -m fleetkey_local.serve [--api-port 8080] [--mqtt-port 8883] [--est-port 8443]
        [--state-dir build/local] [--token-rate-limit N] [--discovery-rate-limit N]
        [--rate-limit-window S] [--no-rate-limits] [--rotation-sweep-seconds 60] [--lambda-port 0]

AWS (moto) on 127.0.0.1, the resources created from the definitions the CDK stack uses (and the
issuing CA, as `fleetkey pki init` makes it), the API on a local API gateway, the same API over
HTTPS with client certificates for EST (a custom domain with mutual TLS), AWS IoT Core as an MQTT
broker over TLS, the lifecycle queue's event source mapping feeding the converge function, the
rotation sweep's schedule (the rotation_events function every minute), and a demo manufacturer CA
whose files (certificate and key) let you make devices that register just in time.

The deployed stack's failure queues exist too, and the functions the IoT rules invoke have their
on-failure destinations; Lambda's Invoke API (InvocationType Event) runs the local functions for
`fleetkey redrive`, which finds the queues, the functions and both endpoints in
<state dir>/outputs.json (what CloudFormation's outputs say of a deployed stack).

The EST listener's server certificate is issued by the local endpoint CA (the state directory's
`iot-endpoint-ca.pem`, which devices trust for AWS IoT too). Its truststore is AWS IoT's: the CA
certificates registered in AWS IoT (the manufacturer CAs, and the issuing CA, which fleetkey
registers), read again whenever they change, plus the issuing CA's chain up to its root. A client
certificate is optional at the TLS handshake (RFC 7030 lets /cacerts be anonymous) but must be
trusted when presented; simplereenroll is refused without one by the rotation function.

The API applies the deployed stack's per-client limits (cdk.json's context, else
`fleetkey_infra.edge`'s defaults) per client address; the options override them (any positive
numbers: small ones let a test trip them) or turn them off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetkey.errors import FleetkeyError
from fleetkey_cli.redrive import DEFAULT_STATE_DIR, write_local_outputs
from fleetkey_infra.edge import HTTP_METHODS, OPERATOR_ROLES, EdgeConfig, RateLimit
from fleetkey_local.api_gateway import (
    DEFAULT_MUTUAL_TLS_PORT,
    LOCAL_OPERATOR_ARN,
    LOCAL_RELYING_PARTY_ARN,
    LOCAL_RELYING_PARTY_KEY,
    LocalApiGateway,
    MutualTlsDomain,
    local_operator,
    local_operator_role,
)
from fleetkey_local.failure_queues import (
    FAILURE_QUEUES,
    REGISTRATION_RETRY_OUTPUT,
    local_outputs,
    provision_failure_queues,
)
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.iot_core import (
    IotCoreEmulator,
    TrustStore,
    ensure_endpoint_pki,
    registry_backend,
)
from fleetkey_local.lambda_invoke import AsyncInvoker, LocalLambdaEndpoint
from fleetkey_local.pki import CertificateAuthority, key_pem
from fleetkey_local.queues import QueueWorker
from fleetkey_local.server import local_aws
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory

log = logging.getLogger("fleetkey_local.serve")

DEMO_CA = "demo-factory"
EST_SERVER_FILES = ("est-server.pem", "est-server.key")
# The deployed schedule's rate (fleetkey_infra.constants.ROTATION_SWEEP_RATE: one minute).
ROTATION_SWEEP_SECONDS = 60
ROTATION_SWEEP_RULE = "fleetkey-local-rotation-sweep"


def describe_operator_roles() -> str:
    """One line per operator role's local session: its role, its credentials (access key =
    secret) and its scope (`fleetkey_infra.edge.OPERATOR_ROLES`)."""
    lines = []
    for role in OPERATOR_ROLES:
        session = local_operator_role(role.name)
        methods = "any method" if set(role.methods) == set(HTTP_METHODS) else "/".join(role.methods)
        lines.append(
            f"  {role.name:<14} {session.principal_arn} (access key {session.access_key}; "
            f"{methods} on {' '.join(role.policy_paths)})\n"
        )
    return "".join(lines)


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


def issuing_ca_anchors(stack: EmbeddedStack) -> Callable[[], tuple[str, ...]]:
    """The issuing CA's chain (PEM, the CA then its issuers up to the root) as the EST
    truststore's extra anchors; none while no issuing CA is active."""

    def anchors() -> tuple[str, ...]:
        try:
            return (stack.pki.chain_pem(),)
        except FleetkeyError:
            return ()

    return anchors


def est_truststore(stack: EmbeddedStack, state_dir: Path, host: str) -> TrustStore:
    """The EST listener's TLS context: a server certificate of the local endpoint CA, and AWS
    IoT's registered CAs plus the issuing CA's chain as trust anchors; a client certificate is
    optional, and must be trusted when presented."""
    _, certfile, keyfile = ensure_endpoint_pki(state_dir, [host], EST_SERVER_FILES)
    return TrustStore(
        lambda: registry_backend(ACCOUNT, REGION),
        certfile,
        keyfile,
        extra_anchors=issuing_ca_anchors(stack),
        verify_mode=ssl.CERT_OPTIONAL,
    )


def scheduled_event(
    rule_arn: str, *, account: str = ACCOUNT, region: str = REGION, now: datetime | None = None
) -> dict[str, Any]:
    """The event an EventBridge schedule sends its target (events/scheduled-maintenance.json)."""
    moment = now or datetime.now(UTC)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": account,
        "time": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [rule_arn],
        "detail": {},
    }


class RateSchedule:
    """An EventBridge rule `rate(<interval>)` with a function as its target: every `interval`
    seconds (the first time one interval after `start`, as EventBridge's first), the function
    (functions/<name>, or a handler) is invoked with the scheduled event, in the schedule's own
    thread, one invocation at a time. A failed invocation is logged and counted, not retried
    (Lambda would retry it twice; the next run repeats the work anyway)."""

    def __init__(
        self,
        rule_name: str,
        function: str | Callable[[dict, Any], Any],
        interval: float = ROTATION_SWEEP_SECONDS,
        *,
        account: str = ACCOUNT,
        region: str = REGION,
    ) -> None:
        if interval <= 0:
            raise ValueError("a schedule's interval must be positive")
        self.rule_arn = f"arn:aws:events:{region}:{account}:rule/{rule_name}"
        self.function = function
        self.interval = interval
        self.account, self.region = account, region
        self.runs = self.failures = 0
        self.last_result: Any = None
        self._handler: Callable[[dict, Any], Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def function_name(self) -> str:
        if isinstance(self.function, str):
            return self.function
        return getattr(self.function, "__name__", type(self.function).__name__)

    def start(self) -> RateSchedule:
        self._handler = (
            load_function(self.function).handler
            if isinstance(self.function, str)
            else self.function
        )
        self._thread = threading.Thread(
            target=self._run, name=f"schedule-{self.function_name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """No further run; waits for a run in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.invoke()

    def invoke(self) -> Any:
        """One scheduled invocation now; its result (None when it failed)."""
        if self._handler is None:
            raise RuntimeError("the schedule is not started")
        name = f"fleetkey-{self.function_name}"
        context = LambdaContext(
            function_name=name,
            invoked_function_arn=f"arn:aws:lambda:{self.region}:{self.account}:function:{name}",
            aws_request_id=str(uuid.uuid4()),
        )
        event = scheduled_event(self.rule_arn, account=self.account, region=self.region)
        self.runs += 1
        try:
            self.last_result = self._handler(event, context)
        except Exception:  # an asynchronous invocation's failure stays in its log
            self.failures += 1
            self.last_result = None
            log.exception("scheduled %s failed", self.function_name)
        return self.last_result


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
    parser.add_argument(
        "--est-port",
        type=int,
        default=DEFAULT_MUTUAL_TLS_PORT,
        help="the API over HTTPS with client certificates, for EST (0: any free port)",
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
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
    parser.add_argument(
        "--rotation-sweep-seconds",
        type=_positive,
        default=ROTATION_SWEEP_SECONDS,
        help="how often the rotation sweep (rotation_events) runs; deployed: every minute",
    )
    parser.add_argument(
        "--lambda-port",
        type=int,
        default=0,
        help="Lambda's Invoke API (InvocationType Event) for `fleetkey redrive` (0: any free port)",
    )
    args = parser.parse_args(argv)
    limits = rate_limits(args)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_aws() as endpoint, contextlib.ExitStack() as started:
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
        # Everything started is stopped on the way out, in reverse order, whatever fails.
        api.start()
        started.callback(api.stop)
        os.environ["FLEETKEY_ISSUER"] = api.url  # the functions' issuer is this API's address
        iot.start()
        started.callback(iot.stop)
        est = MutualTlsDomain(
            api, est_truststore(stack, args.state_dir, "127.0.0.1").context, port=args.est_port
        )
        est.start()
        started.callback(est.stop)
        sweep = RateSchedule(ROTATION_SWEEP_RULE, "rotation_events", args.rotation_sweep_seconds)
        sweep.start()
        started.callback(sweep.stop)
        # The deployed stack's failure queues; Lambda's asynchronous invocation with the
        # functions' on-failure destinations (the IoT rules' invocations too) and its Invoke API,
        # where `fleetkey redrive` re-invokes them; the outputs it reads (fleetkey_cli.redrive).
        failure_queues = provision_failure_queues(stack.make_client("sqs"))
        # The registration function's on-failure destination is its retry queue, which it
        # consumes itself (an event source mapping), as deployed.
        registration_retries = QueueWorker(
            stack.make_client("sqs"),
            failure_queues[REGISTRATION_RETRY_OUTPUT],
            "registration",
            batch_size=1,
            region=REGION,
            account=ACCOUNT,
        )
        invoker = AsyncInvoker.with_destinations(
            stack.make_client("sqs"), failure_queues, region=REGION, account=ACCOUNT
        )
        started.callback(invoker.close)
        iot.rules.on_failure = invoker.destination_for_rules
        lambda_api = LocalLambdaEndpoint(invoker, port=args.lambda_port).start()
        started.callback(lambda_api.stop)
        outputs_file = write_local_outputs(
            args.state_dir,
            local_outputs(
                lifecycle_queue_url=settings.lifecycle_queue_url or "",
                lifecycle_dead_letter_queue_url=stack.lifecycle_dead_letter_queue_url,
                failure_queue_urls=failure_queues,
            ),
            aws_endpoint=endpoint,
            lambda_endpoint=lambda_api.url,
            region=REGION,
        )
        lifecycle.start()
        started.callback(lifecycle.stop)
        registration_retries.start()
        started.callback(registration_retries.stop)
        redrive = "fleetkey redrive all --dry-run" + (
            "" if args.state_dir == DEFAULT_STATE_DIR else f" --state-dir {args.state_dir}"
        )
        print(
            f"fleetkey local stack\n"
            f"  API            {api.url}  (admin routes need SigV4: docs/local-stack.md#the-api)\n"
            f"  rate limits    {describe_rate_limits(limits)}\n"
            f"  operator       {LOCAL_OPERATOR_ARN} (access key {local_operator().access_key})\n"
            f"  relying party  {LOCAL_RELYING_PARTY_ARN} (access key {LOCAL_RELYING_PARTY_KEY}; "
            f"introspection and validations only)\n"
            f"{describe_operator_roles()}"
            f"  EST (mTLS)     {est.url}/.well-known/est/  (client certificate of a registered "
            f"CA or the issuing CA; required for simplereenroll)\n"
            f"  issuing CA     {api.url}/v1/pki/ca (CRL: {api.url}/v1/pki/crl)\n"
            f"  AWS IoT (MQTT) mqtts://{iot.address[0]}:{iot.address[1]}  "
            f"(client certificate required)\n"
            f"  lifecycle      {settings.lifecycle_queue_url} -> converge "
            f"({describe_redrive(lifecycle)})\n"
            f"  rotation sweep rotation_events every {sweep.interval} s (scheduled event)\n"
            f"  retries        {registration_retries.queue_url} -> registration "
            f"({describe_redrive(registration_retries)})\n"
            f"  failure queues {len(FAILURE_QUEUES) + 1} (`{redrive}`: docs/runbook-redrive.md; "
            f"outputs in {outputs_file})\n"
            f"  Lambda (Event) {lambda_api.url}  (async invocation, on-failure destinations)\n"
            f"  endpoint CA    {iot.endpoint_ca_path}  (the MQTT and EST servers' issuer)\n"
            f"  demo factory   {args.state_dir / (DEMO_CA + '.pem')} and .key "
            f"(registered manufacturer CA)\n"
            f"  AWS (moto)     {endpoint}\n"
            "Try it with curl and the CLI: docs/local-stack.md#try-it-with-curl-and-the-cli\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
