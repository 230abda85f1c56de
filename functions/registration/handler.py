"""Just-in-time registration, invoked by the IoT rule on $aws/events/certificates/registered/+.

Transient AWS failures propagate, so Lambda's async retries and the failure destination take the
event; a malformed event is audited and acknowledged (retrying it cannot help).
"""

from functools import lru_cache

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from fleetkey.adapters.iot import IotRegistry
from fleetkey.events import CertificateRegisteredEvent
from fleetkey.observability import logger, metrics, tracer
from fleetkey.services.registration import RegistrationService
from fleetkey.services.trust import TrustAnchors
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import Store


@lru_cache(maxsize=1)
def service() -> RegistrationService:
    settings = Settings.from_environ()
    store = Store(settings.table_name, region=settings.region)
    return RegistrationService(
        settings,
        store,
        IotRegistry(region=settings.region),
        TrustAnchors(store, settings.trust_anchor_cache_seconds),
    )


@logger.inject_lambda_context(correlation_id_path="certificateId", clear_state=True)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict, context: LambdaContext) -> dict:
    try:
        parsed = CertificateRegisteredEvent.model_validate(event)
    except ValidationError as exc:
        logger.warning("malformed registration event", extra={"errors": exc.error_count()})
        service().record_malformed_event(event, str(exc))
        metrics.add_metric(name="RegistrationEventsMalformed", unit=MetricUnit.Count, value=1)
        return {"status": "malformed"}

    outcome = service().register(parsed)
    if outcome.accepted:
        metrics.add_metric(name="RegistrationsAccepted", unit=MetricUnit.Count, value=1)
        logger.info("registration accepted", extra={"device_id": outcome.device_id})
        return {"status": "accepted", "device_id": outcome.device_id}
    reason = outcome.reason.value if outcome.reason else "unknown"
    # One registration metric per invocation, so the dimension applies to it alone.
    metrics.add_dimension(name="reason", value=reason)
    metrics.add_metric(name="RegistrationsRefused", unit=MetricUnit.Count, value=1)
    logger.warning("registration refused", extra={"device_id": outcome.device_id, "reason": reason})
    return {"status": "refused", "device_id": outcome.device_id, "reason": reason}
