"""`fleetkey redrive <queue>`: re-deliver what a failure queue holds to the function that failed.

    fleetkey redrive all --dry-run                          # the local stack (`make serve`)
    fleetkey redrive registration-failures
    fleetkey redrive lifecycle-dlq --max 10
    fleetkey --region eu-west-1 redrive all --dry-run --stack Fleetkey   # a deployed stack

The CDK stack keeps what fleetkey could not process in nine queues (`QUEUES`), of four kinds,
each re-delivered its own way:

- **dead-letters** (`lifecycle-dlq`): lifecycle messages the converge function could not finish
  after the lifecycle queue's maxReceiveCount. Each message is sent back to the lifecycle queue as
  it was (body and message attributes; SendMessage, then DeleteMessage), where the converge
  function gets another maxReceiveCount deliveries. SQS's own StartMessageMoveTask moves a whole
  queue at a given rate but cannot be limited to N messages, or listed first; the local stack's
  SQS (moto) does not have it.
- **lambda-destination** (`registration-failures`, `device-event-failures`,
  `rotation-event-failures`): Lambda's invocation records of asynchronous invocations whose
  retries were exhausted. The record's `requestPayload` (the event as the function got it) is
  invoked again, asynchronously (Invoke, InvocationType Event), on the function the queue belongs
  to; a record of another function (`requestContext.functionArn`) is left alone.
- **rule-errors** (`registration-rule-errors`, `tamper-rule-errors`, `presence-rule-errors`): an
  IoT rule's error action messages, left when AWS IoT could not invoke the rule's function at all.
  They carry the MQTT message as published (`base64OriginalPayload`) and its `topic`: the rule's
  SQL is applied to them again (`fleetkey_local.rules`, the same SQL as the deployed rules: its
  `topic(N)` fields) and the result invoked asynchronously on the rule's function. A message whose
  topic the rule does not match, or whose payload is not the JSON the rule's `SELECT *` needs, is
  left alone.
- **schedule-dead-letters** (`maintenance-dlq`, `rotation-sweep-dlq`): scheduled events
  EventBridge could not deliver to the schedule's function (the body is the event). Every run of
  those functions does all the work due at that moment, so all the scheduled events of a function
  in one redrive are one invocation: the first is invoked, the rest are deleted as covered by it.
  The same holds for scheduled events among `rotation-event-failures`' records (a failed sweep).

Idempotent throughout: every function converges (a registration already decided, a device already
suspended, a rotation already committed, a teardown already complete change nothing), so a
message re-delivered twice (a redrive interrupted between the re-delivery and the delete, or a
duplicate AWS left) does no harm. Within one redrive, identical events are re-delivered once.

A message is deleted only after its re-delivery succeeded: the lifecycle queue accepted it, or
Lambda accepted the asynchronous invocation (202). What the function then does is Lambda's
asynchronous invocation again: its retries, and for the three functions with an on-failure
destination a new record in their failure queue if it fails again; maintenance's failures are in
its log (the next hourly run does the same work). A redrive takes only the messages sent before
it started (SentTimestamp): a record arriving meanwhile (an event it re-delivered that failed
again) is left for the next one, so a redrive never loops on a failure not fixed yet. A message
that cannot be re-delivered stays in the queue, visible again when the redrive ends, with why.
After `MAX_CONSECUTIVE_FAILURES` re-deliveries failed in a row the redrive stops (Lambda or SQS
is refusing everything).

`--dry-run` receives the messages (up to --max), lists them (function, event summary, first
failure time, receive count, error) and makes them visible again: nothing is re-delivered or
deleted. Receiving counts as a receive (ApproximateReceiveCount goes up by one).

The first failure time: a Lambda record's event's own time when it has one (a registration
event's or a presence event's `timestamp`, a scheduled event's `time`: the first attempt
followed within seconds), else the record's `timestamp` (when Lambda gave up); an IoT rule error's
SentTimestamp (AWS IoT fails the action at once and does not retry it); a scheduled event's
`time`; a lifecycle message's ApproximateFirstReceiveTimestamp (its first delivery to the converge
function; SQS keeps it when it moves the message to the dead-letter queue).

Where the queues and functions are: a deployed stack's CloudFormation outputs (--stack NAME:
DescribeStacks; the operator's AWS credentials), or the local stack's, which `make serve` writes
to <state dir>/outputs.json with its AWS (moto) and Lambda endpoints (`fleetkey_local.serve`).
AWS calls: cloudformation:DescribeStacks (deployed), sqs:ReceiveMessage, sqs:DeleteMessage,
sqs:ChangeMessageVisibility on the failure queues, sqs:SendMessage on the lifecycle queue,
lambda:InvokeFunction on registration, device_events, rotation_events and maintenance.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from botocore.exceptions import BotoCoreError, ClientError

DEAD_LETTERS = "dead-letters"
LAMBDA_DESTINATION = "lambda-destination"
RULE_ERRORS = "rule-errors"
SCHEDULE_DEAD_LETTERS = "schedule-dead-letters"

MAX_CONSECUTIVE_FAILURES = 3
# Received messages stay invisible this long while the redrive works on them; those left in the
# queue are made visible again when it ends.
VISIBILITY_TIMEOUT_SECONDS = 300
# Long polling, so that SQS asks all its servers: an empty answer means an empty queue.
WAIT_SECONDS = 1
RECEIVE_BATCH = 10  # ReceiveMessage's maximum
DEFAULT_STATE_DIR = Path("build/local")
LOCAL_OUTPUTS_FILE = "outputs.json"
DEFAULT_STACK_ENV = "FLEETKEY_STACK"


@dataclass(frozen=True)
class FailureQueue:
    """One failure queue of the stack: its name here, the stack output with its URL, its kind,
    and the function whose failures it keeps (functions/<function>, and the stack output with
    the deployed function's name)."""

    name: str
    queue_output: str
    kind: str
    function: str
    function_output: str
    holds: str
    rule: str | None = None  # rule-errors: the rule's name in fleetkey_local.rules.RULES
    target_output: str | None = None  # dead-letters: the queue they go back to


QUEUES: tuple[FailureQueue, ...] = (
    FailureQueue(
        "lifecycle-dlq",
        "LifecycleDeadLetterQueueUrl",
        DEAD_LETTERS,
        "converge",
        "ConvergeFunctionName",
        "lifecycle messages (teardowns, convergences) the converge function could not finish",
        target_output="LifecycleQueueUrl",
    ),
    FailureQueue(
        "registration-failures",
        "RegistrationFailureQueueUrl",
        LAMBDA_DESTINATION,
        "registration",
        "RegistrationFunctionName",
        "registration events that failed every retry: Lambda's, then six hours of the "
        "registration retry queue's",
    ),
    FailureQueue(
        "device-event-failures",
        "DeviceEventFailureQueueUrl",
        LAMBDA_DESTINATION,
        "device_events",
        "DeviceEventsFunctionName",
        "tamper reports whose asynchronous invocation failed every retry",
    ),
    FailureQueue(
        "rotation-event-failures",
        "RotationEventFailureQueueUrl",
        LAMBDA_DESTINATION,
        "rotation_events",
        "RotationEventsFunctionName",
        "presence events and rotation sweeps whose asynchronous invocation failed every retry",
    ),
    FailureQueue(
        "registration-rule-errors",
        "RegistrationRuleErrorQueueUrl",
        RULE_ERRORS,
        "registration",
        "RegistrationFunctionName",
        "certificate-registered events AWS IoT could not hand to the registration function",
        rule="registration",
    ),
    FailureQueue(
        "tamper-rule-errors",
        "TamperRuleErrorQueueUrl",
        RULE_ERRORS,
        "device_events",
        "DeviceEventsFunctionName",
        "tamper reports AWS IoT could not hand to the device_events function",
        rule="tamper",
    ),
    FailureQueue(
        "presence-rule-errors",
        "PresenceRuleErrorQueueUrl",
        RULE_ERRORS,
        "rotation_events",
        "RotationEventsFunctionName",
        "presence (connected) events AWS IoT could not hand to the rotation_events function",
        rule="presence_connected",
    ),
    FailureQueue(
        "maintenance-dlq",
        "MaintenanceDeadLetterQueueUrl",
        SCHEDULE_DEAD_LETTERS,
        "maintenance",
        "MaintenanceFunctionName",
        "hourly signing-key maintenance runs EventBridge could not deliver",
    ),
    FailureQueue(
        "rotation-sweep-dlq",
        "RotationSweepDeadLetterQueueUrl",
        SCHEDULE_DEAD_LETTERS,
        "rotation_events",
        "RotationEventsFunctionName",
        "rotation sweeps EventBridge could not deliver",
    ),
)
BY_NAME: dict[str, FailureQueue] = {queue.name: queue for queue in QUEUES}


class RedriveError(Exception):
    """The redrive cannot start: an unknown queue, a stack without the outputs it needs, the local
    stack not running."""


class RedeliveryFailed(Exception):
    """A re-delivery was refused (the message stays in its queue)."""


@dataclass(frozen=True)
class Target:
    """A function: its directory name (functions/<name>) and its deployed name (or ARN)."""

    name: str
    deployed_name: str


class Invoker(Protocol):
    """Invokes a function asynchronously. Production: `LambdaInvoker` (boto3 Lambda Invoke,
    InvocationType Event); the local stack: the same against its Lambda endpoint; tests:
    `fleetkey_local.lambda_invoke.AsyncInvoker`, through `LocalInvoker`."""

    def invoke_event(self, target: Target, payload: Any) -> None:
        """Raises RedeliveryFailed when the invocation was not accepted."""


class LambdaInvoker:
    """Lambda's Invoke with InvocationType Event: accepted when Lambda answers 202 (the event is
    in the function's asynchronous queue). boto3's retries apply to throttling (429) and 5xx."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def invoke_event(self, target: Target, payload: Any) -> None:
        try:
            response = self.client.invoke(
                FunctionName=target.deployed_name,
                InvocationType="Event",
                Payload=json.dumps(payload).encode(),
            )
        except (ClientError, BotoCoreError) as exc:
            raise RedeliveryFailed(str(exc)) from exc
        if response.get("StatusCode") != 202:
            raise RedeliveryFailed(f"Lambda answered {response.get('StatusCode')}, not 202")


class LocalInvoker:
    """The port onto the locally loaded handlers (`fleetkey_local.lambda_invoke.AsyncInvoker`),
    by directory name."""

    def __init__(self, invoker: Any) -> None:
        self.invoker = invoker

    def invoke_event(self, target: Target, payload: Any) -> None:
        try:
            self.invoker.invoke(target.name, payload)
        except (LookupError, RuntimeError) as exc:
            raise RedeliveryFailed(str(exc)) from exc


# ---- reading the messages ------------------------------------------------------------------------


@dataclass
class Entry:
    """A message of a failure queue, what it would re-deliver, and what became of it."""

    message_id: str
    receipt_handle: str
    receive_count: int
    function: str
    summary: str
    first_failure: datetime | None = None
    error: str | None = None
    payload: Any = None  # the event to invoke, or (dead-letters) the message body
    attributes: dict[str, Any] = field(default_factory=dict)  # dead-letters: to send along
    key: str | None = None  # identical keys are re-delivered once per redrive
    problem: str | None = None  # why it cannot be re-delivered
    outcome: str = "listed"  # listed, redriven, duplicate, covered, failed, skipped
    detail: str | None = None

    def line(self) -> str:
        when = _iso(self.first_failure) if self.first_failure else "unknown"
        text = (
            f"{self.message_id}  {self.function}  first failed {when}  "
            f"received {self.receive_count}x  {self.summary}"
        )
        if self.error:
            text += f"  [{_shorten(self.error, 160)}]"
        if self.outcome != "listed":
            text += f"  -> {self.outcome}"
            if self.detail:
                text += f": {self.detail}"
        return text


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_id(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) > 16 else str(value)


def _millis(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def is_scheduled_event(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and event.get("source") == "aws.events"
        and event.get("detail-type") == "Scheduled Event"
    )


def event_time(event: Any) -> datetime | None:
    """When the event happened, if it says: a scheduled event's `time`, an AWS IoT event's
    `timestamp` (milliseconds)."""
    if not isinstance(event, dict):
        return None
    if is_scheduled_event(event):
        return _parse_time(event.get("time"))
    return _millis(event.get("timestamp")) if "timestamp" in event else None


def summarize(function: str, event: Any) -> str:
    """One line about an event, for the listing."""
    if is_scheduled_event(event):
        rule = str((event.get("resources") or ["?"])[0]).rsplit("/", 1)[-1]
        return f"scheduled run of {event.get('time')} (rule {rule})"
    if isinstance(event, dict):
        if function == "registration" and "certificateId" in event:
            return (
                f"certificate {_short_id(event.get('certificateId'))} registered "
                f"(CA {_short_id(event.get('caCertificateId'))})"
            )
        if function == "device_events" and "device_id" in event:
            return f"tamper report of {event.get('device_id')}"
        if function == "rotation_events" and "principalIdentifier" in event:
            return (
                f"{event.get('clientId')} {event.get('eventType', 'connected')} with certificate "
                f"{_short_id(event.get('principalIdentifier'))}"
            )
        if function == "converge" and "device_id" in event:
            epoch = f" (epoch {event['epoch']})" if "epoch" in event else ""
            return f"converge {event.get('device_id')}{epoch}"
    return _shorten(json.dumps(event, sort_keys=True, default=str), 100)


def _event_key(function: str, event: Any) -> str:
    if is_scheduled_event(event):
        return f"schedule:{function}"  # one run does all that is due
    return f"{function}:{json.dumps(event, sort_keys=True)}"


def _deployed_function(arn: str) -> str:
    """The function name in a (possibly qualified) function ARN, or the name itself."""
    if ":function:" in arn:
        return arn.split(":function:", 1)[1].split(":", 1)[0]
    return arn


def read_message(queue: FailureQueue, message: Mapping[str, Any], deployed_name: str) -> Entry:
    """What a received message says and would re-deliver (`problem` set when nothing can be)."""
    attributes = message.get("Attributes", {})
    entry = Entry(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        receive_count=int(attributes.get("ApproximateReceiveCount", "0")),
        function=queue.function,
        summary="",
    )
    body: Any
    try:
        body = json.loads(message["Body"])
    except ValueError:
        body = None
    readers: dict[str, Callable[[Entry, Any, Mapping[str, Any], str], None]] = {
        DEAD_LETTERS: _read_dead_letter,
        LAMBDA_DESTINATION: _read_destination_record,
        RULE_ERRORS: _read_rule_error,
        SCHEDULE_DEAD_LETTERS: _read_schedule_dead_letter,
    }
    readers[queue.kind](entry, body, message, deployed_name)
    if queue.kind == RULE_ERRORS and entry.problem is None:
        _apply_rule(entry, queue, body)
    if not entry.summary:
        entry.summary = summarize(queue.function, entry.payload)
    if entry.problem is None and entry.key is None:
        entry.key = _event_key(queue.function, entry.payload)
    return entry


def _read_dead_letter(
    entry: Entry, body: Any, message: Mapping[str, Any], deployed_name: str
) -> None:
    attributes = message.get("Attributes", {})
    entry.payload = message["Body"]
    entry.attributes = {
        name: {
            key: value[key] for key in ("DataType", "StringValue", "BinaryValue") if key in value
        }
        for name, value in message.get("MessageAttributes", {}).items()
    }
    entry.first_failure = _millis(attributes.get("ApproximateFirstReceiveTimestamp"))
    entry.summary = summarize("converge", body) if isinstance(body, dict) else ""
    entry.key = f"message:{message['Body']}"


def _read_destination_record(
    entry: Entry, record: Any, message: Mapping[str, Any], deployed_name: str
) -> None:
    if not isinstance(record, dict) or record.get("requestPayload") is None:
        entry.problem = "not a Lambda invocation record with a requestPayload"
        entry.summary = _shorten(message["Body"], 100)
        entry.first_failure = _millis(message.get("Attributes", {}).get("SentTimestamp"))
        return
    context = record.get("requestContext") or {}
    response = record.get("responsePayload")
    entry.payload = record["requestPayload"]
    entry.first_failure = event_time(entry.payload) or _parse_time(record.get("timestamp"))
    error = ""
    if isinstance(response, dict) and (response.get("errorType") or response.get("errorMessage")):
        error = f"{response.get('errorType', 'Error')}: {response.get('errorMessage', '')}"
    entry.error = (
        f"{context.get('condition', 'failed')} after {context.get('approximateInvokeCount', '?')} "
        f"attempts" + (f": {error}" if error else "")
    )
    failed = _deployed_function(str(context.get("functionArn", "")))
    if failed and failed != _deployed_function(deployed_name):
        entry.problem = f"a record of function {failed}, not {_deployed_function(deployed_name)}"


def _read_rule_error(
    entry: Entry, message_body: Any, message: Mapping[str, Any], deployed_name: str
) -> None:
    entry.first_failure = _millis(message.get("Attributes", {}).get("SentTimestamp"))
    if not isinstance(message_body, dict) or "base64OriginalPayload" not in message_body:
        entry.problem = "not an IoT rule error action message"
        entry.summary = _shorten(message["Body"], 100)
        return
    failures = message_body.get("failures") or []
    entry.error = "; ".join(
        f"{failure.get('failedAction', '?')}: {failure.get('errorMessage', '')}"
        for failure in failures
        if isinstance(failure, dict)
    )


def _apply_rule(entry: Entry, queue: FailureQueue, message_body: dict[str, Any]) -> None:
    """The event the rule's Lambda action would have got: its SQL applied to the original MQTT
    message."""
    from fleetkey_local.rules import RULES

    rule = next(rule for rule in RULES if rule.name == queue.rule)
    topic = message_body.get("topic")
    if not isinstance(topic, str) or not rule.matches(topic):
        entry.problem = f"topic {topic!r} is not the {rule.name} rule's ({rule.topic_filter})"
        entry.summary = f"message on {topic}"
        return
    try:
        raw = base64.b64decode(message_body["base64OriginalPayload"], validate=True)
    except (ValueError, TypeError):
        entry.problem = "base64OriginalPayload is not base64"
        return
    payload: Any = {}
    if rule.select.everything:  # SELECT *: the payload's JSON fields are the event's
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            entry.problem = f"the payload is not a JSON object, which {rule.sql!r} needs"
            entry.summary = f"message on {topic}"
            return
    entry.payload = rule.event(topic, payload)


def _read_schedule_dead_letter(
    entry: Entry, event: Any, message: Mapping[str, Any], deployed_name: str
) -> None:
    attributes = {
        name: value.get("StringValue", "")
        for name, value in message.get("MessageAttributes", {}).items()
    }
    entry.payload = event
    entry.first_failure = event_time(event) or _millis(
        message.get("Attributes", {}).get("SentTimestamp")
    )
    parts = [
        attributes.get(name)
        for name in ("EXHAUSTED_RETRY_CONDITION", "ERROR_CODE", "ERROR_MESSAGE")
        if attributes.get(name)
    ]
    entry.error = ": ".join(p for p in parts if p) or None
    if not is_scheduled_event(event):
        entry.problem = "not an EventBridge scheduled event"
        entry.summary = _shorten(message["Body"], 100)
        return
    target = attributes.get("TARGET_ARN")
    if target and _deployed_function(target) != _deployed_function(deployed_name):
        entry.problem = (
            f"a dead letter of target {_deployed_function(target)}, not "
            f"{_deployed_function(deployed_name)}"
        )


# ---- redriving ---------------------------------------------------------------------------------


@dataclass
class Report:
    queue: FailureQueue
    queue_url: str
    dry_run: bool
    entries: list[Entry] = field(default_factory=list)
    stopped: str | None = None  # why the redrive stopped early
    later: int = 0  # messages that arrived during the redrive, left for the next one

    def count(self, outcome: str) -> int:
        return sum(1 for entry in self.entries if entry.outcome == outcome)

    @property
    def left(self) -> int:
        """Messages left in the queue."""
        return sum(1 for e in self.entries if e.outcome in ("failed", "skipped", "listed"))

    @property
    def ok(self) -> bool:
        if self.dry_run:
            return True
        return self.stopped is None and self.count("failed") == self.count("skipped") == 0

    def summary(self) -> str:
        if self.dry_run:
            return (
                f"{self.queue.name}: {len(self.entries)} message(s) listed (dry run: nothing "
                "re-delivered or deleted)"
            )
        counts = ", ".join(
            f"{self.count(outcome)} {outcome}"
            for outcome in ("redriven", "duplicate", "covered", "failed", "skipped")
        )
        text = f"{self.queue.name}: {counts}; {self.left} left in the queue"
        if self.later:
            text += f"; {self.later} arrived during the redrive (not touched)"
        return text + (f" (stopped: {self.stopped})" if self.stopped else "")


class Redriver:
    """Redrives the failure queues named by `outputs` (a stack's CloudFormation outputs), with
    `sqs` (boto3 SQS client) and `invoker` (the asynchronous invocation port)."""

    def __init__(
        self,
        sqs: Any,
        invoker: Invoker,
        outputs: Mapping[str, str],
        *,
        wait_seconds: int = WAIT_SECONDS,
        visibility_timeout: int = VISIBILITY_TIMEOUT_SECONDS,
        max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.sqs = sqs
        self.invoker = invoker
        self.outputs = dict(outputs)
        self.wait_seconds = wait_seconds
        self.visibility_timeout = visibility_timeout
        self.max_consecutive_failures = max_consecutive_failures
        self.out = out

    def _output(self, key: str) -> str:
        value = self.outputs.get(key)
        if not value:
            raise RedriveError(f"the stack has no output {key} (deployed before redrive existed?)")
        return value

    def run(
        self, queue: FailureQueue, *, dry_run: bool = False, max_messages: int | None = None
    ) -> Report:
        """Redrive (or list) up to `max_messages` messages of `queue` (default: all)."""
        queue_url = self._output(queue.queue_output)
        deployed_name = self._output(queue.function_output)
        target_url = self._output(queue.target_output) if queue.target_output else None
        target = Target(queue.function, deployed_name)
        report = Report(queue, queue_url, dry_run)
        self._say(f"{queue.name} ({queue_url}): {queue.holds}")
        # Messages sent after this moment are not this redrive's: among them the new records of
        # events it re-delivered that failed again, which a loop would re-deliver forever.
        started_ms = int(self.clock() * 1000)
        received: dict[str, str] = {}  # message id -> receipt handle, of this redrive
        deleted: set[str] = set()
        later = 0  # arrived during the redrive: left as they are
        done: set[str] = set()  # keys re-delivered in this redrive
        failures_in_a_row = 0
        try:
            while max_messages is None or len(report.entries) < max_messages:
                wanted = RECEIVE_BATCH
                if max_messages is not None:
                    wanted = min(wanted, max_messages - len(report.entries))
                batch = self._receive(queue_url, wanted)
                if not batch:
                    break
                # A message received again (the redrive outlasted its visibility timeout) keeps
                # what became of it; its latest receipt handle is the one that releases it.
                fresh = [m for m in batch if m["MessageId"] not in received]
                received.update({m["MessageId"]: m["ReceiptHandle"] for m in batch})
                for message in fresh:
                    sent = int(message.get("Attributes", {}).get("SentTimestamp", "0"))
                    if sent > started_ms:
                        later += 1
                        continue
                    entry = read_message(queue, message, deployed_name)
                    report.entries.append(entry)
                    if dry_run:
                        pass
                    elif entry.problem is not None:
                        entry.outcome, entry.detail = "skipped", entry.problem
                    elif entry.key in done:
                        if entry.key.startswith("schedule:"):
                            entry.outcome = "covered"
                            entry.detail = "by the run re-invoked in this redrive"
                        else:
                            entry.outcome = "duplicate"
                            entry.detail = "of an event re-delivered in this redrive"
                        if self._delete(queue_url, entry):
                            deleted.add(entry.message_id)
                    elif self._redeliver(entry, target, target_url):
                        failures_in_a_row = 0
                        done.add(entry.key or "")
                        if self._delete(queue_url, entry):
                            deleted.add(entry.message_id)
                    else:
                        failures_in_a_row += 1
                    self._say("  " + entry.line())
                    if failures_in_a_row >= self.max_consecutive_failures:
                        report.stopped = (
                            f"{failures_in_a_row} re-deliveries failed in a row; fix the cause "
                            "and run the redrive again"
                        )
                        break
                if report.stopped:
                    break
        finally:
            # Whatever was received and is still in the queue (listed, skipped, failed, not
            # reached, arrived later) is visible again at once, not after the visibility timeout.
            self._release(
                queue_url, [handle for id_, handle in received.items() if id_ not in deleted]
            )
        report.later = later
        self._say(report.summary())
        return report

    def _receive(self, queue_url: str, wanted: int) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=wanted,
            WaitTimeSeconds=self.wait_seconds,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    def _redeliver(self, entry: Entry, target: Target, target_url: str | None) -> bool:
        try:
            if target_url is not None:  # dead letters go back to their queue
                request: dict[str, Any] = {"QueueUrl": target_url, "MessageBody": entry.payload}
                if entry.attributes:
                    request["MessageAttributes"] = entry.attributes
                self.sqs.send_message(**request)
                entry.outcome, entry.detail = "redriven", "sent back to the lifecycle queue"
            else:
                self.invoker.invoke_event(target, entry.payload)
                entry.outcome = "redriven"
                entry.detail = f"{target.name} invoked (InvocationType Event)"
        except (RedeliveryFailed, ClientError, BotoCoreError) as exc:
            entry.outcome, entry.detail = "failed", str(exc)
            return False
        return True

    def _delete(self, queue_url: str, entry: Entry) -> bool:
        try:
            self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=entry.receipt_handle)
        except (ClientError, BotoCoreError) as exc:
            # Re-delivered but still in the queue: a later redrive re-delivers it again, which
            # converges to the same state.
            entry.detail = f"{entry.detail or ''}; not deleted: {exc}".lstrip("; ")
            return False
        return True

    def _release(self, queue_url: str, receipt_handles: list[str]) -> None:
        """Make the messages left in the queue visible again (ChangeMessageVisibilityBatch)."""
        for start in range(0, len(receipt_handles), RECEIVE_BATCH):
            batch = receipt_handles[start : start + RECEIVE_BATCH]
            try:
                self.sqs.change_message_visibility_batch(
                    QueueUrl=queue_url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": 0}
                        for i, handle in enumerate(batch)
                    ],
                )
            except (ClientError, BotoCoreError) as exc:  # they come back after the timeout
                self._say(f"  could not make {len(batch)} message(s) visible again: {exc}")

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)


# ---- where the stack is ------------------------------------------------------------------------


@dataclass
class Environment:
    """What a redrive works with: an SQS client, the invocation port, the stack's outputs, and
    how long a receive waits (the local stack's SQS is one server: short polls see everything)."""

    sqs: Any
    invoker: Invoker
    outputs: Mapping[str, str]
    wait_seconds: int = WAIT_SECONDS


def stack_outputs(cloudformation: Any, stack_name: str) -> dict[str, str]:
    """A deployed stack's outputs (DescribeStacks)."""
    stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    if not stacks:
        raise RedriveError(f"no stack {stack_name}")
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def deployed_environment(stack_name: str, region: str | None) -> Environment:
    """A deployed stack, with the standard AWS credential chain."""
    import boto3

    session = boto3.session.Session(region_name=region)
    outputs = stack_outputs(session.client("cloudformation"), stack_name)
    return Environment(session.client("sqs"), LambdaInvoker(session.client("lambda")), outputs)


def local_environment(state_dir: Path) -> Environment:
    """The local stack (`make serve`), from the outputs it wrote to its state directory: its AWS
    endpoint (moto) and Lambda endpoint, signed with its own credentials."""
    import boto3

    from fleetkey_cli.client import local_credentials

    path = state_dir / LOCAL_OUTPUTS_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise RedriveError(
            f"no local stack outputs at {path}: is the local stack running (`make serve`)? "
            "For a deployed stack: --stack NAME"
        ) from None
    credentials = local_credentials()
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
        region_name=state["region"],
    )
    return Environment(
        session.client("sqs", endpoint_url=state["aws_endpoint"]),
        LambdaInvoker(session.client("lambda", endpoint_url=state["lambda_endpoint"])),
        state["outputs"],
        wait_seconds=0,
    )


def write_local_outputs(
    state_dir: Path,
    outputs: Mapping[str, str],
    *,
    aws_endpoint: str,
    lambda_endpoint: str,
    region: str,
) -> Path:
    """What `local_environment` reads (`make serve` writes it)."""
    path = state_dir / LOCAL_OUTPUTS_FILE
    path.write_text(
        json.dumps(
            {
                "outputs": dict(outputs),
                "aws_endpoint": aws_endpoint,
                "lambda_endpoint": lambda_endpoint,
                "region": region,
            },
            indent=2,
            sort_keys=True,
        )
    )
    return path


# ---- the command -------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {text!r}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """`fleetkey redrive`'s arguments, on the CLI's subcommands."""
    queues = "\n".join(f"  {q.name:<25} {q.holds}" for q in QUEUES)
    parser: argparse.ArgumentParser = commands.add_parser(
        "redrive",
        help="re-deliver what a failure queue holds to the function that failed",
        description=textwrap.fill(
            "Re-deliver the messages of a failure queue to the function that failed "
            "(asynchronously, as AWS first delivered them), deleting each only once its "
            "re-delivery was accepted; every function converges, so a message re-delivered "
            "twice does no harm. Exit status: 0 all re-delivered (or listed); 1 some left in "
            "the queue; 2 a local problem. See docs/runbook-redrive.md.",
            width=100,
        )
        + "\n\nqueues:\n"
        + queues
        + "\n  all                       every one of them, in this order",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("queue", choices=[*BY_NAME, "all"], metavar="QUEUE")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the messages (function, event, first failure, receive count, error) and "
        "leave them in the queue",
    )
    parser.add_argument(
        "--max", type=_positive, metavar="N", help="at most N messages (per queue with `all`)"
    )
    parser.add_argument(
        "--stack",
        default=os.environ.get(DEFAULT_STACK_ENV),
        metavar="NAME",
        help="a deployed stack's CloudFormation name (default $FLEETKEY_STACK); without it, "
        "the local stack",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"the local stack's state directory (default {DEFAULT_STATE_DIR})",
    )
    return parser


def command(
    args: argparse.Namespace,
    *,
    environment: Environment | None = None,
    out: TextIO | None = None,
    **options: Any,
) -> int:
    """Run `fleetkey redrive`: 0 every message re-delivered (or listed), 1 some left in the
    queue, 2 a local problem (on stderr)."""
    out = out or sys.stdout
    try:
        if environment is None:
            if args.stack:
                region = (
                    args.region
                    or os.environ.get("AWS_REGION")
                    or os.environ.get("AWS_DEFAULT_REGION")
                )
                environment = deployed_environment(args.stack, region)
            else:
                environment = local_environment(args.state_dir)
        options.setdefault("wait_seconds", environment.wait_seconds)
        redriver = Redriver(
            environment.sqs, environment.invoker, environment.outputs, out=out, **options
        )
        queues: Iterable[FailureQueue] = QUEUES if args.queue == "all" else [BY_NAME[args.queue]]
        reports = [
            redriver.run(queue, dry_run=args.dry_run, max_messages=args.max) for queue in queues
        ]
    except RedriveError as exc:
        print(f"fleetkey: {exc}", file=sys.stderr)
        return 2
    except (ClientError, BotoCoreError) as exc:
        print(f"fleetkey: {exc}", file=sys.stderr)
        return 2
    return 0 if all(report.ok for report in reports) else 1
