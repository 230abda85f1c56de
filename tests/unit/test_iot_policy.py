"""The AWS IoT policy evaluator of the local IoT Core emulator, against fleetkey's real profile
policies: a device reaches its own topics and nothing else."""

import json

import pytest

from fleetkey.domain.profiles import PROFILES
from fleetkey_local.iot_policy import (
    ConnectionContext,
    PolicyError,
    arn_prefix,
    client_resource,
    evaluate,
    is_allowed,
    topic_filter_resource,
    topic_resource,
)

PREFIX = arn_prefix("eu-west-1", "123456789012")
DEVICE = "well-0001"
OTHER = "well-0002"


@pytest.fixture(params=sorted(PROFILES))
def policy(request):
    return PROFILES[request.param].iot_policy_document(PREFIX)


def attached(client_id=DEVICE):
    """A connection whose certificate is attached to the thing named by its client id."""
    return ConnectionContext(client_id=client_id, thing_name=client_id)


def publish(policy, topic, context=None):
    return is_allowed([policy], "iot:Publish", topic_resource(PREFIX, topic), context or attached())


def subscribe(policy, topic_filter, context=None):
    resource = topic_filter_resource(PREFIX, topic_filter)
    return is_allowed([policy], "iot:Subscribe", resource, context or attached())


def receive(policy, topic, context=None):
    return is_allowed([policy], "iot:Receive", topic_resource(PREFIX, topic), context or attached())


def connect(policy, context):
    return is_allowed([policy], "iot:Connect", client_resource(PREFIX, context.client_id), context)


def test_a_device_connects_with_its_thing_name_only_while_attached(policy):
    # Given the profile policy: the client id must be the thing name of an attached certificate
    assert connect(policy, attached())
    # Not attached to a thing of that name (a cloned certificate with another client id)
    assert not connect(policy, ConnectionContext(client_id=OTHER))
    # The attachment names another thing than the client id: never resolved as attached
    assert not connect(policy, ConnectionContext(client_id=""))


def test_a_device_publishes_its_own_events_and_telemetry_only(policy):
    assert publish(policy, f"fleetkey/{DEVICE}/events/alarm")
    assert publish(policy, f"fleetkey/{DEVICE}/telemetry/pressure/bar")
    assert not publish(policy, f"fleetkey/{OTHER}/events/alarm")
    assert not publish(policy, f"fleetkey/{DEVICE}/commands/rotate")
    assert not publish(policy, f"fleetkey/{DEVICE}/status")
    assert not publish(policy, "$aws/things/well-0001/shadow/update")


def test_a_device_subscribes_to_its_own_commands_only(policy):
    assert subscribe(policy, f"fleetkey/{DEVICE}/commands/rotate")
    assert subscribe(policy, f"fleetkey/{DEVICE}/commands/#")
    assert subscribe(policy, f"fleetkey/{DEVICE}/commands/+")
    # Wildcards reaching beyond its own prefix are literal characters in the resource: denied
    assert not subscribe(policy, "fleetkey/+/commands/rotate")
    assert not subscribe(policy, "fleetkey/#")
    assert not subscribe(policy, "#")
    assert not subscribe(policy, f"fleetkey/{OTHER}/commands/#")
    assert not subscribe(policy, f"fleetkey/{DEVICE}/events/#")


def test_a_device_receives_its_own_commands_only(policy):
    assert receive(policy, f"fleetkey/{DEVICE}/commands/rotate")
    assert not receive(policy, f"fleetkey/{OTHER}/commands/rotate")
    assert not receive(policy, f"fleetkey/{DEVICE}/events/alarm")


def test_nothing_is_allowed_without_an_attached_thing(policy):
    # The thing variables have no value when the certificate is not attached to the client id's
    # thing: every pattern using them matches nothing.
    context = ConnectionContext(client_id=DEVICE)
    assert not publish(policy, f"fleetkey/{DEVICE}/events/alarm", context)
    assert not subscribe(policy, f"fleetkey/{DEVICE}/commands/#", context)
    assert not receive(policy, f"fleetkey/{DEVICE}/commands/rotate", context)


def test_substituted_variables_are_literals_not_wildcards(policy):
    # A thing (and client id) named "*" gets its own topics, not everyone's
    star = attached("*")
    assert connect(policy, star)
    assert publish(policy, "fleetkey/*/events/alarm", star)
    assert not publish(policy, f"fleetkey/{DEVICE}/events/alarm", star)
    assert not subscribe(policy, f"fleetkey/{OTHER}/commands/#", star)


def test_explicit_deny_overrides_any_allow(policy):
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Action": ["iot:Publish"],
                "Resource": (
                    f"{PREFIX}:topic/fleetkey/${{iot:Connection.Thing.ThingName}}/events/debug*"
                ),
            }
        ],
    }
    context = attached()
    decision = evaluate(
        [policy, deny],
        "iot:Publish",
        topic_resource(PREFIX, f"fleetkey/{DEVICE}/events/debug/1"),
        context,
    )
    assert not decision.allowed and decision.reason == "explicit_deny"
    assert is_allowed(
        [policy, deny],
        "iot:Publish",
        topic_resource(PREFIX, f"fleetkey/{DEVICE}/events/alarm"),
        context,
    )


