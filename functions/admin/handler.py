"""Operator API under /v1/admin/ (IAM-authenticated by API Gateway): allow-list, devices and their
lifecycle, data keys, manufacturer CAs, audit trails, signing keys, token revocation.

The routes are the routers of fleetkey.api.admin; Powertools validates each request and response
against their models. This module assembles them and maps errors to responses; the rules live in
the core. docs/openapi/admin.json is generated from this resolver: `python -m fleetkey_cli.openapi`.
"""

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
    """The resolver, built at the first request: Powertools' event handler, the routers, their
    models and pydantic were most of this function's import (docs/cold-start.md)."""
    from fleetkey.api.admin import ROUTERS
    from fleetkey.api.admin.resolver import admin_resolver

    return admin_resolver(ROUTERS)


if ahead_of_requests():  # SnapStart, provisioned concurrency: init is off the request path
    app()


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app().resolve(event, context)
