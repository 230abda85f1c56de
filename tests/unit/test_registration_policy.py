"""The just-in-time registration decision (refusal_for): each refusal, acceptance, precedence."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from fleetkey.crypto.certificates import DeviceCertificate
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import (
    CaStatus,
    CertificateOrigin,
    CertificateRole,
    Device,
    HeldCertificate,
    ManufacturerCa,
)
from fleetkey.domain.registration import refusal_for
from fleetkey.domain.rejection import RejectionReason as R
from fleetkey.errors import InvalidRequest

CERT_ID = "c" * 64
KEY_FP = "f" * 64
START = datetime(2025, 1, 1, tzinfo=UTC)

DEVICE = Device(
    device_id="pump-0001",
    serial_number="SN-0001",
    manufacturer_ca="acme",
    profile="telemetry-sensor",
    state=DeviceState.ALLOWLISTED,
    audit_head=ChainHead(1, "a" * 64),
    public_key_fingerprint=KEY_FP,
)
CERT = DeviceCertificate(
    certificate_id=CERT_ID,
    device_id="pump-0001",
    serial_number="SN-0001",
    public_key_fingerprint=KEY_FP,
    not_before=START,
    not_after=START + timedelta(days=365),
    key_description="ec:secp256r1",
    public_key_pem="-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
)
CA = ManufacturerCa(
    name="acme",
    iot_ca_id="9" * 64,
    certificate_pem="-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
    status=CaStatus.ACTIVE,
    audit_head=ChainHead(1, "b" * 64),
)


# A device that is already registered, with CERT as its certificate.
def held(certificate_id: str) -> tuple[HeldCertificate, ...]:
    return (
        HeldCertificate(
            certificate_id=certificate_id,
            role=CertificateRole.CURRENT,
            origin=CertificateOrigin.FACTORY,
            public_key_pem=CERT.public_key_pem,
            key=CERT.key_description,
            not_after=CERT.not_after.isoformat(),
        ),
    )


REGISTERED = replace(DEVICE, state=DeviceState.ACTIVE, certificates=held(CERT_ID))
OTHER_CERT = replace(CERT, certificate_id="d" * 64)


def test_allowlisted_device_with_matching_certificate_is_accepted():
    # Given an allow-listed device and a certificate that matches it in every respect
    # When / Then
    assert refusal_for(DEVICE, CERT, CA) is None


def test_device_without_expected_key_accepts_any_allowed_key():
    # Given an entry with no public-key fingerprint
    device = replace(DEVICE, public_key_fingerprint=None)

    # When / Then
    assert refusal_for(device, replace(CERT, public_key_fingerprint="e" * 64), CA) is None


def test_certificate_without_serial_is_not_checked_against_the_device_serial():
    # Given a certificate with no subject serialNumber, for a profile that does not require one
    # When / Then: nothing to compare
    assert refusal_for(DEVICE, replace(CERT, serial_number=None), CA) is None


def test_a_pump_certificate_without_a_subject_serial_is_refused():
    # Given a pump (its profile requires the subject serialNumber) and a factory certificate
    # without one
    pump = replace(DEVICE, profile="infusion-pump")

    # When / Then: it cannot be tied to the entry's serial
    assert refusal_for(pump, replace(CERT, serial_number=None), CA) is R.SERIAL_MISMATCH
    assert refusal_for(pump, CERT, CA) is None


@pytest.mark.parametrize("state", [DeviceState.ACTIVE, DeviceState.SUSPENDED])
def test_same_certificate_again_is_accepted(state):
    # Given a device registered with this very certificate (e.g. the JITR event delivered twice)
    device = replace(REGISTERED, state=state)

    # When / Then: not a clone
    assert refusal_for(device, CERT, CA) is None


def test_decommissioned_device_is_refused():
    device = replace(DEVICE, state=DeviceState.DECOMMISSIONED)
    assert refusal_for(device, CERT, CA) is R.DECOMMISSIONED


@pytest.mark.parametrize("state", [DeviceState.ACTIVE, DeviceState.SUSPENDED])
def test_second_certificate_for_a_registered_device_is_a_suspected_clone(state):
    # Given a registered (or suspended) device and another certificate presenting its identity
    device = replace(REGISTERED, state=state)

    # When / Then
    assert refusal_for(device, OTHER_CERT, CA) is R.CLONE_SUSPECTED


def test_certificate_from_another_manufacturer_ca_is_refused():
    other_ca = replace(CA, name="globex")
    assert refusal_for(DEVICE, CERT, other_ca) is R.WRONG_ISSUER


def test_serial_mismatch_is_refused():
    assert refusal_for(DEVICE, replace(CERT, serial_number="SN-9999"), CA) is R.SERIAL_MISMATCH


def test_unexpected_public_key_is_refused():
    cert = replace(CERT, public_key_fingerprint="e" * 64)
    assert refusal_for(DEVICE, cert, CA) is R.UNEXPECTED_PUBLIC_KEY


@pytest.mark.parametrize(
    "profile, key, expected",
    [
        ("telemetry-sensor", "ec:secp256r1", None),
        ("telemetry-sensor", "ec:secp384r1", None),
        ("telemetry-sensor", "rsa:2048", None),
        ("telemetry-sensor", "rsa:4096", None),
        ("telemetry-sensor", "rsa:1024", R.WEAK_KEY),
        ("telemetry-sensor", "ec:secp521r1", R.WEAK_KEY),
        ("telemetry-sensor", "ec:secp256k1", R.WEAK_KEY),
        ("infusion-pump", "ec:secp256r1", None),
        ("infusion-pump", "rsa:2048", R.WEAK_KEY),
        ("infusion-pump", "rsa:4096", R.WEAK_KEY),
    ],
)
def test_key_must_satisfy_the_device_profile(profile, key, expected):
    # Given a device of a profile and a certificate with a given key
    device = replace(DEVICE, profile=profile)

    # When / Then
    assert refusal_for(device, replace(CERT, key_description=key), CA) is expected


def test_key_of_an_unknown_kind_is_refused():
    # Given a certificate with a key the profile's policy does not describe at all
    cert = replace(CERT, key_description="other:Ed25519PublicKey")

    # When / Then
    assert refusal_for(DEVICE, cert, CA) is R.WEAK_KEY


def test_device_with_an_unknown_profile_raises():
    # Given a stored device whose profile no longer exists (current behaviour: an error)
    device = replace(DEVICE, profile="retired-profile")

    # When / Then
    with pytest.raises(InvalidRequest):
        refusal_for(device, CERT, CA)


# --- precedence: the most telling reason first ----------------------------------------------------

EVERYTHING_WRONG = replace(
    OTHER_CERT, serial_number="SN-9999", public_key_fingerprint="e" * 64, key_description="rsa:1024"
)
OTHER_CA = replace(CA, name="globex")


def test_decommissioned_comes_after_every_refusal_for_cause():
    # Given a decommissioned device that had a certificate
    device = replace(REGISTERED, state=DeviceState.DECOMMISSIONED)

    # When a certificate wrong in every way claims it, Then it is refused for cause (burnt)
    assert refusal_for(device, EVERYTHING_WRONG, OTHER_CA) is R.WRONG_ISSUER
    # and one that would be acceptable is only set aside (decommissioned, not for cause)
    assert refusal_for(device, CERT, CA) is R.DECOMMISSIONED


def test_clone_comes_before_issuer_serial_key_and_strength():
    assert refusal_for(REGISTERED, EVERYTHING_WRONG, OTHER_CA) is R.CLONE_SUSPECTED


def test_wrong_issuer_comes_before_serial_key_and_strength():
    assert refusal_for(DEVICE, EVERYTHING_WRONG, OTHER_CA) is R.WRONG_ISSUER


def test_serial_mismatch_comes_before_key_and_strength():
    assert refusal_for(DEVICE, EVERYTHING_WRONG, CA) is R.SERIAL_MISMATCH


def test_unexpected_key_comes_before_strength():
    cert = replace(EVERYTHING_WRONG, serial_number="SN-0001")
    assert refusal_for(DEVICE, cert, CA) is R.UNEXPECTED_PUBLIC_KEY


def test_weak_key_is_the_last_check():
    cert = replace(CERT, key_description="rsa:1024")
    assert refusal_for(DEVICE, cert, CA) is R.WEAK_KEY


def test_allowlisted_device_is_never_a_clone():
    # Given an allow-listed device that (unusually) still records an old certificate id
    device = replace(DEVICE, certificates=held("0" * 64))

    # When / Then: only registered devices are protected against a second certificate
    assert refusal_for(device, CERT, CA) is None


def test_disabled_ca_is_not_judged_here():
    # Given a disabled CA (checked by the trust-anchor lookup before this decision)
    # When / Then: refusal_for only compares names
    assert refusal_for(DEVICE, CERT, replace(CA, status=CaStatus.DISABLED)) is None
