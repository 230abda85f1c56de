"""Least privilege: each function's own role grants what the function calls, and nothing more."""

import pytest

from fleetkey_infra import constants
from infra_template import (
    IOT_ARN_PREFIX,
    KMS_KEYS,
    allowed_actions,
    data_key_key_id,
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
CONVERGE = constants.CONVERGE_SERVICE_NAME
DEVICE_EVENTS = constants.DEVICE_EVENTS_SERVICE_NAME
DATA_KEYS = constants.DATA_KEYS_SERVICE_NAME
ROTATION = constants.ROTATION_SERVICE_NAME
ROTATION_EVENTS = constants.ROTATION_EVENTS_SERVICE_NAME
VALIDATIONS = constants.VALIDATIONS_SERVICE_NAME

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
# the jti write checks the device (ConditionCheck DEVICE#) and, attested, the firmware release
# (ConditionCheck FIRMWARE#) in the same transaction; a validation's answer decides it (Update
# VALIDATION#).
TOKEN_TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:DeleteItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:UpdateItem",
}
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
# Lifecycle changes (converge, device_events): reads, and the device item's Update with its audit
# record's Put, in devices' partitions only.
LIFECYCLE_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"}
# Suspend / resume in AWS IoT (admin, device_events): certificates INACTIVE <-> ACTIVE, the MQTT
# connection closed, the iot-data endpoint looked up.
SUSPEND_ACTIONS = {
    "iot:DescribeCertificate",
    "iot:UpdateCertificate",
    "iot:DeleteConnection",
    "iot:DescribeEndpoint",
}
# A certificate's removal from AWS IoT (JITR sets aside a decommissioned device's certificate;
# recommission removes the factory certificate whatever AWS IoT holds for it).
SET_ASIDE_ACTIONS = {
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DeleteCertificate",
}
# Teardown after decommission (converge).
TEARDOWN_ACTIONS = SUSPEND_ACTIONS | {
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DeleteCertificate",
    "iot:DescribeThing",
    "iot:ListThingPrincipals",
    "iot:DetachThingPrincipal",
    "iot:DeleteThing",
    "iot:Publish",  # the reset command
}
# What Lambda's SQS poller does with a consumer's role (the event source's grant): converge's
# (the lifecycle queue), registration's (its retry queue).
QUEUE_CONSUMER_ACTIONS = {
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
    "sqs:GetQueueUrl",
}
# The async failure destination (CDK's SqsDestination grant).
FAILURE_DESTINATION_ACTIONS = {"sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}
# data_keys: reads (GetItem); the assertion's jti (Put JTI#, Delete NONCE#, ConditionCheck
# DEVICE#), a life's first data key (Put DATAKEY#) with its record in the device's chain (Update
# and Put DEVICE#); wraps and unwraps with the data-key key.
DATA_KEYS_TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DeleteItem",
}
DATA_KEY_KEY_ACTIONS = {"kms:GenerateDataKey", "kms:Decrypt"}
# Certificate rotation (draft, reconciled with the recorded calls): rotation reads any item and
# writes its own partitions (see test_infra_rotation.py); rotation_events also queries the `due`
# index (on the index's ARN).
ROTATION_TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:DeleteItem",
}
ROTATION_EVENTS_TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",  # the previous CRL's chunks (PKI#)
}
# The issuing CA's keys through IAM: read them (both), create and tag them (rotation). kms:Sign is
# the CA key's own policy's, never IAM's (FORBIDDEN below).
ISSUING_CA_READ_ACTIONS = {"kms:GetPublicKey"}
ISSUING_CA_CREATE_ACTIONS = {"kms:CreateKey", "kms:TagResource"}
# A certificate fleetkey issues, in AWS IoT: registered, bound to the device's policy and thing.
ISSUE_CERTIFICATE_ACTIONS = {
    "iot:RegisterCertificate",
    "iot:AttachPolicy",
    "iot:AttachThingPrincipal",
    "iot:DescribeCertificate",
    "iot:UpdateCertificate",
}
# ... and taken out of AWS IoT (a rollback, a retired certificate's deletion; a registration that
# finds its rotation rolled back meanwhile).
RETIRE_CERTIFICATE_ACTIONS = {
    "iot:DescribeCertificate",
    "iot:UpdateCertificate",
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DetachThingPrincipal",
    "iot:DeleteCertificate",
}
# validations: reads (the device, the validation), new validations only (Put VALIDATION#: the
# token function decides them); the command to the device (iot-data Publish, the endpoint looked
# up).
VALIDATIONS_TABLE_ACTIONS = {"dynamodb:GetItem", "dynamodb:PutItem"}
TABLE_GRANTS = {
    REGISTRATION: (TABLE_ACTIONS, KEY_ACTIONS),
    ADMIN: (ADMIN_TABLE_ACTIONS, KEY_ACTIONS),
    TOKEN: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    DISCOVERY: (READ_TABLE_ACTIONS, READ_KEY_ACTIONS),
    INTROSPECT: (READ_TABLE_ACTIONS, READ_KEY_ACTIONS),
    MAINTENANCE: (MAINTENANCE_TABLE_ACTIONS, KEY_ACTIONS),
    CONVERGE: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    DEVICE_EVENTS: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    DATA_KEYS: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    ROTATION: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    ROTATION_EVENTS: ({"dynamodb:GetItem"}, KEY_ACTIONS),
    VALIDATIONS: ({"dynamodb:GetItem"}, KEY_ACTIONS),
}
# Table actions granted under a dynamodb:LeadingKeys condition, in statements of their own.
# (rotation_events' Query is also granted on the `due` index: test_infra_rotation.py.)
CONDITIONED_TABLE_ACTIONS = {
    TOKEN: {
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
        "dynamodb:ConditionCheckItem",
        "dynamodb:UpdateItem",
    },
    CONVERGE: {"dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query", "dynamodb:DeleteItem"},
    DEVICE_EVENTS: {"dynamodb:PutItem", "dynamodb:UpdateItem"},
    DATA_KEYS: DATA_KEYS_TABLE_ACTIONS - {"dynamodb:GetItem"},
    ROTATION: ROTATION_TABLE_ACTIONS - {"dynamodb:GetItem"},
    ROTATION_EVENTS: ROTATION_EVENTS_TABLE_ACTIONS - {"dynamodb:GetItem", "dynamodb:Query"},
    VALIDATIONS: VALIDATIONS_TABLE_ACTIONS - {"dynamodb:GetItem"},
}

