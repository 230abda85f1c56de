"""The admin API (/v1/admin, IAM-authenticated), one router per bounded context. The admin
function includes every router of ROUTERS into its resolver, the rotation function those of
PKI_ROUTERS; the OpenAPI document is generated from both (`python -m fleetkey_cli.openapi`).

ROUTERS and PKI_ROUTERS are imported when first read (PEP 562): a package's `__init__` runs for
each of its modules, and the functions that import only `resolver` (validations) or only the PKI's
router (rotation) would otherwise import every router and its models (docs/cold-start.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aws_lambda_powertools.event_handler.api_gateway import Router

    ROUTERS: tuple[Router, ...]
    PKI_ROUTERS: tuple[Router, ...]


def __getattr__(name: str) -> tuple[Router, ...]:
    if name == "ROUTERS":
        from fleetkey.api.admin.allowlist import router as allowlist_router
        from fleetkey.api.admin.cas import router as cas_router
        from fleetkey.api.admin.data_keys import router as data_keys_router
        from fleetkey.api.admin.devices import router as devices_router
        from fleetkey.api.admin.firmware import router as firmware_router
        from fleetkey.api.admin.lifecycle import router as lifecycle_router
        from fleetkey.api.admin.rotation import router as rotation_router
        from fleetkey.api.admin.signing_keys import router as signing_keys_router
        from fleetkey.api.admin.tokens import router as tokens_router

        routers: tuple[Router, ...] = (
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
    elif name == "PKI_ROUTERS":
        # Served by the rotation function (`/v1/admin/pki/*`): the only role that may use the
        # CA's key.
        from fleetkey.api.admin.pki import router as pki_router

        routers = (pki_router,)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = routers  # read once: the same routers on every later read
    return routers
