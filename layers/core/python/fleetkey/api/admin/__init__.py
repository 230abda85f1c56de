"""The admin API (/v1/admin, IAM-authenticated), one router per bounded context. The admin
function includes every router of ROUTERS into its resolver, the rotation function those of
PKI_ROUTERS; the OpenAPI document is generated from both (`python -m fleetkey_cli.openapi`)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler.api_gateway import Router

from fleetkey.api.admin.allowlist import router as allowlist_router
from fleetkey.api.admin.cas import router as cas_router
from fleetkey.api.admin.data_keys import router as data_keys_router
from fleetkey.api.admin.devices import router as devices_router
from fleetkey.api.admin.firmware import router as firmware_router
from fleetkey.api.admin.lifecycle import router as lifecycle_router
from fleetkey.api.admin.pki import router as pki_router
from fleetkey.api.admin.rotation import router as rotation_router
from fleetkey.api.admin.signing_keys import router as signing_keys_router
from fleetkey.api.admin.tokens import router as tokens_router

ROUTERS: tuple[Router, ...] = (
    allowlist_router,
    devices_router,
    lifecycle_router,
    data_keys_router,
    cas_router,
    signing_keys_router,
    tokens_router,
    rotation_router,
    firmware_router,
)
# Served by the rotation function (`/v1/admin/pki/*`): the only role that may use the CA's key.
PKI_ROUTERS: tuple[Router, ...] = (pki_router,)
