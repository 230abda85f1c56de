"""Least privilege: each function's own role grants what the function calls, and nothing more."""

import pytest
from fleetkey_infra import constants
from infra_template import (
    IOT_ARN_PREFIX,
    allowed_actions,
    function_by_service,
    of_type,
    only,
    resources_for,
    role_of,
    role_statements,
)

TABLE_ACTIONS = {
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
}
KEY_ACTIONS = {"kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"}
LOG_ACTIONS = {"logs:CreateLogStream", "logs:PutLogEvents"}
TRACING_ACTIONS = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}

EXPECTED_ACTIONS = {
    constants.REGISTRATION_SERVICE_NAME: TABLE_ACTIONS
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
    constants.ADMIN_SERVICE_NAME: TABLE_ACTIONS
    | KEY_ACTIONS
    | LOG_ACTIONS
    | TRACING_ACTIONS
    | {
        "iot:GetRegistrationCode",
        "iot:RegisterCACertificate",
        "iot:UpdateCACertificate",
        "iot:DescribeCACertificate",
    },
}
# Actions neither function may ever hold, whatever else changes.
FORBIDDEN = {
    "iot:DeleteThing",
    "iot:DeleteCertificate",
    "iot:DeleteCACertificate",
    "iot:DeletePolicy",
    "iot:CreatePolicy",
    "dynamodb:Scan",
    "dynamodb:DeleteItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:DeleteTable",
    "kms:ScheduleKeyDeletion",
    "kms:PutKeyPolicy",
}
# The only actions allowed on Resource "*", because they support no resource-level permissions.
STAR_ACTIONS = {
    constants.REGISTRATION_SERVICE_NAME: TRACING_ACTIONS,
    constants.ADMIN_SERVICE_NAME: TRACING_ACTIONS
    | {"iot:GetRegistrationCode", "iot:RegisterCACertificate"},
}


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
    # Given the table, the key and one function's role
    table_id, _ = only(resources, "AWS::DynamoDB::Table")
    key_id, _ = only(resources, "AWS::KMS::Key")
    statements = statements_of(resources, service)

    # When reading the resources of the table and key actions
    # Then each is the one table (no index, no other table) and the one key
    for action in TABLE_ACTIONS:
        assert resources_for(statements, action) == [f"<{table_id}.Arn>"], action
    for action in KEY_ACTIONS:
        assert resources_for(statements, action) == [f"<{key_id}.Arn>"], action


def test_registration_iot_actions_are_scoped_to_certificates_things_and_profile_policies(
    resources: dict[str, dict],
) -> None:
    # Given the registration role and the profile policies
    statements = statements_of(resources, constants.REGISTRATION_SERVICE_NAME)
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
    statements = statements_of(resources, constants.ADMIN_SERVICE_NAME)

    # When reading the resources of the CA actions that support resource-level permissions
    # Then they target CA certificates only
    for action in ("iot:UpdateCACertificate", "iot:DescribeCACertificate"):
        assert resources_for(statements, action) == [f"{IOT_ARN_PREFIX}:cacert/*"]


def test_each_function_has_its_own_role_without_managed_policies(
    resources: dict[str, dict],
) -> None:
    # Given both functions
    roles = [
        role_of(function_by_service(resources, service)[1]) for service in EXPECTED_ACTIONS
    ]

    # When reading their roles
    # Then the roles are distinct, assumable by Lambda only, with no AWS managed policy
    assert len(set(roles)) == 2
    for role_id in roles:
        props = resources[role_id]["Properties"]
        assert "ManagedPolicyArns" not in props
        [statement] = props["AssumeRolePolicyDocument"]["Statement"]
        assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}
