"""The lifecycle queue's consumer: brings AWS IoT in line with each queued device's recorded state
(`LifecycleService.converge`): a decommissioned device's teardown, and suspensions or resumptions
whose convergence could not finish in the request.

SQS event source with partial batch responses (Powertools BatchProcessor): a device whose
convergence could not finish yet (AWS IoT has not settled a detach, or AWS failed) is reported
failed, so SQS delivers it again after the visibility timeout, and after the queue's
maxReceiveCount keeps it in the dead-letter queue, from which an operator sends it back once the
cause is fixed: `fleetkey redrive lifecycle-dlq` (docs/runbook-redrive.md).
Every step is idempotent, so a redelivery, a duplicate or a concurrent copy finishes the same
work.

Metrics: `TeardownRetries` (a delivery that could not finish), `ConvergeMessagesMalformed`;
lifecycle metrics from the service: `TeardownsCompleted`, and `TeardownsOverdue` (a delivery that
finds a teardown still pending 30 minutes after the decommission: the `TeardownsOverdue` alarm).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import Components, from_environ
from fleetkey.errors import NotFound, NotSettled
from fleetkey.observability import logger, metrics, tracer


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


processor = BatchProcessor(event_type=EventType.SQS)
_DEVICE_ID = re.compile(r"[a-zA-Z0-9:_-]{1,128}")


def converge_record(record: SQSRecord) -> None:
    """Converge one device. A malformed message is dropped (logged): no retry can help it.

    Raises:
        NotSettled: AWS IoT has not settled yet; the record is retried.
        AWS errors: the record is retried.
    """
    try:
        body = json.loads(record.body)
        device_id = body["device_id"]
    except (ValueError, KeyError, TypeError, RecursionError):
        logger.error("malformed lifecycle message dropped", extra={"message_id": record.message_id})
        metrics.add_metric(name="ConvergeMessagesMalformed", unit=MetricUnit.Count, value=1)
        return
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        logger.error("lifecycle message names no device", extra={"message_id": record.message_id})
        metrics.add_metric(name="ConvergeMessagesMalformed", unit=MetricUnit.Count, value=1)
        return
    try:
        settled = components().lifecycle.converge(device_id)
    except NotFound:
        logger.error("lifecycle message for an unknown device", extra={"device_id": device_id})
        return
    if not settled:
        metrics.add_metric(name="TeardownRetries", unit=MetricUnit.Count, value=1)
        raise NotSettled(f"device {device_id}: AWS IoT has not settled yet; retried later")
    logger.info("device converged", extra={"device_id": device_id})


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=converge_record, processor=processor, context=context
    )
