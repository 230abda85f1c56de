"""The just-in-time registration decision: may this validated certificate become this device's?"""

from __future__ import annotations

from fleetkey.crypto.certificates import DeviceCertificate
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import Device, ManufacturerCa
from fleetkey.domain.profiles import KeyPolicy, get_profile
from fleetkey.domain.rejection import RejectionReason

# Before the device (and so its profile) is known, no profile may accept less than this.
BASELINE_KEY_POLICY = KeyPolicy()


def refusal_for(
    device: Device, certificate: DeviceCertificate, ca: ManufacturerCa
) -> RejectionReason | None:
    """Why `certificate` (already chain-validated against `ca`) may not register as `device`,
    or None when it may. The order puts the most telling reason first; DECOMMISSIONED comes
    last, as it is not a refusal for cause (JITR sets such a certificate aside, see
    `RegistrationService`)."""
    # A recommissioned device re-onboards with the factory certificate fleetkey knows it by:
    # another one (even of its manufacturer, with its CN and serial) is a cloned identity.
    if (
        device.epoch > 1
        and device.factory_certificate_id is not None
        and certificate.certificate_id != device.factory_certificate_id
    ):
        return RejectionReason.CLONE_SUSPECTED
    # A second certificate for a device that already has one: a cloned identity until an
    # operator says otherwise (rotation goes through its own API, not through JITR).
    if (
        device.state in (DeviceState.ACTIVE, DeviceState.SUSPENDED)
        and device.holds(certificate.certificate_id) is None
    ):
        return RejectionReason.CLONE_SUSPECTED
    if device.manufacturer_ca != ca.name:
        return RejectionReason.WRONG_ISSUER
    if certificate.serial_number is None:
        # Checked when present; required only where the profile says so (pumps).
        if get_profile(device.profile).require_subject_serial:
            return RejectionReason.SERIAL_MISMATCH
    elif certificate.serial_number != device.serial_number:
        return RejectionReason.SERIAL_MISMATCH
    if (
        device.public_key_fingerprint is not None
        and device.public_key_fingerprint != certificate.public_key_fingerprint
    ):
        return RejectionReason.UNEXPECTED_PUBLIC_KEY
    if not get_profile(device.profile).key_policy.allows(certificate.key_description):
        return RejectionReason.WEAK_KEY
    # Last: a certificate refused for any reason above is refused for cause; one that would be
    # acceptable is only set aside (not burnt) while its device is decommissioned.
    if device.state is DeviceState.DECOMMISSIONED:
        return RejectionReason.DECOMMISSIONED
    return None
