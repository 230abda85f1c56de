"""Device profiles: the least-privilege IoT policy each one gets, and profile lookup."""

import json

import pytest

from fleetkey.domain.profiles import (
    PROFILES,
    THING_VARIABLE,
    KeyPolicy,
    get_profile,
    thing_type_names,
)
from fleetkey.domain.registration import BASELINE_KEY_POLICY
from fleetkey.errors import InvalidRequest

ARN = "arn:aws:iot:eu-west-1:123456789012"
OWN = f"fleetkey/{THING_VARIABLE}"
ALL_PROFILES = pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))


def as_list(value):
    return value if isinstance(value, list) else [value]


def statements_for(document, action):
    return [s for s in document["Statement"] if action in as_list(s["Action"])]


def resources_for(document, action):
    return [r for s in statements_for(document, action) for r in as_list(s["Resource"])]


def test_thing_variable_is_the_iot_policy_variable():
    assert THING_VARIABLE == "${iot:Connection.Thing.ThingName}"


@ALL_PROFILES
def test_policy_document_is_valid_json_with_the_current_version(profile):
    # Given / When
    document = profile.iot_policy_document(ARN)

    # Then it serialises (CloudFormation/IoT take it as JSON) and uses the 2012-10-17 grammar
    assert json.loads(json.dumps(document)) == document
    assert document["Version"] == "2012-10-17"
    assert all(s["Effect"] == "Allow" for s in document["Statement"])


@ALL_PROFILES
def test_connect_is_only_as_the_own_thing_while_attached(profile):
    # Given a profile's policy
    document = profile.iot_policy_document(ARN)

    # When the Connect statements are read
    (statement,) = statements_for(document, "iot:Connect")

    # Then the client id must be the thing name, and the certificate attached to that thing
    assert as_list(statement["Resource"]) == [f"{ARN}:client/{THING_VARIABLE}"]
    assert statement["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}


@ALL_PROFILES
def test_no_statement_uses_wildcard_actions_or_resources(profile):
    # Given a profile's policy
    document = profile.iot_policy_document(ARN)

    # When / Then: no action or resource grants everything
    for statement in document["Statement"]:
        for action in as_list(statement["Action"]):
            assert "*" not in action, action
        for resource in as_list(statement["Resource"]):
            assert resource not in ("*", f"{ARN}:*")
            assert resource.startswith(f"{ARN}:"), resource
            # the only wildcard allowed is a trailing one under the device's own topic tree
            assert "*" not in resource or resource.startswith(
                (f"{ARN}:topic/{OWN}/", f"{ARN}:topicfilter/{OWN}/")
            ), resource


@ALL_PROFILES
def test_only_the_four_device_actions_are_granted(profile):
    # Given / When
    document = profile.iot_policy_document(ARN)
    actions = {a for s in document["Statement"] for a in as_list(s["Action"])}

    # Then no shadow, job, retain or admin action slips in
    assert actions == {"iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"}


@ALL_PROFILES
def test_publish_only_to_own_events_and_telemetry(profile):
    # Given / When
    resources = resources_for(profile.iot_policy_document(ARN), "iot:Publish")

    # Then
    assert sorted(resources) == sorted(
        [f"{ARN}:topic/{OWN}/events/*", f"{ARN}:topic/{OWN}/telemetry/*"]
    )


@ALL_PROFILES
def test_subscribe_and_receive_only_own_commands(profile):
    # Given / When
    document = profile.iot_policy_document(ARN)

    # Then subscription filters and received topics are the device's own command topics
    assert resources_for(document, "iot:Subscribe") == [f"{ARN}:topicfilter/{OWN}/commands/*"]
    assert resources_for(document, "iot:Receive") == [f"{ARN}:topic/{OWN}/commands/*"]


@ALL_PROFILES
def test_policy_follows_the_partition_and_region_of_the_arn_prefix(profile):
    # Given another partition
    arn = "arn:aws-cn:iot:cn-north-1:123456789012"

    # When / Then: every resource is in it
    document = profile.iot_policy_document(arn)
    assert all(
        r.startswith(f"{arn}:") for s in document["Statement"] for r in as_list(s["Resource"])
    )


@ALL_PROFILES
def test_profile_key_policy_is_never_weaker_than_the_baseline(profile):
    # Given the baseline every certificate is checked against before its device is known
    # When / Then: a profile may only narrow it
    policy = profile.key_policy
    assert policy.ec_curves <= BASELINE_KEY_POLICY.ec_curves
    assert policy.rsa_min_bits is None or policy.rsa_min_bits >= BASELINE_KEY_POLICY.rsa_min_bits


def test_baseline_key_policy():
    assert KeyPolicy() == BASELINE_KEY_POLICY
    assert BASELINE_KEY_POLICY.ec_curves == {"secp256r1", "secp384r1"}
    assert BASELINE_KEY_POLICY.rsa_min_bits == 2048


def test_infusion_pump_profile_is_stricter():
    # Given / When
    pump = get_profile("infusion-pump")

    # Then EC keys only, attested, short-lived tokens and certificates
    assert pump.key_policy.rsa_min_bits is None
    assert pump.token_rules.require_attestation is True
    assert pump.token_rules.lifetime_seconds == 300
    assert pump.certificate_validity_days == 180


@pytest.mark.parametrize("name", list(PROFILES))
def test_get_profile_returns_the_named_profile(name):
    assert get_profile(name) is PROFILES[name]
    assert get_profile(name).name == name


def test_profile_resource_names_carry_the_prefix():
    profile = get_profile("telemetry-sensor")
    assert profile.iot_policy_name("fk-prod") == "fk-prod-telemetry-sensor"
    assert profile.thing_type_name("fk-prod") == "fk-prod-telemetry-sensor"


@pytest.mark.parametrize("name", ["toaster", "", "Telemetry-Sensor", "telemetry-sensor "])
def test_get_profile_unknown_raises_invalid_request(name):
    # Given a name that is not a defined profile
    # When / Then: a 400 that lists the known profiles
    with pytest.raises(InvalidRequest) as caught:
        get_profile(name)
    assert caught.value.status == 400
    assert caught.value.details == {"profiles": sorted(PROFILES)}


def test_the_thing_types_fleetkey_owns_are_its_profiles_with_the_prefix():
    # Given the deployment's name prefix
    # When / Then: a thing of one of these types is fleetkey's to take over, no other
    assert thing_type_names("fleetkey") == frozenset(
        {"fleetkey-telemetry-sensor", "fleetkey-infusion-pump"}
    )
    assert thing_type_names("other") & thing_type_names("fleetkey") == frozenset()


def test_only_pumps_require_the_subject_serial_number():
    # Given the profiles / Then pumps (whose factory certificates carry the hardware serial)
    # require it, other profiles check it when present
    assert {name for name, p in PROFILES.items() if p.require_subject_serial} == {"infusion-pump"}
