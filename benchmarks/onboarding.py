"""Onboarding benchmark: N devices connect at once, just-in-time registration under AWS IoT's
documented rate limits, and every device must end registered without a person.

    .venv/bin/python benchmarks/onboarding.py [--devices N] [--environments K] [--json PATH]

What runs, against moto (by default a moto server in a child process, so that moto and fleetkey
use the machine's two cores, answering one request at a time and looking certificates and things
up by key where moto scans them all; `--moto in-process` keeps moto in this process, unchanged):

  * AWS IoT's side: N devices with factory certificates of one registered manufacturer CA, all
    allow-listed, connect at once. AWS IoT auto-registers an unknown certificate (PENDING_
    ACTIVATION, `fleetkey_local.iot.auto_register`), refuses the connection and publishes the
    certificate-registered event; the registration rule (its SQL is the stack's) hands it to the
    registration function. AWS IoT registers at most `JITR` certificates a second
    (`fleetkey_local.iot_limits`): a device over that rate is refused before its certificate is
    registered and connects again after a backoff (exponential from 1 s, capped, with jitter,
    as device SDKs reconnect).
  * Lambda's side: asynchronous invocation of the real registration handler
    (functions/registration/handler.py) with K execution environments (the function's reserved
    concurrency: events wait in Lambda's queue for a free environment, as Lambda keeps
    throttled asynchronous events for up to six hours). Each environment loads the handler as a
    Lambda environment does (its own module, its own clients and caches). An invocation that
    raises is retried twice after `--async-retry-delays` (Lambda: about one and two minutes),
    then its record (Lambda's on-failure destination record) goes to the registration retry
    queue (moto SQS, with the deployed redrive policy to the registration failure queue).
  * The retry queue's event source mapping, as deployed: at most `--retry-concurrency`
    invocations at once (2), one message each, in the same environments (they share the
    function's concurrency: with every environment busy, Lambda throttles the delivery, which uses
    a receive); a retry reported failed comes back after `--retry-visibility-timeout`
    (deployed: 180 s), and SQS moves one received `--retry-max-receives` times (120) to the
    failure queue. Nobody redrives anything: a record left in the failure queue is a device that
    needed a person, reported as a problem.
  * AWS IoT's rate limits (`IotRateLimits.documented()`, `--quota-scale`) are installed on the
    functions' boto3 session, so every HTTP attempt of an AWS IoT call takes a token or gets
    ThrottlingException; the functions' own retries (botocore standard mode, 4 attempts) then
    Lambda's retries and the retry queue absorb it.

When every device is registered (or `--timeout`), the run checks every device as AWS IoT and
fleetkey see it: the certificate ACTIVE, attached to the thing named after the device, the
profile's policy attached (what `fleetkey_local.iot.connect_refusal` requires for AWS IoT to
accept its connection), the device ACTIVE in fleetkey's table; and that nothing is stuck (no
certificate left PENDING_ACTIVATION, the retry and failure queues empty, no invocation pending).

Reported: registrations per second against the binding quota (the lowest rate / calls per
registration among the APIs a registration calls, from the calls measured), per API calls,
HTTP attempts, throttled attempts and calls that failed after the SDK's retries, Lambda's
retries, the retry queue's records and deliveries, connect-to-registered latency. Exit status 1
when a device did not end registered or anything is stuck.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetkey_local.benchmarking import percentile, stdout_to

ROOT = Path(__file__).resolve().parents[1]
REGISTRATION = "registration"
CA_NAME = "acme"
PROFILE = "telemetry-sensor"
# Lambda retries a failed asynchronous invocation twice, about one and two minutes later.
LAMBDA_ASYNC_RETRY_DELAYS = (60.0, 120.0)
# A refused device connects again after 1, 2, 4 ... seconds (up to this), jittered to 50-100 %.
DEVICE_RECONNECT_MAX_SECONDS = 32.0
MANIFEST_ROWS = 10_000  # the allow-list service's manifest limit
# The retry queue's event source mapping, as deployed (infra/fleetkey_infra/constants.py).
RETRY_VISIBILITY_TIMEOUT_SECONDS = 180
RETRY_MAX_CONCURRENCY = 2
RETRY_MAX_RECEIVES = 120


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- moto in a child process --------------------------------------------------------------------


def serve_moto() -> int:
    """The child: a moto server on 127.0.0.1 with fleetkey's moto patches; prints its endpoint,
    serves until its stdin closes."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    from fleetkey_local import moto_patches

    moto_patches.apply()
    moto_patches.use_aws_certificate_ids()
    # moto's IoT backend is not thread-safe (its look-ups iterate dicts that concurrent requests
    # change: "OrderedDict mutated during iteration", answered 500): one request at a time.
    from moto.moto_server import werkzeug_app

    lock = threading.Lock()
    dispatch = werkzeug_app.DomainDispatcherApplication.__call__

    def serialized(self: Any, environ: dict, start_response: Any) -> list:
        with lock:
            return list(dispatch(self, environ, start_response))

    werkzeug_app.DomainDispatcherApplication.__call__ = serialized  # type: ignore[method-assign]
    index_iot_lookups()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()
    server.stop()
    return 0


