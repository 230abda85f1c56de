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
    render,
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
# get_device / signing-key registry / challenges (GetItem), put_nonce (PutItem NONCE#),
# use_assertion (a transaction of a Put JTI# and a Delete NONCE#). Never the registry: readers
# take the stack's first key from settings while it is empty.
TOKEN_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem"}
READ_TABLE_ACTIONS = {"dynamodb:GetItem"}
# retire_expired: read the registry (GetItem), then put_signing_keys, a transaction of two Puts
# (the registry item and its audit record).
MAINTENANCE_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem"}
KEY_ACTIONS = {"kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"}
READ_KEY_ACTIONS = {"kms:Decrypt"}
LOG_ACTIONS = {"logs:CreateLogStream", "logs:PutLogEvents"}
TRACING_ACTIONS = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}
# Reading a token key's metadata (origin), public half, tags and key policy: every registry reader
# confirms keys. kms:Sign and kms:ScheduleKeyDeletion are granted by the keys' own policy, never
# by IAM (tests/infra/test_infra_token_keys.py).
CONFIRM_ACTIONS = {
    "kms:DescribeKey",
    "kms:GetPublicKey",
    "kms:ListResourceTags",
    "kms:GetKeyPolicy",
}
TOKEN_SIGNING_ACTIONS = CONFIRM_ACTIONS
TOKEN_KEY_ADMIN_ACTIONS = {"kms:CreateKey", "kms:TagResource"} | CONFIRM_ACTIONS
# The admin function checks no other item in its transactions (no ConditionCheckItem).
ADMIN_TABLE_ACTIONS = TABLE_ACTIONS - {"dynamodb:ConditionCheckItem"}
TABLE_GRANTS = {
    REGISTRATION: (TABLE_ACTIONS, KEY_ACTIONS),
    ADMIN: (ADMIN_TABLE_ACTIONS, KEY_ACTIONS),
    TOKEN: ({"dynamodb:GetItem"}, KEY_ACTIONS),
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
        "iot:DescribeThing",
        "iot:UpdateThing",
        "iot:AttachThingPrincipal",
        "iot:DetachThingPrincipal",
        "iot:ListThingPrincipals",
        "iot:AttachPolicy",
    },
    ADMIN: ADMIN_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TOKEN_KEY_ADMIN_ACTIONS
    | {
        "iot:GetRegistrationCode",
        "iot:RegisterCACertificate",
        "iot:DescribeCACertificate",
        "iot:UpdateCACertificate",
    },
    TOKEN: TOKEN_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TOKEN_SIGNING_ACTIONS,
    DISCOVERY: READ_TABLE_ACTIONS
    | READ_KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | CONFIRM_ACTIONS,
    INTROSPECT: READ_TABLE_ACTIONS
    | READ_KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | CONFIRM_ACTIONS,
    MAINTENANCE: MAINTENANCE_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | CONFIRM_ACTIONS,
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
    # granted by the signing keys' own policy to exactly fleetkey's roles, never by IAM: a key
    # someone else owns (whatever its tags) is not one a fleetkey role may sign with or delete
    "kms:Sign",
    "kms:ScheduleKeyDeletion",
}
# ... and the functions that alone may hold some.
ONLY = {
    "kms:CreateKey": {ADMIN},
    "kms:TagResource": {ADMIN},
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
STACK_TAG_VALUE = f"token-signing:{constants.STACK_ID}"
TOKEN_SIGNING_TAG = {"aws:ResourceTag/fleetkey:purpose": STACK_TAG_VALUE}
TOKEN_SIGNING_REQUEST_TAG = {"aws:RequestTag/fleetkey:purpose": STACK_TAG_VALUE}
P256_SIGNING_KEY = {
    "kms:KeySpec": "ECC_NIST_P256",
    "kms:KeyUsage": "SIGN_VERIFY",
    "kms:KeyOrigin": "AWS_KMS",
}
SINGLE_REGION = {"Bool": {"kms:MultiRegion": "false"}}
# Every statement on key/*: this stack's tag, a P-256 signing key of KMS's own material,
# single-Region.
TOKEN_KEY_CONDITION = {"StringEquals": {**TOKEN_SIGNING_TAG, **P256_SIGNING_KEY}, **SINGLE_REGION}
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
    for action in table_actions | (
        {"dynamodb:PutItem", "dynamodb:DeleteItem"} if service == TOKEN else set()
    ):
        assert resources_for(statements, action) == [f"<{table_id}.Arn>"], action
    for action in key_actions:
        assert resources_for(statements, action) == [f"<{key_id}.Arn>"], action


@pytest.mark.parametrize("service", [ADMIN, TOKEN, DISCOVERY, INTROSPECT, MAINTENANCE])
def test_confirming_reaches_this_stacks_signing_keys_only(
    resources: dict[str, dict], service: str
) -> None:
    # Given a registry reader's role
    statements = statements_of(resources, service)

    # When reading the statements that allow confirming a key
    for action in CONFIRM_ACTIONS:
        [granted] = statements_for(statements, action)

        # Then they apply to P-256 signing keys tagged for this stack only (the first key too)
        assert granted["Resource"] == KMS_KEYS, action
        assert granted["Condition"] == TOKEN_KEY_CONDITION, action


def test_token_writes_only_its_own_items(resources: dict[str, dict]) -> None:
    # Given the token role (internet-facing)
    statements = statements_of(resources, TOKEN)

    # When reading the statements that allow writes
    [put] = statements_for(statements, "dynamodb:PutItem")
    [delete] = statements_for(statements, "dynamodb:DeleteItem")

    # Then they hold only for items in its own partitions: it records assertions and challenges,
    # and deletes only challenges (a recorded jti, its replay protection, stays)
    assert put["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["JTI#*", "NONCE#*"]}
    }
    assert delete["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["NONCE#*"]}}


def test_maintenance_writes_only_the_signing_key_registry(resources: dict[str, dict]) -> None:
    # Given the maintenance role
    statements = statements_of(resources, MAINTENANCE)

    # When reading the statement that allows PutItem
    [granted] = statements_for(statements, "dynamodb:PutItem")

    # Then it holds only in the registry's partition (the registry and its audit chain)
    assert granted["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["STREAM#signing-keys"]}
    }


def test_admin_creates_only_tagged_signing_keys(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the statement that allows CreateKey
    [create] = statements_for(statements, "kms:CreateKey")

    # Then the request must create a P-256 signing key tagged for token signing, and no other tag
    assert create["Resource"] == "*"
    assert create["Condition"] == {
        "StringEquals": {**TOKEN_SIGNING_REQUEST_TAG, **P256_SIGNING_KEY},
        **SINGLE_REGION,
        **ONLY_THE_PURPOSE_TAG,
    }


def test_admin_tags_only_with_the_token_signing_tag(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the statement that allows TagResource (CreateKey with tags needs it)
    [tag] = statements_for(statements, "kms:TagResource")

    # Then it sets only this stack's tag, and only on a P-256 signing key (never on the table's
    # symmetric key, nor on any other kind of key: an existing key always carries its shape);
    # the shape is IfExists because AWS does not document it for the TagResource CreateKey
    # implies (CreateKey itself requires it)
    assert tag["Resource"] == KMS_KEYS
    assert tag["Condition"] == {
        "StringEquals": TOKEN_SIGNING_REQUEST_TAG,
        # never re-tags another stack's key, never a key of another shape
        "StringEqualsIfExists": {**TOKEN_SIGNING_TAG, **P256_SIGNING_KEY},
        "BoolIfExists": {"kms:MultiRegion": "false"},
        **ONLY_THE_PURPOSE_TAG,
    }


@pytest.mark.parametrize("service", [ADMIN, TOKEN, DISCOVERY, INTROSPECT, MAINTENANCE])
def test_every_key_statement_is_scoped_to_this_stacks_signing_keys(
    resources: dict[str, dict], service: str
) -> None:
    # Given one function's role
    statements = [render(s) for s in statements_of(resources, service)]

    # When reading its statements on key/* (all keys of the account and region)
    on_keys = [s for s in statements if s["Resource"] == KMS_KEYS]

    # Then each holds only for P-256 signing keys of this stack: the tag (existing keys) or the
    # request tag (tagging a key being created); the shape is required, or for TagResource
    # required whenever KMS supplies it (it always does for an existing key)
    assert on_keys, service
    for statement in on_keys:
        condition = statement["Condition"]["StringEquals"]
        shape = statement["Condition"].get("StringEqualsIfExists", condition)
        if statement["Action"] != "kms:TagResource":
            shape = condition
        assert shape.items() >= P256_SIGNING_KEY.items(), statement
        assert condition.items() >= TOKEN_SIGNING_TAG.items() or (
            condition.items() >= TOKEN_SIGNING_REQUEST_TAG.items()
        ), statement


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
    assert resources_for(statements, "iot:DescribeThing") == [things]
    assert resources_for(statements, "iot:ListThingPrincipals") == [things]
    # By the Service Authorization Reference: Attach/DetachThingPrincipal are authorized on the
    # certificate (the thing is the iot:thingArn condition), AttachPolicy on its target only
    for action in ("iot:AttachThingPrincipal", "iot:DetachThingPrincipal"):
        [granted] = statements_for(statements, action)
        assert granted["Resource"] == certificates, action
        assert granted["Condition"] == {"ArnLike": {"iot:thingArn": things}}, action
    assert resources_for(statements, "iot:AttachPolicy") == [certificates]
    assert policies  # the profiles' policies exist, and no grant names them (see README)


def test_admin_ca_actions_are_scoped_to_ca_certificates(resources: dict[str, dict]) -> None:
    # Given the admin role
    statements = statements_of(resources, ADMIN)

    # When reading the resources of the CA actions that support resource-level permissions
    # Then they target CA certificates only
    for action in ("iot:DescribeCACertificate", "iot:UpdateCACertificate"):
        assert resources_for(statements, action) == [f"{IOT_ARN_PREFIX}:cacert/*"]


def test_each_function_has_its_own_role_without_managed_policies(
    resources: dict[str, dict],
) -> None:
    # Given every function
    roles = [role_of(function_by_service(resources, service)[1]) for service in EXPECTED_ACTIONS]

    # When reading their roles
    # Then the roles are distinct, assumable by Lambda only, with no AWS managed policy
    assert len(set(roles)) == len(EXPECTED_ACTIONS)
    for role_id in roles:
        props = resources[role_id]["Properties"]
        assert "ManagedPolicyArns" not in props
        [statement] = props["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}


def test_table_key_policy_denies_its_management_to_every_function_role(
    resources: dict[str, dict],
) -> None:
    # Given the table's key and every function's role
    key = resources[table_key_id(resources)]
    roles = {role_of(function_by_service(resources, s)[1]) for s in EXPECTED_ACTIONS}

    # When reading the Deny statements of its key policy
    [deny] = [s for s in key["Properties"]["KeyPolicy"]["Statement"] if s["Effect"] == "Deny"]

    # Then no function role may tag, re-permission, disable or delete it, whatever IAM grants
    assert deny["Principal"] == {"AWS": "*"} and deny["Resource"] == "*"
    assert set(deny["Action"]) == set(constants.TABLE_KEY_DENIED_ACTIONS)
    assert {
        "kms:TagResource",
        "kms:ScheduleKeyDeletion",
        "kms:DisableKey",
        "kms:PutKeyPolicy",
        "kms:CreateGrant",
        "kms:ReplicateKey",
        "kms:RotateKeyOnDemand",
        "kms:ImportKeyMaterial",
    } <= set(deny["Action"])
    denied = {arn["Fn::GetAtt"][0] for arn in deny["Condition"]["ArnEquals"]["aws:PrincipalArn"]}
    assert denied == roles
