"""The local stack is the deployed stack: what `fleetkey_local` provisions and serves matches the
CloudFormation template the CDK app synthesizes (table, IoT policies and thing types, the IoT
rules, the API's routes, binary media types and resource policy (audiences, operator roles and
their scopes), the rotation sweep's schedule, the functions' settings)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from fleetkey_local.provision import NAME_PREFIX
from fleetkey_local.stack import ACCOUNT, REGION, TABLE
from tests.support.aws_calls import remember_template

PSEUDO_PARAMETERS = {"AWS::Partition": "aws", "AWS::Region": REGION, "AWS::AccountId": ACCOUNT}
# Settings the deployed stack passes from its own resources and the local stack provisions
# instead: FLEETKEY_TOKEN_KEY_ID names the stack's first token signing key, which every registry
# reader takes as the sole key while the registry is empty; the embedded stack creates that key
# and writes it into its registry itself (EmbeddedStack.provision). FLEETKEY_STACK_NAME is the
# value of the signing keys' tag: the local stack's functions keep Settings' default (the local
# stack's name), which its keys are tagged with. See test_first_token_signing_key_matches.
# Set from resources the local stack provisions itself (its first token key, the lifecycle queue,
# the data-key key: EmbeddedStack.environment), not from a fixed local setting.
PROVISIONED_LOCALLY = {
    "FLEETKEY_TOKEN_KEY_ID",
    "FLEETKEY_STACK_NAME",
    "FLEETKEY_LIFECYCLE_QUEUE_URL",
    "FLEETKEY_DATA_KEY_ID",
    "FLEETKEY_RECOMMISSION_QUIET_SECONDS",  # 0 locally: one lifecycle worker, no copies
}


@pytest.fixture(scope="module")
def resources(tmp_path_factory) -> dict[str, dict]:
    """The synthesized template's resources (the real synthesis: cdk.json context, cdk-nag)."""
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
    from aws_cdk.assertions import Template

    from fleetkey_infra import constants
    from fleetkey_infra.application import create_app

    if not (constants.DEFAULT_LAYER_DIR / "python" / "fleetkey").is_dir():
        pytest.fail(
            f"{constants.DEFAULT_LAYER_DIR} is not built: run `make layer` first "
            "(`make test` does it for you).",
            pytrace=False,
        )
    # Templates only: skip copying the layer into the assembly (the template is the same).
    app = create_app(
        outdir=str(tmp_path_factory.mktemp("cdk.out")),
        context={"aws:cdk:disable-asset-staging": True},
    )
    app.synth()
    template = Template.from_stack(app.node.find_child(constants.STACK_ID)).to_json()
    remember_template(template)  # the suite's IAM check evaluates this template too
    return template["Resources"]


def of_type(resources: dict[str, dict], cfn_type: str) -> dict[str, dict]:
    return {lid: r for lid, r in resources.items() if r["Type"] == cfn_type}


