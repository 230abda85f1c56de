"""Devices and audit trails: read a device, read and verify an audit chain."""

from __future__ import annotations

from fleetkey.api.common import (
    CertificateIdSegment,
    DeviceIdSegment,
    StreamNameSegment,
    components,
    new_router,
    responses,
)
from fleetkey.api.models import AuditTrailView, DeviceView

router = new_router()
TAGS = ["devices"]
AUDIT_TAGS = ["audit"]


def audit_trail(subject: str) -> AuditTrailView:
    """The subject's records, oldest first, once their hash chain verified (a broken chain raises
    AuditChainBroken: a 500, never a trail marked unverified)."""
    records, verification = components().devices.audit(subject)
    return AuditTrailView.model_validate(
        {
            "subject": subject,
            "verified": True,
            "records": [
                {
                    "seq": r.seq,
                    "at": r.at,
                    "action": r.action,
                    "actor": r.actor,
                    "details": r.details,
                    "prev_hash": r.prev_hash,
                    "hash": r.hash,
                }
                for r in records
            ],
            "head": {"seq": verification.head.seq, "hash": verification.head.hash},
        }
    )


@router.get(
    "/devices/<device_id>",
    summary="Read a device",
    operation_id="getDevice",
    tags=TAGS,
    responses=responses(200, "The device", 404),
)
def get_device(device_id: DeviceIdSegment) -> DeviceView:
    return DeviceView.model_validate(components().devices.get(device_id).to_public())


@router.get(
    "/devices/<device_id>/audit",
    summary="Read a device's verified audit trail",
    operation_id="getDeviceAudit",
    tags=AUDIT_TAGS,
    responses=responses(200, "The device's audit records, oldest first", 404),
)
def device_audit(device_id: DeviceIdSegment) -> AuditTrailView:
    return audit_trail(f"device:{device_id}")


@router.get(
    "/certificates/<certificate_id>/audit",
    summary="Read a certificate's verified audit trail",
    operation_id="getCertificateAudit",
    tags=AUDIT_TAGS,
    responses=responses(200, "The certificate's audit records, oldest first", 404),
)
def certificate_audit(certificate_id: CertificateIdSegment) -> AuditTrailView:
    return audit_trail(f"certificate:{certificate_id}")


@router.get(
    "/audit-streams/<name>",
    summary="Read an audit stream (events that concern no one device)",
    operation_id="getAuditStream",
    tags=AUDIT_TAGS,
    responses=responses(200, "The stream's audit records, oldest first", 404),
)
def stream_audit(name: StreamNameSegment) -> AuditTrailView:
    return audit_trail(f"stream:{name}")
