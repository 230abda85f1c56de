"""Manufacturer CA registration and disabling: one name per CA, AWS IoT and fleetkey agree."""

import pytest

from fleetkey.errors import Conflict, InvalidCertificate, InvalidRequest
from fleetkey_local.iot import certificate_id
from fleetkey_local.pki import CertificateAuthority, pem
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca


def iot_status(stack, ca_id):
    return stack.harness_iot.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]["status"]


def test_one_ca_cannot_take_two_names(stack):
    # Given a CA registered as acme
    acme = cached_ca("acme")
    stack.register_ca(acme, name="acme")
    # When the same CA is registered under another name
    with pytest.raises(Conflict):
        stack.register_ca(acme, name="zz-acme")
    # Then there is one trust anchor for it
    assert [ca.name for ca in stack.cas.list()] == ["acme"]


def test_reserved_and_invalid_names(stack):
    with pytest.raises(InvalidRequest):
        stack.register_ca(cached_ca("acme"), name="registration-code")
    with pytest.raises(InvalidRequest):
        stack.register_ca(cached_ca("acme"), name="Acme Inc")


def test_a_ca_whose_devices_jitr_would_refuse_is_refused_at_registration(stack):
    # Given a CA with an RSA-1024 key (the device verifier refuses every certificate it issues)
    weak = CertificateAuthority.create("weak", key_kind="rsa:1024")
    # When / Then it cannot be registered, and AWS IoT never hears of it
    with pytest.raises(InvalidCertificate):
        stack.register_ca(weak)
    assert stack.cas.list() == []


@pytest.mark.parametrize("after", [False, True], ids=["fail-before-call", "fail-after-call"])
def test_registration_converges_after_a_failure_at_any_call(stack, after):
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    faults = FaultInjector().watch(*stack.service_clients())

    def register(name, authority):
        proof = pem(authority.verification_certificate(code))
        return stack.cas.register(name, authority.pem, proof, actor="op")

    faults.arm(None)
    register("clean", CertificateAuthority.create("clean"))
    clean_calls = list(faults.calls)
    for k in range(1, len(clean_calls) + 1):
        # Given a failure at the k-th call of registering a new CA
        authority, name = CertificateAuthority.create(f"ca{k}"), f"ca-{k}"
        faults.arm(k, after=after)
        with pytest.raises(Exception):
            register(name, authority)
        assert faults.fired == clean_calls[k - 1]
        faults.arm(None)
        # Then AWS IoT auto-registers for it only if fleetkey recorded it
        recorded = stack.store.get_ca(name)
        ca_id = certificate_id(authority.pem)
        if recorded is None and ca_exists(stack, ca_id):
            assert iot_status(stack, ca_id) == "INACTIVE"
        # When it is retried, it converges: recorded, active in both, one audit record
        ca = register(name, authority)
        assert ca.status.value == "ACTIVE" and iot_status(stack, ca.iot_ca_id) == "ACTIVE"
        records, _ = stack.devices.audit(f"ca:{name}")
        assert [r.action for r in records] == ["ca_registered"]


def ca_exists(stack, ca_id):
    try:
        stack.harness_iot.describe_ca_certificate(certificateId=ca_id)
    except stack.harness_iot.exceptions.ResourceNotFoundException:
        return False
    return True


def test_disable_and_enable_keep_aws_iot_in_step(stack):
    # Given a registered CA
    ca = stack.register_ca(cached_ca("acme"))
    # When it is disabled, disabled again, and enabled
    stack.cas.set_enabled("acme", False, actor="op")
    assert iot_status(stack, ca.iot_ca_id) == "INACTIVE"
    stack.cas.set_enabled("acme", False, actor="op")
    stack.cas.set_enabled("acme", True, actor="op")
    # Then AWS IoT follows, and the trail has one record per change
    assert iot_status(stack, ca.iot_ca_id) == "ACTIVE"
    records, _ = stack.devices.audit("ca:acme")
    assert [r.action for r in records] == ["ca_registered", "ca_disabled", "ca_enabled"]
