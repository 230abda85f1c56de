"""AWS IoT rules for the local IoT Core emulator, and Lambda's asynchronous invocation of the
functions they name.

`RULES` is what the deployed stack configures (each rule's SQL is the CDK stack's, from
fleetkey.events: infra/fleetkey_infra/constructs/iot_rules.py), plus the rules whose functions do
not exist yet: a rule whose function is None drops what it matches. A rule's function is a
fleetkey function name (functions/<name>/handler.py, loaded as Lambda loads it) or any callable
`handler(event, context)` (a test double). Every rule whose filter matches a message acts on it,
as in AWS IoT: one rule dropping a message does not keep another from invoking its function.

Emulated SQL: `SELECT * FROM '<topic filter>'` (the event is the message's JSON payload as is),
and `SELECT *, topic(N) AS <name>[, ...] FROM '<topic filter>'` (AWS IoT SQL's topic function,
levels numbered from 1, `topic()` the whole topic): the payload plus those fields, each replacing
a payload field of the same name (the SELECT items are applied in order, so the alias, after `*`,
wins: a device cannot name another device in its payload). A `topic(N)` past the topic's last
level is Undefined, and AWS IoT leaves an Undefined item out of the outgoing payload. Anything
else (WHERE, other functions, projections) is refused when the rule is defined.

Lambda's asynchronous invocation is emulated: the rules engine queues the event and returns; a
worker thread invokes the handler and retries it twice when it raises (as Lambda does for async
invocations, without Lambda's minutes of backoff), then hands an invocation whose attempts all
failed to `on_failure` (Lambda's on-failure destination); every invocation is recorded. Each
function has `concurrency` workers (default 1): Lambda runs one invocation at a time per
execution environment, and the functions' module-level state (Powertools' logger and metrics,
cached clients) assumes it; more environments in one process would share that state.
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
    TAMPER_RULE_SQL,
)
from fleetkey_local.functions import LambdaContext, load_function

logger = logging.getLogger("fleetkey_local.rules")

# Device-reported events under fleetkey/<device id>/events/. No rule of the stack reads them all
# (the tamper rule reads its own topic); tests give this filter to test doubles.
DEVICE_EVENTS_RULE_SQL = "SELECT * FROM 'fleetkey/+/events/#'"

_SELECT = re.compile(
    r"^\s*SELECT\s+(?P<items>.+?)\s+FROM\s+'(?P<filter>[^']+)'\s*$", re.IGNORECASE | re.DOTALL
)
_TOPIC_ITEM = re.compile(
    r"^topic\(\s*(?P<level>[0-9]*)\s*\)\s+AS\s+(?P<alias>[A-Za-z_][A-Za-z0-9_]*)$", re.IGNORECASE
)

Handler = Callable[[dict, Any], Any]


@dataclass(frozen=True)
class TopicField:
    """`topic(level) AS alias`: the message topic's level (from 1), or the whole topic (None)."""

    alias: str
    level: int | None = None

    def value(self, topic: str) -> str | None:
        """The level's text, or None (AWS IoT's Undefined) past the topic's last level."""
        if self.level is None:
            return topic
        levels = topic.split("/")
        return levels[self.level - 1] if self.level <= len(levels) else None


@dataclass(frozen=True)
class Select:
    """What an emulated rule SQL says: its topic filter, and the topic fields added to `*`."""

    topic_filter: str
    fields: tuple[TopicField, ...] = ()
    # `*` selected: the payload's own fields come first (else only the topic fields).
    everything: bool = True

    def project(self, topic: str, payload: dict) -> dict:
        """The rule's outgoing payload: a copy of `payload` with the topic fields set on it in
        their SQL order (each replaces a payload field of its name); an Undefined one is left
        out, as AWS IoT leaves it out."""
        event = json.loads(json.dumps(payload)) if self.everything else {}
        for item in self.fields:
            value = item.value(topic)
            if value is not None:
                event[item.alias] = value
        return event