EXPECTED_ACTIONS = {
    REGISTRATION: TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | FAILURE_DESTINATION_ACTIONS  # the retry queue (Lambda's destination) ...
    | QUEUE_CONSUMER_ACTIONS  # ... which the function consumes (the event source's grant)
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
    }
    | SET_ASIDE_ACTIONS,
    ADMIN: ADMIN_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TOKEN_KEY_ADMIN_ACTIONS
    | SUSPEND_ACTIONS
    | {"sqs:SendMessage"}  # decommission queues the teardown
    | SET_ASIDE_ACTIONS  # recommission removes the factory certificate from AWS IoT
    | {"iot:DetachThingPrincipal"}
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
    CONVERGE: LIFECYCLE_TABLE_ACTIONS
    | {"dynamodb:Query", "dynamodb:DeleteItem"}  # destroying data keys: DATAKEY# only
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | TEARDOWN_ACTIONS
    | QUEUE_CONSUMER_ACTIONS,
    DEVICE_EVENTS: LIFECYCLE_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | SUSPEND_ACTIONS
    | FAILURE_DESTINATION_ACTIONS,  # its failure queue, and the lifecycle queue (SendMessage)
    DATA_KEYS: DATA_KEYS_TABLE_ACTIONS
    | KEY_ACTIONS
    | DATA_KEY_KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS,
    ROTATION: ROTATION_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | ISSUING_CA_READ_ACTIONS
    | ISSUING_CA_CREATE_ACTIONS
    | {"iot:GetRegistrationCode", "iot:RegisterCACertificate"}  # the issuing CA
    | ISSUE_CERTIFICATE_ACTIONS
    | RETIRE_CERTIFICATE_ACTIONS
    | {"sqs:SendMessage"},  # the lifecycle queue
    ROTATION_EVENTS: ROTATION_EVENTS_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | ISSUING_CA_READ_ACTIONS
    | RETIRE_CERTIFICATE_ACTIONS
    | {"iot:Publish", "iot:DescribeEndpoint"}  # renewal commands
    | FAILURE_DESTINATION_ACTIONS,  # its failure queue, and the lifecycle queue (SendMessage)
    VALIDATIONS: VALIDATIONS_TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | {"iot:Publish", "iot:DescribeEndpoint"},  # the validate command
}
# Actions no function may ever hold, whatever else changes.
FORBIDDEN = {
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
    # token signing keys (admin), the issuing CA's keys (rotation)
    "kms:CreateKey": {ADMIN, ROTATION},
    "kms:TagResource": {ADMIN, ROTATION},
    # consuming a challenge (token, data_keys, rotation), destroying data keys (converge), the
    # previous CRL's chunks (rotation_events)
    "dynamodb:DeleteItem": {TOKEN, CONVERGE, DATA_KEYS, ROTATION, ROTATION_EVENTS},
    # the teardown after decommission, and its reset command; a certificate set aside (JITR) or
    # removed before a recommission (admin); a retired certificate's deletion (rotation_events)
    "iot:DeleteCertificate": {CONVERGE, REGISTRATION, ADMIN, ROTATION, ROTATION_EVENTS},
    "iot:DeleteThing": {CONVERGE},
    "iot:DetachPolicy": {CONVERGE, REGISTRATION, ADMIN, ROTATION, ROTATION_EVENTS},
    # the reset command (converge), the renewal command (rotation_events), the validate command
    # (validations)
    "iot:Publish": {CONVERGE, ROTATION_EVENTS, VALIDATIONS},
    # certificates fleetkey issues
    "iot:RegisterCertificate": {ROTATION},
    # suspend and teardown close the device's MQTT connection
    "iot:DeleteConnection": {ADMIN, DEVICE_EVENTS, CONVERGE},
    # the lifecycle queue (converge), the registration retry queue (registration)
    "sqs:ReceiveMessage": {CONVERGE, REGISTRATION},
}
# The only actions allowed on Resource "*", because they support no resource-level permissions.
STAR_ACTIONS = {
    REGISTRATION: TRACING_ACTIONS,
    ADMIN: TRACING_ACTIONS
    | {
        "iot:GetRegistrationCode",
        "iot:RegisterCACertificate",
        "kms:CreateKey",
        "iot:DescribeEndpoint",
    },
    TOKEN: TRACING_ACTIONS,
    DISCOVERY: TRACING_ACTIONS,
    INTROSPECT: TRACING_ACTIONS,
    MAINTENANCE: TRACING_ACTIONS,
    CONVERGE: TRACING_ACTIONS | {"iot:DescribeEndpoint"},
    DEVICE_EVENTS: TRACING_ACTIONS | {"iot:DescribeEndpoint"},
    DATA_KEYS: TRACING_ACTIONS,
    ROTATION: TRACING_ACTIONS
    | {
        "iot:GetRegistrationCode",
        "iot:RegisterCACertificate",
        "iot:RegisterCertificate",
        "kms:CreateKey",
    },
    ROTATION_EVENTS: TRACING_ACTIONS | {"iot:DescribeEndpoint"},
    VALIDATIONS: TRACING_ACTIONS | {"iot:DescribeEndpoint"},
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
    # Then each is the one table (no index, no other table) and the one key (data_keys also
    # uses the data-key key, its own statement: see below)
    for action in table_actions | CONDITIONED_TABLE_ACTIONS.get(service, set()):
        assert resources_for(statements, action) == [f"<{table_id}.Arn>"], action
    data_key = {f"<{data_key_key_id(resources)}.Arn>"} if service == DATA_KEYS else set()
    for action in key_actions:
        expected = {f"<{key_id}.Arn>"} | (data_key if action in DATA_KEY_KEY_ACTIONS else set())
        granted = resources_for(statements, action)
        assert sorted(granted) == sorted(expected), action


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
    # and it only checks devices and firmware releases (in the jti's transaction), never writes
    # them
    [check] = statements_for(statements, "dynamodb:ConditionCheckItem")
    assert check["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["DEVICE#*", "FIRMWARE#*"]}
    }
    # and of the validations, it only decides those a device answers (their Update)
    [update] = statements_for(statements, "dynamodb:UpdateItem")
    assert update["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["VALIDATION#*"]}
    }


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
    assert policies  # the profiles' policies exist, and no grant names them (infra/README.md)


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


# ---- the lifecycle: suspend, teardown, data keys ------------------------------------------------

CERTIFICATES = f"{IOT_ARN_PREFIX}:cert/*"
THINGS = f"{IOT_ARN_PREFIX}:thing/*"
CLIENTS = f"{IOT_ARN_PREFIX}:client/*"


@pytest.mark.parametrize("service", [ADMIN, DEVICE_EVENTS])
def test_suspending_reaches_certificates_and_connections_only(
    resources: dict[str, dict], service: str
) -> None:
    # Given a role that suspends and resumes devices
    statements = statements_of(resources, service)

    # When reading the resources of the suspension's IoT actions
    # Then certificates are only described and updated (INACTIVE <-> ACTIVE), connections only
    # closed, and the endpoint lookup (no resource-level permissions) is the only '*'
    assert resources_for(statements, "iot:DescribeCertificate") == [CERTIFICATES]
    assert resources_for(statements, "iot:UpdateCertificate") == [CERTIFICATES]
    assert resources_for(statements, "iot:DeleteConnection") == [CLIENTS]
    assert resources_for(statements, "iot:DescribeEndpoint") == ["*"]


def test_converge_iot_actions_are_scoped_to_certificates_things_clients_and_reset_topics(
    resources: dict[str, dict],
) -> None:
    # Given the converge role
    statements = statements_of(resources, CONVERGE)

    # When reading the resources of each teardown action
    # Then certificates, things, clients and the reset command topics are the only targets
    for action in (
        "iot:DescribeCertificate",
        "iot:UpdateCertificate",
        "iot:ListAttachedPolicies",
        "iot:DetachPolicy",
        "iot:ListPrincipalThings",
        "iot:DeleteCertificate",
    ):
        assert resources_for(statements, action) == [CERTIFICATES], action
    for action in ("iot:DescribeThing", "iot:ListThingPrincipals", "iot:DeleteThing"):
        assert resources_for(statements, action) == [THINGS], action
    # DetachThingPrincipal: authorized on the certificate, the thing is iot:thingArn
    [detach] = statements_for(statements, "iot:DetachThingPrincipal")
    assert detach["Resource"] == CERTIFICATES
    assert detach["Condition"] == {"ArnLike": {"iot:thingArn": THINGS}}
    # the only command it sends is the reset, on the device's own command topic
    assert resources_for(statements, "iot:Publish") == [
        f"{IOT_ARN_PREFIX}:topic/fleetkey/*/commands/reset"
    ]
    assert resources_for(statements, "iot:DeleteConnection") == [CLIENTS]


@pytest.mark.parametrize("service", [CONVERGE, DEVICE_EVENTS])
def test_lifecycle_writes_only_devices(resources: dict[str, dict], service: str) -> None:
    # Given a role that applies lifecycle changes
    statements = statements_of(resources, service)

    # When reading the statement that allows Put and Update
    [put] = statements_for(statements, "dynamodb:PutItem")
    [update] = statements_for(statements, "dynamodb:UpdateItem")

    # Then both hold only in devices' partitions (the device item and its audit chain)
    assert put is not None and put == update
    assert put["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["DEVICE#*"]}}


def test_converge_deletes_only_data_keys(resources: dict[str, dict]) -> None:
    # Given the converge role
    statements = statements_of(resources, CONVERGE)

    # When reading the statement that allows DeleteItem (and the Query that lists the keys)
    [delete] = statements_for(statements, "dynamodb:DeleteItem")
    [query] = statements_for(statements, "dynamodb:Query")

    # Then both hold only in the data keys' partition: a device record and its audit trail stay
    assert delete == query
    assert delete["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["DATAKEY#*"]}
    }


@pytest.mark.parametrize(
    ("action", "partitions"),
    [
        ("dynamodb:PutItem", ["DATAKEY#*", "DEVICE#*", "JTI#*"]),
        ("dynamodb:UpdateItem", ["DEVICE#*"]),
        ("dynamodb:ConditionCheckItem", ["DEVICE#*"]),
        ("dynamodb:DeleteItem", ["NONCE#*"]),
    ],
)
def test_data_keys_writes_only_its_own_items(
    resources: dict[str, dict], action: str, partitions: list[str]
) -> None:
    # Given the data_keys role (internet-facing)
    statements = statements_of(resources, DATA_KEYS)

    # When reading the statement that allows one kind of write
    [granted] = statements_for(statements, action)

    # Then it holds only in the partitions the function writes: the assertion's jti and its
    # challenge, the device (checked; its data_key_created record), the data key
    assert granted["Condition"] == {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": partitions}}


def test_only_data_keys_uses_the_data_key_key(resources: dict[str, dict]) -> None:
    # Given the data-key KMS key and every role of the stack
    key_arn = f"<{data_key_key_id(resources)}.Arn>"
    data_keys_role = role_of(function_by_service(resources, DATA_KEYS)[1])

    # When collecting the statements on that key, role by role
    on_key = {
        role_id: [
            s for s in map(render, role_statements(resources, role_id)) if key_arn in s["Resource"]
        ]
        for role_id in of_type(resources, "AWS::IAM::Role")
    }

    # Then only the data_keys role has one, for wrapping and unwrapping data keys: not the admin
    # role (the backend decrypts, with its own policy), not converge (destroying a data key is a
    # table delete)
    assert {role_id for role_id, found in on_key.items() if found} == {data_keys_role}
    [statement] = on_key[data_keys_role]
    assert set(statement["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt"}
    assert statement["Resource"] == key_arn


def test_only_admin_device_events_and_rotation_send_to_the_lifecycle_queue(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the lifecycle queue and every function's role
    queue_arn = f"<{template_outputs['LifecycleQueueUrl']['Value']['Ref']}.Arn>"
    roles = {
        service: role_of(function_by_service(resources, service)[1]) for service in EXPECTED_ACTIONS
    }

    # When collecting who may send to it and who may receive from it
    senders = {
        service
        for service, role_id in roles.items()
        if queue_arn in resources_for(role_statements(resources, role_id), "sqs:SendMessage")
    }
    receivers = {
        service
        for service, role_id in roles.items()
        if queue_arn in resources_for(role_statements(resources, role_id), "sqs:ReceiveMessage")
    }

    # Then the admin API (decommission), device_events and the rotation functions queue work,
    # converge alone consumes it
    assert senders == {ADMIN, DEVICE_EVENTS, ROTATION, ROTATION_EVENTS}
    assert receivers == {CONVERGE}


# ---- validations ---------------------------------------------------------------------------------


def test_validations_writes_only_validations(resources: dict[str, dict]) -> None:
    # Given the validations role (relying parties' requests)
    statements = statements_of(resources, VALIDATIONS)

    # When reading the statements that allow writes
    [put] = statements_for(statements, "dynamodb:PutItem")

    # Then it records validations only: a relying party's request never writes a device, a
    # certificate or a token record, and never decides a validation (the token function does)
    assert not statements_for(statements, "dynamodb:UpdateItem")
    assert put["Condition"] == {
        "ForAllValues:StringLike": {"dynamodb:LeadingKeys": ["VALIDATION#*"]}
    }


def test_validations_publishes_only_validate_commands(resources: dict[str, dict]) -> None:
    # Given the validations role
    statements = statements_of(resources, VALIDATIONS)

    # When reading what it may publish
    # Then only the validate command, on a device's own command topic; and nothing of AWS IoT's
    # control plane but the iot-data endpoint's lookup
    assert resources_for(statements, "iot:Publish") == [
        f"{IOT_ARN_PREFIX}:topic/fleetkey/*/commands/validate"
    ]
    assert resources_for(statements, "iot:DescribeEndpoint") == ["*"]
    assert not {a for a in allowed_actions(statements) if a.startswith("kms:")} - KEY_ACTIONS
