"""Allow-list entries: one at a time, or a factory manifest (CSV or JSON) in bulk."""

from __future__ import annotations

from typing import Annotated, Literal

from aws_lambda_powertools.event_handler.openapi.params import Body, Query
from aws_lambda_powertools.metrics import MetricUnit

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.api.models import DeviceView, ImportReportView
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.errors import InvalidRequest
from fleetkey.observability import metrics

router = new_router()
TAGS = ["allowlist"]

# The manifest is read as sent (CSV or JSON), not by a model: Powertools documents a request body
# only for a Body() parameter, so the route declares it itself.
MANIFEST_BODY = {
    "required": True,
    "description": "A factory manifest, at most 10,000 rows. CSV: a header naming device_id, "
    "serial_number, manufacturer_ca, public_key_fingerprint, profile and optional "
    'attribute.<name> columns. JSON: a list of allow-list entries, or {"devices": [...]}.',
    "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/json": {
            "schema": {
                "anyOf": [
                    {"type": "array", "items": {"$ref": "#/components/schemas/AllowlistEntry"}},
                    {
                        "type": "object",
                        "properties": {
                            "devices": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/AllowlistEntry"},
                            }
                        },
                        "required": ["devices"],
                    },
                ]
            }
        },
    },
}


def _actor() -> str:
    return caller(router.current_event)


@router.post(
    "/allowlist",
    summary="Allow-list a device",
    description="Adding the same entry again converges; a different entry under an allow-listed "
    "id is a conflict.",
    operation_id="addAllowlistEntry",
    tags=TAGS,
    status_code=201,
    responses=responses(201, "The allow-listed device", 409),
)
def add_allowlist_entry(entry: Annotated[AllowlistEntry, Body()]) -> DeviceView:
    device = components().allowlist.add(entry, actor=_actor())
    return DeviceView.model_validate(device.to_public())


@router.post(
    "/allowlist/import",
    summary="Import a factory manifest",
    description="Valid rows are allow-listed; each refused row is reported with its reason. "
    "Re-running an import converges. The format is the `format` parameter, else text/csv if the "
    "content type says CSV, else JSON.",
    operation_id="importManifest",
    tags=TAGS,
    responses=responses(200, "What was imported and what was refused, row by row"),
    openapi_extensions={"requestBody": MANIFEST_BODY},
)
def import_manifest(
    fmt: Annotated[
        Literal["csv", "json"] | None, Query(alias="format", description="csv or json")
    ] = None,
) -> ImportReportView:
    event = router.current_event
    content_type = (event.headers.get("content-type") or "").lower()
    chosen = fmt or ("csv" if "csv" in content_type else "json")
    try:
        text = event.decoded_body or ""
    except UnicodeDecodeError:
        raise InvalidRequest("manifest must be UTF-8 text") from None
    report = components().allowlist.import_manifest(text, chosen, actor=_actor())
    metrics.add_metric(name="AllowlistRowsImported", unit=MetricUnit.Count, value=report.imported)
    metrics.add_metric(
        name="AllowlistRowsRejected", unit=MetricUnit.Count, value=len(report.rejected)
    )
    return ImportReportView.model_validate(report.to_public())