def parse_sql(sql: str) -> Select:
    """The emulated part of AWS IoT SQL: `SELECT *[, topic(N) AS name ...] FROM '<filter>'`, or
    the topic fields alone (`SELECT topic(N) AS name[, ...] FROM '<filter>'`).

    Raises:
        ValueError: anything else.
    """
    match = _SELECT.match(sql)
    items = [item.strip() for item in match["items"].split(",")] if match else []
    everything = bool(items) and items[0] == "*"
    if match is None or (not everything and not all(_TOPIC_ITEM.match(i) for i in items)):
        raise ValueError(
            "only SELECT *[, topic(N) AS <name> ...] FROM '<topic filter>' is emulated, "  # noqa: S608
            f"not {sql!r}"
        )
    fields = []
    for item in items[1:] if everything else items:
        topic_item = _TOPIC_ITEM.match(item)
        if topic_item is None:
            raise ValueError(f"only topic(N) AS <name> may follow * in emulated SQL, not {item!r}")
        level = int(topic_item["level"]) if topic_item["level"] else None
        if level is not None and level < 1:
            raise ValueError(f"topic levels are numbered from 1: {item!r}")
        fields.append(TopicField(topic_item["alias"], level))
    return Select(match["filter"], tuple(fields), everything)


def topic_filter_of(sql: str) -> str:
    """The topic filter of an emulated rule SQL (see `parse_sql`); ValueError for other SQL."""
    return parse_sql(sql).topic_filter


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
    select: Select = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        select = parse_sql(self.sql)
        if select.topic_filter != self.topic_filter:
            raise ValueError(
                f"rule {self.name}: the SQL reads {select.topic_filter!r}, "
                f"not {self.topic_filter!r}"
            )
        object.__setattr__(self, "select", select)

    @classmethod
    def select_all(cls, name: str, sql: str, function: str | Handler | None = None) -> Rule:
        """A rule from its SQL alone (`SELECT * ...`, with or without topic fields)."""
        return cls(name, sql, topic_filter_of(sql), function)

    def matches(self, topic: str) -> bool:
        return topic_matches(self.topic_filter, topic)

    def event(self, topic: str, payload: dict) -> dict:
        """What the rule's action receives for a message's JSON payload on `topic`."""
        return self.select.project(topic, payload)

    @property
    def function_name(self) -> str | None:
        if self.function is None or isinstance(self.function, str):
            return self.function
        return getattr(self.function, "__name__", type(self.function).__name__)


RULES: list[Rule] = [
    Rule.select_all("registration", REGISTRATION_RULE_SQL, "registration"),
    # A device connected: rotation_events commits the pending certificate it connected with
    # (principalIdentifier = the certificate id).
    Rule.select_all("presence_connected", PRESENCE_CONNECTED_RULE_SQL, "rotation_events"),
    # A device reports tampering on fleetkey/<device id>/events/tamper: suspend it.
    Rule.select_all("tamper", TAMPER_RULE_SQL, "device_events"),
]


def _is_empty(payload: bytes | bytearray | str | dict) -> bool:
    """A message without a payload (or only whitespace)."""
    if isinstance(payload, dict):
        return False
    return not (payload.encode() if isinstance(payload, str) else bytes(payload)).strip()


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
        on_failure: Callable[[Invocation], None] | None = None,
    ) -> None:
        self.rules = list(rules)
        # Called with an invocation whose every attempt failed: Lambda's on-failure destination
        # (`fleetkey_local.lambda_invoke.AsyncInvoker.destination_for_rules` sends its record).
        # May be set after construction.
        self.on_failure = on_failure
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
        function. Returns the matching rules. Never blocks on a function.

        A payload that is not a JSON object reaches no function, except that an empty payload
        is an empty object to a rule adding topic fields (AWS IoT adds data to an empty
        payload)."""
        matched = [rule for rule in self.rules if rule.matches(topic)]
        with self._lock:
            self.counters["messages"] += 1
            self.counters["matched"] += len(matched)
            if self._closed or not matched:
                return matched
        event = self._event(payload)
        empty = _is_empty(payload)
        skipped = False
        for rule in matched:
            if rule.function is None:
                with self._lock:
                    self.counters["dropped_no_function"] += 1
                continue
            base = {} if event is None and empty and rule.select.fields else event
            if base is None:
                skipped = True
                continue
            self._queue(rule, topic, rule.event(topic, base))
        if skipped:
            with self._lock:
                self.counters["not_json"] += 1
            logger.warning("message on %s is not a JSON object; rules skipped", topic)
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
                self._on_failure(invocation)
                break
            else:
                invocation.status = "succeeded"
                invocation.error = None
                with self._lock:
                    self.counters["succeeded"] += 1
                break
        invocation.finished_at = time.time()

    def _on_failure(self, invocation: Invocation) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(invocation)
        except Exception:  # Lambda counts a destination it cannot deliver to; nothing else fails
            logger.exception("on-failure destination of %s failed", invocation.function)

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
