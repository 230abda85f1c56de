"""Just-in-time registration, invoked by the IoT rule on $aws/events/certificates/registered/+.

Transient AWS failures propagate, so Lambda's async retries and then the retry queue (below) take
the event; a malformed event, or one that does not match what AWS IoT says about its certificate
(mismatched), is audited and acknowledged (retrying it cannot help). `ThingConflict` propagates
too (a thing of the device's name exists in AWS IoT and is not fleetkey's; nothing in AWS IoT is
changed): retrying cannot help until an operator resolves the name clash (the retries' failures
alarm), but the event must be kept, and the retry after the fix finishes the registration.

Metrics: `RegistrationsAccepted` and `RegistrationsRefused` (dimension `reason`) count decisions,
once per certificate: only the invocation that records the decision counts it, at the moment it
is recorded (Powertools flushes metrics even when the invocation then fails, and the redrive that
finishes the decision does not count it again). `RegistrationEventsMalformed`,
`RegistrationEventsMismatched` and `RegistrationEventsRepeated` (a delivery for a certificate
already decided: a duplicate, a redrive, a concurrent copy) count deliveries.

Retries without a person: Lambda's on-failure destination is the registration retry queue, whose
event source mapping brings each failed event back here one at a time (an SQS batch of one
message whose body is Lambda's invocation record; the event is its `requestPayload`). A retry
that fails again fails the invocation, logged and counted
(`RegistrationRetriesFailed` by `kind`: `persistent` ones alarm), and SQS delivers it again after
the visibility timeout; after the queue's maxReceiveCount (six hours) it moves to the registration
failure queue, for an operator (`fleetkey redrive registration-failures`).
`RegistrationEventsRetried` counts the deliveries.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import from_environ
from fleetkey.domain.rejection import RejectionReason
from fleetkey.init_phase import load_ahead
from fleetkey.observability import count_alone, logger, metrics, tracer

if TYPE_CHECKING:
    from fleetkey.services.registration import RegistrationOutcome, RegistrationService

# pydantic, the event's model and the service's module are imported at the first event (or at
# init, ahead of requests).
load_ahead("fleetkey.events", "fleetkey.services.registration")


@lru_cache(maxsize=1)
def service() -> RegistrationService:
    # Its own components: the decision observer counts decisions for this function's metrics.
    return from_environ(on_decision=count_decision).registration


def count_decision(outcome: RegistrationOutcome) -> None:
    """Count a decision this invocation has just recorded (at most one per invocation, so the
    `reason` dimension applies to it alone)."""
    if outcome.accepted:
        metrics.add_metric(name="RegistrationsAccepted", unit=MetricUnit.Count, value=1)
        return
    reason = outcome.reason.value if outcome.reason else "unknown"
    metrics.add_dimension(name="reason", value=reason)
    metrics.add_metric(name="RegistrationsRefused", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context(correlation_id_path="certificateId", clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if is_retry_batch(event):
        return retry(event, context)
    return register(event)


def is_retry_batch(event: object) -> bool:
    """An SQS event from the retry queue's event source mapping. AWS IoT's certificate-registered
    event (selected by the rule's SQL) has no `Records`."""
    if not isinstance(event, dict):
        return False
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, dict) and r.get("eventSource") == "aws:sqs" for r in records)
    )


