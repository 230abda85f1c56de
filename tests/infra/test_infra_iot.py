"""AWS IoT: one policy and one thing type per device profile, and the JITR topic rule."""

import json

import pytest

from fleetkey.domain.profiles import PROFILES, THING_VARIABLE
from fleetkey_infra import constants
from infra_template import (
    ACCOUNT,
    IOT_ARN_PREFIX,
    function_by_service,
    of_type,
    only,
    render,
)


def policies_by_name(resources: dict[str, dict]) -> dict[str, dict]:
    return {
        r["Properties"]["PolicyName"]: r["Properties"]["PolicyDocument"]
        for r in of_type(resources, "AWS::IoT::Policy").values()
    }


def test_one_iot_policy_and_thing_type_per_profile(resources: dict[str, dict]) -> None:
    # Given the device profiles of the core
    # When listing the IoT policies and thing types of the stack
    policy_names = set(policies_by_name(resources))
    thing_types = {
        r["Properties"]["ThingTypeName"]: r["Properties"]["ThingTypeProperties"]
        for r in of_type(resources, "AWS::IoT::ThingType").values()
    }

    # Then each profile has its policy and thing type, named as the functions will look them up
    assert policy_names == {p.iot_policy_name(constants.NAME_PREFIX) for p in PROFILES.values()}
    assert set(thing_types) == {p.thing_type_name(constants.NAME_PREFIX) for p in PROFILES.values()}
    for properties in thing_types.values():
        assert properties["SearchableAttributes"] == [
            "serial_number",
            "profile",
            "manufacturer_ca",
        ]


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_policy_document_is_the_profile_document_with_policy_variables_intact(
    resources: dict[str, dict], profile_name: str
) -> None:
    # Given one profile and its synthesized policy
    profile = PROFILES[profile_name]
    document = policies_by_name(resources)[profile.iot_policy_name(constants.NAME_PREFIX)]

    # When rendering the ARN tokens of the synthesized document
    rendered = render(document)

    # Then it is the core's document, the IoT policy variables untouched (no Fn::Sub)
    assert rendered == profile.iot_policy_document(IOT_ARN_PREFIX)
    assert "Fn::Sub" not in json.dumps(document)
    assert THING_VARIABLE in json.dumps(document)


@pytest.mark.parametrize("profile_name", sorted(PROFILES))
def test_devices_connect_only_as_their_own_attached_thing(
    resources: dict[str, dict], profile_name: str
) -> None:
    # Given one profile's synthesized policy
    document = policies_by_name(resources)[
        PROFILES[profile_name].iot_policy_name(constants.NAME_PREFIX)
    ]

    # When reading its iot:Connect statements
    connects = [s for s in render(document["Statement"]) if s["Action"] == "iot:Connect"]

    # Then the client id must be the thing name, and the certificate attached to that thing
    assert connects == [
        {
            "Effect": "Allow",
            "Action": "iot:Connect",
            "Resource": f"{IOT_ARN_PREFIX}:client/${{iot:Connection.Thing.ThingName}}",
            "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
        }
    ]


def test_iot_policies_and_thing_types_are_retained(resources: dict[str, dict]) -> None:
    # Given the IoT resources devices depend on
    retained = {
        **of_type(resources, "AWS::IoT::Policy"),
        **of_type(resources, "AWS::IoT::ThingType"),
    }

    # When reading their deletion policies
    # Then a stack deletion leaves them for the devices still using them
    assert retained
    for resource in retained.values():
        assert resource["DeletionPolicy"] == "Retain"


def test_registration_rule_invokes_the_registration_function(resources: dict[str, dict]) -> None:
    # Given the topic rule and the registration function
    function_id, _ = function_by_service(resources, constants.REGISTRATION_SERVICE_NAME)
    _, rule = only(resources, "AWS::IoT::TopicRule")
    payload = rule["Properties"]["TopicRulePayload"]

    # When reading the rule
    # Then certificate-registered events go to the registration function
    assert payload["Sql"] == "SELECT * FROM '$aws/events/certificates/registered/+'"
    assert payload["AwsIotSqlVersion"] == "2016-03-23"
    assert payload["RuleDisabled"] is False
    assert payload["Actions"] == [{"Lambda": {"FunctionArn": {"Fn::GetAtt": [function_id, "Arn"]}}}]


def test_registration_rule_errors_go_to_a_queue_through_a_scoped_role(
    resources: dict[str, dict],
) -> None:
    # Given the topic rule's error action
    _, rule = only(resources, "AWS::IoT::TopicRule")
    error_action = rule["Properties"]["TopicRulePayload"]["ErrorAction"]["Sqs"]

    # When following its queue and role
    queue_id = error_action["QueueUrl"]["Ref"]
    role_id = error_action["RoleArn"]["Fn::GetAtt"][0]
    [trust] = resources[role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]

    # Then events IoT could not deliver are kept, by a role only AWS IoT of this account assumes
    assert resources[queue_id]["Type"] == "AWS::SQS::Queue"
    assert trust["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(trust["Condition"]) == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}


def test_only_the_registration_rule_may_invoke_the_registration_function(
    resources: dict[str, dict],
) -> None:
    # Given the registration function and the rule
    function_id, _ = function_by_service(resources, constants.REGISTRATION_SERVICE_NAME)
    rule_id, _ = only(resources, "AWS::IoT::TopicRule")

    # When listing the invoke permissions of the function
    permissions = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::Permission").values()
        if r["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]

    # Then there is one, for AWS IoT, bound to this rule's ARN and this account
    assert permissions == [
        {
            "Action": "lambda:InvokeFunction",
            "FunctionName": {"Fn::GetAtt": [function_id, "Arn"]},
            "Principal": "iot.amazonaws.com",
            "SourceArn": {"Fn::GetAtt": [rule_id, "Arn"]},
            "SourceAccount": {"Ref": "AWS::AccountId"},
        }
    ]
