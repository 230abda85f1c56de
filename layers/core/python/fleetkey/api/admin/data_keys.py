"""Device data keys as an IAM-authenticated backend gets them: wrapped by KMS, for the backend
to decrypt with its own kms:Decrypt (the device gets its key sealed to its certificate key, on
the device-facing route)."""

from __future__ import annotations

from aws_lambda_powertools.metrics import MetricUnit

from fleetkey.api.common import DeviceIdSegment, caller, components, new_router, responses
from fleetkey.api.models import DataKeyView
from fleetkey.observability import metrics

router = new_router()
TAGS = ["data keys"]


@router.get(
    "/devices/<device_id>/data-key",
    summary="Read a device's data key, wrapped by KMS",
    description="Decrypt `ciphertext_blob` with kms:Decrypt and exactly `encryption_context`.",
    operation_id="getDeviceDataKey",
    tags=TAGS,
    responses=responses(200, "The KMS-wrapped data key", 404, 409),
)
def device_data_key(device_id: DeviceIdSegment) -> DataKeyView:
    key = components().data_keys.for_backend(device_id, actor=caller(router.current_event))
    metrics.add_metric(name="DataKeysIssued", unit=MetricUnit.Count, value=1)
    return DataKeyView.model_validate(key)
