"""AWS IoT: one policy and one thing type per device profile, and the topic rules (JITR,
tamper reports)."""

import json

import pytest

from fleetkey import events
from fleetkey.domain.profiles import PROFILES, THING_VARIABLE
from fleetkey_infra import constants
from infra_template import ACCOUNT, IOT_ARN_PREFIX, function_by_service, of_type, render


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


# Each topic rule: its SQL, and the function it invokes.
RULES = {
    "registration": (
        "SELECT * FROM '$aws/events/certificates/registered/+'",
        constants.REGISTRATION_SERVICE_NAME,
    ),
    # the device id is the topic's second level: a device publishes under its own name only
    "tamper": (
        "SELECT topic(2) AS device_id FROM 'fleetkey/+/events/tamper'",
        constants.DEVICE_EVENTS_SERVICE_NAME,
    ),
    # a device's connection commits its pending certificate (principalIdentifier)
    "presence": (
        "SELECT * FROM '$aws/events/presence/connected/+'",
        constants.ROTATION_EVENTS_SERVICE_NAME,
    ),
}


def rule_for(resources: dict[str, dict], sql: str) -> tuple[str, dict]:
    [found] = [
        (lid, r)
        for lid, r in of_type(resources, "AWS::IoT::TopicRule").items()
        if r["Properties"]["TopicRulePayload"]["Sql"] == sql
    ]
    return found


def test_there_are_exactly_the_fleetkey_topic_rules(resources: dict[str, dict]) -> None:
    # Given the synthesized stack
    # When listing its topic rules' SQL
    sqls = {
        r["Properties"]["TopicRulePayload"]["Sql"]
        for r in of_type(resources, "AWS::IoT::TopicRule").values()
    }

    # Then they are registration (JITR), tamper and presence, the SQL the core defines (the local
    # IoT Core emulator builds its rules from the same constants)
    assert sqls == {sql for sql, _ in RULES.values()}
    assert RULES["tamper"][0] == events.TAMPER_RULE_SQL
    assert RULES["registration"][0] == events.REGISTRATION_RULE_SQL
    assert RULES["presence"][0] == events.PRESENCE_CONNECTED_RULE_SQL


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_rule_invokes_its_function(resources: dict[str, dict], rule_name: str) -> None:
    # Given one topic rule and the function it should invoke
    sql, service = RULES[rule_name]
    function_id, _ = function_by_service(resources, service)
    _, rule = rule_for(resources, sql)
    payload = rule["Properties"]["TopicRulePayload"]

    # When reading the rule
    # Then its messages go to that function alone, with the core's SQL version
    assert payload["AwsIotSqlVersion"] == events.IOT_SQL_VERSION == "2016-03-23"
    assert payload["RuleDisabled"] is False
    assert payload["Actions"] == [{"Lambda": {"FunctionArn": {"Fn::GetAtt": [function_id, "Arn"]}}}]


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_rule_errors_go_to_a_queue_through_a_scoped_role(
    resources: dict[str, dict], rule_name: str
) -> None:
    # Given one topic rule's error action
    _, rule = rule_for(resources, RULES[rule_name][0])
    error_action = rule["Properties"]["TopicRulePayload"]["ErrorAction"]["Sqs"]

    # When following its queue and role
    queue_id = error_action["QueueUrl"]["Ref"]
    role_id = error_action["RoleArn"]["Fn::GetAtt"][0]
    [trust] = resources[role_id]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    granted = [
        render(s)
        for p in of_type(resources, "AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]

    # Then messages IoT could not deliver are kept in an encrypted queue of the rule's own, by a
    # role only AWS IoT of this account assumes and that may only send to that queue
    assert resources[queue_id]["Type"] == "AWS::SQS::Queue"
    assert resources[queue_id]["Properties"]["SqsManagedSseEnabled"] is True
    assert error_action["UseBase64"] is False
    assert trust["Principal"] == {"Service": "iot.amazonaws.com"}
    assert render(trust["Condition"]) == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}
    assert {
        r
        for s in granted
        for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
    } == {f"<{queue_id}.Arn>"}


def test_each_rule_has_its_own_error_queue(resources: dict[str, dict]) -> None:
    # Given the topic rules
    queues = [
        r["Properties"]["TopicRulePayload"]["ErrorAction"]["Sqs"]["QueueUrl"]["Ref"]
        for r in of_type(resources, "AWS::IoT::TopicRule").values()
    ]

    # Then no two share one: an operator replays each kind of event on its own
    assert len(queues) == len(set(queues)) == len(RULES)


@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_only_its_rule_may_invoke_the_function(resources: dict[str, dict], rule_name: str) -> None:
    # Given the rule and the function it invokes
    sql, service = RULES[rule_name]
    function_id, _ = function_by_service(resources, service)
    rule_id, _ = rule_for(resources, sql)

    # When listing the invoke permissions of the function
    permissions = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::Permission").values()
        if r["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]
    others = [p for p in permissions if p["Principal"] != "iot.amazonaws.com"]

    # Then there is one for AWS IoT, bound to this rule's ARN and this account, and no other but
    # the rotation sweep's schedule (EventBridge) for rotation_events
    # (tests/infra/test_infra_rotation.py)
    if service == constants.ROTATION_EVENTS_SERVICE_NAME:
        assert [p["Principal"] for p in others] == ["events.amazonaws.com"]
    else:
        assert others == []
    assert [p for p in permissions if p not in others] == [
        {
            "Action": "lambda:InvokeFunction",
            "FunctionName": {"Fn::GetAtt": [function_id, "Arn"]},
            "Principal": "iot.amazonaws.com",
            "SourceArn": {"Fn::GetAtt": [rule_id, "Arn"]},
            "SourceAccount": {"Ref": "AWS::AccountId"},
        }
    ]


def test_devices_publish_tamper_reports_only_under_their_own_name() -> None:
    # Given the tamper rule's topic filter and the devices' IoT policy
    # When reading what topics a device may publish to
    # Then its tamper topic is under its own thing name: topic(2), the device id the rule
    # selects, is the publisher's own (a device cannot get another device suspended)
    for profile in PROFILES.values():
        document = profile.iot_policy_document(IOT_ARN_PREFIX)
        [publish] = [s for s in document["Statement"] if s["Action"] == "iot:Publish"]
        assert f"{IOT_ARN_PREFIX}:topic/fleetkey/{THING_VARIABLE}/events/*" in publish["Resource"]
        assert all(THING_VARIABLE in r for r in publish["Resource"])
