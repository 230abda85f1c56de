"""Certificate rotation as time: when a device's certificate is due for renewal, and when the next
thing about its certificates falls due (a pending rotation's deadline, a retired certificate's
deletion). The device repository writes those moments into two sparse indexes with every change
(`due` and `renewal`), so the scheduled sweep reads only devices with something due: its cost
follows the number of due certificates, never the size of the fleet.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime

from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import CertificateOrigin, CertificateRole, Device, HeldCertificate
from fleetkey.domain.profiles import get_profile

# Renewal is asked for at two thirds of a certificate's lifetime, spread by up to 1/15 of the
# lifetime either way so that certificates issued together are not renewed together.
RENEWAL_FRACTION = 2 / 3
JITTER_FRACTION = 1 / 15
# A device that was asked to renew and did not is asked again this long after.
RENEWAL_RETRY_SECONDS = 6 * 3600
# The `due` index spreads its items over this many partition keys (a sweep queries each).
DUE_SHARDS = 8


def epoch_of(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


def key_fingerprint(public_key_pem: str) -> str:
    """SHA-256 (hex) of the SubjectPublicKeyInfo a PEM public key holds (its base64 body)."""
    body = "".join(
        line for line in public_key_pem.strip().splitlines() if not line.startswith("-----")
    )
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:  # not PEM: it can match no key a CSR carries
        der = public_key_pem.encode()
    return hashlib.sha256(der).hexdigest()


def renewal_time(certificate: HeldCertificate, *, replace_factory: bool) -> int:
    """When fleetkey asks the device to renew `certificate` (epoch seconds).

    A factory certificate the profile replaces is due at once: its key may have been copied
    anywhere between the factory's test rig and the field. Otherwise two thirds of its lifetime,
    with a jitter derived from the certificate id (the same every time it is computed).
    """
    if certificate.origin is CertificateOrigin.FACTORY and replace_factory:
        return 0
    not_after = certificate.not_after_epoch()
    not_before = epoch_of(certificate.not_before) if certificate.not_before else None
    if not_before is None or not_before >= not_after:
        return not_after - 30 * 86400
    lifetime = not_after - not_before
    spread = int(lifetime * JITTER_FRACTION)
    jitter = int(certificate.certificate_id[:8], 16) % (2 * spread + 1) - spread if spread else 0
    return not_before + int(lifetime * RENEWAL_FRACTION) + jitter


def renewal_due_at(device: Device) -> int | None:
    """When the current certificate is next due for a renewal request, or None (no current
    certificate, or a rotation is pending)."""
    current = device.current_certificate
    if current is None or device.pending_certificate is not None:
        return None
    if current.renewal_requested_at is not None:
        due = epoch_of(current.renewal_requested_at) + RENEWAL_RETRY_SECONDS
    else:
        due = renewal_time(current, replace_factory=get_profile(device.profile).replace_factory)
    if device.rotation_held_until is not None:  # no rotation may start before
        due = max(due, epoch_of(device.rotation_held_until))
    return due


def next_deadline(device: Device) -> int | None:
    """The next deadline of `device`'s certificates (epoch seconds): its pending rotation's (a
    rollback) or a retired certificate's deletion; None when there is none, or the device is
    neither ACTIVE nor SUSPENDED (a decommissioned device's certificates go with its teardown)."""
    if device.state not in (DeviceState.ACTIVE, DeviceState.SUSPENDED):
        return None
    moments: list[int] = []
    for certificate in device.certificates:
        if certificate.role is CertificateRole.PENDING and certificate.commit_deadline:
            moments.append(epoch_of(certificate.commit_deadline))
        elif certificate.role is CertificateRole.RETIRED and certificate.delete_after:
            moments.append(epoch_of(certificate.delete_after))
    return min(moments) if moments else None


def next_renewal(device: Device) -> int | None:
    """When an ACTIVE device is next asked to renew (a suspended one is not asked), or None."""
    return renewal_due_at(device) if device.state is DeviceState.ACTIVE else None


def due_shard(device_id: str) -> str:
    """A device's partition in the sparse indexes (stable, spread evenly by a hash of its id)."""
    return f"DUE#{int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16) % DUE_SHARDS}"


def all_due_shards() -> list[str]:
    return [f"DUE#{n}" for n in range(DUE_SHARDS)]
