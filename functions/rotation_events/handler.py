"""Rotation's events:

- the IoT rule on `$aws/events/presence/connected/+` (AWS IoT's presence event: `clientId` = the
  device id, `principalIdentifier` = the certificate id): a device that connected with its
  pending certificate commits its rotation. Events arrive late, twice and out of order: the
  service commits once and ignores the rest.
- the EventBridge schedule (every minute): the sweep of devices with something due (rollbacks
  past their deadline, retired certificates past their grace, renewal commands at the
  configured rate) and the CRL's refresh.

Transient AWS failures are re-raised (Lambda's retry and the failure destination take them); an
event of the wrong shape is logged and dropped (a retry would not change it).

This function's role is one of the two that may sign with the issuing CA's KMS key (the CRL, and
revocations at commit and rollback).

Metrics: `RotationsCommitted`, `RotationsRolledBack`, `RetiredCertificatesDeleted`,
`RenewalsRequested`, `CrlsPublished`, `RotationSweepFailures`, and `RotationsOverdue` (each sweep
that finds devices whose deadline passed more than five minutes ago: how many; the
`RotationsOverdue` alarm).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import Components, from_environ
from fleetkey.observability import logger, metrics, tracer


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


def _is_schedule(event: object) -> bool:
    return (
        isinstance(event, dict)
        and event.get("source") == "aws.events"
        and event.get("detail-type") == "Scheduled Event"
    )


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    if _is_schedule(event):
        counts = components().rotation.sweep()
        if counts["failed"]:
            metrics.add_metric(
                name="RotationSweepFailures", unit=MetricUnit.Count, value=counts["failed"]
            )
        if counts["overdue"]:
            metrics.add_metric(
                name="RotationsOverdue", unit=MetricUnit.Count, value=counts["overdue"]
            )
        logger.info("rotation sweep", extra=counts)
        return counts
    outcome = components().rotation.on_connected(event)
    if outcome == "ignored":
        logger.debug("presence event ignored")
    else:
        logger.info(
            "presence event",
            extra={
                "outcome": outcome,
                "device_id": event.get("clientId") if isinstance(event, dict) else None,
            },
        )
    return {"outcome": outcome}
