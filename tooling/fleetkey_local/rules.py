"""AWS IoT rules for the local IoT Core emulator, and Lambda's asynchronous invocation of the
functions they name.

`RULES` is what the deployed stack configures (the registration rule's SQL is the CDK stack's:
infra/fleetkey_infra/constructs/iot_rules.py), plus the rules whose functions do not exist yet:
a rule whose function is None drops what it matches. A rule's function is a fleetkey function name
(functions/<name>/handler.py, loaded as Lambda loads it) or any callable `handler(event, context)`
(a test double).

Only `SELECT * FROM '<topic filter>'` is emulated: the event is the message's JSON payload as is.
Lambda's asynchronous invocation is emulated: the rules engine queues the event and returns; a
worker thread invokes the handler and retries it twice when it raises (as Lambda does for async
invocations, without Lambda's minutes of backoff); every invocation is recorded. Each function
has `concurrency` workers (default 1): Lambda runs one invocation at a time per execution
environment, and the functions' module-level state (Powertools' logger and metrics, cached
clients) assumes it; more environments in one process would share that state.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fleetkey.events import (  # one definition, shared with the CDK stack
    IOT_SQL_VERSION,  # noqa: F401 - re-exported: the template test reads rules.IOT_SQL_VERSION
    PRESENCE_CONNECTED_RULE_SQL,
    REGISTRATION_RULE_SQL,
)
from fleetkey_local.functions import LambdaContext, load_function

logger = logging.getLogger("fleetkey_local.rules")

DEVICE_EVENTS_RULE_SQL = "SELECT * FROM 'fleetkey/+/events/#'"

_SELECT_ALL = re.compile(r"^\s*SELECT\s+\*\s+FROM\s+'([^']+)'\s*$", re.IGNORECASE)

Handler = Callable[[dict, Any], Any]


def topic_filter_of(sql: str) -> str:
    """The topic filter of `SELECT * FROM '<filter>'`; ValueError for any other SQL."""
    match = _SELECT_ALL.match(sql)
    if not match:
        raise ValueError(f"only SELECT * FROM '<topic filter>' is emulated, not {sql!r}")  # noqa: S608
    return match.group(1)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching; a filter starting with a wildcard does not match `$` topics."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True)
class Rule:
    name: str
    sql: str
    topic_filter: str
    # a fleetkey function name, a handler(event, context) callable, or None (the event is dropped)
    function: str | Handler | None = None

    def __post_init__(self) -> None:
        if topic_filter_of(self.sql) != self.topic_filter:
            raise ValueError(
                f"rule {self.name}: the SQL reads {topic_filter_of(self.sql)!r}, "
                f"not {self.topic_filter!r}"
            )

    @classmethod
    def select_all(cls, name: str, sql: str, function: str | Handler | None = None) -> Rule:
        return cls(name, sql, topic_filter_of(sql), function)

    def matches(self, topic: str) -> bool:
        return topic_matches(self.topic_filter, topic)

    @property
    def function_name(self) -> str | None:
        if self.function is None or isinstance(self.function, str):
            return self.function
        return getattr(self.function, "__name__", type(self.function).__name__)


RULES: list[Rule] = [
    Rule.select_all("registration", REGISTRATION_RULE_SQL, "registration"),
    # Rotation commit will take these (principalIdentifier = the certificate id).
    Rule.select_all("presence_connected", PRESENCE_CONNECTED_RULE_SQL, None),
    # Device-reported events: no function consumes them yet.
    Rule.select_all("device_events", DEVICE_EVENTS_RULE_SQL, None),
]


@dataclass
class Invocation:
    """One asynchronous invocation of a rule's function (all its attempts)."""

    rule: str
    function: str | None
    topic: str
    event: dict
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    queued_at: float = field(default_factory=time.time)
    attempts: int = 0
    status: str = "queued"  # queued, running, succeeded, failed, cancelled (emulator stopped)
    result: Any = None
    error: str | None = None
    finished_at: float | None = None

    @property
    def duration_ms(self) -> float | None:
        return None if self.finished_at is None else (self.finished_at - self.queued_at) * 1000


