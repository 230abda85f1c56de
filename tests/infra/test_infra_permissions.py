"""Least privilege: each function's own role grants what the function calls, and nothing more."""

import pytest
from fleetkey_infra import constants
from infra_template import (
    IOT_ARN_PREFIX,
    KMS_KEYS,
    allowed_actions,
    function_by_service,
    of_type,
    only,
    resources_for,
    role_of,
    role_statements,
    statements_for,
    table_key_id,
)

REGISTRATION = constants.REGISTRATION_SERVICE_NAME
ADMIN = constants.ADMIN_SERVICE_NAME
TOKEN = constants.TOKEN_SERVICE_NAME
DISCOVERY = constants.DISCOVERY_SERVICE_NAME
INTROSPECT = constants.INTROSPECT_SERVICE_NAME
MAINTENANCE = constants.MAINTENANCE_SERVICE_NAME

TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
}
# get_device / signing-key registry (GetItem), put_nonce (PutItem), use_assertion (a transaction
# of a Put and a Delete), initialize (a transaction of Puts).
TOKEN_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem"}
READ_TABLE_ACTIONS = {"dynamodb:GetItem"}
# retire_expired: read the registry (GetItem), then put_signing_keys, a transaction of two Puts
# (the registry item and its audit record).
MAINTENANCE_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem"}
KEY_ACTIONS = {"kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"}
READ_KEY_ACTIONS = {"kms:Decrypt"}
LOG_ACTIONS = {"logs:CreateLogStream", "logs:PutLogEvents"}
TRACING_ACTIONS = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}
# Reading a token key's public half and tags: every registry reader confirms entries with KMS.
CONFIRM_ACTIONS = {"kms:GetPublicKey", "kms:ListResourceTags"}
TOKEN_SIGNING_ACTIONS = {"kms:Sign"} | CONFIRM_ACTIONS
TOKEN_KEY_ADMIN_ACTIONS = {
    "kms:CreateKey",
    "kms:TagResource",
    "kms:ScheduleKeyDeletion",
} | CONFIRM_ACTIONS
TABLE_GRANTS = {
    REGISTRATION: (TABLE_ACTIONS, KEY_ACTIONS),
    ADMIN: (TABLE_ACTIONS, KEY_ACTIONS),
    TOKEN: (TOKEN_TABLE_ACTIONS, KEY_ACTIONS),
    DISCOVERY: (READ_TABLE_ACTIONS, READ_KEY_ACTIONS),
    INTROSPECT: (READ_TABLE_ACTIONS, READ_KEY_ACTIONS),
    MAINTENANCE: (MAINTENANCE_TABLE_ACTIONS, KEY_ACTIONS),
}

