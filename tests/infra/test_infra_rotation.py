"""Certificate rotation in the stack: the rotation and rotation_events functions, their routes,
the presence rule, the one-minute sweep, the `due` index, the issuing CA's KMS grants, and EST's
mutual-TLS custom domain (only when configured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Environment, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk.assertions import Template

from fleetkey.services.pki import issuing_ca_key_policy
from fleetkey.store import schema
from fleetkey_infra import constants, edge
from fleetkey_infra.application import create_app
from fleetkey_infra.constructs.rotation import EstDomain, RotationConfig, RotationConfigError
from fleetkey_infra.stack import FleetkeyStack
from infra_template import (
    ACCOUNT,
    IOT_ARN_PREFIX,
    KMS_KEYS,
    REGION,
    allowed_actions,
    function_by_service,
    method_paths,
    of_type,
    only,
    render,
    resources_for,
    role_of,
    role_statements,
    statements_for,
)
from tests.support import aws_calls
from tests.support.aws_calls import (
    DEFAULT_KEY_POLICY,
    Decision,
    KeyFacts,
    Request,
    decide,
    function_roles,
    key_context,
    role_arn,
    role_policy,
)

ROTATION = constants.ROTATION_SERVICE_NAME
ROTATION_EVENTS = constants.ROTATION_EVENTS_SERVICE_NAME
ISSUING_CA_TAG = {"aws:ResourceTag/fleetkey:purpose": f"issuing-ca:{constants.STACK_ID}"}
ISSUING_CA_REQUEST_TAG = {"aws:RequestTag/fleetkey:purpose": f"issuing-ca:{constants.STACK_ID}"}
CA_KEY_SHAPE = {
    "kms:KeySpec": ["ECC_NIST_P256", "ECC_NIST_P384"],
    "kms:KeyUsage": "SIGN_VERIFY",
    "kms:KeyOrigin": "AWS_KMS",
}
SINGLE_REGION = {"Bool": {"kms:MultiRegion": "false"}}
CERTIFICATES = f"{IOT_ARN_PREFIX}:cert/*"
# As the infrastructure tests' conftest synthesizes: templates, not asset bundles.
TEST_CONTEXT = {"aws:cdk:disable-asset-staging": True}
THINGS = f"{IOT_ARN_PREFIX}:thing/*"


def statements_of(resources: dict[str, dict], service: str) -> list[dict]:
    _, function = function_by_service(resources, service)
    return role_statements(resources, role_of(function))


def role_id_of(resources: dict[str, dict], service: str) -> str:
    return role_of(function_by_service(resources, service)[1])


# ---- the functions -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", [ROTATION, ROTATION_EVENTS])
def test_rotation_functions_know_the_signers_the_issuer_and_the_rotation_settings(
    resources: dict[str, dict], template_outputs: dict[str, dict], service: str
) -> None:
    # Given one rotation function and the two rotation roles
    _, function = function_by_service(resources, service)
    env = function["Properties"]["Environment"]["Variables"]
    signers = [role_id_of(resources, ROTATION), role_id_of(resources, ROTATION_EVENTS)]
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")

    # When reading its rotation settings
    # Then it knows the roles the CA key's policy lets sign (both rotation roles, from the roles
    # themselves), the default commit window and renewal rate, the issuer (CRL distribution
    # point, assertions' audience) and the lifecycle queue
    assert env["FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS"] == {
        "Fn::Join": [",", [{"Fn::GetAtt": [role, "Arn"]} for role in signers]]
    }
    assert env["FLEETKEY_ROTATION_COMMIT_SECONDS"] == "3600"
    assert env["FLEETKEY_RENEWAL_RATE_PER_MINUTE"] == "100"
    assert render(env["FLEETKEY_ISSUER"]) == (
        f"https://<{api_id}>.execute-api.{REGION}.<AWS::URLSuffix>/{constants.API_STAGE_NAME}"
    )
    assert env["FLEETKEY_LIFECYCLE_QUEUE_URL"] == template_outputs["LifecycleQueueUrl"]["Value"]


def test_rotation_events_failures_go_to_their_own_queue(resources: dict[str, dict]) -> None:
    # Given the rotation_events function (invoked asynchronously by the presence rule and the
    # sweep's schedule) and its async invoke configuration
    function_id, _ = function_by_service(resources, ROTATION_EVENTS)
    [config] = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
        if r["Properties"]["FunctionName"] == {"Ref": function_id}
    ]

    # When following its on-failure destination
    queue_id = config["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]

    # Then failures are retried twice, then kept in an encrypted queue of its own
    assert config["MaximumRetryAttempts"] == 2
    assert resources[queue_id]["Type"] == "AWS::SQS::Queue"
    assert resources[queue_id]["Properties"]["SqsManagedSseEnabled"] is True
    assert queue_id.startswith("FunctionsRotationEventFailures")


# ---- the API -------------------------------------------------------------------------------------

ROTATION_ROUTES = {
    ("POST", constants.ROTATION_PATH): "NONE",
    ("POST", constants.ROTATION_COMMIT_PATH): "NONE",
    ("GET", constants.PKI_CA_PATH): "NONE",
    ("GET", constants.PKI_CRL_PATH): "NONE",
    ("GET", constants.EST_CACERTS_PATH): "NONE",
    ("POST", constants.EST_SIMPLEREENROLL_PATH): "NONE",
    ("ANY", constants.ADMIN_PKI_PATH): "AWS_IAM",
    ("ANY", constants.ADMIN_PKI_PROXY_PATH): "AWS_IAM",
}


def test_the_rotation_routes_are_the_contracts(resources: dict[str, dict]) -> None:
    # Given the rotation function and every method of the API
    function_id, _ = function_by_service(resources, ROTATION)
    methods = method_paths(resources)

    # When collecting the methods that integrate the rotation function
    served = {
        route: m["Properties"]["AuthorizationType"]
        for route, m in methods.items()
        if f"<{function_id}.Arn>" in render(m["Properties"]["Integration"]["Uri"])
    }

    # Then they are exactly the device and public routes (no authorization) and the operators'
    # PKI routes (IAM), each a Lambda proxy integration
    assert served == ROTATION_ROUTES
    for route in ROTATION_ROUTES:
        assert methods[route]["Properties"]["Integration"]["Type"] == "AWS_PROXY"
    assert ROTATION_ROUTES.keys() == {
        ("POST", "/v1/devices/{device_id}/certificates"),
        ("POST", "/v1/devices/{device_id}/certificates/{certificate_id}/commit"),
        ("GET", "/v1/pki/ca"),
        ("GET", "/v1/pki/crl"),
        ("GET", "/.well-known/est/cacerts"),
        ("POST", "/.well-known/est/simplereenroll"),
        ("ANY", "/v1/admin/pki"),
        ("ANY", "/v1/admin/pki/{proxy+}"),
    }


@pytest.mark.parametrize(
    ("route", "parameters"),
    [
        (("POST", constants.ROTATION_PATH), {"method.request.path.device_id": True}),
        (
            ("POST", constants.ROTATION_COMMIT_PATH),
            {
                "method.request.path.device_id": True,
                "method.request.path.certificate_id": True,
            },
        ),
        (("ANY", constants.ADMIN_PKI_PROXY_PATH), {"method.request.path.proxy": True}),
    ],
)
def test_rotation_routes_declare_their_path_parameters(
    resources: dict[str, dict], route: tuple[str, str], parameters: dict[str, bool]
) -> None:
    # Given a parameterized rotation route
    props = method_paths(resources)[route]["Properties"]

    # Then its parameters are declared and required (the request validator checks them)
    assert props["RequestParameters"] == parameters


def test_the_crl_is_a_binary_media_type(resources: dict[str, dict]) -> None:
    # Given the REST API
    _, api = only(resources, "AWS::ApiGateway::RestApi")

    # Then the DER CRL (returned base64-encoded by the function) goes out as bytes, and no other
    # media type is binary (a wider list would base64-encode request bodies for every function)
    assert api["Properties"]["BinaryMediaTypes"] == ["application/pkix-crl"]


def test_public_rotation_routes_are_open_and_throttled_like_their_peers(
    resources: dict[str, dict],
) -> None:
    # Given the resource policy and the stage's method settings
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    [public] = [
        render(s) for s in api["Properties"]["Policy"]["Statement"] if s["Effect"] == "Allow"
    ]
    _, stage = only(resources, "AWS::ApiGateway::Stage")
    # (a method setting's path is "/" and the resource path with its "/" escaped as "~1")
    throttles = {
        (m["HttpMethod"], m["ResourcePath"].removeprefix("/").replace("~1", "/")): (
            m["ThrottlingRateLimit"],
            m["ThrottlingBurstLimit"],
        )
        for m in stage["Properties"]["MethodSettings"]
        if m["ResourcePath"] != "/*"
    }

    # When reading the public rotation routes' entries
    # Then everyone may call them; requests that issue certificates are throttled like the token
    # endpoint, the public documents like the discovery documents
    for (method, path), authorization in ROTATION_ROUTES.items():
        if authorization != "NONE":
            continue
        policy_path = path.replace("{device_id}", "*").replace("{certificate_id}", "*")
        assert f"execute-api:/*/{method}{policy_path}" in public["Resource"], path
    assert throttles[("POST", constants.ROTATION_PATH)] == (50, 100)
    assert throttles[("POST", constants.ROTATION_COMMIT_PATH)] == (50, 100)
    assert throttles[("POST", constants.EST_SIMPLEREENROLL_PATH)] == (50, 100)
    assert throttles[("GET", constants.PKI_CA_PATH)] == (100, 200)
    assert throttles[("GET", constants.PKI_CRL_PATH)] == (100, 200)
    assert throttles[("GET", constants.EST_CACERTS_PATH)] == (100, 200)


@pytest.mark.parametrize("path", ["/v1/admin/pki", "/v1/admin/pki/init", "/v1/admin/pki/csr"])
def test_the_operators_pki_routes_are_guarded_like_the_admin_api(path: str) -> None:
    # Given the edge's audiences (the REST API's resource policy denies each group's routes to
    # every principal not configured)
    audiences = edge.EdgeConfig.from_cdk_json().audiences("aws", ACCOUNT)
    [operators] = [a for a in audiences if a.name == "operators"]

    # Then the operators' PKI routes fall under the admin routes' Deny (`/v1/admin/*`)
    assert operators.guards(path)


@pytest.mark.parametrize(
    ("path", "limit"),
    [
        ("/prod/v1/devices/pump-1/certificates", "token"),
        ("/prod/v1/devices/pump-1/certificates/ab/commit", "token"),
        ("/prod/v1/pki/ca", "discovery"),
        ("/prod/v1/pki/crl", "discovery"),
        ("/prod/.well-known/est/cacerts", "discovery"),
        ("/prod/.well-known/est/simplereenroll", "discovery"),
        ("/prod/v1/admin/pki/init", None),
    ],
)
def test_each_public_rotation_route_is_under_one_per_client_limit(
    path: str, limit: str | None
) -> None:
    # Given the configured per-client limits (the WAF rules and the local gateway's)
    limits = edge.EdgeConfig.from_cdk_json().rate_limits()

    # When matching a request's path, Then it falls under exactly the expected one
    assert [r.name for r in limits if r.covers(path)] == ([limit] if limit else [])


# ---- the presence rule and the sweep -------------------------------------------------------------


def test_presence_events_invoke_rotation_events_with_an_error_queue(
    resources: dict[str, dict],
) -> None:
    # Given the presence rule and the rotation_events function
    function_id, _ = function_by_service(resources, ROTATION_EVENTS)
    [(rule_id, rule)] = [
        (lid, r)
        for lid, r in of_type(resources, "AWS::IoT::TopicRule").items()
        if r["Properties"]["TopicRulePayload"]["Sql"] == constants.PRESENCE_CONNECTED_RULE_SQL
    ]
    payload = rule["Properties"]["TopicRulePayload"]

    # Then connections are delivered to rotation_events alone, what AWS IoT cannot deliver goes to
    # the rule's own queue, and only this rule (AWS IoT, this account) may invoke it that way
    assert payload["Sql"] == "SELECT * FROM '$aws/events/presence/connected/+'"
    assert payload["Actions"] == [{"Lambda": {"FunctionArn": {"Fn::GetAtt": [function_id, "Arn"]}}}]
    queue_id = payload["ErrorAction"]["Sqs"]["QueueUrl"]["Ref"]
    assert queue_id.startswith("PresenceRuleErrors")
    [permission] = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::Permission").values()
        if r["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
        and r["Properties"]["Principal"] == "iot.amazonaws.com"
    ]
    assert permission["SourceArn"] == {"Fn::GetAtt": [rule_id, "Arn"]}


def test_the_sweep_runs_every_minute_with_retries_and_a_dead_letter_queue(
    resources: dict[str, dict],
) -> None:
    # Given the rotation_events function and the EventBridge rule that targets it
    function_id, _ = function_by_service(resources, ROTATION_EVENTS)
    [(rule_id, rule)] = [
        (lid, r)
        for lid, r in of_type(resources, "AWS::Events::Rule").items()
        if any(t["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]} for t in r["Properties"]["Targets"])
    ]
    [target] = rule["Properties"]["Targets"]

    # Then it runs every minute with the scheduled event itself, retries within the minute, then
    # keeps undeliverable events in a queue only this rule may send to; only this rule
    # (EventBridge) may invoke the function that way
    assert rule["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert rule["Properties"]["State"] == "ENABLED"
    assert not {"Input", "InputPath", "InputTransformer"} & set(target)
    assert target["RetryPolicy"] == {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 60}
    queue_id = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
    assert queue_id.startswith("SchedulesRotationSweepDeadLetters")
    [policy] = [
        p
        for p in of_type(resources, "AWS::SQS::QueuePolicy").values()
        if {"Ref": queue_id} in p["Properties"]["Queues"]
    ]
    [allow] = [
        s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"
    ]
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": [rule_id, "Arn"]}}}
    [permission] = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::Permission").values()
        if r["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
        and r["Properties"]["Principal"] == "events.amazonaws.com"
    ]
    assert permission["SourceArn"] == {"Fn::GetAtt": [rule_id, "Arn"]}


def test_a_sweep_ends_before_the_next_one_starts(resources: dict[str, dict]) -> None:
    # Given the rotation_events function
    _, function = function_by_service(resources, ROTATION_EVENTS)

    # Then its timeout is under the sweep's period
    assert function["Properties"]["Timeout"] < constants.ROTATION_SWEEP_RATE.to_seconds()


# ---- the `due` index -----------------------------------------------------------------------------


def test_the_table_has_the_two_sparse_indexes(resources: dict[str, dict]) -> None:
    # Given the table
    _, table = only(resources, "AWS::DynamoDB::Table")
    props = table["Properties"]

    # When reading its global secondary indexes
    indexes = {index["IndexName"]: index for index in props["GlobalSecondaryIndexes"]}

    # Then `due` (deadlines) and `renewal` are keyed by shard (string) and moment (number), keys
    # only, as the core's schema says
    assert (schema.DUE_INDEX, schema.RENEWAL_INDEX) == ("due", "renewal")
    assert set(indexes) == {"due", "renewal"}
    for name, (partition, sort) in schema.SPARSE_INDEXES.items():
        assert indexes[name] == {
            "IndexName": name,
            "KeySchema": [
                {"AttributeName": partition, "KeyType": "HASH"},
                {"AttributeName": sort, "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "KEYS_ONLY"},
        }
    attributes = {a["AttributeName"]: a["AttributeType"] for a in props["AttributeDefinitions"]}
    assert attributes["due_shard"] == "S" and attributes["due_at"] == "N"
    assert attributes["renewal_shard"] == "S" and attributes["renew_at"] == "N"


def test_only_rotation_events_queries_the_sparse_indexes(resources: dict[str, dict]) -> None:
    # Given the table and every role of the stack
    table_id, _ = only(resources, "AWS::DynamoDB::Table")
    indexes = [f"<{table_id}.Arn>/index/due", f"<{table_id}.Arn>/index/renewal"]

    # When collecting who may query the indexes
    holders = {
        role_id
        for role_id in of_type(resources, "AWS::IAM::Role")
        if any(
            index in resources_for(role_statements(resources, role_id), "dynamodb:Query")
            for index in indexes
        )
    }

    # Then only rotation_events (the sweep), on the indexes alone
    assert holders == {role_id_of(resources, ROTATION_EVENTS)}
    [query] = [
        s
        for s in statements_for(statements_of(resources, ROTATION_EVENTS), "dynamodb:Query")
        if s["Resource"] == indexes
    ]
    assert query["Action"] == "dynamodb:Query"


# ---- KMS: the issuing CA's keys ------------------------------------------------------------------


def test_rotation_creates_only_tagged_issuing_ca_keys(resources: dict[str, dict]) -> None:
    # Given the rotation role
    statements = statements_of(resources, ROTATION)

    # When reading the statements that allow CreateKey and TagResource
    [create] = statements_for(statements, "kms:CreateKey")
    [tag] = statements_for(statements, "kms:TagResource")

    # Then the request must create a single-Region ECC P-256/P-384 signing key of KMS material,
    # tagged as this stack's issuing CA and with no other tag; TagResource (which CreateKey with
    # tags implies) sets that tag only, never over another purpose, on a key of that shape only
    only_the_purpose_tag = {"ForAllValues:StringEquals": {"aws:TagKeys": ["fleetkey:purpose"]}}
    assert create["Resource"] == "*"
    assert create["Condition"] == {
        "StringEquals": {**ISSUING_CA_REQUEST_TAG, **CA_KEY_SHAPE},
        **SINGLE_REGION,
        **only_the_purpose_tag,
    }
    assert tag["Resource"] == KMS_KEYS
    assert tag["Condition"] == {
        "StringEquals": ISSUING_CA_REQUEST_TAG,
        "StringEqualsIfExists": {**ISSUING_CA_TAG, **CA_KEY_SHAPE},
        "BoolIfExists": {"kms:MultiRegion": "false"},
        **only_the_purpose_tag,
    }


@pytest.mark.parametrize("service", [ROTATION, ROTATION_EVENTS])
def test_rotation_roles_read_only_this_stacks_issuing_ca_keys(
    resources: dict[str, dict], service: str
) -> None:
    # Given a rotation role
    statements = [render(s) for s in statements_of(resources, service)]

    # When reading its statements on key/* (every key of the account and region)
    on_keys = [s for s in statements if s["Resource"] == KMS_KEYS]
    reads = [s for s in on_keys if s["Action"] != "kms:TagResource"]

    # Then each holds only for this stack's issuing CA keys; the read is GetPublicKey (what the
    # signer reads), on the CA's tag, shape and single-Region scope
    assert on_keys
    for statement in on_keys:
        condition = statement["Condition"]
        tags = condition["StringEquals"]
        assert tags.items() >= ISSUING_CA_TAG.items() or (
            tags.items() >= ISSUING_CA_REQUEST_TAG.items()
        ), statement
        assert "token-signing" not in json.dumps(condition)
    [read] = reads
    assert read["Action"] == "kms:GetPublicKey"
    assert read["Condition"] == {
        "StringEquals": {**ISSUING_CA_TAG, **CA_KEY_SHAPE},
        **SINGLE_REGION,
    }


def test_no_role_is_granted_kms_sign_by_iam(resources: dict[str, dict]) -> None:
    # Given every role of the stack
    # When collecting who holds kms:Sign in IAM
    holders = {
        role_id
        for role_id in of_type(resources, "AWS::IAM::Role")
        if "kms:Sign" in allowed_actions(role_statements(resources, role_id))
    }

    # Then nobody: the issuing CA key's own policy lets the two rotation roles sign (as the
    # token keys' policy lets the token role), so no tag on a key someone else owns opens it
    assert holders == set()


# The evaluator (tests/support/aws_calls.py) asked about the synthesized roles, with the CA key's
# policy the rotation function writes (fleetkey.services.pki.issuing_ca_key_policy), naming the
# rotation roles as the evaluator resolves them from the template.
CA_KEY_POLICY = json.dumps(
    issuing_ca_key_policy((role_arn("rotation"), role_arn("rotation_events")))
)
CA_KEY = f"arn:aws:kms:{aws_calls.REGION}:{aws_calls.ACCOUNT}:key/ca"
OWN_CA_KEY = KeyFacts(
    {"fleetkey:purpose": f"issuing-ca:{constants.STACK_ID}"},
    "ECC_NIST_P384",
    "SIGN_VERIFY",
    policy=CA_KEY_POLICY,
)
# Tagged as this stack's CA key, but governed by IAM alone (someone else's key, tagged by the
# rotation role or anyone).
TAGGED_FOREIGN_KEY = KeyFacts(
    OWN_CA_KEY.tags, "ECC_NIST_P256", "SIGN_VERIFY", policy=DEFAULT_KEY_POLICY
)
OTHER_STACKS_CA_KEY = KeyFacts(
    {"fleetkey:purpose": "issuing-ca:OtherStack"},
    "ECC_NIST_P256",
    "SIGN_VERIFY",
    policy=json.dumps(issuing_ca_key_policy((f"arn:aws:iam::{aws_calls.ACCOUNT}:role/other",))),
)
TOKEN_KEY = KeyFacts(
    {"fleetkey:purpose": f"token-signing:{constants.STACK_ID}"},
    "ECC_NIST_P256",
    "SIGN_VERIFY",
    policy=DEFAULT_KEY_POLICY,
)
TABLE_KEY = KeyFacts({}, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", policy=DEFAULT_KEY_POLICY)
IMPORTED_CA_KEY = KeyFacts(
    OWN_CA_KEY.tags, "ECC_NIST_P256", "SIGN_VERIFY", "EXTERNAL", policy=DEFAULT_KEY_POLICY
)
NEW_CA_KEY = KeyFacts({}, "ECC_NIST_P256", "SIGN_VERIFY", policy=CA_KEY_POLICY)


@pytest.fixture(scope="module")
def roles(synthesized: Any) -> dict[str, list[dict[str, Any]]]:
    template = synthesized.template_json
    return {
        name: role_policy(template, role_id, constants.STACK_ID)
        for name, role_id in function_roles(template).items()
    }


def key_request(action: str, facts: KeyFacts, **request_tags: str) -> Request:
    context = key_context(facts, constants.STACK_ID)
    modeled = set(aws_calls.KEY_CONDITION_PREFIXES)
    if request_tags:
        context.update({f"aws:requesttag/{k}": (v,) for k, v in request_tags.items()})
        context["aws:tagkeys"] = tuple(request_tags)
        modeled |= {"aws:requesttag/", "aws:tagkeys"}
    return Request(action, CA_KEY, context, frozenset(modeled), key_policy=facts.policy)


def create_key_request(spec: str, **tags: str) -> Request:
    context: dict[str, tuple[str, ...]] = {f"aws:requesttag/{k}": (v,) for k, v in tags.items()}
    context |= {
        "aws:tagkeys": tuple(tags),
        "kms:keyspec": (spec,),
        "kms:keyusage": ("SIGN_VERIFY",),
        "kms:keyorigin": ("AWS_KMS",),
        "kms:multiregion": ("false",),
    }
    modeled = frozenset({"aws:requesttag/", "aws:tagkeys"} | aws_calls.KEY_CONDITION_PREFIXES)
    return Request("kms:CreateKey", "*", context, modeled)


def decide_as(roles: dict[str, list[dict[str, Any]]], function: str, request: Request) -> Decision:
    return decide(roles[function], request, role_arn(function))


@pytest.mark.parametrize(
    ("function", "facts", "decision"),
    [
        ("rotation", OWN_CA_KEY, Decision.ALLOWED),
        ("rotation_events", OWN_CA_KEY, Decision.ALLOWED),
        # someone else's key, tagged as this stack's CA key: IAM grants no Sign
        ("rotation", TAGGED_FOREIGN_KEY, Decision.DENIED),
        ("rotation_events", TAGGED_FOREIGN_KEY, Decision.DENIED),
        ("rotation", OTHER_STACKS_CA_KEY, Decision.DENIED),
        ("rotation", TOKEN_KEY, Decision.DENIED),
        # no other role signs with the CA key
        ("token", OWN_CA_KEY, Decision.DENIED),
        ("admin", OWN_CA_KEY, Decision.DENIED),
        ("registration", OWN_CA_KEY, Decision.DENIED),
        ("maintenance", OWN_CA_KEY, Decision.DENIED),
        ("data_keys", OWN_CA_KEY, Decision.DENIED),
    ],
)
def test_only_the_rotation_roles_sign_and_only_with_the_ca_keys_policy(
    roles: dict[str, list[dict[str, Any]]], function: str, facts: KeyFacts, decision: Decision
) -> None:
    # Given a role and a key
    # When it would sign with it (a certificate, a CRL)
    # Then only the rotation roles may, and only with a key whose policy is fleetkey's CA key's
    assert decide_as(roles, function, key_request("kms:Sign", facts)) is decision


@pytest.mark.parametrize("function", ["rotation", "rotation_events"])
@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (OWN_CA_KEY, Decision.ALLOWED),
        (TOKEN_KEY, Decision.DENIED),
        (TABLE_KEY, Decision.DENIED),
        (OTHER_STACKS_CA_KEY, Decision.DENIED),
        (IMPORTED_CA_KEY, Decision.DENIED),
    ],
)
def test_rotation_roles_read_the_ca_key_only(
    roles: dict[str, list[dict[str, Any]]], function: str, facts: KeyFacts, decision: Decision
) -> None:
    # Given a rotation role and a key
    # When it would read its public key
    # Then only this stack's CA key (tag, shape, KMS material) is within reach
    assert decide_as(roles, function, key_request("kms:GetPublicKey", facts)) is decision


@pytest.mark.parametrize(
    ("function", "request_", "decision"),
    [
        (
            "rotation",
            create_key_request("ECC_NIST_P384", **{"fleetkey:purpose": "issuing-ca:<stack>"}),
            Decision.ALLOWED,
        ),
        (
            "rotation",
            create_key_request("ECC_NIST_P256", **{"fleetkey:purpose": "issuing-ca:<stack>"}),
            Decision.ALLOWED,
        ),
        # not a CA key's shape, or not its tag, or another tag besides
        (
            "rotation",
            create_key_request("RSA_2048", **{"fleetkey:purpose": "issuing-ca:<stack>"}),
            Decision.DENIED,
        ),
        (
            "rotation",
            create_key_request("ECC_NIST_P256", **{"fleetkey:purpose": "token-signing:<stack>"}),
            Decision.DENIED,
        ),
        (
            "rotation",
            create_key_request(
                "ECC_NIST_P256", **{"fleetkey:purpose": "issuing-ca:<stack>", "owner": "x"}
            ),
            Decision.DENIED,
        ),
        ("rotation", create_key_request("ECC_NIST_P256"), Decision.DENIED),
        # the admin role creates token keys, not CA keys; rotation_events creates none
        (
            "admin",
            create_key_request("ECC_NIST_P256", **{"fleetkey:purpose": "issuing-ca:<stack>"}),
            Decision.DENIED,
        ),
        (
            "rotation_events",
            create_key_request("ECC_NIST_P256", **{"fleetkey:purpose": "issuing-ca:<stack>"}),
            Decision.DENIED,
        ),
    ],
)
def test_only_rotation_creates_ca_keys(
    roles: dict[str, list[dict[str, Any]]], function: str, request_: Request, decision: Decision
) -> None:
    # Given a role and a CreateKey request
    # Then only the rotation role creates a key, and only an issuing CA key of this stack
    assert decide_as(roles, function, request_) is decision


@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (NEW_CA_KEY, Decision.ALLOWED),  # the key pki init is creating
        (OWN_CA_KEY, Decision.ALLOWED),
        (TOKEN_KEY, Decision.DENIED),
        (TABLE_KEY, Decision.DENIED),
        (OTHER_STACKS_CA_KEY, Decision.DENIED),
    ],
)
def test_rotation_tags_only_ca_shaped_keys_with_this_stacks_ca_tag(
    roles: dict[str, list[dict[str, Any]]], facts: KeyFacts, decision: Decision
) -> None:
    # Given the rotation role
    # When it would tag a key as this stack's issuing CA key
    request = key_request("kms:TagResource", facts, **{"fleetkey:purpose": "issuing-ca:<stack>"})

    # Then never a token key, the table's key or another stack's CA key
    assert decide_as(roles, "rotation", request) is decision


# ---- the table and AWS IoT -----------------------------------------------------------------------

TABLE = f"arn:aws:dynamodb:{aws_calls.REGION}:{aws_calls.ACCOUNT}:table/<table>"


def item(action: str, partition: str) -> Request:
    return Request(
        f"dynamodb:{action}",
        TABLE,
        {"dynamodb:leadingkeys": (partition,)},
        frozenset({"dynamodb:leadingkeys"}),
    )


@pytest.mark.parametrize(
    ("function", "action", "partition", "decision"),
    [
        ("rotation", "GetItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("rotation", "PutItem", "JTI#pump-1#j1", Decision.ALLOWED),
        ("rotation", "UpdateItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("rotation", "PutItem", "KEY#ab", Decision.ALLOWED),
        ("rotation", "PutItem", "STREAM#issuing-ca", Decision.ALLOWED),
        ("rotation", "DeleteItem", "NONCE#n1", Decision.ALLOWED),
        ("rotation", "DeleteItem", "JTI#pump-1#j1", Decision.DENIED),  # replay protection stays
        ("rotation", "DeleteItem", "DEVICE#pump-1", Decision.DENIED),
        ("rotation", "PutItem", "STREAM#signing-keys", Decision.DENIED),
        ("rotation", "PutItem", "DATAKEY#pump-1", Decision.DENIED),
        ("rotation", "PutItem", "REVOKED#j1", Decision.DENIED),
        ("rotation_events", "UpdateItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("rotation_events", "PutItem", "PKI#CRL", Decision.ALLOWED),
        ("rotation_events", "Query", "PKI#REVOKED", Decision.ALLOWED),
        ("rotation_events", "Query", "DEVICE#pump-1", Decision.DENIED),
        ("rotation_events", "DeleteItem", "DEVICE#pump-1", Decision.DENIED),
        ("rotation_events", "PutItem", "JTI#pump-1#j1", Decision.DENIED),
        ("rotation_events", "PutItem", "STREAM#signing-keys", Decision.DENIED),
    ],
)
def test_rotation_roles_write_only_their_own_items(
    roles: dict[str, list[dict[str, Any]]],
    function: str,
    action: str,
    partition: str,
    decision: Decision,
) -> None:
    # Given a rotation role
    # When it would touch an item of the table
    # Then it writes only the partitions rotation owns (no signing-key registry, no data key, no
    # token revocation), and deletes nothing but a consumed challenge
    assert decide(roles[function], item(action, partition)) is decision


def test_the_sweep_queries_the_due_index(roles: dict[str, list[dict[str, Any]]]) -> None:
    # Given a query of the `due` index (authorized on the index's ARN)
    query = aws_calls.to_requests(
        "dynamodb",
        "Query",
        {
            "TableName": "t",
            "IndexName": "due",
            "KeyConditionExpression": "due_shard = :s AND due_at <= :now",
            "ExpressionAttributeValues": {":s": {"S": "DUE#3"}, ":now": {"N": "1"}},
        },
        table_name="t",
    )

    # Then the sweep may run it, and no other role
    assert [r.resource for r in query] == [f"{TABLE}/index/due"]
    for function, statements in roles.items():
        expected = Decision.ALLOWED if function == "rotation_events" else Decision.DENIED
        assert decide(statements, query[0]) is expected, function


@pytest.mark.parametrize(
    ("function", "action", "resource", "decision"),
    [
        (
            "rotation_events",
            "iot:Publish",
            "topic/fleetkey/pump-1/commands/rotate",
            Decision.ALLOWED,
        ),
        ("rotation_events", "iot:Publish", "topic/fleetkey/pump-1/commands/reset", Decision.DENIED),
        ("rotation_events", "iot:DeleteCertificate", "cert/abc", Decision.ALLOWED),
        ("rotation_events", "iot:DeleteThing", "thing/pump-1", Decision.DENIED),
        ("rotation", "iot:AttachPolicy", "cert/abc", Decision.ALLOWED),
        ("rotation", "iot:UpdateCertificate", "cert/abc", Decision.ALLOWED),
        # a registration that finds its rotation rolled back meanwhile takes it out again
        ("rotation", "iot:DeleteCertificate", "cert/abc", Decision.ALLOWED),
        ("rotation_events", "iot:AttachPolicy", "cert/abc", Decision.DENIED),
        ("rotation_events", "iot:RegisterCertificate", "*", Decision.DENIED),
        ("rotation", "iot:Publish", "topic/fleetkey/pump-1/commands/rotate", Decision.DENIED),
        ("rotation", "iot:UpdateCACertificate", "cacert/abc", Decision.DENIED),
        ("converge", "iot:Publish", "topic/fleetkey/pump-1/commands/rotate", Decision.DENIED),
    ],
)
def test_rotation_iot_requests(
    roles: dict[str, list[dict[str, Any]]],
    function: str,
    action: str,
    resource: str,
    decision: Decision,
) -> None:
    # Given a role and an AWS IoT request of this account and region
    request = Request(action, f"arn:aws:iot:{aws_calls.REGION}:{aws_calls.ACCOUNT}:{resource}")

    # Then rotation registers and binds certificates and deletes none; the sweep retires them and
    # sends only the rotate command
    assert decide(roles[function], request) is decision


@pytest.mark.parametrize("service", [ROTATION, ROTATION_EVENTS])
def test_thing_principals_are_bound_on_certificates_of_this_accounts_things(
    resources: dict[str, dict], service: str
) -> None:
    # Given a rotation role
    statements = statements_of(resources, service)

    # Then Attach/DetachThingPrincipal are authorized on the certificate, with the thing as
    # iot:thingArn (Service Authorization Reference); the sweep only detaches
    actions = ("iot:DetachThingPrincipal",) + (
        ("iot:AttachThingPrincipal",) if service.endswith("-rotation") else ()
    )
    assert not statements_for(statements, "iot:AttachThingPrincipal") or service.endswith(
        "-rotation"
    )
    for action in actions:
        [granted] = statements_for(statements, action)
        assert granted["Resource"] == CERTIFICATES, action
        assert granted["Condition"] == {"ArnLike": {"iot:thingArn": THINGS}}, action


# ---- configuration: the rotation settings and EST's custom domain --------------------------------

EST_CONTEXT = {
    constants.EST_DOMAIN_NAME_CONTEXT_KEY: "est.fleet.example.com",
    constants.EST_CERTIFICATE_ARN_CONTEXT_KEY: (
        "arn:aws:acm:eu-west-1:111122223333:certificate/0a1b2c3d-0000-1111-2222-333344445555"
    ),
    constants.EST_TRUSTSTORE_URI_CONTEXT_KEY: "s3://fleet-truststore/est/truststore.pem",
    constants.EST_TRUSTSTORE_VERSION_CONTEXT_KEY: "v3",
}


def test_without_est_settings_there_is_no_custom_domain(resources: dict[str, dict]) -> None:
    # Given the stack synthesized with cdk.json's context (no EST settings)
    # Then there is no custom domain: the EST routes exist on the default endpoint only, where
    # simplereenroll finds no client certificate and is refused by the function
    assert of_type(resources, "AWS::ApiGateway::DomainName") == {}
    assert of_type(resources, "AWS::ApiGateway::BasePathMapping") == {}


@pytest.fixture(scope="module")
def est_resources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The whole app (cdk-nag included) synthesized with EST's settings."""
    outdir = tmp_path_factory.mktemp("cdk.out.est")
    app = create_app(outdir=str(outdir), context={**TEST_CONTEXT, **EST_CONTEXT})
    app.synth()  # cdk-nag runs here: an unacknowledged finding raises
    stack = app.node.find_child(constants.STACK_ID)
    assert isinstance(stack, FleetkeyStack)
    return Template.from_stack(stack).to_json()


