"""Firmware releases: the measurements devices of a profile that attest their firmware are
tokens for. Publishing and revoking are the release role's job; each is recorded on the
`firmware-releases` audit stream (`GET /audit-streams/firmware-releases`)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import AfterValidator

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.api.models import (
    FirmwarePublishRequest,
    FirmwareReleaseListView,
    FirmwareReleaseView,
    FirmwareRevokeRequest,
)
from fleetkey.observability import metrics

router = new_router()
TAGS = ["firmware"]

# Decoded once, as the other path parameters; a name no release can have is a 404.
ProfileSegment = Annotated[
    str, AfterValidator(unquote), Path(description="The device profile the release is of")
]
Sha256Segment = Annotated[
    str,
    AfterValidator(unquote),
    Path(description="The image's SHA-256 (64 lowercase hex digits)"),
]


def _actor() -> str:
    return caller(router.current_event)


@router.post(
    "/firmware",
    summary="Publish a firmware release",
    description="Devices of the profile that attest firmware with this measurement and version "
    "get tokens from now on. Publishing the same release again answers it unchanged (200); the "
    "same measurement with another version, or a revoked one, is a conflict.",
    operation_id="publishFirmware",
    tags=TAGS,
    status_code=201,
    responses={
        **responses(201, "The published release", 409),
        200: {"description": "The release, already published the same; nothing changed"},
    },
)
def publish_firmware(
    request: Annotated[FirmwarePublishRequest, Body()],
) -> Response[FirmwareReleaseView]:
    outcome = components().firmware.publish(
        request.profile, request.version, request.sha256, actor=_actor()
    )
    if outcome.changed:
        metrics.add_metric(name="FirmwarePublished", unit=MetricUnit.Count, value=1)
    return Response(
        status_code=201 if outcome.changed else 200,
        content_type=content_types.APPLICATION_JSON,
        body=FirmwareReleaseView.model_validate(outcome.release.to_public()),
    )


@router.get(
    "/firmware",
    summary="List firmware releases",
    operation_id="listFirmware",
    tags=TAGS,
    responses=responses(200, "The releases (published and revoked), by profile"),
)
def list_firmware(
    profile: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Only this profile's releases (default: every profile's)",
        ),
    ] = None,
) -> FirmwareReleaseListView:
    releases = components().firmware.list(profile)
    return FirmwareReleaseListView.model_validate(
        {"releases": [release.to_public() for release in releases]}
    )


@router.get(
    "/firmware/<profile>/<sha256>",
    summary="Read a firmware release",
    operation_id="getFirmware",
    tags=TAGS,
    responses=responses(200, "The release", 404),
)
def get_firmware(profile: ProfileSegment, sha256: Sha256Segment) -> FirmwareReleaseView:
    return FirmwareReleaseView.model_validate(
        components().firmware.get(profile, sha256).to_public()
    )


@router.post(
    "/firmware/<profile>/<sha256>/revoke",
    summary="Revoke a firmware release",
    description="Attestation of this measurement fails from now on, for every device of the "
    "profile; a revoked release is never published again. Revoking it again answers it "
    "unchanged. The body is empty, `{}`, or names the reason.",
    operation_id="revokeFirmware",
    tags=TAGS,
    responses=responses(200, "The revoked release", 404),
)
def revoke_firmware(
    profile: ProfileSegment,
    sha256: Sha256Segment,
    request: Annotated[FirmwareRevokeRequest | None, Body()] = None,
) -> FirmwareReleaseView:
    reason = request.reason if request is not None else None
    outcome = components().firmware.revoke(profile, sha256, reason=reason, actor=_actor())
    if outcome.changed:
        metrics.add_metric(name="FirmwareRevoked", unit=MetricUnit.Count, value=1)
    return FirmwareReleaseView.model_validate(outcome.release.to_public())
