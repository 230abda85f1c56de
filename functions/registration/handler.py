"""Just-in-time registration, invoked by the IoT rule on $aws/events/certificates/registered/+.

Transient AWS failures propagate, so Lambda's async retries and the failure destination take the
event; a malformed event, or one that does not match what AWS IoT says about its certificate
(mismatched), is audited and acknowledged (retrying it cannot help). `ThingConflict` propagates
too (a thing of the device's name exists in AWS IoT and is not fleetkey's; nothing in AWS IoT is
changed): retrying cannot help until an operator resolves the name clash, but the failure queue
must keep the event, whose redrive then finishes the registration.

Metrics: `RegistrationsAccepted` and `RegistrationsRefused` (dimension `reason`) count decisions,
once per certificate: only the invocation that records the decision counts it, at the moment it
is recorded (Powertools flushes metrics even when the invocation then fails, and the redrive that
finishes the decision does not count it again). `RegistrationEventsMalformed`,
`RegistrationEventsMismatched` and `RegistrationEventsRepeated` (a delivery for a certificate
already decided: a duplicate, a redrive, a concurrent copy) count deliveries.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import from_environ
from fleetkey.domain.rejection import RejectionReason
from fleetkey.init_phase import load_ahead
from fleetkey.observability import logger, metrics, tracer

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