def test_est_settings_create_a_mutual_tls_domain_for_the_api(
    est_resources: dict[str, Any],
) -> None:
    # Given the app synthesized with EST's settings
    resources = est_resources["Resources"]
    domain_id, domain = only(resources, "AWS::ApiGateway::DomainName")
    _, mapping = only(resources, "AWS::ApiGateway::BasePathMapping")
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    stage_id, _ = only(resources, "AWS::ApiGateway::Stage")

    # Then a regional domain, TLS 1.2, its certificate, mutual TLS against the truststore (at the
    # given version), maps the API's stage at its root (EST clients ask for /.well-known/est/)
    props = domain["Properties"]
    assert props["DomainName"] == "est.fleet.example.com"
    assert props["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    assert props["SecurityPolicy"] == "TLS_1_2"
    assert props["RegionalCertificateArn"] == EST_CONTEXT[constants.EST_CERTIFICATE_ARN_CONTEXT_KEY]
    assert props["MutualTlsAuthentication"] == {
        "TruststoreUri": "s3://fleet-truststore/est/truststore.pem",
        "TruststoreVersion": "v3",
    }
    assert mapping["Properties"]["DomainName"] == {"Ref": domain_id}
    assert mapping["Properties"]["RestApiId"] == {"Ref": api_id}
    assert mapping["Properties"]["Stage"] == {"Ref": stage_id}
    assert "BasePath" not in mapping["Properties"]
    # and operators learn where to point EST's DNS name
    outputs = est_resources["Outputs"]
    assert {"EstDomainTarget", "EstDomainHostedZoneId"} <= set(outputs)


def test_rotation_settings_come_from_context() -> None:
    # Given context with other rotation settings (as `cdk -c key=N` passes them: strings)
    context = {
        constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY: "900",
        constants.RENEWAL_RATE_CONTEXT_KEY: 20,
    }

    # When reading them
    config = RotationConfig.from_context(context.get)

    # Then they are the configured ones, and no EST domain without EST's settings
    assert (config.commit_seconds, config.renewal_rate_per_minute, config.est) == (900, 20, None)
    assert RotationConfig.from_context({}.get) == RotationConfig(3600, 100, None)


def test_configured_rotation_settings_reach_both_functions(tmp_path: Path) -> None:
    # Given the stack (without cdk-nag) synthesized with other rotation settings
    app = App(
        outdir=str(tmp_path),
        context={
            **TEST_CONTEXT,
            constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY: 900,
            constants.RENEWAL_RATE_CONTEXT_KEY: 20,
        },
    )
    stack = FleetkeyStack(app, constants.STACK_ID)
    resources = Template.from_stack(stack).to_json()["Resources"]

    # Then both rotation functions get them
    for service in (ROTATION, ROTATION_EVENTS):
        env = function_by_service(resources, service)[1]["Properties"]["Environment"]["Variables"]
        assert env["FLEETKEY_ROTATION_COMMIT_SECONDS"] == "900"
        assert env["FLEETKEY_RENEWAL_RATE_PER_MINUTE"] == "20"


@pytest.mark.parametrize(
    ("context", "complaint"),
    [
        ({constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY: 60}, "between 300 and 604800"),
        ({constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY: "soon"}, "whole number"),
        ({constants.RENEWAL_RATE_CONTEXT_KEY: 0}, "between 1 and 3000"),
        ({constants.RENEWAL_RATE_CONTEXT_KEY: True}, "whole number"),
        ({constants.EST_DOMAIN_NAME_CONTEXT_KEY: "est.example.com"}, "missing"),
        (
            {
                **EST_CONTEXT,
                constants.EST_TRUSTSTORE_URI_CONTEXT_KEY: "https://bucket/truststore.pem",
            },
            "s3://<bucket>/<key>",
        ),
        ({**EST_CONTEXT, constants.EST_TRUSTSTORE_URI_CONTEXT_KEY: "s3://bucket/"}, "s3://"),
        ({**EST_CONTEXT, constants.EST_CERTIFICATE_ARN_CONTEXT_KEY: "cert-1"}, "ACM certificate"),
        ({**EST_CONTEXT, constants.EST_DOMAIN_NAME_CONTEXT_KEY: "not a name"}, "DNS name"),
        ({constants.EST_TRUSTSTORE_VERSION_CONTEXT_KEY: "v1"}, "without EST's domain"),
    ],
)
def test_an_impossible_rotation_configuration_fails_synthesis(
    context: dict[str, object], complaint: str
) -> None:
    # Given context out of range, malformed, or EST's settings given in part
    # When reading it, Then synthesis stops with a message saying what to fix
    with pytest.raises(RotationConfigError, match=complaint):
        RotationConfig.from_context(context.get)


def test_est_certificate_must_be_of_the_stacks_region() -> None:
    # Given a stack in us-east-1 and EST's certificate of eu-west-1
    config = RotationConfig.from_context(EST_CONTEXT.get).est
    assert config is not None
    stack = Stack(App(), "EstTest", env=Environment(account="111122223333", region="us-east-1"))
    api = apigateway.RestApi(stack, "Api")
    api.root.add_method("GET", apigateway.MockIntegration())

    # When building the domain, Then synthesis stops: a regional endpoint needs its region's
    with pytest.raises(RotationConfigError, match="needs one of us-east-1"):
        EstDomain(stack, "Est", api=api, config=config)
