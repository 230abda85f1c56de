"""Relying parties' delegated validation (IAM-authenticated): POST /v1/validations asks fleetkey
to have a device prove itself now; GET /v1/validations/{validation_id}[?wait=N] reads the result.
The device answers at the token endpoint (functions/token). Errors are JSON as the admin API's.

Metrics: `ValidationsRequested` for every validation created, and `ValidationsRefused` (dimension
`reason` = `device_not_active`, a metric document of its own) for one refused at once because
the device is not ACTIVE (the outcome's other counts are the token function's). Reading a result
counts nothing: `expired` is computed on read, so a count of it would be one per read."""

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import components as services  # the tests reset it between stacks
from fleetkey.init_phase import ahead_of_requests
from fleetkey.observability import logger, metrics, tracer

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver

__all__ = ["app", "handler", "services"]


@lru_cache(maxsize=1)
def app() -> "APIGatewayRestResolver":
    """The resolver, built at the first request: Powertools' event handler, the router's models
    and pydantic were most of this function's import (docs/cold-start.md)."""
    from fleetkey.api.admin.resolver import admin_resolver
    from fleetkey.api.validations import router

    return admin_resolver((router,), strip_prefixes=())


if ahead_of_requests():  # SnapStart, provisioned concurrency: init is off the request path
    app()


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app().resolve(event, context)
