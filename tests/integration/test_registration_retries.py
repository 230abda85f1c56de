"""The registration function's retry path: Lambda's invocation record of a failed registration,
given back to the function by the retry queue's event source mapping, finishes the registration;
what fails again is reported failed (and comes back), and nothing is lost on the way to the
failure queue."""

from __future__ import annotations

import copy
import json

import pytest
from aws_lambda_powertools.utilities.batch.exceptions import BatchProcessingError
from botocore.exceptions import ClientError

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.errors import ConcurrentModification, NotSettled, TransientAwsError
from fleetkey_local.failure_queues import (
    REGISTRATION_RETRY_OUTPUT,
    destination_record,
    provision_failure_queues,
)
from fleetkey_local.lambda_invoke import AsyncInvoker
from fleetkey_local.pki import pem
from fleetkey_local.queues import QueueWorker
from fleetkey_local.stack import TABLE
from tests.conftest import load_event
from tests.support.faults import FaultInjector
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca


class MetricsRecorder:
    def __init__(self) -> None:
        self.metrics: list[tuple[str, float]] = []
        self.alone: list[tuple[str, dict[str, str]]] = []

    def add_metric(self, name: str, unit: object, value: float) -> None:
        self.metrics.append((name, value))

    def add_dimension(self, name: str, value: str) -> None:
        pass

    def count_alone(self, name: str, **dimensions: str) -> None:
        self.metrics.append((name, 1))
        self.alone.append((name, dimensions))

    def names(self) -> list[str]:
        return [name for name, _ in self.metrics]


