"""The admin API (/v1/admin, IAM-authenticated), one router per bounded context. The admin
function includes every router of ROUTERS into its resolver; the OpenAPI document is generated
from that resolver (`python -m fleetkey_cli.openapi`)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler.api_gateway import Router

from fleetkey.api.admin import allowlist, cas, data_keys, devices, lifecycle, signing_keys, tokens

ROUTERS: tuple[Router, ...] = (
    allowlist.router,
    devices.router,
    lifecycle.router,
    data_keys.router,
    cas.router,
    signing_keys.router,
    tokens.router,
)
