"""The local lifecycle queue and Lambda's SQS event source mapping (`fleetkey_local.queues`) on
moto's SQS: the event as Lambda delivers it, partial batch responses, redelivery after the
visibility timeout, the dead-letter queue after maxReceiveCount, draining, and the background
poller `make serve` runs."""

from __future__ import annotations

import json
import threading
import time

import pytest
from aws_lambda_powertools.utilities.parser.models import SqsModel

from fleetkey_local.queues import (
    LIFECYCLE_MAX_RECEIVE_COUNT,
    LOCAL_VISIBILITY_TIMEOUT_SECONDS,
    QueueWorker,
    batch_item_failures,
    lifecycle_queue_names,
    provision_lifecycle_queues,
)
from fleetkey_local.server import local_aws
from fleetkey_local.stack import ACCOUNT, REGION, client_factory

TIMEOUT = 30.0


class Handler:
    """A test double for the converge function: records each event; `fail(body)` says which
    bodies to report failed, `raises` makes every invocation raise."""

    __name__ = "converge_double"

    def __init__(self, fail=lambda body: False, raises: Exception | None = None) -> None:
        self.fail = fail
        self.raises = raises
        self.events: list[dict] = []
        self.contexts: list = []
        self._lock = threading.Lock()

    def __call__(self, event: dict, context) -> dict:
        with self._lock:
            self.events.append(event)
            self.contexts.append(context)
        if self.raises is not None:
            raise self.raises
        failed = [r["messageId"] for r in event["Records"] if self.fail(json.loads(r["body"]))]
        return {"batchItemFailures": [{"itemIdentifier": i} for i in failed]}

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for e in self.events for r in e["Records"]]


@pytest.fixture
def sqs(moto):
    return client_factory()("sqs")


def queues(sqs, visibility_timeout: int = 0) -> tuple[str, str]:
    """The lifecycle queues; visibility 0 lets a failed message come back at once."""
    return provision_lifecycle_queues(sqs, visibility_timeout=visibility_timeout)


def send(sqs, url: str, *bodies: dict) -> None:
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))


def count(sqs, url: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


def dead_letters(sqs, dlq_url: str) -> list[dict]:
    messages = sqs.receive_message(
        QueueUrl=dlq_url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
    ).get("Messages", [])
    return messages


def test_the_queues_have_the_stacks_redrive_policy(sqs):
    # When the local stack provisions the lifecycle queues (again over queues provisioned
    # otherwise: provisioning is repeatable, and leaves the queues as it says)
    first = provision_lifecycle_queues(sqs, visibility_timeout=7, max_receive_count=2)
    queue_url, dlq_url = provision_lifecycle_queues(sqs)
    assert (queue_url, dlq_url) == first

    # Then the queue sends what it could not deliver 8 times to the dead-letter queue, and a
    # failed message comes back after a second
    name, dlq_name = lifecycle_queue_names()
    assert queue_url.endswith(f"/{name}") and dlq_url.endswith(f"/{dlq_name}")
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    dlq = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq["QueueArn"],
        "maxReceiveCount": LIFECYCLE_MAX_RECEIVE_COUNT,
    }
    assert LIFECYCLE_MAX_RECEIVE_COUNT == 8
    assert attributes["VisibilityTimeout"] == str(LOCAL_VISIBILITY_TIMEOUT_SECONDS) == "1"
    # and the dead letters wait as long as SQS keeps anything
    assert dlq["MessageRetentionPeriod"] == str(14 * 24 * 3600)