@pytest.fixture
def registration(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    function = load_handler("registration")
    recorder = MetricsRecorder()
    monkeypatch.setattr(function, "metrics", recorder)
    monkeypatch.setattr(function, "count_alone", recorder.count_alone)
    yield function, recorder
    function.service.cache_clear()


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


def manufactured(stack, acme, device_id: str) -> dict:
    """An allow-listed device's first connection: AWS IoT's certificate-registered event."""
    stack.allowlist.add(
        AllowlistEntry(
            device_id=device_id,
            serial_number=f"SN-{device_id}",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    _, certificate = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
    event = stack.first_connect(pem(certificate), acme.pem)
    assert event is not None
    return event


def retry_message(event: object, *, body: str | None = None) -> dict:
    """The sample retry-queue message, carrying `event` as the record's requestPayload."""
    message = copy.deepcopy(load_event("registration-retry-message"))
    record = json.loads(message["Records"][0]["body"])
    record["requestPayload"] = event
    # Lambda's record names the function that failed: the one the retry queue gives it back to
    record["requestContext"]["functionArn"] = f"{LambdaContext().invoked_function_arn}:$LATEST"
    message["Records"][0]["body"] = json.dumps(record) if body is None else body
    return message


def table_items(stack) -> list[dict]:
    client = stack.make_client("dynamodb")
    items = client.scan(TableName=TABLE)["Items"]  # a test's whole table: a few items
    return sorted(items, key=lambda item: repr(sorted(item.items())))


def invoke(function, message: dict) -> dict:
    return function.handler(message, LambdaContext())


def invoke_failing(function, message: dict) -> None:
    """The retry fails again: the invocation fails (Lambda `Errors`), and the event source mapping
    leaves the message to come back after the visibility timeout."""
    with pytest.raises(BatchProcessingError, match="All records failed processing"):
        invoke(function, message)


def test_the_sample_retry_message_carries_the_sample_event():
    # Given the sample message of the retry queue
    message = load_event("registration-retry-message")
    [record] = message["Records"]
    invocation = json.loads(record["body"])
    # Then it is an SQS record whose body is Lambda's invocation record of the sample event
    assert record["eventSource"] == "aws:sqs"
    assert invocation["requestContext"]["condition"] == "RetriesExhausted"
    assert invocation["requestPayload"] == load_event("certificate-registered")


def test_a_retry_finishes_the_registration(stack, acme, registration):
    function, recorder = registration
    # Given a registration that failed Lambda's retries, back from the retry queue
    event = manufactured(stack, acme, "retry-1")
    # When the function gets the retry
    response = invoke(function, retry_message(event))
    # Then the device is registered, the retry is not reported failed (SQS deletes it), and the
    # delivery is counted as a retry beside the decision
    assert response == {"batchItemFailures": []}
    assert stack.devices.get("retry-1").state is DeviceState.ACTIVE
    assert stack.certificate_status(event["certificateId"]) == "ACTIVE"
    assert recorder.names() == ["RegistrationEventsRetried", "RegistrationsAccepted"]
    # And the same retry delivered again (SQS delivers at least once) changes nothing
    assert invoke(function, retry_message(event)) == {"batchItemFailures": []}
    assert recorder.names()[-1] == "RegistrationEventsRepeated"


def test_a_retry_that_fails_again_is_reported_failed_and_converges_later(stack, acme, registration):
    function, recorder = registration
    event = manufactured(stack, acme, "retry-2")
    service = function.service()
    faults = FaultInjector().watch(service._registry._client, service._devices._table.client)
    # Given the calls a registration makes (learned on another device)
    faults.arm(None)
    assert invoke(function, retry_message(manufactured(stack, acme, "retry-2b"))) == {
        "batchItemFailures": []
    }
    calls = len(faults.calls)
    assert calls >= 5
    # When AWS fails the k-th call of the retry, for every k
    message = retry_message(event)
    for k in range(1, calls + 1):
        faults.arm(k)
        try:
            response = invoke(function, message)
        except BatchProcessingError:
            response = None
        if faults.fired is None:
            break  # an earlier attempt finished some of the work: fewer calls are left
        # Then the retry fails (SQS delivers it again after the visibility timeout), logged and
        # counted as transient (AWS failed: a later retry may not see it)
        assert response is None, k
        assert recorder.alone[-1] == ("RegistrationRetriesFailed", {"kind": "transient"}), k
    # And the next delivery, with AWS working, finishes it
    faults.arm(None)
    assert invoke(function, message) == {"batchItemFailures": []}
    assert stack.devices.get("retry-2").state is DeviceState.ACTIVE
    assert stack.certificate_status(event["certificateId"]) == "ACTIVE"


@pytest.mark.parametrize(
    "body",
    ["not json", "[]", "{}", '{"requestPayload": 1', json.dumps({"version": "1.0"}), "null"],
)
def test_an_unreadable_retry_is_reported_failed_and_changes_nothing(stack, registration, body):
    function, recorder = registration
    # Given a message on the retry queue that is not Lambda's invocation record
    message = retry_message(None, body=body)
    before = table_items(stack)
    # When the function gets it
    invoke_failing(function, message)
    # Then it fails, so that SQS keeps it and, after maxReceiveCount, the failure queue does (for
    # an operator); nothing was recorded, and the failure needs a person (persistent)
    assert table_items(stack) == before
    assert recorder.alone == [("RegistrationRetriesFailed", {"kind": "persistent"})]


def test_a_record_naming_another_function_is_still_retried(stack, acme, registration):
    function, _ = registration
    # Given Lambda's record naming another function (the registration function replaced, with a
    # new name, while records waited in its retry queue)
    event = manufactured(stack, acme, "retry-renamed")
    message = retry_message(event)
    record = json.loads(message["Records"][0]["body"])
    record["requestContext"]["functionArn"] = (
        "arn:aws:lambda:eu-west-1:123456789012:function:Fleetkey-FunctionsRegistration9ZZZ:$LATEST"
    )
    message["Records"][0]["body"] = json.dumps(record)
    # When the function gets it
    assert invoke(function, message) == {"batchItemFailures": []}
    # Then the event is decided as any (nothing in it is believed: read back from AWS IoT)
    assert stack.devices.get("retry-renamed").state is DeviceState.ACTIVE


def conflict(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "injected"}}, "TransactWriteItems")


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (conflict("TransactionCanceledException"), "transient"),  # TransactionConflict
        (conflict("ThrottlingException"), "transient"),
        (conflict("ConflictingResourceUpdateException"), "transient"),
        (conflict("InternalServerError"), "transient"),
        (TransientAwsError("the stream head moved"), "transient"),
        (ConcurrentModification("device changed"), "transient"),
        (NotSettled("AWS IoT has not settled"), "transient"),
        (TimeoutError("read timed out"), "transient"),
        (conflict("AccessDeniedException"), "persistent"),
        (conflict("ResourceNotFoundException"), "persistent"),  # a profile's policy missing
        (conflict("UnauthorizedException"), "persistent"),
        (conflict("InvalidRequestException"), "persistent"),
    ],
)
def test_only_what_retrying_cannot_fix_is_persistent(
    stack, acme, registration, monkeypatch, failure, kind
):
    function, recorder = registration
    # Given a retry whose registration fails so
    event = manufactured(stack, acme, "retry-kind")

    def failing(parsed):
        raise failure

    monkeypatch.setattr(function.service(), "register", failing)
    # When the retry comes back
    invoke_failing(function, retry_message(event))
    # Then it is counted of the kind that says whether a person must act (only persistent ones
    # alarm: a busy onboarding's conflicts and throttling page nobody)
    assert recorder.alone[-1] == ("RegistrationRetriesFailed", {"kind": kind})


