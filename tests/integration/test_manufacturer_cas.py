"""Manufacturer CA registration and disabling: one name per CA, AWS IoT and fleetkey agree."""

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import Conflict, InvalidCertificate, InvalidRequest
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.iot import certificate_id
from fleetkey_local.pki import CertificateAuthority, pem
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca

# What an injected fault surfaces as: the ClientError before a call, the timeout after it.
INJECTED = (ClientError, BotoCoreError)


def iot_status(stack, ca_id):
    return stack.harness_iot.describe_ca_certificate(certificateId=ca_id)["certificateDescription"][
        "status"
    ]


def iot_state(stack, ca_id):
    described = stack.harness_iot.describe_ca_certificate(certificateId=ca_id)[
        "certificateDescription"
    ]
    return described["status"], described["autoRegistrationStatus"]


@pytest.mark.parametrize("disabled", [False, True], ids=["active", "disabled"])
def test_one_ca_cannot_take_two_names_and_the_refusal_changes_nothing(stack, disabled):
    # Given a CA registered as acme (and perhaps disabled since)
    acme = cached_ca("acme")
    ca_id = stack.register_ca(acme, name="acme").iot_ca_id
    if disabled:
        stack.cas.set_enabled("acme", False, actor="op")
    before = iot_state(stack, ca_id)
    calls = AwsCallCounter().watch(*stack.service_clients())
    # When the same CA is registered under another name
    with pytest.raises(Conflict):
        stack.register_ca(acme, name="zz-acme")
    # Then there is one trust anchor for it, AWS IoT is exactly as it was (JITR still on for an
    # active CA), and the refusal made no AWS IoT call at all
    assert [ca.name for ca in stack.cas.list()] == ["acme"]
    assert (
        iot_state(stack, ca_id)
        == before
        == (("INACTIVE", "DISABLE") if disabled else ("ACTIVE", "ENABLE"))
    )
    assert [c for c in calls.calls if not c.startswith("dynamodb.")] == [], calls.calls
    records, _ = stack.devices.audit("ca:acme")
    assert [r.action for r in records] == ["ca_registered"] + (["ca_disabled"] if disabled else [])


def test_the_local_aws_iot_refuses_a_second_registration_of_a_ca_as_aws_does(stack):
    # Given a CA registered with AWS IoT, active with auto-registration
    acme = cached_ca("acme")
    ca_id = stack.register_ca(acme).iot_ca_id
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    # When it is registered again (inactive)
    with pytest.raises(stack.harness_iot.exceptions.ResourceAlreadyExistsException):
        stack.harness_iot.register_ca_certificate(
            caCertificate=acme.pem,
            verificationCertificate=pem(acme.verification_certificate(code)),
            setAsActive=False,
            allowAutoRegistration=False,
        )
    # Then the registered CA is unchanged
    assert iot_state(stack, ca_id) == ("ACTIVE", "ENABLE")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from tests.support.hostile_x509 import HostileX509

    return HostileX509(tmp_path_factory.mktemp("hostile-cas"))


def test_hostile_ca_certificates_are_refused_before_aws_iot_hears_of_them(stack, hostile):
    cases = hostile.ca_cases()
    assert cases
    calls = AwsCallCounter().watch(*stack.service_clients())
    for case in cases:
        # Given a CA certificate wrong in one way (e.g. an extension that does not decode)
        # When it is registered / Then it is an InvalidCertificate (a 400), never a parser error
        with pytest.raises(InvalidCertificate) as refused:
            stack.cas.register("hostile", case.pem, case.pem, actor="op")
        if case.reason is not None:
            assert refused.value.reason == case.reason.value, case.name
    # And AWS IoT and fleetkey never heard of any of them: refused before any AWS call
    assert calls.calls == []
    assert stack.cas.list() == []


def test_hostile_proofs_of_possession_are_refused_before_aws_iot_hears_of_the_ca(stack, hostile):
    acme = cached_ca("acme")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    calls = AwsCallCounter().watch(*stack.service_clients())
    cases = [case for case in hostile.leaf_cases(acme, common_name=code) if case.reason is not None]
    assert cases
    for case in cases:
        # Given a verification certificate, signed by the CA, wrong in one way (legal oddities,
        # such as a UniversalString CN, are left out: they may be a valid proof)
        # When the CA is registered with it / Then it is refused, with nothing registered
        with pytest.raises(InvalidCertificate) as refused:
            stack.cas.register("acme", acme.pem, case.pem, actor="op")
        assert refused.value.reason is not None, case.name
    # Only reads reached AWS: the CA was never registered with AWS IoT
    reads = {"dynamodb.GetItem", "iot.DescribeCACertificate", "iot.GetRegistrationCode"}
    assert set(calls.calls) <= reads, calls.calls
    assert stack.cas.list() == []


def test_reserved_and_invalid_names(stack):
    with pytest.raises(InvalidRequest):
        stack.register_ca(cached_ca("acme"), name="registration-code")
    with pytest.raises(InvalidRequest):
        stack.register_ca(cached_ca("acme"), name="Acme Inc")