EXPECTED_ACTIONS = {
    REGISTRATION: TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | {"sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}  # failure destination
    | {
        "iot:DescribeCertificate",
        "iot:UpdateCertificate",
        "iot:CreateThing",
        "iot:UpdateThing",
        "iot:AttachThingPrincipal",
        "iot:AttachPolicy",
    },
    ADMIN: TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TOKEN_KEY_ADMIN_ACTIONS
    | {
        "iot:GetRegistrationCode",
        "iot:RegisterCACertificate",
        "iot:UpdateCACertificate",
        "iot:DescribeCACertificate",
    },
    TOKEN: TOKEN_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TOKEN_SIGNING_ACTIONS,
    DISCOVERY: READ_TABLE_ACTIONS | READ_KEY_ACTIONS | LOG_ACTIONS | TRACING_ACTIONS | CONFIRM_ACTIONS,
    INTROSPECT: READ_TABLE_ACTIONS | READ_KEY_ACTIONS | LOG_ACTIONS | TRACING_ACTIONS | CONFIRM_ACTIONS,
    MAINTENANCE: MAINTENANCE_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | CONFIRM_ACTIONS
    | {"kms:ScheduleKeyDeletion"},
}
# Actions no function may ever hold, whatever else changes.
FORBIDDEN = {
    "iot:DeleteThing",
    "iot:DeleteCertificate",
    "iot:DeleteCACertificate",
    "iot:DeletePolicy",
    "iot:CreatePolicy",
    "dynamodb:Scan",
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteTable",
    "kms:PutKeyPolicy",
    "kms:CreateGrant",
    "kms:UntagResource",
    "kms:DisableKey",
}
# ... and the functions that alone may hold some.
ONLY = {
    "kms:Sign": {TOKEN},  # only the token function may sign with the token keys
    "kms:CreateKey": {ADMIN},
    "kms:TagResource": {ADMIN},
    # retirement: the admin API on demand, the maintenance schedule every hour
    "kms:ScheduleKeyDeletion": {ADMIN, MAINTENANCE},
    "dynamodb:DeleteItem": {TOKEN},  # consuming a challenge
}
# The only actions allowed on Resource "*", because they support no resource-level permissions.
STAR_ACTIONS = {
    REGISTRATION: TRACING_ACTIONS,
    ADMIN: TRACING_ACTIONS
    | {"iot:GetRegistrationCode", "iot:RegisterCACertificate", "kms:CreateKey"},
    TOKEN: TRACING_ACTIONS,
    DISCOVERY: TRACING_ACTIONS,
    INTROSPECT: TRACING_ACTIONS,
    MAINTENANCE: TRACING_ACTIONS,
}
TOKEN_SIGNING_TAG = {"aws:ResourceTag/fleetkey:purpose": "token-signing"}
TOKEN_SIGNING_REQUEST_TAG = {"aws:RequestTag/fleetkey:purpose": "token-signing"}
ONLY_THE_PURPOSE_TAG = {"ForAllValues:StringEquals": {"aws:TagKeys": ["fleetkey:purpose"]}}


def statements_of(resources: dict[str, dict], service: str) -> list[dict]:
    _, function = function_by_service(resources, service)
    return role_statements(resources, role_of(function))


def token_key_id(resources: dict[str, dict]) -> str:
    [key_id] = [k for k in of_type(resources, "AWS::KMS::Key") if k != table_key_id(resources)]
    return key_id


@pytest.mark.parametrize("service", sorted(EXPECTED_ACTIONS))
def test_role_grants_exactly_the_actions_the_function_calls(
    resources: dict[str, dict], service: str
) -> None:
    # Given the role of one function
    # When collecting every allowed action
    actions = allowed_actions(statements_of(resources, service))

    # Then it is exactly the expected set: no wildcard action, nothing destructive
    assert actions == EXPECTED_ACTIONS[service]
    assert not {a for a in actions if "*" in a}
    assert not actions & FORBIDDEN


def test_single_owner_actions_belong_to_their_function_only(resources: dict[str, dict]) -> None:
    # Given every role in the stack (function roles and the rest: API Gateway, IoT error action)
    roles = of_type(resources, "AWS::IAM::Role")
    owner_roles = {
        service: role_of(function_by_service(resources, service)[1]) for service in EXPECTED_ACTIONS
    }

    # When looking for the actions only some functions may hold
    for action, owners in ONLY.items():
        holders = {
            role_id
            for role_id in roles
            if action in allowed_actions(role_statements(resources, role_id))
        }

        # Then exactly those functions' roles hold it (no other role may sign with the token keys)
        assert holders == {owner_roles[owner] for owner in owners}, action


@pytest.mark.parametrize("service", sorted(EXPECTED_ACTIONS))
def test_only_actions_without_resource_level_permissions_use_star(
    resources: dict[str, dict], service: str
) -> None:
    # Given the role of one function
    statements = statements_of(resources, service)

    # When collecting the actions of statements on Resource "*"
    on_star = {
        a
        for s in statements
        if "*" in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])
        for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])
    }

    # Then they are only the ones AWS cannot scope
    assert on_star == STAR_ACTIONS[service]


@pytest.mark.parametrize("service", sorted(EXPECTED_ACTIONS))
def test_table_and_key_actions_target_the_fleetkey_table_and_key(
    resources: dict[str, dict], service: str
) -> None:
    # Given the table, the key that encrypts it and one function's role
    table_id, _ = only(resources, "AWS::DynamoDB::Table")
    key_id = table_key_id(resources)
    statements = statements_of(resources, service)
    table_actions, key_actions = TABLE_GRANTS[service]

    # When reading the resources of the table and key actions
    # Then each is the one table (no index, no other table) and the one key
    for action in table_actions:
        assert resources_for(statements, action) == [f"<{table_id}.Arn>"], action
    for action in key_actions:
        assert resources_for(statements, action) == [f"<{key_id}.Arn>"], action


def test_token_signs_with_the_first_key_and_tagged_keys_only(resources: dict[str, dict]) -> None:
    # Given the token role and the stack's token signing key
    statements = statements_of(resources, TOKEN)
    key_arn = f"<{token_key_id(resources)}.Arn>"

    # When reading the statements that allow signing
    for action in TOKEN_SIGNING_ACTIONS:
        granted = statements_for(statements, action)

        # Then the first key is named by ARN, and any other key must carry the token-signing tag
        assert len(granted) == 2, action
        by_resource = {s["Resource"]: s.get("Condition") for s in granted}
        assert by_resource == {
            key_arn: None,
            KMS_KEYS: {"StringEquals": TOKEN_SIGNING_TAG},
        }, action


