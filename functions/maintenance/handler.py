"""Scheduled maintenance, invoked by an EventBridge schedule: retires the access-token signing keys
whose tokens have all expired (schedules their KMS deletion, then unpublishes them from the JWKS).

Idempotent: each run reads the registry afresh, and a key already pending deletion counts as
retired. AWS failures, and a registry changed meanwhile (Conflict), propagate, so EventBridge's
asynchronous invocation is retried by Lambda (and the next scheduled run catches up anyway).
An event that is not EventBridge's scheduled event is logged and ignored.
"""

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import from_environ
from fleetkey.errors import Conflict
from fleetkey.init_phase import load_ahead
from fleetkey.observability import logger, metrics, tracer

if TYPE_CHECKING:
    from fleetkey.services.signing_keys import SigningKeys

# The service's module is imported at the first run (or at init, ahead of requests).
load_ahead("fleetkey.services.signing_keys")

ACTOR = "schedule:signing-key-maintenance"
SCHEDULED_EVENT = {"source": "aws.events", "detail-type": "Scheduled Event"}


@lru_cache(maxsize=1)
def signing_keys() -> "SigningKeys":
    return from_environ().signing_keys


def _is_scheduled_event(event: object) -> bool:
    return isinstance(event, dict) and all(event.get(k) == v for k, v in SCHEDULED_EVENT.items())


@logger.inject_lambda_context(correlation_id_path=correlation_paths.EVENT_BRIDGE, clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: object, context: LambdaContext) -> dict[str, Any]:
    if not _is_scheduled_event(event):
        fields = event if isinstance(event, dict) else {}
        logger.warning(
            "not a scheduled event; ignored",
            extra={"source": fields.get("source"), "detail_type": fields.get("detail-type")},
        )
        return {"status": "ignored"}

    try:
        retired = signing_keys().retire_expired(actor=ACTOR)
    except Conflict:
        # A rotation (or another retirement) wrote the registry meanwhile: the retry reads it
        # afresh; deletions already scheduled count as done then.
        logger.warning("signing keys changed during retirement; retrying")
        raise
    metrics.add_metric(name="SigningKeysRetired", unit=MetricUnit.Count, value=len(retired))
    if retired:
        logger.info("signing keys retired", extra={"key_ids": retired, "count": len(retired)})
    else:
        logger.info("no signing key due for retirement")
    return {"status": "done", "retired": retired}