def test_the_function_gets_the_event_lambda_delivers_and_finished_messages_are_deleted(sqs):
    # Given the lifecycle queue with two messages, one with a message attribute
    queue_url, dlq_url = queues(sqs)
    sqs.send_message(
        QueueUrl=queue_url,
        MessageBody=json.dumps({"device_id": "d-1", "epoch": 1}),
        MessageAttributes={
            "origin": {"DataType": "String", "StringValue": "admin"},
            "raw": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )
    send(sqs, queue_url, {"device_id": "d-2", "epoch": 3})
    handler = Handler()
    worker = QueueWorker(sqs, queue_url, handler, region=REGION, account=ACCOUNT)

    # When the event source mapping drains the queue
    assert worker.drain(TIMEOUT)

    # Then the function was invoked once with both, in Lambda's SQS event shape
    [event] = handler.events
    SqsModel.model_validate(event)  # Powertools' model of Lambda's SQS event
    first, second = event["Records"]
    queue_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{lifecycle_queue_names()[0]}"
    assert json.loads(first["body"]) == {"device_id": "d-1", "epoch": 1}
    assert first["eventSource"] == "aws:sqs"
    assert first["eventSourceARN"] == queue_arn and first["awsRegion"] == REGION
    assert first["attributes"]["ApproximateReceiveCount"] == "1"
    assert {"SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"} <= set(
        first["attributes"]
    )
    assert first["messageAttributes"] == {
        "origin": {
            "stringValue": "admin",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "raw": {
            "binaryValue": "AAE=",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Binary",
        },
    }
    assert "md5OfMessageAttributes" in first and "md5OfMessageAttributes" not in second
    assert len(first["md5OfBody"]) == 32 and first["receiptHandle"]
    assert second["messageAttributes"] == {}
    # with a context naming the function
    [context] = handler.contexts
    assert context.function_name == "fleetkey-converge_double"
    assert context.aws_request_id == worker.batches[0].request_id
    # And both messages are gone, none dead-lettered
    assert count(sqs, queue_url) == 0 and dead_letters(sqs, dlq_url) == []
    [batch] = worker.batches
    assert batch.status == "succeeded" and sorted(batch.deleted_ids) == sorted(batch.message_ids)
    assert worker.statistics()["deleted"] == 2


def test_a_reported_failure_comes_back_and_lands_in_the_dead_letter_queue_after_8_receives(sqs):
    # Given a message the function keeps reporting failed, beside one it finishes
    queue_url, dlq_url = queues(sqs)
    send(sqs, queue_url, {"device_id": "stuck", "epoch": 1}, {"device_id": "fine", "epoch": 1})
    handler = Handler(fail=lambda body: body["device_id"] == "stuck")
    worker = QueueWorker(sqs, queue_url, handler)

    # When the event source mapping drains the queue
    assert worker.drain(TIMEOUT)

    # Then the finished message was delivered once and deleted; the failed one was delivered
    # maxReceiveCount times (its receive count growing each time), then moved to the DLQ
    bodies = [b["device_id"] for b in handler.bodies()]
    assert bodies.count("fine") == 1
    assert bodies.count("stuck") == LIFECYCLE_MAX_RECEIVE_COUNT == 8
    counts = [
        int(r["attributes"]["ApproximateReceiveCount"])
        for e in handler.events
        for r in e["Records"]
        if json.loads(r["body"])["device_id"] == "stuck"
    ]
    assert counts == list(range(1, 9))
    assert count(sqs, queue_url) == 0
    [dead] = dead_letters(sqs, dlq_url)
    assert json.loads(dead["Body"]) == {"device_id": "stuck", "epoch": 1}
    statuses = [b.status for b in worker.batches]
    assert statuses[0] == "partial" and set(statuses[1:]) == {"partial"}
    assert worker.statistics()["reported_failed"] == 8


def test_a_failed_message_waits_out_the_visibility_timeout(sqs):
    # Given the local queue (visibility timeout 1 s) and a message the function fails once
    queue_url, _ = queues(sqs, visibility_timeout=LOCAL_VISIBILITY_TIMEOUT_SECONDS)
    send(sqs, queue_url, {"device_id": "d-1", "epoch": 1})
    attempts: list[float] = []

    def once(event, context):
        attempts.append(time.monotonic())
        failed = [r["messageId"] for r in event["Records"]] if len(attempts) == 1 else []
        return {"batchItemFailures": [{"itemIdentifier": i} for i in failed]}

    worker = QueueWorker(sqs, queue_url, once)

    # When it is polled at once after the failure
    assert worker.poll_once() is not None
    # Then the message is in flight, not delivered again
    assert worker.poll_once() is None
    assert worker.pending() == 1
    # And drain delivers it again once the timeout has passed, and it is deleted then
    assert worker.drain(TIMEOUT)
    assert len(attempts) == 2
    assert attempts[1] - attempts[0] >= 0.9
    assert worker.pending() == 0


def test_a_raising_function_fails_the_whole_batch(sqs):
    # Given three messages and a function that raises
    queue_url, dlq_url = queues(sqs)
    send(sqs, queue_url, *({"device_id": f"d-{i}", "epoch": 1} for i in range(3)))
    handler = Handler(raises=RuntimeError("IoT is throttling"))
    worker = QueueWorker(sqs, queue_url, handler)

    # When one batch is processed
    batch = worker.poll_once()

    # Then none of its messages is deleted: all come back
    assert batch is not None and batch.status == "failed"
    assert batch.error == "RuntimeError: IoT is throttling"
    assert sorted(batch.failed_ids) == sorted(batch.message_ids) and batch.deleted_ids == []
    assert count(sqs, queue_url) == 3
    # And, failing each time, all three end in the dead-letter queue
    assert worker.drain(TIMEOUT)
    assert len(dead_letters(sqs, dlq_url)) == 3
    assert worker.statistics()["batches_failed"] == len(handler.events) == 8


@pytest.mark.parametrize(
    "response, expected",
    [
        (None, set()),
        ({}, set()),
        ({"batchItemFailures": []}, set()),
        ({"batchItemFailures": None}, set()),
        ({"batchItemFailures": [{"itemIdentifier": "m1"}]}, {"m1"}),
        ({"batchItemFailures": [{"itemIdentifier": ""}]}, None),
        ({"batchItemFailures": [{"itemIdentifier": None}]}, None),
        ({"batchItemFailures": [{"itemIdentifer": "m1"}]}, None),  # a bad key name
        ({"batchItemFailures": [{"itemIdentifier": "unknown"}]}, None),
        ({"batchItemFailures": "m1"}, None),
        ("ok", None),
    ],
)
def test_batch_responses_are_read_as_lambda_reads_them(response, expected):
    # Complete success: no list, an empty one, an empty response. Complete failure (None):
    # an identifier empty, null, misnamed or of no message in the batch; another shape.
    assert batch_item_failures(response, ["m1", "m2"]) == expected


def test_an_unreadable_response_fails_the_whole_batch(sqs):
    queue_url, _ = queues(sqs)
    send(sqs, queue_url, {"device_id": "d-1", "epoch": 1}, {"device_id": "d-2", "epoch": 1})

    def misnamed(event, context):
        return {"batchItemFailures": [{"itemIdentifier": "not-a-message-of-this-batch"}]}

    batch = QueueWorker(sqs, queue_url, misnamed).poll_once()
    assert batch is not None and batch.status == "failed" and batch.deleted_ids == []
    assert count(sqs, queue_url) == 2


def test_a_named_function_is_loaded_once_as_lambda_loads_it(sqs):
    # Given the worker for the converge function, with a loader standing in for load_function
    queue_url, _ = queues(sqs)
    handler = Handler()
    loaded: list[str] = []

    class Module:
        pass

    def loader(name):
        loaded.append(name)
        module = Module()
        module.handler = handler
        return module

    worker = QueueWorker(sqs, queue_url, "converge", loader=loader)
    send(sqs, queue_url, {"device_id": "d-1", "epoch": 1})
    assert worker.drain(TIMEOUT)
    send(sqs, queue_url, {"device_id": "d-2", "epoch": 1})
    assert worker.drain(TIMEOUT)

    # Then it was loaded once, and invoked as fleetkey-converge
    assert loaded == ["converge"]
    assert [c.function_name for c in handler.contexts] == ["fleetkey-converge"] * 2


def test_drain_returns_at_once_on_an_empty_queue_and_false_on_timeout(sqs):
    queue_url, _ = queues(sqs, visibility_timeout=30)
    worker = QueueWorker(sqs, queue_url, Handler(fail=lambda body: True))
    started = time.monotonic()
    assert worker.drain(TIMEOUT)
    assert time.monotonic() - started < 1
    # A failed message is in flight for 30 s: drain does not wait that long when told not to
    send(sqs, queue_url, {"device_id": "d-1", "epoch": 1})
    assert worker.drain(0.3) is False
    assert worker.pending() == 1


def test_the_background_poller_on_the_moto_server_as_make_serve_runs_it():
    # Given moto as a server (as `make serve` runs it), the lifecycle queues, and the poller
    with local_aws() as endpoint:
        sqs = client_factory(endpoint)("sqs")
        queue_url, dlq_url = provision_lifecycle_queues(sqs, visibility_timeout=0)
        handler = Handler(fail=lambda body: body["device_id"] == "stuck")
        worker = QueueWorker(sqs, queue_url, handler).start()
        try:
            assert worker.running
            # When messages arrive while it polls
            send(
                sqs, queue_url, {"device_id": "d-1", "epoch": 1}, {"device_id": "stuck", "epoch": 2}
            )
            # Then it delivers them on its own; drain beside it waits until all is settled
            assert worker.drain(TIMEOUT)
            assert sorted({b["device_id"] for b in handler.bodies()}) == ["d-1", "stuck"]
            [dead] = dead_letters(sqs, dlq_url)
            assert json.loads(dead["Body"])["device_id"] == "stuck"
        finally:
            started = time.monotonic()
            worker.stop()
            # And it stops promptly
            assert not worker.running
            assert time.monotonic() - started < 5


def test_drain_keeps_its_timeout_when_a_message_never_settles(sqs):
    # Given a queue without a dead-letter queue, visibility 0, and a function failing forever
    queue_url = sqs.create_queue(QueueName="no-redrive", Attributes={"VisibilityTimeout": "0"})[
        "QueueUrl"
    ]
    send(sqs, queue_url, {"device_id": "d-1", "epoch": 1})
    worker = QueueWorker(sqs, queue_url, Handler(fail=lambda body: True))
    # Then drain gives up at its timeout, though a batch arrives on every poll
    started = time.monotonic()
    assert worker.drain(0.5) is False
    assert time.monotonic() - started < 5
