"""The lifecycle queue: decommission's teardown, queued for the converge function, with a
dead-letter queue and partial batch responses."""

import pytest
from aws_cdk import App, Duration, Stack
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs

from fleetkey_infra import constants
from fleetkey_infra.constructs.lifecycle import LifecycleQueue
from fleetkey_infra.constructs.registration_retries import RegistrationRetries
from infra_template import function_by_service, of_type, output_ref, render


def lifecycle_queue(resources: dict[str, dict], outputs: dict[str, dict]) -> tuple[str, dict]:
    queue_id = output_ref(outputs, "LifecycleQueueUrl")
    return queue_id, resources[queue_id]


def test_lifecycle_queue_is_encrypted_and_redrives_to_its_dead_letter_queue(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the lifecycle queue and its dead-letter queue
    _, queue = lifecycle_queue(resources, template_outputs)
    dead_letters_id = output_ref(template_outputs, "LifecycleDeadLetterQueueUrl")
    props = queue["Properties"]

    # When reading the queue's settings
    # Then it is SQS-encrypted (senders need no KMS grant), a message is delivered at most 8
    # times before it moves to the dead-letter queue, which keeps it for 14 days (longer than the
    # queue itself: a standard queue's message keeps its first enqueue time when moved)
    assert props["SqsManagedSseEnabled"] is True
    assert props["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dead_letters_id, "Arn"]},
        "maxReceiveCount": 8,
    }
    dead_letters = resources[dead_letters_id]["Properties"]
    assert dead_letters["SqsManagedSseEnabled"] is True
    assert dead_letters["MessageRetentionPeriod"] == 14 * 24 * 3600
    assert props["MessageRetentionPeriod"] < dead_letters["MessageRetentionPeriod"]
    assert "FifoQueue" not in props


def test_visibility_timeout_is_at_least_six_times_the_converge_timeout(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the lifecycle queue and the converge function
    _, queue = lifecycle_queue(resources, template_outputs)
    _, converge = function_by_service(resources, constants.CONVERGE_SERVICE_NAME)

    # When comparing the queue's visibility timeout with the function's timeout
    # Then a batch still being processed (or retried by Lambda's poller) is not delivered twice
    assert queue["Properties"]["VisibilityTimeout"] >= 6 * converge["Properties"]["Timeout"]
    assert queue["Properties"]["VisibilityTimeout"] == 360


def test_converge_consumes_the_queue_with_partial_batch_responses(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the lifecycle queue's event source mapping
    queue_id, _ = lifecycle_queue(resources, template_outputs)
    [mapping] = [
        mapping
        for mapping in of_type(resources, "AWS::Lambda::EventSourceMapping").values()
        if mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    ]
    converge_id, _ = function_by_service(resources, constants.CONVERGE_SERVICE_NAME)
    props = mapping["Properties"]

    # When reading it
    # Then the converge function receives the lifecycle queue's messages in batches of 10,
    # reports the ones that failed (only those are delivered again), and runs at most 5 at once
    assert props["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert props["FunctionName"] == {"Ref": converge_id}
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["BatchSize"] == 10
    assert props["ScalingConfig"] == {"MaximumConcurrency": 5}
    assert props.get("Enabled", True) is True


def test_converge_is_invoked_by_the_queue_alone(resources: dict[str, dict]) -> None:
    # Given the converge function
    converge_id, _ = function_by_service(resources, constants.CONVERGE_SERVICE_NAME)

    # When looking for anything else that invokes it
    permissions = [
        p
        for p in of_type(resources, "AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"]
        in ({"Fn::GetAtt": [converge_id, "Arn"]}, {"Ref": converge_id})
    ]
    routes = [
        m
        for m in of_type(resources, "AWS::ApiGateway::Method").values()
        if f"<{converge_id}.Arn>" in str(render(m["Properties"].get("Integration", {})))
    ]

    # Then there is nothing: no API route, no rule, no schedule (the event source mapping polls
    # with the function's own role)
    assert permissions == [] and routes == []


def test_lifecycle_queues_refuse_requests_without_tls(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the lifecycle queue and its dead-letter queue
    queues = {
        output_ref(template_outputs, "LifecycleQueueUrl"),
        output_ref(template_outputs, "LifecycleDeadLetterQueueUrl"),
    }

    # When reading their queue policies
    for queue_id in queues:
        statements = [
            s
            for p in of_type(resources, "AWS::SQS::QueuePolicy").values()
            if {"Ref": queue_id} in p["Properties"]["Queues"]
            for s in p["Properties"]["PolicyDocument"]["Statement"]
        ]

        # Then insecure transport is denied, and nobody is allowed anything by the queue policy
        # (senders and the consumer are granted by their roles)
        assert any(
            s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for s in statements
        ), queue_id
        assert not [s for s in statements if s["Effect"] == "Allow"], queue_id


@pytest.mark.parametrize(
    ("queue", "visibility_timeout", "timeout"),
    [
        (LifecycleQueue, constants.LIFECYCLE_VISIBILITY_TIMEOUT, constants.CONVERGE_TIMEOUT),
        (
            RegistrationRetries,
            constants.REGISTRATION_RETRY_VISIBILITY_TIMEOUT,
            constants.REGISTRATION_TIMEOUT,
        ),
    ],
)
def test_a_consumer_slower_than_the_visibility_timeout_allows_is_refused(
    queue: type, visibility_timeout: Duration, timeout: Duration
) -> None:
    # Given a consumer whose timeout the queue's visibility timeout does not cover six times
    too_slow = Duration.seconds(visibility_timeout.to_seconds() // 6 + 1)

    def consumer(stack: Stack, seconds: Duration) -> lambda_.Function:
        return lambda_.Function(
            stack,
            f"Consumer{int(seconds.to_seconds())}",
            runtime=lambda_.Runtime.PYTHON_3_12,
            handler="index.handler",
            code=lambda_.Code.from_inline("def handler(event, context): pass"),
            timeout=seconds,
        )

    stack = Stack(App(), "Consumers")
    if queue is LifecycleQueue:
        construct = LifecycleQueue(stack, "Queue")
    else:
        construct = RegistrationRetries(stack, "Queue", dead_letters=sqs.Queue(stack, "Dlq"))

    # When it is given the queue, Then synthesis would stop; the stack's own timeout passes
    with pytest.raises(ValueError, match="at least 6x"):
        construct.consume(consumer(stack, too_slow))
    construct.consume(consumer(stack, timeout))