def index_iot_lookups() -> None:
    """moto finds a certificate by id or ARN, and a thing by name, by scanning every one it
    holds: at 10,000 devices the scans, not AWS's limits, would set the pace. Look them up by key
    instead (certificates are keyed by id, an ARN ends with the id; things are keyed by ARN, a
    name is looked up in an index checked against the backend), with moto's answers unchanged."""
    from moto.iot.exceptions import ResourceNotFoundException
    from moto.iot.models import IoTBackend

    get_principal = IoTBackend._get_principal

    def describe_certificate(self: Any, certificate_id: str) -> Any:
        certificate = self.certificates.get(certificate_id)
        if certificate is None:
            raise ResourceNotFoundException()
        return certificate

    def principal(self: Any, principal_arn: str) -> Any:
        if ":cert/" in principal_arn:
            certificate = self.certificates.get(principal_arn.rsplit("cert/", 1)[-1])
            if certificate is None or certificate.arn != principal_arn:
                raise ResourceNotFoundException()
            return certificate
        return get_principal(self, principal_arn)

    def describe_thing(self: Any, thing_name: str) -> Any:
        index = self.__dict__.setdefault("_fleetkey_things_by_name", {})
        thing = index.get(thing_name)
        if thing is None or self.things.get(thing.arn) is not thing:
            thing = next((t for t in self.things.values() if t.thing_name == thing_name), None)
            if thing is None:
                raise ResourceNotFoundException()
            index[thing_name] = thing
        return thing

    IoTBackend.describe_certificate = describe_certificate  # type: ignore[method-assign]
    IoTBackend._get_principal = principal  # type: ignore[method-assign]
    IoTBackend.describe_thing = describe_thing  # type: ignore[method-assign]