class RulesEngine:
    """Matches messages against the rules and invokes their functions like Lambda's async invoke."""

    def __init__(
        self,
        rules: Sequence[Rule] = RULES,
        *,
        account: str = "123456789012",
        region: str = "eu-west-1",
        concurrency: int = 1,
        retries: int = 2,
        retry_delays: Sequence[float] = (0.05, 0.2),
        loader: Callable[[str], Any] = load_function,
    ) -> None:
        self.rules = list(rules)
        self.account = account
        self.region = region
        self.retries = retries
        self.retry_delays = tuple(retry_delays)
        self._loader = loader
        self.concurrency = concurrency
        self._handlers: dict[str, Handler] = {}
        self._handlers_lock = threading.Lock()
        # one pool per function: its execution environments
        self._executors: dict[Any, ThreadPoolExecutor] = {}
        self._lock = threading.Condition()
        self._pending = 0
        self._closed = False
        self._invocations: list[Invocation] = []
        self.counters: dict[str, int] = {
            "messages": 0,
            "matched": 0,
            "dropped_no_function": 0,
            "not_json": 0,
            "invoked": 0,
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
        }

    # ---- dispatch ------------------------------------------------------------------------------

    def dispatch(self, topic: str, payload: bytes | bytearray | str | dict) -> list[Rule]:
        """Offer a message to the rules; queue an invocation for each matching rule with a
        function. Returns the matching rules. Never blocks on a function."""
        matched = [rule for rule in self.rules if rule.matches(topic)]
        with self._lock:
            self.counters["messages"] += 1
            self.counters["matched"] += len(matched)
            if self._closed or not matched:
                return matched
        event = self._event(payload)
        if event is None:
            with self._lock:
                self.counters["not_json"] += 1
            logger.warning("message on %s is not a JSON object; rules skipped", topic)
            return matched
        for rule in matched:
            if rule.function is None:
                with self._lock:
                    self.counters["dropped_no_function"] += 1
                continue
            self._queue(rule, topic, event)
        return matched

    @staticmethod
    def _event(payload: bytes | bytearray | str | dict) -> dict | None:
        if isinstance(payload, dict):
            return json.loads(json.dumps(payload))  # each invocation gets its own copy
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
        return event if isinstance(event, dict) else None

    def _queue(self, rule: Rule, topic: str, event: dict) -> None:
        invocation = Invocation(
            rule=rule.name,
            function=rule.function_name,
            topic=topic,
            event=json.loads(json.dumps(event)),
        )
        with self._lock:
            if self._closed:
                return
            self._pending += 1
            self._invocations.append(invocation)
        try:
            future = self._executor(rule).submit(self._invoke, rule, invocation)
        except RuntimeError:  # the executor shut down meanwhile
            self._finished(None, invocation)
            return
        future.add_done_callback(lambda f: self._finished(f, invocation))

    def _executor(self, rule: Rule) -> ThreadPoolExecutor:
        key = rule.function if isinstance(rule.function, str) else id(rule.function)
        with self._lock:
            if self._closed:
                raise RuntimeError("the rules engine is closed")
            if key not in self._executors:
                self._executors[key] = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix=f"lambda-{rule.function_name}"
                )
            return self._executors[key]

    def _finished(self, future: Future | None, invocation: Invocation) -> None:
        with self._lock:
            if future is None or future.cancelled():
                invocation.status = "cancelled"
            self._pending -= 1
            self._lock.notify_all()

    # ---- invocation ----------------------------------------------------------------------------

    def _handler(self, function: str | Handler) -> Handler:
        if not isinstance(function, str):
            return function
        with self._handlers_lock:
            if function not in self._handlers:
                self._handlers[function] = self._loader(function).handler
            return self._handlers[function]

    def _context(self, invocation: Invocation) -> LambdaContext:
        name = f"fleetkey-{invocation.function}"
        return LambdaContext(
            function_name=name,
            invoked_function_arn=f"arn:aws:lambda:{self.region}:{self.account}:function:{name}",
            aws_request_id=invocation.request_id,
        )

    def _invoke(self, rule: Rule, invocation: Invocation) -> None:
        invocation.status = "running"
        with self._lock:
            self.counters["invoked"] += 1
        for attempt in range(self.retries + 1):
            invocation.attempts = attempt + 1
            try:
                handler = self._handler(rule.function)
                # Each attempt gets the original event, as Lambda redelivers it.
                invocation.result = handler(
                    json.loads(json.dumps(invocation.event)), self._context(invocation)
                )
            except Exception as exc:  # noqa: BLE001 - the function failed: Lambda retries async invocations
                invocation.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "%s (rule %s) failed, attempt %d: %s",
                    invocation.function,
                    rule.name,
                    attempt + 1,
                    invocation.error,
                )
                if attempt < self.retries:
                    with self._lock:
                        self.counters["retried"] += 1
                    time.sleep(
                        self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
                        if self.retry_delays
                        else 0
                    )
                    continue
                invocation.status = "failed"
                with self._lock:
                    self.counters["failed"] += 1
                break
            else:
                invocation.status = "succeeded"
                invocation.error = None
                with self._lock:
                    self.counters["succeeded"] += 1
                break
        invocation.finished_at = time.time()

    # ---- observation ---------------------------------------------------------------------------

    @property
    def invocations(self) -> list[Invocation]:
        with self._lock:
            return list(self._invocations)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued invocation finished (retries included); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def statistics(self) -> dict:
        with self._lock:
            by_function: dict[str, dict[str, int]] = {}
            for invocation in self._invocations:
                counts = by_function.setdefault(invocation.function or "-", {})
                counts[invocation.status] = counts.get(invocation.status, 0) + 1
            return {**self.counters, "pending": self._pending, "by_function": by_function}

    def close(self, wait: bool = True) -> None:
        """Stop accepting events; wait for running invocations (queued ones are cancelled)."""
        with self._lock:
            self._closed = True
            executors = list(self._executors.values())
        for executor in executors:
            executor.shutdown(wait=wait, cancel_futures=True)
