"""Devices' data keys: the KMS key that wraps them, and the policy a backend attaches to unwrap
them (scoped by encryption context)."""

import pytest

from fleetkey_infra import constants
from infra_template import (
    data_key_key_id,
    function_by_service,
    of_type,
    only,
    output_ref,
    render,
    role_of,
)

CONTEXT_KEYS = ["fleetkey:device_id", "fleetkey:owner", "fleetkey:epoch"]


def test_data_key_key_is_symmetric_rotating_and_retained(resources: dict[str, dict]) -> None:
    # Given the data-key KMS key
    key = resources[data_key_key_id(resources)]
    props = key["Properties"]

    # When reading its settings
    # Then it is a symmetric encryption key (GenerateDataKey needs one), rotated yearly by KMS
    # (old material still decrypts old blobs), and outlives the stack like the table holding the
    # blobs it wraps
    assert props.get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT"
    assert props.get("KeyUsage", "ENCRYPT_DECRYPT") == "ENCRYPT_DECRYPT"
    assert props["EnableKeyRotation"] is True
    assert props["Description"] == constants.DATA_KEY_DESCRIPTION
    assert key["DeletionPolicy"] == "Retain"
    assert key["UpdateReplacePolicy"] == "Retain"


def test_data_key_key_has_an_alias_named_after_the_stack(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the stack's KMS aliases
    _, alias = only(resources, "AWS::KMS::Alias")

    # When reading the one alias
    # Then it names the data-key key, after the stack (aliases are unique per account and region)
    assert alias["Properties"]["AliasName"] == f"alias/{constants.STACK_ID}/data-keys"
    assert alias["Properties"]["TargetKeyId"] == {"Fn::GetAtt": [data_key_key_id(resources), "Arn"]}
    assert output_ref(template_outputs, "DataKeyId") == data_key_key_id(resources)


def test_data_key_key_policy_delegates_to_iam_and_denies_functions_its_management(
    resources: dict[str, dict],
) -> None:
    # Given the data-key key's policy and every function's role
    statements = resources[data_key_key_id(resources)]["Properties"]["KeyPolicy"]["Statement"]
    roles = {
        role_of(r)
        for r in of_type(resources, "AWS::Lambda::Function").values()
        if r["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"].startswith(
            "fleetkey-"
        )
    }

    # When reading its statements
    [allow] = [s for s in statements if s["Effect"] == "Allow"]
    [deny] = [s for s in statements if s["Effect"] == "Deny"]

    # Then the account's IAM governs it (the data_keys role's grant and the backend's policy
    # count), and no function role may tag, re-permission, disable or delete it
    assert render(allow["Principal"]) == {"AWS": "arn:<AWS::Partition>:iam::<AWS::AccountId>:root"}
    assert allow["Action"] == "kms:*"
    assert deny["Principal"] == {"AWS": "*"} and deny["Resource"] == "*"
    assert set(deny["Action"]) == set(constants.TABLE_KEY_DENIED_ACTIONS)
    denied = {arn["Fn::GetAtt"][0] for arn in deny["Condition"]["ArnEquals"]["aws:PrincipalArn"]}
    assert denied == roles and len(roles) == 12


def backend_policy(
    resources: dict[str, dict], outputs: dict[str, dict]
) -> tuple[str, dict[str, object]]:
    policy_id = output_ref(outputs, "DataKeyDecryptPolicyArn")
    return policy_id, resources[policy_id]["Properties"]


def test_backend_policy_decrypts_with_the_data_key_key_only(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the customer managed policy the stack outputs for backends
    policy_id, props = backend_policy(resources, template_outputs)

    # When reading its one statement
    [statement] = props["PolicyDocument"]["Statement"]

    # Then it is a managed policy attached to nothing (the backend's deployer attaches it), and
    # allows kms:Decrypt alone on the data-key key alone
    assert resources[policy_id]["Type"] == "AWS::IAM::ManagedPolicy"
    assert not {"Roles", "Users", "Groups"} & set(props)
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "kms:Decrypt"
    assert statement["Resource"] == {"Fn::GetAtt": [data_key_key_id(resources), "Arn"]}


def test_backend_policy_requires_exactly_fleetkeys_encryption_context(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the backend policy's statement
    _, props = backend_policy(resources, template_outputs)
    [statement] = props["PolicyDocument"]["Statement"]

    # When reading its conditions
    # Then the request's encryption context may hold no key but fleetkey's three, and must hold
    # each of them (ForAllValues alone would also allow an empty context)
    assert statement["Condition"] == {
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": CONTEXT_KEYS},
        "Null": {f"kms:EncryptionContext:{key}": "false" for key in CONTEXT_KEYS},
    }
    assert list(constants.DATA_KEY_CONTEXT_KEYS) == CONTEXT_KEYS


def context_allows(condition: dict[str, dict[str, object]], context: dict[str, str]) -> bool:
    """IAM's reading of the backend policy's conditions for a kms:Decrypt request with the
    encryption `context`. Only the operators the policy uses: `ForAllValues:StringEquals` on
    kms:EncryptionContextKeys (every key of the request is listed; true for none), `Null`
    (`"false"`: the key is present) and `StringEquals` on kms:EncryptionContext:<key> (the
    narrowing to one owner). (tests/support/aws_calls.py does not model `Null`.)"""
    values = {"kms:EncryptionContextKeys": list(context)} | {
        f"kms:EncryptionContext:{k}": [v] for k, v in context.items()
    }
    for operator, keys in condition.items():
        for key, wanted in keys.items():
            present = values.get(key)
            if operator == "ForAllValues:StringEquals":
                holds = all(v in wanted for v in present or [])  # type: ignore[operator]
            elif operator == "Null":
                holds = (present is None) == (wanted == "true")
            elif operator == "StringEquals":
                holds = present is not None and any(v == wanted for v in present)
            else:
                raise AssertionError(f"operator not modeled here: {operator}")
            if not holds:
                return False
    return True


FULL = {"fleetkey:device_id": "pump-1", "fleetkey:owner": "acme", "fleetkey:epoch": "2"}


@pytest.mark.parametrize(
    ("context", "allowed"),
    [
        (FULL, True),
        ({**FULL, "fleetkey:owner": "-"}, True),  # a device without an owner
        ({}, False),  # no context: not a fleetkey data key
        ({"fleetkey:device_id": "pump-1", "fleetkey:epoch": "2"}, False),
        ({**FULL, "purpose": "other"}, False),  # another key in the context
        ({"aws:dynamodb:tableName": "t"}, False),  # e.g. DynamoDB's own use of a key
    ],
    ids=["full", "no-owner", "empty", "missing-key", "extra-key", "other"],
)
def test_backend_policy_decides_by_the_encryption_context(
    resources: dict[str, dict],
    template_outputs: dict[str, dict],
    context: dict[str, str],
    allowed: bool,
) -> None:
    # Given the backend policy's conditions
    _, props = backend_policy(resources, template_outputs)
    [statement] = props["PolicyDocument"]["Statement"]

    # When a backend decrypts a blob with some encryption context
    # Then only fleetkey's exact context is allowed
    assert context_allows(statement["Condition"], context) is allowed


def test_narrowing_to_one_owner_refuses_other_owners(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the backend policy narrowed to one owner, as infra/README.md explains
    _, props = backend_policy(resources, template_outputs)
    [statement] = props["PolicyDocument"]["Statement"]
    narrowed = {
        **statement["Condition"],
        "StringEquals": {"kms:EncryptionContext:fleetkey:owner": "acme"},
    }

    # When decrypting blobs of that owner and of another
    # Then only that owner's are allowed
    assert context_allows(narrowed, FULL) is True
    assert context_allows(narrowed, {**FULL, "fleetkey:owner": "globex"}) is False


def test_admin_hands_out_wrapped_blobs_only(resources: dict[str, dict]) -> None:
    # Given the admin function (GET /v1/admin/devices/{id}/data-key answers the wrapped blob)
    _, admin = function_by_service(resources, constants.ADMIN_SERVICE_NAME)
    key_arn = f"<{data_key_key_id(resources)}.Arn>"

    # When looking for a grant on the data-key key in its role
    statements = [
        render(s)
        for p in of_type(resources, "AWS::IAM::Policy").values()
        if {"Ref": role_of(admin)} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]

    # Then there is none: it knows the key's id, the backend decrypts with its own policy
    assert not [s for s in statements if key_arn in str(s["Resource"])]