def test_a_retry_that_cannot_succeed_alarms_as_persistent(stack, acme, registration):
    function, recorder = registration
    # Given another team's thing named like the device (retrying cannot fix a name clash)
    stack.harness_iot.create_thing(
        thingName="retry-clash", attributePayload={"attributes": {"owner": "them"}}
    )
    event = manufactured(stack, acme, "retry-clash")
    # When the retry comes back
    invoke_failing(function, retry_message(event))
    # Then the failure is counted as one for a person
    assert recorder.alone[-1] == ("RegistrationRetriesFailed", {"kind": "persistent"})


@pytest.mark.parametrize("payload", [None, 7, "text", [], {"certificateId": 5}])
def test_a_retry_of_a_malformed_event_is_audited_once_and_acknowledged(
    stack, registration, payload
):
    function, recorder = registration
    # When a retry carries an event that is not AWS IoT's (as the direct path treats one)
    response = invoke(function, retry_message(payload))
    # Then it is audited as malformed and acknowledged: retrying cannot help it
    assert response == {"batchItemFailures": []}
    records, _ = stack.devices.audit("stream:registration-events")
    assert [r.action for r in records] == ["malformed_event"]
    assert recorder.names() == ["RegistrationEventsRetried", "RegistrationEventsMalformed"]


def test_an_sqs_shaped_event_from_elsewhere_is_not_a_retry_batch():
    is_retry_batch = load_handler("registration").is_retry_batch
    assert is_retry_batch(load_event("registration-retry-message"))
    for event in (
        load_event("certificate-registered"),
        {"Records": []},
        {"Records": [{"eventSource": "aws:sns"}]},
        {"Records": [{"eventSource": "aws:sqs"}, "x"]},
        {"Records": "aws:sqs"},
        [],
        None,
    ):
        assert not is_retry_batch(event), event


def test_throttled_registrations_end_registered_without_a_person(stack, acme, monkeypatch):
    """The local stack end to end: Lambda's asynchronous invocation with the deployed
    destinations, the retry queue's event source mapping, and the failure queue."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    sqs = stack.make_client("sqs")
    queues = provision_failure_queues(sqs, retry_visibility_timeout=0)
    # Given a registration function that AWS IoT throttles on its first four invocations
    throttled = {"left": 4}

    def loader(name: str):
        real = load_handler(name)

        def handler(event, context):
            if throttled["left"] > 0:
                throttled["left"] -= 1
                from botocore.exceptions import ClientError

                raise ClientError(
                    {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                    "UpdateCertificate",
                )
            return real.handler(event, context)

        return type("Loaded", (), {"handler": staticmethod(handler)})

    invoker = AsyncInvoker.with_destinations(
        sqs, queues, synchronous=True, retry_delays=(), loader=loader
    )
    retries = QueueWorker(sqs, queues[REGISTRATION_RETRY_OUTPUT], "registration", loader=loader)
    # When AWS IoT's rule invokes it for a device: Lambda's three attempts are throttled, and its
    # record goes to the retry queue, whose first delivery is throttled too
    event = manufactured(stack, acme, "retry-3")
    invocation = invoker.invoke("registration", event)
    assert invocation.status == "failed"
    assert invocation.destination == queues[REGISTRATION_RETRY_OUTPUT]
    assert retries.drain(timeout=30)
    # Then the retry queue's second delivery registered it: nobody redrove anything, the
    # failure queue is empty
    assert retries.counters["batches_failed"] == 1 and retries.counters["deleted"] == 1
    assert stack.devices.get("retry-3").state is DeviceState.ACTIVE
    assert stack.certificate_status(event["certificateId"]) == "ACTIVE"
    left = sqs.get_queue_attributes(
        QueueUrl=queues["RegistrationFailureQueueUrl"],
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert left == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }


def test_the_record_a_failed_invocation_leaves_is_what_the_retry_reads():
    # Given Lambda's record of a failed invocation (as the local stack builds it)
    event = load_event("certificate-registered")
    record = destination_record(
        function_arn="arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-registration",
        event=event,
        error_type="ClientError",
        error_message="Rate exceeded",
    )
    # Then the sample message's body has the same shape
    sample = json.loads(load_event("registration-retry-message")["Records"][0]["body"])
    assert set(sample) == set(record)
    assert set(sample["requestContext"]) == set(record["requestContext"])
