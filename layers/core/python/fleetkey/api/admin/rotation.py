"""A device's certificates as rotation sees them: current, pending (with its deadline), retired,
and when it is next asked to renew."""

from __future__ import annotations

from fleetkey.api.common import DeviceIdSegment, components, new_router, responses
from fleetkey.api.models import RotationStatusView

router = new_router()
TAGS = ["rotation"]


@router.get(
    "/devices/<device_id>/rotation",
    summary="Read a device's rotation status",
    operation_id="getRotationStatus",
    tags=TAGS,
    responses=responses(200, "The device's certificates and its next renewal", 404),
)
def rotation_status(device_id: DeviceIdSegment) -> RotationStatusView:
    return RotationStatusView.model_validate(components().rotation.status(device_id))