def test_default_deny_and_the_reason():
    decision = evaluate([], "iot:Connect", client_resource(PREFIX, DEVICE), attached())
    assert not decision and decision.reason == "implicit_deny"


def test_actions_match_wildcards_and_any_case_resources_lists_and_question_marks():
    document = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": {
                "Effect": "Allow",
                "Action": "iot:*",
                "Resource": [f"{PREFIX}:topic/a/?", f"{PREFIX}:client/${{iot:ClientId}}"],
            },
        }
    )
    context = ConnectionContext(client_id="any-client")
    assert is_allowed([document], "iot:Publish", topic_resource(PREFIX, "a/b"), context)
    assert is_allowed([document], "IOT:RECEIVE", topic_resource(PREFIX, "a/c"), context)
    assert not is_allowed([document], "iot:Publish", topic_resource(PREFIX, "a/bc"), context)
    assert is_allowed([document], "iot:Connect", client_resource(PREFIX, "any-client"), context)
    assert not is_allowed([document], "iot:Connect", client_resource(PREFIX, "Any-Client"), context)


def test_not_action_and_not_resource():
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "NotAction": "iot:Connect", "Resource": "*"},
            {"Effect": "Deny", "Action": "iot:Publish", "NotResource": f"{PREFIX}:topic/ok/*"},
        ],
    }
    context = ConnectionContext(client_id="c")
    assert not is_allowed([document], "iot:Connect", client_resource(PREFIX, "c"), context)
    assert is_allowed([document], "iot:Publish", topic_resource(PREFIX, "ok/1"), context)
    assert not is_allowed([document], "iot:Publish", topic_resource(PREFIX, "other"), context)
    assert is_allowed([document], "iot:Subscribe", topic_filter_resource(PREFIX, "x/#"), context)


def test_thing_type_and_attribute_variables_and_conditions():
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Publish",
                "Resource": f"{PREFIX}:topic/sites/${{iot:Connection.Thing.Attributes[site]}}/*",
                "Condition": {
                    "StringEquals": {
                        "iot:Connection.Thing.ThingTypeName": "fleetkey-telemetry-sensor"
                    },
                    "StringLike": {"iot:ClientId": ["well-*", "pump-*"]},
                },
            }
        ],
    }
    context = ConnectionContext(
        client_id="well-1",
        thing_name="well-1",
        thing_type_name="fleetkey-telemetry-sensor",
        thing_attributes={"site": "permian-14"},
    )
    assert is_allowed(
        [document], "iot:Publish", topic_resource(PREFIX, "sites/permian-14/t"), context
    )
    assert not is_allowed(
        [document], "iot:Publish", topic_resource(PREFIX, "sites/ward-7/t"), context
    )
    no_site = ConnectionContext(
        client_id="well-1", thing_name="well-1", thing_type_name="fleetkey-telemetry-sensor"
    )
    assert not is_allowed([document], "iot:Publish", topic_resource(PREFIX, "sites//t"), no_site)
    other_type = ConnectionContext(
        client_id="well-1",
        thing_name="well-1",
        thing_type_name="other",
        thing_attributes={"site": "permian-14"},
    )
    assert not is_allowed(
        [document], "iot:Publish", topic_resource(PREFIX, "sites/permian-14/t"), other_type
    )


def test_variables_are_not_substituted_in_old_policy_versions():
    document = {
        "Version": "2008-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": f"{PREFIX}:client/${{iot:ClientId}}",
            }
        ],
    }
    assert not is_allowed(
        [document], "iot:Connect", client_resource(PREFIX, "c"), ConnectionContext(client_id="c")
    )
    assert is_allowed(
        [document],
        "iot:Connect",
        client_resource(PREFIX, "${iot:ClientId}"),
        ConnectionContext(client_id="c"),
    )


def test_is_attached_condition_false_and_if_exists():
    document = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": "*",
                "Condition": {
                    "Bool": {"iot:Connection.Thing.IsAttached": False},
                    "StringEqualsIfExists": {"iot:Connection.Thing.ThingName": "nothing"},
                },
            }
        ],
    }
    assert is_allowed(
        [document], "iot:Connect", client_resource(PREFIX, "c"), ConnectionContext(client_id="c")
    )
    assert not is_allowed([document], "iot:Connect", client_resource(PREFIX, "c"), attached("c"))


def statement(**fields):
    return {"Version": "2012-10-17", "Statement": [fields]}


@pytest.mark.parametrize(
    "document",
    [
        statement(
            Effect="Allow",
            Action="iot:Connect",
            Resource="*",
            Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
        ),
        statement(Effect="Maybe", Action="iot:Connect", Resource="*"),
        statement(Effect="Allow", Resource="*"),
        "not json",
    ],
)
def test_what_it_does_not_understand_is_an_error_never_an_allow(document):
    with pytest.raises(PolicyError):
        evaluate(
            [document],
            "iot:Connect",
            client_resource(PREFIX, "c"),
            ConnectionContext(client_id="c"),
        )
