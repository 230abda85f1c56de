"""Lambda's asynchronous invocation for the local stack's functions (loaded from
functions/<name>/handler.py as Lambda loads them), with the deployed functions' on-failure
destinations, and Lambda's Invoke API over HTTP, so that a boto3 Lambda client pointed at it
(`fleetkey redrive` against the local stack) invokes them as it invokes deployed functions.

`AsyncInvoker.invoke(function, event)` is `Invoke` with InvocationType Event: the event is
accepted (queued) and the call returns; a worker invokes the handler and, when it raises, twice
more (Lambda's two retries of an asynchronous invocation, without its minutes of backoff); when
every attempt failed, a function with an on-failure destination (registration, device_events,
rotation_events: `fleetkey_local.failure_queues.ON_FAILURE_DESTINATIONS`) gets Lambda's
invocation record in its failure queue; the others' failures stay in the log, as in AWS. With
`synchronous=True` (the tests) the attempts run before `invoke` returns.

`LocalLambdaEndpoint` serves `POST /2015-03-31/functions/<name>/invocations` on 127.0.0.1 for
InvocationType Event (202); any other invocation type is refused (400), an unknown function is
404 (ResourceNotFoundException), a request not signed with the local stack's credentials 403. A
function is named by its local name (`fleetkey-<function>`, the stack outputs'), its ARN (a
`$LATEST` qualifier allowed), or its directory name.

One invocation at a time per function (`concurrency` workers each): the functions' module-level
state assumes one invocation at a time per execution environment (see `fleetkey_local.rules`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from fleetkey_local.failure_queues import ON_FAILURE_DESTINATIONS, destination_record
from fleetkey_local.failure_queues import function_arn as local_function_arn
from fleetkey_local.functions import FUNCTIONS_DIR, LambdaContext, load_function
from fleetkey_local.provision import NAME_PREFIX

logger = logging.getLogger("fleetkey_local.lambda_invoke")

Handler = Callable[[Any, Any], Any]
_ARN = re.compile(r"^arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:([A-Za-z0-9_-]+)(:.+)?$")
_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations$")


class UnknownFunction(LookupError):
    """No function of that name (Lambda: ResourceNotFoundException)."""


@dataclass
class AsyncInvocation:
    """One asynchronous invocation (all its attempts), and what became of it."""

    function: str
    event: Any
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    queued_at: float = field(default_factory=time.time)
    attempts: int = 0
    status: str = "queued"  # queued, running, succeeded, failed
    result: Any = None
    error: str | None = None
    destination: str | None = None  # the failure queue its record went to
    finished_at: float | None = None


class AsyncInvoker:
    """Lambda's asynchronous invocation of the local functions. `failure_queues` maps a function
    (directory name) to the URL of its on-failure destination queue; `sqs` is the client that
    sends the records (Lambda's, not the function's)."""

    def __init__(
        self,
        sqs: Any = None,
        failure_queues: Mapping[str, str] | None = None,
        *,
        region: str = "eu-west-1",
        account: str = "123456789012",
        prefix: str = NAME_PREFIX,
        retries: int = 2,
        retry_delays: Sequence[float] = (0.05, 0.2),
        synchronous: bool = False,
        concurrency: int = 1,
        loader: Callable[[str], Any] = load_function,
    ) -> None:
        self.sqs = sqs
        self.failure_queues = dict(failure_queues or {})
        self.region, self.account, self.prefix = region, account, prefix
        self.retries = retries
        self.retry_delays = tuple(retry_delays)
        self.synchronous = synchronous
        self.concurrency = concurrency
        self._loader = loader
        self._handlers: dict[str, Handler] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Condition()
        self._pending = 0
        self._closed = False
        self._invocations: list[AsyncInvocation] = []

    @classmethod
    def with_destinations(
        cls, sqs: Any, failure_queue_urls: Mapping[str, str], **options: Any
    ) -> AsyncInvoker:
        """With the deployed destinations: `failure_queue_urls` by stack output
        (`fleetkey_local.failure_queues.provision_failure_queues`)."""
        queues = {
            function: failure_queue_urls[output]
            for function, output in ON_FAILURE_DESTINATIONS.items()
            if output in failure_queue_urls
        }
        return cls(sqs, queues, **options)

    # ---- names ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The function directory a name, ARN or directory name denotes.

        Raises:
            UnknownFunction: no such function.
        """
        match = _ARN.match(name)
        if match:
            qualifier = match.group(2)
            if qualifier not in (None, ":$LATEST"):
                raise UnknownFunction(f"{name}: only $LATEST exists locally")
            name = match.group(1)
        if name.startswith(f"{self.prefix}-"):
            name = name[len(self.prefix) + 1 :]
        known = re.fullmatch(r"[a-z_]+", name) and (FUNCTIONS_DIR / name / "handler.py").is_file()
        if not known:
            raise UnknownFunction(f"Function not found: {name}")
        return name

    # ---- invocation ----------------------------------------------------------------------------

    def invoke(self, function: str, event: Any) -> AsyncInvocation:
        """Accept an asynchronous invocation (InvocationType Event): the invocation, queued (or,
        synchronous, finished).

        Raises:
            UnknownFunction: no such function.
            RuntimeError: the invoker is closed.
        """
        name = self.resolve(function)
        invocation = AsyncInvocation(function=name, event=json.loads(json.dumps(event)))
        with self._lock:
            if self._closed:
                raise RuntimeError("the invoker is closed")
            self._invocations.append(invocation)
            if self.synchronous:
                self._pending += 1
        if self.synchronous:
            try:
                self._run(invocation)
            finally:
                self._done()
            return invocation
        with self._lock:
            self._pending += 1
            executor = self._executors.get(name)
            if executor is None:
                executor = self._executors[name] = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix=f"lambda-async-{name}"
                )
        future = executor.submit(self._run, invocation)
        future.add_done_callback(lambda _: self._done())
        return invocation

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            self._lock.notify_all()

    def _handler(self, name: str) -> Handler:
        with self._lock:
            if name not in self._handlers:
                self._handlers[name] = self._loader(name).handler
            return self._handlers[name]

    def _run(self, invocation: AsyncInvocation) -> None:
        invocation.status = "running"
        context = LambdaContext(
            function_name=f"{self.prefix}-{invocation.function}",
            invoked_function_arn=self.function_arn(invocation.function),
            aws_request_id=invocation.request_id,
        )
        failure: BaseException | None = None
        for attempt in range(self.retries + 1):
            invocation.attempts = attempt + 1
            try:
                # Each attempt gets the original event, as Lambda redelivers it.
                result = self._handler(invocation.function)(
                    json.loads(json.dumps(invocation.event)), context
                )
                invocation.result = json.loads(json.dumps(result))
            except Exception as exc:  # noqa: BLE001 - the function failed: Lambda retries it
                failure = exc
                invocation.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "%s failed, attempt %d: %s", invocation.function, attempt + 1, invocation.error
                )
                if attempt < self.retries and self.retry_delays:
                    time.sleep(self.retry_delays[min(attempt, len(self.retry_delays) - 1)])
                continue
            invocation.status, invocation.error = "succeeded", None
            break
        else:
            invocation.status = "failed"
            self._send_to_destination(invocation, failure)
        invocation.finished_at = time.time()

    def function_arn(self, function: str) -> str:
        return local_function_arn(function, self.region, self.account, self.prefix)

    def _send_to_destination(
        self, invocation: AsyncInvocation, failure: BaseException | None
    ) -> None:
        error_type = type(failure).__name__ if failure else "Error"
        message = str(failure) if failure else (invocation.error or "")
        self.record_failure(
            invocation.function,
            invocation.event,
            error_type=error_type,
            error_message=message,
            request_id=invocation.request_id,
            attempts=invocation.attempts,
            invocation=invocation,
        )

    def record_failure(
        self,
        function: str,
        event: Any,
        *,
        error_type: str,
        error_message: str,
        request_id: str | None = None,
        attempts: int = 3,
        invocation: AsyncInvocation | None = None,
    ) -> str | None:
        """Send Lambda's invocation record of a failed asynchronous invocation of `function` to
        its on-failure destination, if it has one: the queue's URL, else None (the failure stays
        in the log, as Lambda leaves it)."""
        queue_url = self.failure_queues.get(function)
        if queue_url is None or self.sqs is None:
            logger.error("%s failed after %d attempts: %s", function, attempts, error_message)
            return None
        record = destination_record(
            function_arn=self.function_arn(function),
            event=event,
            error_type=error_type,
            error_message=error_message,
            request_id=request_id,
            attempts=attempts,
        )
        self.sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(record))
        if invocation is not None:
            invocation.destination = queue_url
        return queue_url

    def destination_for_rules(self, invocation: Any) -> None:
        """`fleetkey_local.rules.RulesEngine`'s `on_failure`: the record of an invocation of a
        rule's function whose attempts all failed (its `error` is "Type: message")."""
        error_type, _, message = (invocation.error or "Error: ").partition(": ")
        if not isinstance(invocation.function, str) or invocation.function not in (
            self.failure_queues
        ):
            return
        self.record_failure(
            invocation.function,
            invocation.event,
            error_type=error_type,
            error_message=message,
            request_id=invocation.request_id,
            attempts=invocation.attempts,
        )

    # ---- observation ---------------------------------------------------------------------------

    @property
    def invocations(self) -> list[AsyncInvocation]:
        with self._lock:
            return list(self._invocations)

    def drain(self, timeout: float | None = 30.0) -> bool:
        """Wait until every accepted invocation finished (retries included); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=wait)


class LocalLambdaEndpoint:
    """Lambda's Invoke API (InvocationType Event) on 127.0.0.1:`port` (0: a free one) for
    `invoker`'s functions. Requests must be signed with `access_key` (the local stack's)."""

    def __init__(
        self,
        invoker: AsyncInvoker,
        *,
        port: int = 0,
        access_key: str | None = "fleetkey-local",
    ) -> None:
        self.invoker = invoker
        self.access_key = access_key
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the endpoint is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalLambdaEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                status, headers, body = endpoint.handle(
                    self.path, dict(self.headers.items()), self._body()
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("lambda endpoint: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", self._requested_port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-lambda-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> LocalLambdaEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(
        self, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """One Invoke request: (status, headers, body)."""
        headers = {name.lower(): value for name, value in headers.items()}
        match = _INVOKE_PATH.match(path.split("?", 1)[0])
        if match is None:
            return _error(404, "ResourceNotFoundException", f"no such route: {path}")
        if self.access_key is not None and (
            f"Credential={self.access_key}/" not in headers.get("authorization", "")
        ):
            return _error(403, "AccessDeniedException", "sign with the local stack's credentials")
        invocation_type = headers.get("x-amz-invocation-type", "RequestResponse")
        if invocation_type != "Event":
            return _error(
                400,
                "InvalidParameterValueException",
                f"the local stack accepts InvocationType Event only, not {invocation_type}",
            )
        try:
            event = json.loads(body or b"{}")
        except ValueError:
            return _error(400, "InvalidRequestContentException", "Could not parse request body")
        try:
            invocation = self.invoker.invoke(unquote(match.group(1)), event)
        except UnknownFunction as exc:
            return _error(404, "ResourceNotFoundException", str(exc))
        except RuntimeError as exc:
            return _error(503, "ServiceException", str(exc))
        return 202, {"x-amzn-RequestId": invocation.request_id}, b""


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"Type": "User", "message": message}).encode()
    return (
        status,
        {"x-amzn-ErrorType": code, "Content-Type": "application/json"},
        body,
    )