@contextlib.contextmanager
def moto_endpoint(mode: str) -> Iterator[str]:
    if mode == "in-process":
        from fleetkey_local.server import local_aws

        with local_aws() as endpoint:
            yield endpoint
        return
    child = subprocess.Popen(  # noqa: S603 - this script, with the running interpreter
        [sys.executable, str(Path(__file__).resolve()), "--serve-moto"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        endpoint = child.stdout.readline().strip()
        if not endpoint.startswith("http://"):
            raise SystemExit(f"the moto child did not start (said {endpoint!r})")
        yield endpoint
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)


# ---- the functions' AWS calls -------------------------------------------------------------------


class CallRecorder:
    """Hooks on the functions' boto3 session: API calls (`before-call`), HTTP attempts
    (`before-send`, retries included) and how each call ended (`after-call`), per
    `service.Operation`; the times of the successful AWS IoT calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.succeeded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()  # "service.Operation:ErrorCode"
        self.iot_success_times: dict[str, list[float]] = {}

    def install(self, session: Any) -> None:
        session.events.register("before-call", self._before_call)
        session.events.register("before-send", self._before_send)
        session.events.register("after-call", self._after_call)

    @staticmethod
    def _name(event_name: str) -> str:
        _, service, operation = event_name.split(".", 2)
        return f"{service}.{operation}"

    def _before_call(self, event_name: str, **_: Any) -> None:
        with self._lock:
            self.calls[self._name(event_name)] += 1

    def _before_send(self, event_name: str, **_: Any) -> None:
        with self._lock:
            self.attempts[self._name(event_name)] += 1

    def _after_call(self, event_name: str, parsed: Any = None, **_: Any) -> None:
        name = self._name(event_name)
        code = (parsed or {}).get("Error", {}).get("Code") if isinstance(parsed, dict) else None
        with self._lock:
            if code:
                self.failed[f"{name}:{code}"] += 1
                return
            self.succeeded[name] += 1
            if name.startswith("iot."):
                self.iot_success_times.setdefault(name[4:], []).append(time.monotonic())


# ---- Lambda's asynchronous invocation -----------------------------------------------------------


@dataclass
class AsyncEvent:
    """An asynchronous invocation (Invoke, InvocationType Event) and its attempts, or
    (`message` set) one invocation by the retry queue's event source mapping."""

    event: dict
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempts: int = 0
    message: dict | None = None
    errors: list[str] = field(default_factory=list)


class Environment:
    """One Lambda execution environment of the registration function: its own handler module
    (and so its own clients and caches), loaded as Lambda loads it."""

    _load_lock = threading.Lock()

    def __init__(self, number: int) -> None:
        from fleetkey_local.functions import load_function

        with self._load_lock:  # botocore sessions are not thread-safe while creating clients
            started = time.perf_counter()
            self.module = load_function(REGISTRATION)
            self.module.service()  # the components and clients the first invocation would build
            self.init_seconds = time.perf_counter() - started
        self.number = number
        self.invocations = 0


class LambdaAsync:
    """Lambda's asynchronous invocation of the registration function: an unbounded event queue,
    `environments` execution environments (its reserved concurrency), two retries of a failed
    invocation after `retry_delays` (the environment serves other events meanwhile), then the
    on-failure destination (`on_failure(record)`). `invoke_retry` is the retry queue's event
    source mapping invoking the function with one message (`on_retry(message, failed)`)."""

    def __init__(
        self,
        environments: int,
        retry_delays: tuple[float, ...],
        on_failure: Callable[[dict], None],
        on_result: Callable[[AsyncEvent, dict], None],
        function_arn: str,
        on_retry: Callable[[AsyncEvent, bool], None],
        queue_arn: str,
    ) -> None:
        self._cv = threading.Condition()
        self._ready: deque[AsyncEvent] = deque()
        self._delayed: list[tuple[float, int, AsyncEvent]] = []
        self._sequence = 0
        self._running = 0
        self._closed = False
        self._retry_delays = retry_delays
        self._on_failure = on_failure
        self._on_result = on_result
        self._on_retry = on_retry
        self._queue_arn = queue_arn
        self._function_arn = function_arn
        self.retries_in_flight = 0
        self.counters: Counter[str] = Counter()
        self.environments: list[Environment] = []
        self.max_queue = 0
        self._threads = [
            threading.Thread(target=self._serve, args=(n,), name=f"lambda-env-{n}", daemon=True)
            for n in range(environments)
        ]
        for thread in self._threads:
            thread.start()

    def invoke(self, event: dict) -> None:
        """InvocationType Event: accepted and queued."""
        with self._cv:
            self._ready.append(AsyncEvent(json.loads(json.dumps(event))))
            self.counters["invocations"] += 1
            self.max_queue = max(self.max_queue, len(self._ready))
            self._cv.notify()

    def invoke_retry(self, message: dict) -> bool:
        """The event source mapping's synchronous invocation with one retry-queue message. The
        function's concurrency is shared: with every environment busy, Lambda throttles it
        (False: the message stays in the queue, visible again after the visibility timeout, its
        receive counted); else a free environment runs it next."""
        payload = json.loads(message["Body"])["requestPayload"]
        with self._cv:
            if self._running >= len(self._threads):
                self.counters["retry_throttled"] += 1
                return False
            self._ready.appendleft(AsyncEvent(payload, message=message))
            self.counters["retry_deliveries"] += 1
            self.retries_in_flight += 1
            self._cv.notify()
            return True

    def _sqs_event(self, message: dict) -> dict:
        """The SQS event Lambda's event source mapping delivers for one message."""
        return {
            "Records": [
                {
                    "messageId": message["MessageId"],
                    "receiptHandle": message["ReceiptHandle"],
                    "body": message["Body"],
                    "attributes": message.get("Attributes", {}),
                    "messageAttributes": {},
                    "md5OfBody": message.get("MD5OfBody", ""),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": self._queue_arn,
                    "awsRegion": "eu-west-1",
                }
            ]
        }

    def queued(self) -> int:
        with self._cv:
            return len(self._ready) + len(self._delayed) + self._running

    def idle(self) -> bool:
        return self.queued() == 0

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _next(self) -> AsyncEvent | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._ready.append(heapq.heappop(self._delayed)[2])
                if self._ready:
                    self._running += 1
                    return self._ready.popleft()
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._cv.wait(timeout)

    def _serve(self, number: int) -> None:
        from fleetkey_local.functions import LambdaContext

        environment: Environment | None = None
        while (item := self._next()) is not None:
            try:
                if environment is None:
                    environment = Environment(number)
                    with self._cv:
                        self.environments.append(environment)
                item.attempts += 1
                environment.invocations += 1
                context = LambdaContext(
                    function_name=f"fleetkey-{REGISTRATION}",
                    invoked_function_arn=self._function_arn,
                    aws_request_id=item.request_id,
                )
                if item.message is not None:
                    self._retry(environment, item, context)
                    continue
                try:
                    result = environment.module.handler(json.loads(json.dumps(item.event)), context)
                except Exception as exc:  # noqa: BLE001 - the function failed: Lambda retries it
                    self._failed(item, exc)
                else:
                    with self._cv:
                        self.counters["succeeded"] += 1
                    self._on_result(item, json.loads(json.dumps(result)))
            finally:
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    def _retry(self, environment: Environment, item: AsyncEvent, context: Any) -> None:
        """One retry-queue message: failed when the function raised or listed it in
        batchItemFailures (the message then stays in the queue), else SQS deletes it."""
        assert item.message is not None
        try:
            result = environment.module.handler(self._sqs_event(item.message), context)
            failed = bool(result.get("batchItemFailures"))
        except Exception:  # noqa: BLE001 - the whole batch failed
            failed = True
        with self._cv:
            self.counters["retries_failed_again" if failed else "retries_succeeded"] += 1
        try:
            self._on_retry(item, failed)
        finally:
            with self._cv:
                self.retries_in_flight -= 1

    def _failed(self, item: AsyncEvent, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        item.errors.append(error)
        with self._cv:
            self.counters["function_errors"] += 1
            self.counters[f"error:{type(exc).__name__}"] += 1
            if item.attempts <= len(self._retry_delays):
                self.counters["async_retries"] += 1
                due = time.monotonic() + self._retry_delays[item.attempts - 1]
                self._sequence += 1
                heapq.heappush(self._delayed, (due, self._sequence, item))
                self._cv.notify_all()
                return
            self.counters["to_retry_queue"] += 1
        self._on_failure(self._destination_record(item, exc))

    def _destination_record(self, item: AsyncEvent, exc: BaseException) -> dict:
        """Lambda's invocation record for an asynchronous invocation whose attempts all failed
        (docs.aws.amazon.com/lambda/latest/dg/invocation-async-retain-records.html)."""
        return {
            "version": "1.0",
            "timestamp": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "requestContext": {
                "requestId": item.request_id,
                "functionArn": f"{self._function_arn}:$LATEST",
                "condition": "RetriesExhausted",
                "approximateInvokeCount": item.attempts,
            },
            "requestPayload": item.event,
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled",
            },
            "responsePayload": {
                "errorMessage": str(exc),
                "errorType": type(exc).__name__,
                "stackTrace": traceback.format_tb(exc.__traceback__)[-3:],
            },
        }


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Device:
    device_id: str
    pem: str
    certificate_id: str
    connects: int = 0
    refused_by_jitr: int = 0
    registered_by_aws_iot_at: float | None = None  # JITR registered the certificate
    accepted_at: float | None = None  # the registration function accepted it


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run(args: argparse.Namespace) -> dict:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # Powertools warns when an invocation published no metric (a repeated delivery publishes none).
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    # fleetkey's services log warnings through `logging` (stderr); the run reports counts instead.
    logging.getLogger("fleetkey").setLevel(logging.ERROR)
    with moto_endpoint(args.moto) as endpoint:
        from fleetkey_local.server import function_environment

        os.environ.update(function_environment(endpoint, f"fleetkey-{REGISTRATION}"))
        os.environ["POWERTOOLS_LOG_LEVEL"] = "ERROR"
        os.environ.pop("AWS_PROFILE", None)
        return _run(args, endpoint)


def _run(args: argparse.Namespace, endpoint: str) -> dict:
    import boto3
    from botocore.config import Config

    import fleetkey.adapters.aws as aws_adapters
    from fleetkey.domain.allowlist import CSV_COLUMNS
    from fleetkey.domain.profiles import get_profile
    from fleetkey.events import REGISTRATION_RULE_SQL
    from fleetkey_local import iot as iot_emulation
    from fleetkey_local.failure_queues import REGISTRATION_RETRY_OUTPUT, provision_failure_queues
    from fleetkey_local.iot_limits import JITR, IotRateLimits, binding_rate
    from fleetkey_local.pki import CertificateAuthority, pem
    from fleetkey_local.rules import Rule
    from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory

    started = time.monotonic()
    limits = (
        None
        if args.no_limits
        else IotRateLimits.documented(scale=args.quota_scale, jitr=not args.no_jitr_limit)
    )
    if args.sdk_attempts is not None:
        # The functions' clients (fleetkey.adapters.aws.client reads it when it builds one).
        aws_adapters.CLIENT_CONFIG = aws_adapters.CLIENT_CONFIG.merge(
            Config(retries={"mode": "standard", "total_max_attempts": args.sdk_attempts})
        )
    sdk_retries = aws_adapters.CLIENT_CONFIG.retries

    log(f"provisioning the stack (moto {args.moto}) ...")
    stack = EmbeddedStack(client_factory(endpoint), iot_limits=limits).provision()
    os.environ.update(stack.environment())
    acme = CertificateAuthority.create(CA_NAME)
    stack.register_ca(acme)
    sqs = stack.make_client("sqs")
    # The deployed retry queue (its redrive policy to the failure queue), with the run's settings.
    queue_urls = provision_failure_queues(
        sqs,
        retry_max_receive_count=args.retry_max_receives,
        retry_visibility_timeout=args.retry_visibility_timeout,
    )
    failure_queue_url = queue_urls["RegistrationFailureQueueUrl"]
    retry_queue_url = queue_urls[REGISTRATION_RETRY_OUTPUT]
    retry_queue_arn = sqs.get_queue_attributes(
        QueueUrl=retry_queue_url, AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]

    n = args.devices
    log(f"allow-listing {n} devices and issuing their factory certificates ...")
    t = time.monotonic()
    ids = [f"dev-{i:06d}" for i in range(n)]
    for chunk in range(0, n, MANIFEST_ROWS):
        rows = [",".join(CSV_COLUMNS)] + [
            f"{d},SN-{d},{CA_NAME},,{PROFILE}" for d in ids[chunk : chunk + MANIFEST_ROWS]
        ]
        report = stack.allowlist.import_manifest("\n".join(rows) + "\n", "csv", actor="bench")
        assert report.imported == len(rows) - 1, report
    import_seconds = time.monotonic() - t
    t = time.monotonic()
    devices: dict[str, Device] = {}
    for device_id in ids:
        _, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
        certificate_pem = pem(cert)
        devices[device_id] = Device(
            device_id, certificate_pem, iot_emulation.certificate_id(certificate_pem)
        )
    by_certificate = {d.certificate_id: d for d in devices.values()}
    issue_seconds = time.monotonic() - t

    # The functions' session: the rate limits and the call recorder, before any client exists.
    boto3.setup_default_session()
    recorder = CallRecorder()
    recorder.install(boto3.DEFAULT_SESSION)
    if limits is not None:
        limits.install(boto3.DEFAULT_SESSION)
        limits.reset_statistics()

    rule = Rule.select_all(REGISTRATION, REGISTRATION_RULE_SQL)
    harness_iot = stack.harness_iot
    lock = threading.Lock()
    accepted: dict[str, float] = {}
    outcomes: Counter[str] = Counter()
    progress = threading.Event()

    def on_result(item: AsyncEvent, result: dict) -> None:
        device = by_certificate.get(item.event.get("certificateId", ""))
        with lock:
            outcomes[f"{result.get('status')}:{result.get('reason', '')}".rstrip(":")] += 1
            if result.get("status") == "accepted" and device and device.accepted_at is None:
                device.accepted_at = time.monotonic()
                accepted[device.device_id] = device.accepted_at
                if len(accepted) == n:
                    progress.set()

    def to_retry_queue(record: dict) -> None:
        sqs.send_message(QueueUrl=retry_queue_url, MessageBody=json.dumps(record))

    def on_retry(item: AsyncEvent, failed: bool) -> None:
        """The event source mapping deletes a message the function finished; a failed one stays
        (visible again after the visibility timeout). A retry's response names no outcome: the
        certificate's recorded decision does."""
        assert item.message is not None
        if failed:
            return
        sqs.delete_message(QueueUrl=retry_queue_url, ReceiptHandle=item.message["ReceiptHandle"])
        decision = stack.store.certificates.get(item.event.get("certificateId", ""))
        outcome = decision.outcome.value if decision else "undecided"
        on_result(item, {"status": outcome})

    function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:fleetkey-{REGISTRATION}"
    lambda_async = LambdaAsync(
        args.environments,
        tuple(args.async_retry_delays),  # type: ignore[arg-type]
        to_retry_queue,
        on_result,
        function_arn,
        on_retry,
        retry_queue_arn,
    )

    def retry_poller() -> None:
        """Lambda's poller of the retry queue: one message per invocation, at most
        `--retry-concurrency` invocations at once."""
        while not stop.is_set():
            if lambda_async.retries_in_flight >= args.retry_concurrency:
                stop.wait(0.2)
                continue
            messages = sqs.receive_message(
                QueueUrl=retry_queue_url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=0,
                AttributeNames=["All"],
            ).get("Messages", [])
            if not messages:
                stop.wait(1.0)  # Lambda long-polls; moto answers one request at a time
                continue
            lambda_async.invoke_retry(messages[0])

    # AWS IoT's side: every device connects at t0; one over JITR's rate reconnects later.
    connect_heap: list[tuple[float, int, str]] = [(0.0, i, d) for i, d in enumerate(ids)]
    heapq.heapify(connect_heap)
    connector_done = threading.Event()
    stop = threading.Event()
    connector_errors: list[str] = []

    def connector(t0: float) -> None:
        sequence = len(ids)
        while connect_heap and not stop.is_set():
            due, _, device_id = connect_heap[0]
            now = time.monotonic() - t0
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            heapq.heappop(connect_heap)
            device = devices[device_id]
            device.connects += 1
            if limits is not None and not limits.admit(JITR):
                device.refused_by_jitr += 1
                backoff = min(args.reconnect_max, 2.0 ** (device.refused_by_jitr - 1))
                sequence += 1
                heapq.heappush(
                    connect_heap, (now + backoff * (0.5 + random.random() / 2), sequence, device_id)
                )
                continue
            try:
                event = iot_emulation.auto_register(harness_iot, device.pem, acme.pem, ACCOUNT)
            except Exception as exc:  # noqa: BLE001 - reported, the device is then lost
                connector_errors.append(f"{device_id}: {type(exc).__name__}: {exc}")
                continue
            if event is None:
                connector_errors.append(f"{device_id}: AWS IoT published no event")
                continue
            device.registered_by_aws_iot_at = time.monotonic()
            topic = f"$aws/events/certificates/registered/{event['caCertificateId']}"
            lambda_async.invoke(rule.event(topic, event))
        connector_done.set()

    def depth(queue_url: str) -> int:
        attributes = sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return sum(int(v) for v in attributes.values())

    log(
        f"onboarding {n} devices at once: {args.environments} environment(s), "
        + (
            "no rate limits"
            if limits is None
            else f"AWS IoT's documented rate limits x {args.quota_scale:g}"
            + ("" if JITR in limits.rates else " (JITR unlimited)")
        )
    )
    handler_stdout = Path(tempfile.mkstemp(prefix="fleetkey-onboarding-stdout-")[1])
    timeline: list[dict] = []
    timed_out = False
    with stdout_to(handler_stdout):
        t0 = time.monotonic()
        threading.Thread(target=connector, args=(t0,), name="aws-iot-jitr", daemon=True).start()
        threading.Thread(target=retry_poller, name="lambda-esm-retries", daemon=True).start()
        deadline = t0 + args.timeout
        next_sample = t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                with lock:
                    done = len(accepted)
                throttled = (
                    sum(s["throttled"] for s in limits.statistics().values()) if limits else 0
                )
                sample = {
                    "t": round(now - t0, 1),
                    "registered": done,
                    "queued": lambda_async.queued(),
                    "devices_waiting_to_connect": len(connect_heap),
                    "throttled_attempts": throttled,
                    "function_errors": lambda_async.counters["function_errors"],
                    "to_retry_queue": lambda_async.counters["to_retry_queue"],
                    "retry_deliveries": lambda_async.counters["retry_deliveries"],
                }
                timeline.append(sample)
                if len(timeline) % max(1, int(10 / args.sample_every)) == 1:
                    log(
                        f"  t={sample['t']:7.1f}s registered {done}/{n} "
                        f"queued {sample['queued']} waiting-to-connect "
                        f"{sample['devices_waiting_to_connect']} throttled {throttled} "
                        f"errors {sample['function_errors']} "
                        f"retry-queue {sample['to_retry_queue']} "
                        f"(delivered {sample['retry_deliveries']})"
                    )
                next_sample = now + args.sample_every
            if connector_done.is_set() and lambda_async.idle() and depth(retry_queue_url) == 0:
                break  # nothing queued, nothing to retry: done, or dead-lettered for a person
            if now >= deadline:
                timed_out = True
                break
            progress.wait(0.2)
        t_end_loop = time.monotonic()
        stop.set()
        lambda_async.close()
    stdout_bytes = handler_stdout.stat().st_size
    handler_stdout.unlink(missing_ok=True)

    log("checking every device as AWS IoT and fleetkey see it ...")
    verify_started = time.monotonic()
    problems: list[str] = []

    # AWS IoT's view in bulk: every certificate's status, and what the profile's policy is
    # attached to (moto answers each list in one page).
    certificates: dict[str, tuple[str, str]] = {}
    for page in harness_iot.get_paginator("list_certificates").paginate(pageSize=250):
        for c in page.get("certificates", []):
            certificates[c["certificateId"]] = (c["status"], c["certificateArn"])
    pending_certificates = sum(
        status == "PENDING_ACTIVATION" for status, _ in certificates.values()
    )
    policy = get_profile(PROFILE).iot_policy_name(stack.settings.name_prefix)
    policy_targets = {
        target
        for page in harness_iot.get_paginator("list_targets_for_policy").paginate(policyName=policy)
        for target in page.get("targets", [])
    }

    def check(device: Device) -> list[str]:
        """What AWS IoT checks when the device connects with its certificate and its id as the
        client id (`fleetkey_local.iot.connect_refusal`: ACTIVE, attached to the thing named
        after the client id, a policy attached; here the profile's policy), and fleetkey's
        record of the device."""
        found = []
        status, arn = certificates.get(device.certificate_id, ("absent", ""))
        if status != "ACTIVE":
            found.append(f"{device.device_id}: its certificate is {status}")
        if arn not in policy_targets:
            found.append(f"{device.device_id}: {policy} is not attached to its certificate")
        try:
            principals = harness_iot.list_thing_principals(thingName=device.device_id)
            attached = arn in principals.get("principals", [])
        except Exception:  # noqa: BLE001 - reported
            attached = False
        if not attached:
            found.append(f"{device.device_id}: its certificate is not attached to its thing")
        try:
            state = stack.devices.get(device.device_id).state.value
        except Exception as exc:  # noqa: BLE001 - reported
            state = f"unreadable ({type(exc).__name__})"
        if state != "ACTIVE":
            found.append(f"{device.device_id}: fleetkey has it {state}")
        return found

    with ThreadPoolExecutor(max_workers=4) as pool:
        for found in pool.map(check, devices.values()):
            problems.extend(found)
    parked = depth(failure_queue_url)
    retrying = depth(retry_queue_url)
    verify_seconds = time.monotonic() - verify_started
    never_connected = sum(d.registered_by_aws_iot_at is None for d in devices.values())
    if pending_certificates:
        problems.append(f"{pending_certificates} certificate(s) still PENDING_ACTIVATION")
    if parked:
        problems.append(
            f"{parked} record(s) in the registration failure queue: they needed a person"
        )
    if retrying:
        problems.append(f"{retrying} record(s) still in the registration retry queue")
    if never_connected:
        problems.append(f"{never_connected} device(s) never got their certificate registered")
    if timed_out:
        problems.append(f"timed out after {args.timeout:g} s")
    problems.extend(connector_errors[:20])

    # ---- figures --------------------------------------------------------------------------------
    times = sorted(t - t0 for t in accepted.values())
    registered = len(times)
    duration = times[-1] if times else 0.0
    lo, hi = int(0.1 * registered), int(0.9 * registered) - 1
    steady = (
        (hi - lo) / (times[hi] - times[lo]) if registered >= 10 and times[hi] > times[lo] else None
    )
    steady_window = (t0 + times[lo], t0 + times[hi]) if steady else None
    window_start, window_end = t0, t0 + duration
    per_registration = {
        op.split(".", 1)[1]: recorder.succeeded[op] / registered
        for op in recorder.succeeded
        if op.startswith("iot.") and registered
    }
    if limits is not None and JITR in limits.rates:
        per_registration[JITR] = 1.0
    rates = limits.rates if limits else {}
    binding, binding_apis = binding_rate(per_registration, rates)
    iot_ops = sorted(
        {k.split(".", 1)[1] for k in recorder.calls if k.startswith("iot.")}
        | ({JITR} if limits and JITR in limits.rates else set())
    )
    limit_stats = limits.statistics() if limits else {}
    apis = {}
    for op in iot_ops:
        name = f"iot.{op}"
        ok_times = recorder.iot_success_times.get(op, [])
        in_window = sum(window_start <= x <= window_end for x in ok_times)
        in_steady = (
            sum(steady_window[0] <= x <= steady_window[1] for x in ok_times) if steady_window else 0
        )
        apis[op] = {
            "rate_limit_per_s": rates.get(op),
            "calls": recorder.calls.get(name, 0) if op != JITR else None,
            "http_attempts": recorder.attempts.get(name, 0) if op != JITR else None,
            "succeeded": recorder.succeeded.get(name, 0) if op != JITR else None,
            "throttled_attempts": limit_stats.get(op, {}).get("throttled", 0),
            "allowed_attempts": limit_stats.get(op, {}).get("allowed", 0),
            "calls_failed_after_sdk_retries": sum(
                v for k, v in recorder.failed.items() if k.startswith(f"{name}:")
            )
            if op != JITR
            else None,
            "per_registration": per_registration.get(op),
            "achieved_per_s": (in_window / duration if duration and op != JITR else None),
            "achieved_steady_per_s": (
                in_steady / (steady_window[1] - steady_window[0])
                if steady_window and op != JITR
                else None
            ),
        }
    latencies = [
        d.accepted_at - d.registered_by_aws_iot_at
        for d in devices.values()
        if d.accepted_at and d.registered_by_aws_iot_at
    ]
    connect_to_registered = [d.accepted_at - t0 for d in devices.values() if d.accepted_at]
    results = {
        "machine": machine(),
        "parameters": {
            "devices": n,
            "environments": args.environments,
            "rate_limits": None if limits is None else "documented",
            "quota_scale": args.quota_scale if limits else None,
            "jitr_limited": bool(limits and JITR in limits.rates),
            "sdk_retries": sdk_retries,
            "async_retry_delays_s": list(args.async_retry_delays),
            "retry_visibility_timeout_s": args.retry_visibility_timeout,
            "retry_max_receives": args.retry_max_receives,
            "retry_concurrency": args.retry_concurrency,
            "device_reconnect_max_s": args.reconnect_max,
            "moto": args.moto,
            "timeout_s": args.timeout,
        },
        "setup_s": {
            "total_before_onboarding": round(t0 - started, 1),
            "allowlist_import": round(import_seconds, 1),
            "certificates": round(issue_seconds, 1),
            "environment_init_median": round(
                statistics.median(e.init_seconds for e in lambda_async.environments), 3
            )
            if lambda_async.environments
            else None,
        },
        "registered": registered,
        "problems": problems,
        "onboarding_s": round(duration, 1),
        "loop_s": round(t_end_loop - t0, 1),
        "verify_s": round(verify_seconds, 1),
        "throughput": {
            "overall_per_s": round(registered / duration, 2) if duration else None,
            "steady_per_s": round(steady, 2) if steady else None,
            "steady_window": "10th to 90th percentile of registrations",
            "binding_quota_per_s": None if binding == float("inf") else round(binding, 2),
            "binding_apis": binding_apis,
            "steady_vs_binding": round(steady / binding, 3)
            if steady and binding != float("inf")
            else None,
            "floor_s_for_these_devices": round(n / binding, 1) if binding != float("inf") else None,
            # the steady rate, plus this run's tail beyond it (reconnect backoffs, retries)
            "extrapolated_10000_s": round(10_000 / steady + max(0.0, duration - n / steady), 0)
            if steady
            else None,
            "quota_floor_10000_s": round(10_000 / binding, 0) if binding != float("inf") else None,
        },
        "apis": apis,
        "other_calls": {
            k: v for k, v in sorted(recorder.calls.items()) if not k.startswith("iot.")
        },
        # a registration's lookup-and-record transaction fails its condition by design (it
        # returns the device item: fleetkey.services.registration)
        "other_failures": {k: v for k, v in recorder.failed.items() if not k.startswith("iot.")},
        "lambda": {
            **dict(lambda_async.counters),
            "environments_started": len(lambda_async.environments),
            "max_queue": lambda_async.max_queue,
            "handler_results": dict(outcomes),
            "handler_stdout_bytes": stdout_bytes,
        },
        "retry_queue": {
            "records_in": lambda_async.counters["to_retry_queue"],
            "deliveries": lambda_async.counters["retry_deliveries"],
            "succeeded": lambda_async.counters["retries_succeeded"],
            "failed_again": lambda_async.counters["retries_failed_again"],
            "throttled": lambda_async.counters["retry_throttled"],
            "dead_lettered": parked,
        },
        "devices": {
            "connect_attempts": sum(d.connects for d in devices.values()),
            "refused_by_jitr_rate": sum(d.refused_by_jitr for d in devices.values()),
            "max_reconnects_of_one_device": max(
                (d.refused_by_jitr for d in devices.values()), default=0
            ),
        },
        "latency_s": {
            "jitr_to_registered_p50": round(percentile(latencies, 50), 2),
            "jitr_to_registered_p95": round(percentile(latencies, 95), 2),
            "jitr_to_registered_max": round(max(latencies, default=0.0), 2),
            "first_connect_to_registered_p50": round(percentile(connect_to_registered, 50), 1),
            "first_connect_to_registered_max": round(max(connect_to_registered, default=0.0), 1),
        },
        "timeline": timeline,
    }
    return results


# ---- output -------------------------------------------------------------------------------------


def render(results: dict) -> str:
    m, p, tp = results["machine"], results["parameters"], results["throughput"]
    limits = (
        "none"
        if p["rate_limits"] is None
        else f"AWS IoT's documented rates x {p['quota_scale']:g}"
        + ("" if p["jitr_limited"] else ", JITR unlimited")
    )
    out = [
        f"Machine: {m['nproc']} CPU(s) ({m['cpu']}), Python {m['python']}",
        f"Devices: {p['devices']}, connecting at once; registration environments (reserved "
        f"concurrency): {p['environments']}; rate limits: {limits}; SDK retries: "
        f"{p['sdk_retries']}; Lambda async retry delays {p['async_retry_delays_s']} s; "
        f"retry queue: {p['retry_concurrency']} at once, every "
        f"{p['retry_visibility_timeout_s']:g} s, {p['retry_max_receives']} receives; "
        f"moto {p['moto']}.",
        "",
        f"Registered: {results['registered']} / {p['devices']} in {results['onboarding_s']} s "
        f"(setup {results['setup_s']['total_before_onboarding']} s, check "
        f"{results['verify_s']} s).",
        "",
        "| Throughput | registrations/s |",
        "|---|---:|",
        f"| overall (first connect to last registration) | {tp['overall_per_s']} |",
        f"| steady ({tp['steady_window']}) | {tp['steady_per_s']} |",
        f"| binding quota ({', '.join(tp['binding_apis']) or '-'}) | {tp['binding_quota_per_s']} |",
        f"| steady / binding | {tp['steady_vs_binding']} |",
        "",
        "| AWS IoT API | rate limit /s | per registration | calls | HTTP attempts "
        "| throttled attempts | failed after SDK retries | achieved /s, steady |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: Any, digits: int = 2) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    for op, a in results["apis"].items():
        out.append(
            f"| {op} | {fmt(a['rate_limit_per_s'], 0)} | {fmt(a['per_registration'])} | "
            f"{fmt(a['calls'])} | {fmt(a['http_attempts'])} | {a['throttled_attempts']} | "
            f"{fmt(a['calls_failed_after_sdk_retries'])} | {fmt(a['achieved_steady_per_s'])} |"
        )
    lam, red, dev, lat = (
        results["lambda"],
        results["retry_queue"],
        results["devices"],
        results["latency_s"],
    )
    out += [
        "",
        "| Backpressure | count |",
        "|---|---:|",
        f"| device connections refused over JITR's rate (reconnected later) | "
        f"{dev['refused_by_jitr_rate']} |",
        f"| asynchronous invocations | {lam.get('invocations', 0)} |",
        f"| function errors (attempts that raised) | {lam.get('function_errors', 0)} |",
        f"| Lambda async retries | {lam.get('async_retries', 0)} |",
        f"| records sent to the retry queue (Lambda's on-failure destination) | "
        f"{red['records_in']} |",
        f"| retry queue deliveries (failed again) | {red['deliveries']} ({red['failed_again']}) |",
        f"| retry queue deliveries Lambda throttled (every environment busy) | "
        f"{red['throttled']} |",
        f"| records left in the failure queue for a person | {red['dead_lettered']} |",
        f"| deepest Lambda event queue | {lam.get('max_queue', 0)} |",
        "",
        f"Latency, certificate registered by AWS IoT to registration accepted: p50 "
        f"{lat['jitr_to_registered_p50']} s, p95 {lat['jitr_to_registered_p95']} s, max "
        f"{lat['jitr_to_registered_max']} s.",
        f"Handler results: {lam.get('handler_results')}.",
    ]
    if tp["extrapolated_10000_s"]:
        out.append(
            f"10,000 devices at the steady rate, with this run's tail: about "
            f"{tp['extrapolated_10000_s']:.0f} s (the binding quota's floor: "
            f"{tp['quota_floor_10000_s']} s)."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-moto", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=10_000, help="devices (default 10000)")
    parser.add_argument(
        "--environments",
        type=int,
        default=4,
        help="the registration function's execution environments (reserved concurrency; default 4)",
    )
    parser.add_argument(
        "--quota-scale",
        type=float,
        default=1.0,
        help="multiply every documented rate (an account with raised quotas; default 1)",
    )
    parser.add_argument("--no-limits", action="store_true", help="no rate limits at all")
    parser.add_argument(
        "--no-jitr-limit", action="store_true", help="AWS IoT registers certificates unlimited"
    )
    parser.add_argument(
        "--sdk-attempts",
        type=int,
        help="total attempts of the functions' AWS calls (default: fleetkey's CLIENT_CONFIG)",
    )
    parser.add_argument(
        "--async-retry-delays",
        type=lambda s: tuple(float(x) for x in s.split(",") if x.strip()),
        default=LAMBDA_ASYNC_RETRY_DELAYS,
        help="seconds before Lambda's retries of a failed invocation, as 'first,second' "
        "(default 60,120; an empty pair of retries: none)",
    )
    parser.add_argument(
        "--retry-visibility-timeout",
        type=int,
        default=RETRY_VISIBILITY_TIMEOUT_SECONDS,
        help="seconds before a retry reported failed comes back (default 180, as deployed)",
    )
    parser.add_argument(
        "--retry-max-receives",
        type=int,
        default=RETRY_MAX_RECEIVES,
        help="receives of a retry before SQS moves it to the failure queue (default 120)",
    )
    parser.add_argument(
        "--retry-concurrency",
        type=int,
        default=RETRY_MAX_CONCURRENCY,
        help="the retry queue's event source mapping's maximum concurrency (default 2)",
    )
    parser.add_argument(
        "--moto",
        choices=("process", "in-process"),
        default="process",
        help="moto server in a child process (default) or in this process",
    )
    parser.add_argument(
        "--reconnect-max",
        type=float,
        default=DEVICE_RECONNECT_MAX_SECONDS,
        help="longest wait of a refused device before it connects again (default 32 s)",
    )
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    parser.add_argument("--sample-every", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=7, help="the devices' reconnect jitter")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.serve_moto:
        return serve_moto()
    if args.devices < 1 or args.environments < 1:
        parser.error("--devices and --environments must be at least 1")
    if args.timeout is None:
        # Three times the quota floor of the registrations, plus Lambda's retries and the retry
        # queue's.
        args.timeout = 3 * args.devices / (10 * args.quota_scale) + 600
    random.seed(args.seed)
    results = run(args)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if results["problems"]:
        problems = results["problems"]
        print(f"\nFAILED ({len(problems)} problem(s)):", file=sys.stderr)
        for problem in problems[:50]:
            print(f"- {problem}", file=sys.stderr)
        return 1
    print(f"\nEvery device registered ({results['registered']}); nothing stuck.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
