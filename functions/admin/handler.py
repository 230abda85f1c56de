"""Operator API under /v1/admin/ (IAM-authenticated by API Gateway): allow-list, devices and their
lifecycle, data keys, manufacturer CAs, audit trails, signing keys, token revocation.

The routes are the routers of fleetkey.api.admin; Powertools validates each request and response
against their models. This module assembles them and maps errors to responses; the rules live in
the core. docs/openapi/admin.json is generated from this resolver: `python -m fleetkey_cli.openapi`.
"""

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.api.admin import ROUTERS
from fleetkey.api.admin.resolver import admin_resolver
from fleetkey.composition import components as services  # the tests reset it between stacks
from fleetkey.observability import logger, metrics, tracer

__all__ = ["app", "handler", "services"]

app = admin_resolver(ROUTERS)


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