def test_admin_creates_only_tagged_signing_keys(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the statement that allows CreateKey
    [create] = statements_for(statements, "kms:CreateKey")

    # Then the request must create a P-256 signing key tagged for token signing, and no other tag
    assert create["Resource"] == "*"
    assert create["Condition"] == {
        "StringEquals": {
            **TOKEN_SIGNING_REQUEST_TAG,
            "kms:KeySpec": "ECC_NIST_P256",
            "kms:KeyUsage": "SIGN_VERIFY",
        },
        **ONLY_THE_PURPOSE_TAG,
    }


def test_admin_tags_only_with_the_token_signing_tag(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the statement that allows TagResource (CreateKey with tags needs it)
    [tag] = statements_for(statements, "kms:TagResource")

    # Then it sets only fleetkey:purpose=token-signing, on this account's and region's keys
    assert tag["Resource"] == KMS_KEYS
    assert tag["Condition"] == {"StringEquals": TOKEN_SIGNING_REQUEST_TAG, **ONLY_THE_PURPOSE_TAG}


@pytest.mark.parametrize("action", ["kms:GetPublicKey", "kms:ScheduleKeyDeletion"])
def test_admin_manages_tagged_keys_only(resources: dict[str, dict], action: str) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the statement that allows the action
    [granted] = statements_for(statements, action)

    # Then it applies only to keys tagged for token signing
    assert granted["Resource"] == KMS_KEYS
    assert granted["Condition"] == {"StringEquals": TOKEN_SIGNING_TAG}


def test_registration_iot_actions_are_scoped_to_certificates_things_and_profile_policies(
    resources: dict[str, dict],
) -> None:
    # Given the registration role and the profile policies
    statements = statements_of(resources, REGISTRATION)
    certificates = f"{IOT_ARN_PREFIX}:cert/*"
    things = f"{IOT_ARN_PREFIX}:thing/*"
    policies = {f"<{lid}.Arn>" for lid in of_type(resources, "AWS::IoT::Policy")}

    # When reading the resources of each IoT action
    # Then certificates, things and the profile policies are the only targets
    assert resources_for(statements, "iot:DescribeCertificate") == [certificates]
    assert resources_for(statements, "iot:UpdateCertificate") == [certificates]
    assert resources_for(statements, "iot:CreateThing") == [things]
    assert resources_for(statements, "iot:UpdateThing") == [things]
    assert set(resources_for(statements, "iot:AttachThingPrincipal")) == {things, certificates}
    assert set(resources_for(statements, "iot:AttachPolicy")) == {certificates} | policies


def test_admin_ca_actions_are_scoped_to_ca_certificates(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the resources of the CA actions that support resource-level permissions
    # Then they target CA certificates only
    for action in ("iot:UpdateCACertificate", "iot:DescribeCACertificate"):
        assert resources_for(statements, action) == [f"{IOT_ARN_PREFIX}:cacert/*"]


def test_each_function_has_its_own_role_without_managed_policies(
    resources: dict[str, dict],
) -> None:
    # Given every function
    roles = [
        role_of(function_by_service(resources, service)[1]) for service in EXPECTED_ACTIONS
    ]

    # When reading their roles
    # Then the roles are distinct, assumable by Lambda only, with no AWS managed policy
    assert len(set(roles)) == len(EXPECTED_ACTIONS)
    for role_id in roles:
        props = resources[role_id]["Properties"]
        assert "ManagedPolicyArns" not in props
        [statement] = props["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}


def test_maintenance_schedules_deletion_of_tagged_keys_only(resources: dict[str, dict]) -> None:
    # Given the maintenance role (its action set is pinned above: no CreateKey, no Sign)
    statements = statements_of(resources, MAINTENANCE)

    # When reading the statement that allows ScheduleKeyDeletion
    [retire] = statements_for(statements, "kms:ScheduleKeyDeletion")

    # Then it allows that action alone, on this account's and region's keys tagged for token
    # signing only
    assert retire["Action"] == "kms:ScheduleKeyDeletion"
    assert retire["Resource"] == KMS_KEYS
    assert retire["Condition"] == {"StringEquals": TOKEN_SIGNING_TAG}
