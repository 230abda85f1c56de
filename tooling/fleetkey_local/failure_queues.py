"""The deployed stack's failure queues for the local stack, the stack outputs that name them, and
the messages AWS leaves in them, as AWS documents them.

The CDK stack keeps what fleetkey could not process in eight queues besides the lifecycle queue's
dead-letter queue (`fleetkey_local.queues`): the registration retry queue's dead-letter queue
(`registration-failures`), the on-failure destinations of device_events and rotation_events, the
error actions of the three IoT rules, and the dead-letter queues of the two schedules' targets.
The registration function's on-failure destination is its retry queue, which the function itself
consumes (an event source mapping: `fleetkey_local.queues.QueueWorker` with `registration`).
`provision_failure_queues` creates them all on the local AWS endpoint (moto) with the deployed
settings (SQS-managed encryption, 14 days' retention, the retry queue's redrive policy; only its
visibility timeout is a second); `local_outputs` is what CloudFormation's outputs would say of
the local stack (queue URLs and function names), so that `fleetkey redrive` reads the local stack
as it reads a deployed one.

What each queue holds, built as AWS builds it (the local emulation sends the first; tests build
the others as AWS IoT and EventBridge would leave them):

- `destination_record`: Lambda's invocation record for an asynchronous invocation whose attempts
  all failed (`requestContext`, `requestPayload` = the event, `responseContext`,
  `responsePayload` = the runtime's error), the body of an SQS on-failure destination's message.
  https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-retain-records.html
- `rule_error_message`: an IoT rule's error action message (`ruleName`, `topic`, `clientId`,
  `cloudwatchTraceId`, `base64OriginalPayload` = the MQTT message as published, before the rule's
  SQL, and `failures`). https://docs.aws.amazon.com/iot/latest/developerguide/rule-error-handling.html
- `schedule_dead_letter`: an EventBridge target's dead letter: the event itself as the body, and
  the message attributes RULE_ARN, TARGET_ARN, ERROR_CODE, ERROR_MESSAGE,
  EXHAUSTED_RETRY_CONDITION and RETRY_ATTEMPTS.
  https://docs.aws.amazon.com/eventbridge/latest/userguide/eb-rule-dlq.html
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fleetkey_local.provision import NAME_PREFIX
from fleetkey_local.queues import (
    DEAD_LETTER_RETENTION_SECONDS,
    LOCAL_VISIBILITY_TIMEOUT_SECONDS,
    _create_queue,
)

# CloudFormation output (the CDK stack's, infra/fleetkey_infra/stack.py) -> the local queue's
# name after the prefix.
FAILURE_QUEUES: dict[str, str] = {
    "RegistrationFailureQueueUrl": "registration-failures",
    "DeviceEventFailureQueueUrl": "device-event-failures",
    "RotationEventFailureQueueUrl": "rotation-event-failures",
    "RegistrationRuleErrorQueueUrl": "registration-rule-errors",
    "TamperRuleErrorQueueUrl": "tamper-rule-errors",
    "PresenceRuleErrorQueueUrl": "presence-rule-errors",
    "MaintenanceDeadLetterQueueUrl": "maintenance-dlq",
    "RotationSweepDeadLetterQueueUrl": "rotation-sweep-dlq",
}
# The registration retry queue (constructs/registration_retries.py): its output, its name after
# the prefix, and the deployed redrive policy's maxReceiveCount (constants.py's
# REGISTRATION_RETRY_MAX_RECEIVE_COUNT; tests/infra compares them).
REGISTRATION_RETRY_OUTPUT = "RegistrationRetryQueueUrl"
REGISTRATION_RETRY_QUEUE = "registration-retries"
REGISTRATION_RETRY_MAX_RECEIVE_COUNT = 120
REGISTRATION_RETRY_RETENTION_SECONDS = 7 * 24 * 3600
# The functions with an on-failure destination (constructs/functions.py) -> its queue's output.
ON_FAILURE_DESTINATIONS: dict[str, str] = {
    "registration": REGISTRATION_RETRY_OUTPUT,
    "device_events": "DeviceEventFailureQueueUrl",
    "rotation_events": "RotationEventFailureQueueUrl",
}
# The function-name outputs of the CDK stack: (output, function directory).
FUNCTION_OUTPUTS: dict[str, str] = {
    "RegistrationFunctionName": "registration",
    "MaintenanceFunctionName": "maintenance",
    "ConvergeFunctionName": "converge",
    "DeviceEventsFunctionName": "device_events",
    "RotationFunctionName": "rotation",
    "RotationEventsFunctionName": "rotation_events",
    "ValidationsFunctionName": "validations",
}


def function_name(function: str, prefix: str = NAME_PREFIX) -> str:
    """A function's name in the local stack (the name its Lambda context carries)."""
    return f"{prefix}-{function}"


def function_arn(function: str, region: str, account: str, prefix: str = NAME_PREFIX) -> str:
    return f"arn:aws:lambda:{region}:{account}:function:{function_name(function, prefix)}"