def test_a_ca_whose_devices_jitr_would_refuse_is_refused_at_registration(stack):
    # Given a CA with an RSA-1024 key (the device verifier refuses every certificate it issues)
    weak = CertificateAuthority.create("weak", key_kind="rsa:1024")
    # When / Then it cannot be registered, and AWS IoT never hears of it
    with pytest.raises(InvalidCertificate) as refused:
        stack.register_ca(weak)
    assert refused.value.reason == RejectionReason.WEAK_KEY
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
        with pytest.raises(INJECTED):
            register(name, authority)
        assert faults.fired == clean_calls[k - 1]
        faults.arm(None)
        # Then AWS IoT auto-registers for it only if fleetkey recorded it
        recorded = stack.store.anchors.get(name)
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


def test_a_ca_registered_outside_fleetkey_is_refused_and_left_as_it_was(stack):
    # Given another team registered a CA with AWS IoT themselves, active and auto-registering
    # (their proof of possession is as good as ours: its CN is the account's registration code)
    theirs = CertificateAuthority.create("theirs")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    ca_id = stack.harness_iot.register_ca_certificate(
        caCertificate=theirs.pem,
        verificationCertificate=pem(theirs.verification_certificate(code)),
        setAsActive=True,
        allowAutoRegistration=True,
    )["certificateId"]
    calls = AwsCallCounter().watch(*stack.service_clients())
    # When fleetkey is asked to register the same CA (e.g. with that team's old proof)
    with pytest.raises(Conflict):
        stack.register_ca(theirs, name="theirs")
    # Then fleetkey records nothing (no trust anchor, no claim on the CA id) and writes nothing
    # to AWS IoT: their CA keeps its status and auto-registration
    assert stack.cas.list() == []
    assert stack.store.anchors.claim_for(ca_id) is None
    assert iot_state(stack, ca_id) == ("ACTIVE", "ENABLE")
    assert [c for c in calls.calls if not c.startswith("dynamodb.")] == [
        "iot.DescribeCACertificate"
    ], calls.calls
    assert "dynamodb.TransactWriteItems" not in calls.calls


def test_a_disable_racing_a_repeated_registration_wins_in_aws_iot_too(stack, monkeypatch):
    # Given a registered CA
    acme = cached_ca("acme")
    ca_id = stack.register_ca(acme, name="acme").iot_ca_id
    registry = stack.cas._registry
    apply = registry.set_ca_active
    raced = []

    def disable_first(ca, active):
        # An operator disables the CA after the repeated registration read it as ACTIVE, and
        # before that registration's UpdateCACertificate reaches AWS IoT.
        if not raced:
            raced.append(True)
            stack.cas.set_enabled("acme", False, actor="op")
        apply(ca, active)

    monkeypatch.setattr(registry, "set_ca_active", disable_first)
    # When the same CA is registered again under the same name (a retry, or a second operator)
    ca = stack.register_ca(acme, name="acme")
    # Then the table and AWS IoT agree on the later change: disabled, no auto-registration
    assert ca.status.value == "DISABLED"
    assert stack.store.anchors.get("acme").status.value == "DISABLED"
    assert iot_state(stack, ca_id) == ("INACTIVE", "DISABLE")


def test_a_ca_refused_because_its_name_was_taken_meanwhile_can_be_registered_later(
    stack, monkeypatch
):
    # Given two operators registering two CAs under one name at once: X claims its id and
    # reaches AWS IoT, then Y is recorded under the name before X's record is written
    x_ca, y_ca = cached_ca("acme"), cached_ca("globex")
    registry = stack.cas._registry
    register = registry.register_ca
    raced = []

    def y_first(pem_text, verification_pem, ca_id):
        result = register(pem_text, verification_pem, ca_id)
        if not raced:
            raced.append(True)
            stack.register_ca(y_ca, name="n")
        return result

    monkeypatch.setattr(registry, "register_ca", y_first)
    with pytest.raises(Conflict):
        stack.register_ca(x_ca, name="n")
    monkeypatch.setattr(registry, "register_ca", register)
    x_id = certificate_id(x_ca.pem)
    # (X stays in AWS IoT, inactive and without auto-registration: harmless, and fleetkey's own)
    assert iot_state(stack, x_id) == ("INACTIVE", "DISABLE")

    # When X is registered again under a free name
    ca = stack.register_ca(x_ca, name="m")

    # Then it is recorded and active: the refused attempt's claim did not block it for good
    assert (ca.name, ca.iot_ca_id) == ("m", x_id)
    assert iot_state(stack, x_id) == ("ACTIVE", "ENABLE")
    assert {c.name: c.iot_ca_id for c in stack.cas.list()} == {
        "n": certificate_id(y_ca.pem),
        "m": x_id,
    }
    # And X still cannot take the name Y holds
    with pytest.raises(Conflict):
        stack.register_ca(x_ca, name="n")


def test_a_new_ca_costs_nine_calls_and_registering_it_again_three(stack):
    # Given a CA fleetkey has never seen
    acme = cached_ca("acme")
    code = stack.harness_iot.get_registration_code()["registrationCode"]
    proof = pem(acme.verification_certificate(code))
    calls = AwsCallCounter().watch(*stack.service_clients())
    # When it is registered, and then registered again under the same name
    stack.cas.register("acme", acme.pem, proof, actor="op")
    first = calls.reset()
    stack.cas.register("acme", acme.pem, proof, actor="op")
    again = calls.reset()
    # Then the budgets docs/registration.md states hold ("Manufacturer CAs")
    assert len(first) == 9, first
    assert again == ["dynamodb.GetItem", "iot.UpdateCACertificate", "dynamodb.GetItem"], again
