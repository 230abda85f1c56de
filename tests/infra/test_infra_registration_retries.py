"""The registration retry queue: a registration that failed through Lambda's retries comes back to
the registration function without a person, and only what keeps failing reaches the failure
queue; and the registration function's reserved concurrency."""

import pytest

from fleetkey_infra import constants
from fleetkey_infra.constructs.registration_retries import (
    RegistrationConfig,
    RegistrationConfigError,
)
from fleetkey_local.failure_queues import (
    REGISTRATION_RETRY_MAX_RECEIVE_COUNT as local_retry_max_receive_count,
)
from infra_template import (
    function_by_service,
    of_type,
    output_ref,
    resources_for,
    role_of,
    role_statements,
)


def registration(resources: dict[str, dict]) -> tuple[str, dict]:
    return function_by_service(resources, constants.REGISTRATION_SERVICE_NAME)


def test_lambda_sends_failed_registrations_to_the_retry_queue(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the registration function's asynchronous invocation settings
    function_id, _ = registration(resources)
    [config] = [
        c["Properties"]
        for c in of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
        if c["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    retries_id = output_ref(template_outputs, "RegistrationRetryQueueUrl")

    # When reading where an event goes after Lambda's retries
    # Then to the retry queue, not to the failure queue
    assert config["MaximumRetryAttempts"] == 2
    assert config["DestinationConfig"]["OnFailure"]["Destination"] == {
        "Fn::GetAtt": [retries_id, "Arn"]
    }


def test_the_retry_queue_moves_what_keeps_failing_to_the_failure_queue(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the retry queue and the failure queue
    retries = resources[output_ref(template_outputs, "RegistrationRetryQueueUrl")]["Properties"]
    failures_id = output_ref(template_outputs, "RegistrationFailureQueueUrl")
    failures = resources[failures_id]["Properties"]
    function = registration(resources)[1]["Properties"]

    # When reading their settings
    # Then a retry comes back every 3 minutes (6x the function's timeout) for 120 deliveries (six
    # hours, as Lambda keeps an asynchronous event), then waits in the failure queue, which keeps
    # it longer than the retry queue kept it; the local stack has the same redrive policy
    assert retries["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [failures_id, "Arn"]},
        "maxReceiveCount": 120,
    }
    assert local_retry_max_receive_count == 120
    assert retries["VisibilityTimeout"] == 180 >= 6 * function["Timeout"]
    assert retries["SqsManagedSseEnabled"] is True
    assert retries["MessageRetentionPeriod"] < failures["MessageRetentionPeriod"]


def test_registration_consumes_its_retry_queue_one_record_at_a_time(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the retry queue's event source mapping
    retries_id = output_ref(template_outputs, "RegistrationRetryQueueUrl")
    function_id, _ = registration(resources)
    [mapping] = [
        m["Properties"]
        for m in of_type(resources, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [retries_id, "Arn"]}
    ]

    # When reading it
    # Then the registration function gets one record per invocation (one decision, one metric
    # dimension), reports a failed one in a partial batch response, and runs two at once at most
    assert mapping["FunctionName"] == {"Ref": function_id}
    assert mapping["BatchSize"] == 1
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": 2}


def test_registration_sends_to_and_receives_from_the_retry_queue_alone(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the registration role and the two queues
    _, function = registration(resources)
    role_id = role_of(function)
    retries_arn = f"<{output_ref(template_outputs, 'RegistrationRetryQueueUrl')}.Arn>"
    failures_arn = f"<{output_ref(template_outputs, 'RegistrationFailureQueueUrl')}.Arn>"

    # When reading what it may do to queues
    statements = role_statements(resources, role_id)
    senders = set(resources_for(statements, "sqs:SendMessage"))
    receivers = set(resources_for(statements, "sqs:ReceiveMessage"))

    # Then only the retry queue: the failure queue is SQS's to fill (the redrive policy)
    assert senders == {retries_arn}
    assert receivers == {retries_arn}
    assert failures_arn not in senders | receivers


def test_registration_has_a_reserved_concurrency_by_default(resources: dict[str, dict]) -> None:
    # Given the registration function
    _, function = registration(resources)

    # Then events beyond 5 at once wait in Lambda's asynchronous queue (docs/load.md)
    assert function["Properties"]["ReservedConcurrentExecutions"] == 5


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 5), ("3", 3), (8, 8), ("none", None), (" None ", None), ("1000", 1000)],
)
def test_registration_concurrency_from_context(value: object, expected: int | None) -> None:
    assert RegistrationConfig.from_context({"registrationConcurrency": value}.get) == (
        RegistrationConfig(reserved_concurrency=expected)
    )


@pytest.mark.parametrize("value", ["", "1", 1, 0, "-3", "1001", True, 2.5, "five", [5], "²", "٣"])
def test_registration_concurrency_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(RegistrationConfigError, match="registrationConcurrency"):
        RegistrationConfig.from_context({"registrationConcurrency": value}.get)
