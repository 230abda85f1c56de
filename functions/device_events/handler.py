"""Events devices report about themselves, delivered by the IoT rule on
`fleetkey/+/events/tamper` (`fleetkey.events.TAMPER_RULE_SQL`): a device that reports tampering
is suspended at once, reason `tamper`.

The device id is the topic's second level, which the rule puts in the event (`device_id`); AWS
IoT lets a device publish only under its own thing name (its profile's IoT policy), so a device can
report only itself. The payload is not trusted for anything else: it is kept in the log only.

A device that is not ACTIVE (already suspended: nothing to do; decommissioned or never
registered: cannot be suspended) is acknowledged and logged; transient AWS failures propagate, so
Lambda retries and the failure destination keeps the event.

Metrics: `TamperEvents` (every event), `TamperEventsIgnored` (nothing to suspend); the lifecycle
metric `DevicesSuspended` from the service, once per suspension.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import Components, from_environ
from fleetkey.errors import IllegalTransition, NotFound
from fleetkey.observability import logger, metrics, tracer


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


_DEVICE_ID = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
ACTOR_PREFIX = "aws-iot:tamper-rule:device:"


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="TamperEvents", unit=MetricUnit.Count, value=1)
    device_id = event.get("device_id") if isinstance(event, dict) else None
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        logger.error("tamper event without a device id", extra={"event": repr(event)[:500]})
        metrics.add_metric(name="TamperEventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "malformed"}
    logger.warning("device reported tampering", extra={"device_id": device_id})
    try:
        device = components().lifecycle.suspend(
            device_id, reason="tamper", actor=ACTOR_PREFIX + device_id
        )
    except (IllegalTransition, NotFound) as exc:
        logger.warning(
            "tamper event for a device that cannot be suspended",
            extra={"device_id": device_id, "code": exc.code},
        )
        metrics.add_metric(name="TamperEventsIgnored", unit=MetricUnit.Count, value=1)
        return {"status": "ignored", "reason": exc.code}
    return {"status": "suspended", "device_id": device.device_id}