def provision_failure_queues(
    sqs: Any,
    *,
    prefix: str = NAME_PREFIX,
    retry_max_receive_count: int = REGISTRATION_RETRY_MAX_RECEIVE_COUNT,
    retry_visibility_timeout: int = LOCAL_VISIBILITY_TIMEOUT_SECONDS,
) -> dict[str, str]:
    """Create the eight failure queues (the lifecycle queue's dead-letter queue is
    `fleetkey_local.queues`') and the registration retry queue, which moves a retry delivered
    `retry_max_receive_count` times to `registration-failures` (existing queues are given these
    settings); their URLs by the stack output that names them. AWS calls: 10 (28 for existing
    queues)."""
    urls = {
        output: _create_queue(
            sqs,
            f"{prefix}-{name}",
            {
                "MessageRetentionPeriod": str(DEAD_LETTER_RETENTION_SECONDS),
                "SqsManagedSseEnabled": "true",
            },
        )
        for output, name in FAILURE_QUEUES.items()
    }
    failures_arn = sqs.get_queue_attributes(
        QueueUrl=urls["RegistrationFailureQueueUrl"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    redrive = {"deadLetterTargetArn": failures_arn, "maxReceiveCount": retry_max_receive_count}
    urls[REGISTRATION_RETRY_OUTPUT] = _create_queue(
        sqs,
        f"{prefix}-{REGISTRATION_RETRY_QUEUE}",
        {
            "VisibilityTimeout": str(retry_visibility_timeout),
            "MessageRetentionPeriod": str(REGISTRATION_RETRY_RETENTION_SECONDS),
            "RedrivePolicy": json.dumps(redrive),
            "SqsManagedSseEnabled": "true",
        },
    )
    return urls


def local_outputs(
    *,
    lifecycle_queue_url: str,
    lifecycle_dead_letter_queue_url: str,
    failure_queue_urls: Mapping[str, str],
    prefix: str = NAME_PREFIX,
) -> dict[str, str]:
    """The outputs a deployed stack's CloudFormation gives for its queues and functions, of the
    local stack: queue URLs, and function names (`fleetkey-<function>`)."""
    return {
        "LifecycleQueueUrl": lifecycle_queue_url,
        "LifecycleDeadLetterQueueUrl": lifecycle_dead_letter_queue_url,
        **failure_queue_urls,
        **{output: function_name(name, prefix) for output, name in FUNCTION_OUTPUTS.items()},
    }


def _timestamp(moment: datetime | None) -> str:
    """ISO 8601 in UTC with milliseconds, as Lambda writes its records' timestamp."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def destination_record(
    *,
    function_arn: str,
    event: Any,
    error_type: str,
    error_message: str,
    request_id: str | None = None,
    attempts: int = 3,
    condition: str = "RetriesExhausted",
    at: datetime | None = None,
) -> dict[str, Any]:
    """Lambda's invocation record of an asynchronous invocation that failed (`condition`
    RetriesExhausted, or EventAgeExceeded), as an on-failure destination receives it. The
    function ARN is qualified with the version that ran ($LATEST)."""
    request_id = request_id or str(uuid.uuid4())
    return {
        "version": "1.0",
        "timestamp": _timestamp(at),
        "requestContext": {
            "requestId": request_id,
            "functionArn": f"{function_arn}:$LATEST",
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": event,
        "responseContext": {
            "statusCode": 200,
            "executedVersion": "$LATEST",
            "functionError": "Unhandled",
        },
        "responsePayload": {
            "errorMessage": error_message,
            "errorType": error_type,
            "requestId": request_id,
            "stackTrace": [],
        },
    }


def rule_error_message(
    *,
    rule_name: str,
    topic: str,
    payload: bytes | str | Mapping[str, Any],
    function_arn: str,
    error_message: str = "Failed to invoke lambda function. Received Server error from Lambda. "
    "The error code is 429",
    client_id: str = "",
) -> dict[str, Any]:
    """An IoT rule's error action message for a message on `topic` whose Lambda action failed:
    the original payload (as published, before the rule's SQL) in base64."""
    if isinstance(payload, Mapping):
        payload = json.dumps(payload)
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    return {
        "ruleName": rule_name,
        "topic": topic,
        "cloudwatchTraceId": str(uuid.uuid4()),
        "clientId": client_id,
        "base64OriginalPayload": base64.b64encode(raw).decode(),
        "failures": [
            {
                "failedAction": "LambdaAction",
                "failedResource": function_arn,
                "errorMessage": error_message,
            }
        ],
    }


def schedule_dead_letter(
    event: Mapping[str, Any],
    *,
    target_arn: str,
    error_code: str = "SDK_CLIENT_ERROR",
    error_message: str = "Rate Exceeded.",
    condition: str = "MaximumRetryAttemptsExhausted",
    retry_attempts: int = 2,
) -> tuple[str, dict[str, dict[str, str]]]:
    """An EventBridge target's dead letter for `event` (a scheduled event): the body, and the
    message attributes (SendMessage's shape) EventBridge adds."""
    rule_arn = (event.get("resources") or [""])[0]
    attributes = {
        "RULE_ARN": rule_arn,
        "TARGET_ARN": target_arn,
        "ERROR_CODE": error_code,
        "ERROR_MESSAGE": error_message,
        "EXHAUSTED_RETRY_CONDITION": condition,
        "RETRY_ATTEMPTS": str(retry_attempts),
    }
    return json.dumps(event), {
        name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()
    }
