"""The lifecycle queue for the local stack, and Lambda's SQS event source mapping in front of the
function that consumes it (`converge`).

`provision_lifecycle_queues` creates the queue and its dead-letter queue on the local AWS endpoint
(moto), with the deployed stack's redrive policy: a message received `LIFECYCLE_MAX_RECEIVE_COUNT`
times without being deleted moves to the dead-letter queue. Only the visibility timeout differs:
the deployed queue's is sized to the function's timeout, the local one is a second (so a message
the function reports failed comes back quickly) and configurable.

`QueueWorker` plays the event source mapping with ReportBatchItemFailures, as Lambda documents it:
it receives up to 10 messages, builds the SQS event Lambda delivers (`Records` with messageId,
receiptHandle, body, attributes, messageAttributes, md5OfBody, eventSource, eventSourceARN,
awsRegion), invokes the function, and deletes the messages the response does not list in
`batchItemFailures`. The failed ones stay in the queue and come back after the visibility
timeout; SQS itself (moto honours the redrive policy, checked by the tests) moves a message to
the dead-letter queue on the receive after its last allowed one. A function that raises, or
answers something Lambda cannot read as a batch response, fails the whole batch.

Run it in the background (`start`/`stop`, for `make serve`) or synchronously (`drain`, for the
tests and the demo). One batch at a time: Lambda would scale out pollers and environments, but
the functions' module-level state assumes one invocation at a time per environment (see
`fleetkey_local.rules`).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.provision import NAME_PREFIX

logger = logging.getLogger("fleetkey_local.queues")

# The deployed stack's redrive policy (the CDK construct uses the same number): a teardown that
# has not converged after this many deliveries is left in the dead-letter queue for an operator.
LIFECYCLE_MAX_RECEIVE_COUNT = 8
# Locally, a failed message comes back after a second (the deployed queue's timeout is sized to
# the function's timeout, as Lambda requires).
LOCAL_VISIBILITY_TIMEOUT_SECONDS = 1
# The deployed stack's retentions: a message waits 4 days for its first delivery; a dead letter
# waits for an operator as long as SQS keeps anything (14 days).
LIFECYCLE_RETENTION_SECONDS = 4 * 24 * 3600
DEAD_LETTER_RETENTION_SECONDS = 14 * 24 * 3600
MAX_BATCH_SIZE = 10  # ReceiveMessage's limit, and the event source mapping's default batch size
# The background poller's long poll: short enough for `stop` to return promptly (and under the
# local clients' 5 s read timeout); Lambda long-polls for 20 s.
BACKGROUND_WAIT_SECONDS = 1

Handler = Callable[[dict, Any], Any]


def lifecycle_queue_names(prefix: str = NAME_PREFIX) -> tuple[str, str]:
    """The lifecycle queue's name and its dead-letter queue's."""
    return f"{prefix}-lifecycle", f"{prefix}-lifecycle-dlq"


def provision_lifecycle_queues(
    sqs: Any,
    *,
    prefix: str = NAME_PREFIX,
    visibility_timeout: int = LOCAL_VISIBILITY_TIMEOUT_SECONDS,
    max_receive_count: int = LIFECYCLE_MAX_RECEIVE_COUNT,
) -> tuple[str, str]:
    """Create the lifecycle queue and its dead-letter queue (existing ones are given these
    settings); returns (queue URL, dead-letter queue URL). AWS calls: 3 (5 for existing
    queues)."""
    name, dlq_name = lifecycle_queue_names(prefix)
    dlq_url = _create_queue(
        sqs,
        dlq_name,
        {
            "MessageRetentionPeriod": str(DEAD_LETTER_RETENTION_SECONDS),
            "SqsManagedSseEnabled": "true",
        },
    )
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count}
    queue_url = _create_queue(
        sqs,
        name,
        {
            "VisibilityTimeout": str(visibility_timeout),
            "MessageRetentionPeriod": str(LIFECYCLE_RETENTION_SECONDS),
            "RedrivePolicy": json.dumps(redrive),
            "SqsManagedSseEnabled": "true",
        },
    )
    return queue_url, dlq_url


def _create_queue(sqs: Any, name: str, attributes: dict[str, str]) -> str:
    """CreateQueue; for a queue of that name with other attributes (SQS refuses to create it
    again), its URL after SetQueueAttributes."""
    try:
        url: str = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        return url
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("QueueAlreadyExists", "QueueNameExists"):
            raise
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
    return url


@dataclass
class Batch:
    """One invocation of the function with a batch of messages, and what became of them."""

    message_ids: list[str]
    receive_counts: list[int]
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started_at: float = field(default_factory=time.time)
    status: str = "running"  # running, succeeded, partial (some reported failed), failed
    failed_ids: list[str] = field(default_factory=list)  # left in the queue
    deleted_ids: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    finished_at: float | None = None


class QueueWorker:
    """Lambda's SQS event source mapping for one queue and one function.

    `function` is a fleetkey function name (functions/<name>/handler.py, loaded by `loader` as
    Lambda loads it; its invocations run with `RUNNING_FUNCTION` set) or any callable
    `handler(event, context)` (a test double). `sqs` is a boto3 SQS client of the harness (its
    calls are the event source mapping's, not the function's)."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        function: str | Handler = "converge",
        *,
        batch_size: int = MAX_BATCH_SIZE,
        report_batch_item_failures: bool = True,
        region: str = "eu-west-1",
        account: str = "123456789012",
        wait_seconds: int = BACKGROUND_WAIT_SECONDS,
        idle_sleep: float = 0.05,
        loader: Callable[[str], Any] = load_function,
    ) -> None:
        if not queue_url:
            raise ValueError("no queue URL (the lifecycle queue is created by provisioning)")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_SIZE}")
        self.sqs = sqs
        self.queue_url = queue_url
        self.function = function
        self.batch_size = batch_size
        self.report_batch_item_failures = report_batch_item_failures
        self.region = region
        self.account = account
        self.wait_seconds = wait_seconds
        self.idle_sleep = idle_sleep
        self._loader = loader
        self._handler: Handler | None = None
        self._queue_arn: str | None = None
        # One batch at a time, whether the background thread or `drain` polls.
        self._poll_lock = threading.Lock()
        self._lock = threading.Lock()
        self._batches: list[Batch] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = {
            "polls": 0,
            "received": 0,
            "deleted": 0,
            "reported_failed": 0,  # listed in batchItemFailures
            "batches": 0,
            "batches_failed": 0,  # the whole batch: the function raised or answered unreadably
            "poll_errors": 0,
        }

    # ---- names ---------------------------------------------------------------------------------

    @property
    def function_name(self) -> str:
        if isinstance(self.function, str):
            return self.function
        return getattr(self.function, "__name__", type(self.function).__name__)

    @property
    def queue_arn(self) -> str:
        if self._queue_arn is None:
            self._queue_arn = self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
        return self._queue_arn

    def redrive_policy(self) -> dict[str, Any] | None:
        """The queue's redrive policy (deadLetterTargetArn, maxReceiveCount), if it has one."""
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
        )["Attributes"]
        return json.loads(attributes["RedrivePolicy"]) if "RedrivePolicy" in attributes else None

    # ---- one batch -----------------------------------------------------------------------------

    def poll_once(self, wait_seconds: int = 0) -> Batch | None:
        """Receive up to `batch_size` messages and hand them to the function; the batch, or None
        when no message was received."""
        with self._poll_lock:
            with self._lock:
                self.counters["polls"] += 1
            response = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=self.batch_size,
                WaitTimeSeconds=wait_seconds,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            messages = response.get("Messages", [])
            if not messages:
                return None
            return self._process(messages)

    def _process(self, messages: Sequence[Mapping[str, Any]]) -> Batch:
        batch = Batch(
            message_ids=[m["MessageId"] for m in messages],
            receive_counts=[
                int(m.get("Attributes", {}).get("ApproximateReceiveCount", "0")) for m in messages
            ],
        )
        with self._lock:
            self._batches.append(batch)
            self.counters["received"] += len(messages)
            self.counters["batches"] += 1
        event = {"Records": [self.record(m) for m in messages]}
        failed = self._invoke(batch, event)
        if failed is None:  # the whole batch failed: every message comes back
            batch.status = "failed"
            batch.failed_ids = list(batch.message_ids)
            with self._lock:
                self.counters["batches_failed"] += 1
        else:
            batch.failed_ids = [i for i in batch.message_ids if i in failed]
            batch.status = "partial" if failed else "succeeded"
            with self._lock:
                self.counters["reported_failed"] += len(failed)
            done = [m for m in messages if m["MessageId"] not in failed]
            batch.deleted_ids = self._delete(done)
        batch.finished_at = time.time()
        return batch

    def record(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """An SQS message as Lambda puts it into the event's `Records`."""
        record: dict[str, Any] = {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": dict(message.get("Attributes", {})),
            "messageAttributes": {
                name: _message_attribute(value)
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": self.queue_arn,
            "awsRegion": self.region,
        }
        if "MD5OfMessageAttributes" in message:
            record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
        return record

    def _invoke(self, batch: Batch, event: dict[str, Any]) -> set[str] | None:
        """The ids the function reported failed, or None when the whole batch failed."""
        name = f"fleetkey-{self.function_name}"
        context = LambdaContext(
            function_name=name,
            invoked_function_arn=f"arn:aws:lambda:{self.region}:{self.account}:function:{name}",
            aws_request_id=batch.request_id,
        )
        try:
            result = self._handler_for()(event, context)
            # What Lambda reads is the JSON the runtime serialized.
            batch.result = json.loads(json.dumps(result))
        except Exception as exc:  # noqa: BLE001 - the function failed: Lambda fails the batch
            batch.error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "%s failed on a batch of %d: %s", name, len(batch.message_ids), batch.error
            )
            return None
        if not self.report_batch_item_failures:
            return set()
        failed = batch_item_failures(batch.result, batch.message_ids)
        if failed is None:
            batch.error = f"unreadable batch response: {batch.result!r}"
            logger.warning("%s: %s; the whole batch failed", name, batch.error)
        return failed

    def _handler_for(self) -> Handler:
        if not isinstance(self.function, str):
            return self.function
        if self._handler is None:
            self._handler = self._loader(self.function).handler
        return self._handler

    def _delete(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Delete what the function finished (DeleteMessageBatch, 10 at most: one call)."""
        if not messages:
            return []
        response = self.sqs.delete_message_batch(
            QueueUrl=self.queue_url,
            Entries=[
                {"Id": str(index), "ReceiptHandle": m["ReceiptHandle"]}
                for index, m in enumerate(messages)
            ],
        )
        for failure in response.get("Failed", []):
            logger.warning("could not delete message %s: %s", failure["Id"], failure)
        deleted = [
            messages[int(entry["Id"])]["MessageId"] for entry in response.get("Successful", [])
        ]
        with self._lock:
            self.counters["deleted"] += len(deleted)
        return deleted

    # ---- synchronous ---------------------------------------------------------------------------

    def pending(self) -> int:
        """Messages in the queue: visible, in flight (received, not deleted) and delayed."""
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return sum(int(value) for value in attributes.values())

    def drain(self, timeout: float | None = 30.0) -> bool:
        """Process batches until the queue is empty and nothing is in flight (failed messages
        are waited for through their visibility timeouts, until deleted or dead-lettered).
        False on timeout. Safe beside the background thread (one batch at a time)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            received = self.poll_once() is not None
            if not received:
                with self._poll_lock:  # not while a batch of the background thread is in flight
                    if self.pending() == 0:
                        return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not received:
                time.sleep(self.idle_sleep)

    # ---- in the background ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> QueueWorker:
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"lambda-esm-{self.function_name}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once(self.wait_seconds)
            except Exception:
                with self._lock:
                    self.counters["poll_errors"] += 1
                logger.exception("polling %s failed", self.queue_url)
                self._stop.wait(1.0)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop polling; the batch in flight, if any, finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> QueueWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observation ---------------------------------------------------------------------------

    @property
    def batches(self) -> list[Batch]:
        with self._lock:
            return list(self._batches)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)


def batch_item_failures(response: Any, message_ids: Sequence[str]) -> set[str] | None:
    """The message ids a ReportBatchItemFailures response lists, as Lambda reads it: a missing or
    empty response or list is complete success; an entry without a known non-empty
    `itemIdentifier`, or a response of another shape, is complete failure (None)."""
    if response is None or response == {}:
        return set()
    if not isinstance(response, dict):
        return None
    failures = response.get("batchItemFailures")
    if failures is None or failures == []:
        return set()
    if not isinstance(failures, list):
        return None
    known = set(message_ids)
    failed = set()
    for entry in failures:
        identifier = entry.get("itemIdentifier") if isinstance(entry, dict) else None
        if not isinstance(identifier, str) or identifier not in known:
            return None
        failed.add(identifier)
    return failed


def _message_attribute(value: Mapping[str, Any]) -> dict[str, Any]:
    """A message attribute as Lambda writes it (camelCase, binary values base64)."""
    attribute: dict[str, Any] = {
        "stringListValues": list(value.get("StringListValues", [])),
        "binaryListValues": [
            base64.b64encode(v).decode() for v in value.get("BinaryListValues", [])
        ],
        "dataType": value["DataType"],
    }
    if "StringValue" in value:
        attribute["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        attribute["binaryValue"] = base64.b64encode(value["BinaryValue"]).decode()
    return attribute