def retry(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """The retry queue's batch (one message: `REGISTRATION_RETRY_BATCH_SIZE` in the CDK stack,
    so that one invocation records at most one decision and its `reason` dimension). A message
    whose event fails again is reported failed and the invocation fails (Lambda `Errors`): SQS
    delivers it again after the visibility timeout."""
    from aws_lambda_powertools.utilities.batch import (
        BatchProcessor,
        EventType,
        process_partial_response,
    )

    processor = BatchProcessor(event_type=EventType.SQS)
    return dict(
        process_partial_response(
            event=event, record_handler=retry_record, processor=processor, context=context
        )
    )


class UnreadableRetry(ValueError):
    """A retry queue message that is not Lambda's invocation record of an event. Reported failed,
    so that it ends in the failure queue for an operator rather than vanish."""


def retried_event(record: Any) -> Any:
    """The event of Lambda's invocation record in `record`'s body (its `requestPayload`). Which
    function the record names is not checked: the event is checked as the rule's is (nothing in
    it is believed), and a record must survive the function's replacement.

    Raises:
        UnreadableRetry: not an invocation record.
    """
    try:
        return json.loads(record.body)["requestPayload"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UnreadableRetry(f"message {record.message_id}: not an invocation record") from exc


# ClientError codes (prefixes) a retry cannot fix: the role, the request or a missing resource.
PERSISTENT_CODES = (
    "AccessDenied",
    "Unauthorized",
    "NotAuthorized",
    "ResourceNotFound",
    "InvalidRequest",
    "ValidationException",
)


def failure_kind(exc: BaseException) -> str:
    """`persistent` for what only a person fixes (a thing name clash, a missing permission, policy
    or resource, an unreadable message), `transient` for everything else: throttling, conflicts
    between concurrent transactions, AWS IoT settling, timeouts (a later retry may not see them).
    Only persistent failures alarm (`RegistrationRetriesFailing`)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    from fleetkey.adapters.iot import ThingConflict

    if isinstance(exc, (ThingConflict, UnreadableRetry, NoCredentialsError)):
        return "persistent"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code.startswith(PERSISTENT_CODES):
            return "persistent"
    return "transient"


def retry_record(record: Any) -> dict[str, Any]:
    """Decide one retried event. A failure is logged and counted (`RegistrationRetriesFailed` by
    `kind`: persistent ones need a person, the `RegistrationRetriesFailing` alarm) and raised, so
    that the record is reported failed."""
    try:
        event = retried_event(record)
        if isinstance(event, dict) and isinstance(event.get("certificateId"), str):
            logger.set_correlation_id(event["certificateId"])
        # Documents of their own: the decision's `reason` dimension must not land on them.
        count_alone("RegistrationEventsRetried")
        return register(event)
    except Exception as exc:
        kind = failure_kind(exc)
        logger.exception(
            "registration retry failed; SQS delivers it again",
            extra={"message_id": record.message_id, "error": type(exc).__name__, "kind": kind},
        )
        count_alone("RegistrationRetriesFailed", kind=kind)
        raise


def register(event: Any) -> dict[str, Any]:
    """Decide one certificate-registered event (the rule's, or a retry's `requestPayload`)."""
    # Imported at the first event, not at init: pydantic and the event's model, like the service
    # (built by `service()`), were most of this function's import (docs/cold-start.md).
    from pydantic import ValidationError

    from fleetkey.events import CertificateRegisteredEvent

    try:
        parsed = CertificateRegisteredEvent.model_validate(event)
    except ValidationError as exc:
        logger.warning("malformed registration event", extra={"errors": exc.error_count()})
        service().record_malformed_event(event, str(exc))
        metrics.add_metric(name="RegistrationEventsMalformed", unit=MetricUnit.Count, value=1)
        return {"status": "malformed"}

    outcome = service().register(parsed)
    if outcome.reason is RejectionReason.MISMATCHED_EVENT:
        metrics.add_metric(name="RegistrationEventsMismatched", unit=MetricUnit.Count, value=1)
        return {"status": "mismatched"}
    if not outcome.decided:
        metrics.add_metric(name="RegistrationEventsRepeated", unit=MetricUnit.Count, value=1)
    if outcome.accepted:
        logger.info(
            "registration accepted",
            extra={"device_id": outcome.device_id, "decided": outcome.decided},
        )
        return {"status": "accepted", "device_id": outcome.device_id}
    reason = outcome.reason.value if outcome.reason else "unknown"
    logger.warning(
        "registration refused",
        extra={"device_id": outcome.device_id, "reason": reason, "decided": outcome.decided},
    )
    return {"status": "refused", "device_id": outcome.device_id, "reason": reason}
