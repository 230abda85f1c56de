"""The device lifecycle an operator drives: suspend, resume, decommission, recommission. The
rules (which state may go where, what happens in AWS IoT) are LifecycleService's, and so are the
metrics (DevicesSuspended, ..., OwnershipTransfers): the composition root counts each committed
change once, whichever function made it, so these routes add none."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Body

from fleetkey.api.common import DeviceIdSegment, caller, components, new_router, responses
from fleetkey.api.models import (
    DecommissionRequest,
    DeviceView,
    RecommissionRequest,
    ResumeRequest,
    SuspendRequest,
)

router = new_router()
TAGS = ["lifecycle"]


def _actor() -> str:
    return caller(router.current_event)


@router.post(
    "/devices/<device_id>/suspend",
    summary="Suspend a device",
    description="Its certificates become INACTIVE in AWS IoT, its MQTT connection is closed and "
    "the tokens issued so far become inactive.",
    operation_id="suspendDevice",
    tags=TAGS,
    responses=responses(200, "The suspended device", 404, 409),
)
def suspend_device(
    device_id: DeviceIdSegment, request: Annotated[SuspendRequest, Body()]
) -> DeviceView:
    device = components().lifecycle.suspend(device_id, reason=request.reason, actor=_actor())
    return DeviceView.model_validate(device.to_public())


@router.post(
    "/devices/<device_id>/resume",
    summary="Resume a suspended device",
    description="Its certificates become ACTIVE again. The body is empty or `{}`.",
    operation_id="resumeDevice",
    tags=TAGS,
    responses=responses(200, "The active device", 404, 409),
)
def resume_device(
    device_id: DeviceIdSegment, request: Annotated[ResumeRequest | None, Body()] = None
) -> DeviceView:
    device = components().lifecycle.resume(device_id, actor=_actor())
    return DeviceView.model_validate(device.to_public())


@router.post(
    "/devices/<device_id>/decommission",
    summary="Decommission a device",
    description="The device is DECOMMISSIONED at once (nothing is granted to it from then on); "
    "its removal from AWS IoT (reset command, disconnection, certificates and thing deleted, "
    "data key destroyed) follows asynchronously: `teardown.status` says when it is complete.",
    operation_id="decommissionDevice",
    tags=TAGS,
    status_code=202,
    responses=responses(202, "The decommissioned device, its teardown pending", 404, 409),
)
def decommission_device(
    device_id: DeviceIdSegment, request: Annotated[DecommissionRequest, Body()]
) -> DeviceView:
    device = components().lifecycle.decommission(device_id, reason=request.reason, actor=_actor())
    return DeviceView.model_validate(device.to_public())


@router.post(
    "/devices/<device_id>/recommission",
    summary="Recommission a decommissioned device",
    description="Once its teardown is complete, the device is ALLOWLISTED again in its next "
    "epoch, optionally for a new owner or profile, and re-onboards with its factory certificate. "
    "A recommission that names an owner is an ownership transfer. The body may be empty.",
    operation_id="recommissionDevice",
    tags=TAGS,
    responses=responses(200, "The allow-listed device", 404, 409),
)
def recommission_device(
    device_id: DeviceIdSegment, request: Annotated[RecommissionRequest | None, Body()] = None
) -> DeviceView:
    request = request or RecommissionRequest()
    device = components().lifecycle.recommission(
        device_id, actor=_actor(), owner=request.owner, profile=request.profile
    )
    return DeviceView.model_validate(device.to_public())