def resolve(value: Any) -> Any:
    """The value as deployed in the local stack's account and region: Fn::Join and Refs to the
    pseudo parameters resolved; anything else referring to another resource is an error."""
    if isinstance(value, list):
        return [resolve(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Join"}:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve(p) for p in parts)
    if set(value) == {"Ref"} and value["Ref"] in PSEUDO_PARAMETERS:
        return PSEUDO_PARAMETERS[value["Ref"]]
    if set(value) & {"Ref", "Fn::GetAtt", "Fn::Sub", "Fn::ImportValue"}:
        raise AssertionError(f"cannot resolve {value} locally")
    return {k: resolve(v) for k, v in value.items()}


def function_name(resources: dict[str, dict], arn_or_ref: Any) -> str:
    """The fleetkey function (functions/<name>) a template reference points at, by the service
    name the stack gives it (`fleetkey-<name>`)."""
    text = json.dumps(arn_or_ref)
    for lid, function in of_type(resources, "AWS::Lambda::Function").items():
        if f'"{lid}"' in text:
            service = function["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
            return service.removeprefix(f"{NAME_PREFIX}-")
    raise AssertionError(f"no function referenced by {arn_or_ref}")


def test_table_matches(stack, resources):
    # Given the template's table and the table the local stack created
    (table,) = of_type(resources, "AWS::DynamoDB::Table").values()
    expected = table["Properties"]
    local = stack.dynamodb.describe_table(TableName=TABLE)["Table"]
    ttl = stack.dynamodb.describe_time_to_live(TableName=TABLE)["TimeToLiveDescription"]
    # Then keys, attribute types, indexes, billing and the TTL attribute are the same
    assert local["KeySchema"] == expected["KeySchema"]
    by_name = lambda items: sorted(items, key=lambda a: a["AttributeName"])  # noqa: E731
    assert by_name(local["AttributeDefinitions"]) == by_name(expected["AttributeDefinitions"])
    assert local["BillingModeSummary"]["BillingMode"] == expected["BillingMode"]
    indexes = lambda items: sorted(  # noqa: E731
        (
            {
                "IndexName": i["IndexName"],
                "KeySchema": i["KeySchema"],
                "Projection": i["Projection"],
            }
            for i in items
        ),
        key=lambda i: i["IndexName"],
    )
    assert indexes(local.get("GlobalSecondaryIndexes", [])) == indexes(
        expected.get("GlobalSecondaryIndexes", [])
    )
    assert expected["TimeToLiveSpecification"]["Enabled"] is True
    assert ttl == {
        "TimeToLiveStatus": "ENABLED",
        "AttributeName": expected["TimeToLiveSpecification"]["AttributeName"],
    }


def test_iot_policies_match(stack, resources):
    template = {
        r["Properties"]["PolicyName"]: resolve(r["Properties"]["PolicyDocument"])
        for r in of_type(resources, "AWS::IoT::Policy").values()
    }
    local = {p["policyName"] for p in stack.harness_iot.list_policies()["policies"]}
    # Then the local stack has exactly the template's policies, with the same documents
    assert {n for n in local if n.startswith(f"{NAME_PREFIX}-")} == set(template)
    for name, document in template.items():
        got = stack.harness_iot.get_policy(policyName=name)["policyDocument"]
        assert json.loads(got) == document, name


def test_thing_types_match(stack, resources):
    template = {
        r["Properties"]["ThingTypeName"]: r["Properties"]["ThingTypeProperties"]
        for r in of_type(resources, "AWS::IoT::ThingType").values()
    }
    local = {t["thingTypeName"] for t in stack.harness_iot.list_thing_types()["thingTypes"]}
    assert {n for n in local if n.startswith(f"{NAME_PREFIX}-")} == set(template)
    for name, expected in template.items():
        got = stack.harness_iot.describe_thing_type(thingTypeName=name)["thingTypeProperties"]
        assert got["searchableAttributes"] == expected["SearchableAttributes"], name
        assert got["thingTypeDescription"] == expected["ThingTypeDescription"], name


def test_iot_rules_match(resources):
    rules = pytest.importorskip("fleetkey_local.rules")
    local = {rule.sql: rule for rule in rules.RULES}
    topic_rules = of_type(resources, "AWS::IoT::TopicRule").values()
    assert topic_rules
    for rule in topic_rules:
        payload = rule["Properties"]["TopicRulePayload"]
        # Then every rule of the template is emulated with the same SQL, feeding the same function
        assert payload["Sql"] in local, payload["Sql"]
        (action,) = payload["Actions"]
        assert local[payload["Sql"]].function == function_name(resources, action["Lambda"])
        assert payload["AwsIotSqlVersion"] == getattr(rules, "IOT_SQL_VERSION", "2016-03-23")


def _resource_paths(resources: dict[str, dict]) -> dict[str, str]:
    """Logical id of each API Gateway resource -> its path ("/v1/admin/{proxy+}")."""
    apis = of_type(resources, "AWS::ApiGateway::RestApi")
    nodes = of_type(resources, "AWS::ApiGateway::Resource")

    def path(parent: Any) -> str:
        if isinstance(parent, dict) and "Fn::GetAtt" in parent:
            assert parent["Fn::GetAtt"][0] in apis and parent["Fn::GetAtt"][1] == "RootResourceId"
            return ""
        node = nodes[parent["Ref"]]["Properties"]
        return f"{path(node['ParentId'])}/{node['PathPart']}"

    return {lid: path({"Ref": lid}) for lid in nodes}


def test_api_routes_match(resources):
    from fleetkey_local.api_gateway import ROUTES

    paths = _resource_paths(resources)
    template = set()
    for method in of_type(resources, "AWS::ApiGateway::Method").values():
        props = method["Properties"]
        resource = props["ResourceId"]
        path = "/" if "Fn::GetAtt" in resource else paths[resource["Ref"]]
        integration = props.get("Integration", {})
        assert integration.get("Type") == "AWS_PROXY", f"{props['HttpMethod']} {path}"
        template.add(
            (
                props["HttpMethod"],
                path,
                function_name(resources, integration["Uri"]),
                props.get("AuthorizationType", "NONE"),
            )
        )
    # Then the local gateway serves the same methods, on the same resources, with the same
    # functions and authorization
    local = {(r.method, r.resource, r.function, r.authorization) for r in ROUTES}
    assert local == template


def test_binary_media_types_match(resources):
    from fleetkey_local.api_gateway import BINARY_MEDIA_TYPES

    (api,) = of_type(resources, "AWS::ApiGateway::RestApi").values()
    # Then the local gateway decodes (and encodes) bodies for the same media types
    assert api["Properties"].get("BinaryMediaTypes", []) == list(BINARY_MEDIA_TYPES)


def test_resource_policy_matches(resources):
    from fleetkey_local.api_gateway import (
        LOCAL_AUDIENCES,
        LOCAL_ROLE_DENIES,
        OPERATOR_ROLE_NAMES,
        local_operator_role,
    )

    (api,) = of_type(resources, "AWS::ApiGateway::RestApi").values()
    statements = {s["Sid"]: resolve(s) for s in api["Properties"]["Policy"]["Statement"]}
    # Given the operator roles the template creates, by ARN in the local stack's account
    roles = {
        f"arn:aws:iam::{ACCOUNT}:role/{r['Properties']['RoleName']}"
        for r in of_type(resources, "AWS::IAM::Role").values()
        if "RoleName" in r["Properties"]
    }
    # Then the local gateway knows a session of each, as the role (aws:PrincipalArn)
    assert {local_operator_role(name).principal_arn for name in OPERATOR_ROLE_NAMES} == roles
    # and guards the same paths per audience (the local principals differ: the template's are
    # cdk.json's, the local ones are the local stack's), the operator roles among the operators
    guarded = {
        tuple(sorted(s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]))
        for sid, s in statements.items()
        if sid.startswith("OnlyConfigured")
    }
    assert guarded == {
        tuple(sorted(f"execute-api:/*/*{path}" for path in a.policy_paths)) for a in LOCAL_AUDIENCES
    }
    [operators] = [a for a in LOCAL_AUDIENCES if a.name == "operators"]
    assert roles <= set(operators.principals)
    # and holds each role to the template's scope: same principal, same (Not)Resource
    template_scopes = {
        sid: (
            tuple(s["Condition"]["ArnLike"]["aws:PrincipalArn"]),
            "NotResource" in s,
            sorted(s.get("NotResource") or s["Resource"]),
        )
        for sid, s in statements.items()
        if sid.startswith("ScopeOf")
    }
    assert template_scopes == {
        deny.sid: (
            deny.principals,
            deny.outside,
            sorted(deny.resources("aws", REGION, ACCOUNT)),
        )
        for deny in LOCAL_ROLE_DENIES
    }


def _rate_seconds(expression: str) -> int:
    """An EventBridge `rate(N unit)` expression in seconds."""
    amount, unit = expression.removeprefix("rate(").removesuffix(")").split()
    return int(amount) * {"minute": 60, "hour": 3600, "day": 86400}[unit.rstrip("s")]


def test_the_rotation_sweep_runs_at_the_stacks_rate(resources):
    from fleetkey_local.serve import ROTATION_SWEEP_SECONDS

    # Given the template's scheduled rules, by the function they invoke
    schedules = {}
    for rule in of_type(resources, "AWS::Events::Rule").values():
        props = rule["Properties"]
        if "ScheduleExpression" in props:
            for target in props["Targets"]:
                schedules[function_name(resources, target["Arn"])] = props["ScheduleExpression"]
    # Then `make serve` runs the rotation sweep (rotation_events) as often as the stack does
    assert _rate_seconds(schedules["rotation_events"]) == ROTATION_SWEEP_SECONDS


def test_function_settings_are_set_locally(resources):
    from fleetkey_local.server import function_environment

    local = function_environment("http://127.0.0.1:1")
    for lid, function in of_type(resources, "AWS::Lambda::Function").items():
        variables = function["Properties"].get("Environment", {}).get("Variables", {})
        # Then every setting the stack gives a function, the local stack gives it too
        assert set(variables) - PROVISIONED_LOCALLY <= set(local), lid
        assert variables.get("FLEETKEY_NAME_PREFIX", NAME_PREFIX) == local["FLEETKEY_NAME_PREFIX"]


def test_first_token_signing_key_matches(stack, resources):
    from fleetkey.services.signing_keys import same_policy, token_signing_tags
    from fleetkey.settings import (
        LOCAL_STACK_NAME,
        LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS,
        LOCAL_TOKEN_SIGNER_ROLE_ARN,
    )
    from fleetkey_infra import constants

    # Given the template's first token signing key (every registry reader is told its id)
    readers = [
        f
        for f in of_type(resources, "AWS::Lambda::Function").values()
        if "FLEETKEY_TOKEN_KEY_ID" in f["Properties"]["Environment"]["Variables"]
    ]
    assert readers
    (key_ref,) = {
        json.dumps(f["Properties"]["Environment"]["Variables"]["FLEETKEY_TOKEN_KEY_ID"])
        for f in readers
    }
    expected = resources[json.loads(key_ref)["Ref"]]["Properties"]
    # and the key the local stack created
    local = stack.kms.describe_key(KeyId=stack.token_key_id)["KeyMetadata"]
    tags = stack.kms.list_resource_tags(KeyId=stack.token_key_id)["Tags"]
    policy = json.loads(
        stack.kms.get_key_policy(KeyId=stack.token_key_id, PolicyName="default")["Policy"]
    )
    # Then it is the same kind of key, tagged for its own stack as the template's is for its own
    assert local["KeySpec"] == expected["KeySpec"]
    assert local["KeyUsage"] == expected["KeyUsage"]
    expected_tags = {t["Key"]: t["Value"] for t in expected["Tags"]}
    assert expected_tags.items() >= token_signing_tags(constants.STACK_ID).items()
    local_tags = {t["TagKey"]: t["TagValue"] for t in tags}
    assert local_tags.items() >= token_signing_tags(LOCAL_STACK_NAME).items()
    # and it has the template's key policy, the roles it names being the local stack's (the
    # token role signs, the admin and maintenance roles retire)
    admin, maintenance = LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS
    local_roles = {
        constants.TOKEN_SERVICE_NAME: LOCAL_TOKEN_SIGNER_ROLE_ARN,
        constants.ADMIN_SERVICE_NAME: admin,
        constants.MAINTENANCE_SERVICE_NAME: maintenance,
    }
    deployed_text = json.dumps(expected["KeyPolicy"])
    for function in of_type(resources, "AWS::Lambda::Function").values():
        service = function["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
        if service in local_roles:
            role = json.dumps(
                {"Fn::GetAtt": [function["Properties"]["Role"]["Fn::GetAtt"][0], "Arn"]}
            )
            assert role in deployed_text, service
            deployed_text = deployed_text.replace(role, json.dumps(local_roles[service]))
    assert same_policy(policy, resolve(json.loads(deployed_text)))
    # and KMS made its material, in this region only, as the template's key
    assert (local["Origin"], local["MultiRegion"]) == (expected["Origin"], expected["MultiRegion"])
    # and it is the registry's signing key (what the variable leads to in AWS)
    registry = stack.signing_keys.keys()
    assert [k.key_id for k in registry] == [stack.token_key_id]
