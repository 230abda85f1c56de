"""The table and its key: the single-table layout of the core, encrypted, recoverable, retained."""

import pytest
from aws_cdk import App, Stack
from aws_cdk.assertions import Match, Template

from fleetkey.store import schema
from fleetkey_infra import constants
from fleetkey_infra.constructs import Data
from fleetkey_infra.constructs.data import DataConfigError, pitr_recovery_days
from infra_template import only, table_key_id


def test_table_uses_the_core_schema_keys_on_demand(template: Template) -> None:
    # Given the synthesized stack
    # When reading the table
    # Then its keys, billing and TTL are the ones fleetkey.store.schema defines
    template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [
                {"AttributeName": schema.PARTITION_KEY, "KeyType": "HASH"},
                {"AttributeName": schema.SORT_KEY, "KeyType": "RANGE"},
            ],
            "AttributeDefinitions": Match.array_with(
                [
                    {"AttributeName": schema.PARTITION_KEY, "AttributeType": "S"},
                    {"AttributeName": schema.SORT_KEY, "AttributeType": "S"},
                ]
            ),
            "BillingMode": "PAY_PER_REQUEST",
            "TimeToLiveSpecification": {"AttributeName": schema.TTL_ATTRIBUTE, "Enabled": True},
        },
    )


def test_table_has_point_in_time_recovery_and_deletion_protection(template: Template) -> None:
    # Given the synthesized stack
    # When reading the table resource
    # Then it is recoverable and survives both a stack deletion and a replacement
    template.has_resource(
        "AWS::DynamoDB::Table",
        {
            "Properties": Match.object_like(
                {
                    "PointInTimeRecoverySpecification": {
                        "PointInTimeRecoveryEnabled": True,
                        # cdk.json's pitrRecoveryDays, or the default: how long a destroyed data
                        # key's wrapped blob stays restorable
                        "RecoveryPeriodInDays": constants.DEFAULT_PITR_RECOVERY_DAYS,
                    },
                    "DeletionProtectionEnabled": True,
                }
            ),
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
        },
    )


def test_table_is_encrypted_with_the_rotating_customer_managed_key(
    resources: dict[str, dict],
) -> None:
    # Given the table and the key that encrypts it
    key_id = table_key_id(resources)
    key = resources[key_id]
    _, table = only(resources, "AWS::DynamoDB::Table")

    # When reading the table's encryption settings
    sse = table["Properties"]["SSESpecification"]

    # Then the table uses that key, which rotates and outlives the stack like the table
    assert sse == {
        "SSEEnabled": True,
        "SSEType": "KMS",
        "KMSMasterKeyId": {"Fn::GetAtt": [key_id, "Arn"]},
    }
    assert key["Type"] == "AWS::KMS::Key"
    assert key["Properties"].get("KeySpec", "SYMMETRIC_DEFAULT") == "SYMMETRIC_DEFAULT"
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Retain"


def _table_pitr(context: dict[str, object]) -> dict:
    """The Data construct alone, in a stack with `context`: its table's PITR specification."""
    stack = Stack(App(context=context), "PitrTest")
    Data(stack, "Data")
    [table] = Template.from_stack(stack).find_resources("AWS::DynamoDB::Table").values()
    return table["Properties"]["PointInTimeRecoverySpecification"]


def test_default_recovery_period_is_seven_days() -> None:
    # Given no pitrRecoveryDays in context
    # When synthesizing the table
    # Then point-in-time recovery reaches back 7 days (DynamoDB's own default would be 35)
    assert constants.DEFAULT_PITR_RECOVERY_DAYS == 7
    assert _table_pitr({}) == {"PointInTimeRecoveryEnabled": True, "RecoveryPeriodInDays": 7}


@pytest.mark.parametrize(("value", "days"), [(1, 1), (35, 35), ("14", 14)])
def test_recovery_period_comes_from_context(value: object, days: int) -> None:
    # Given pitrRecoveryDays in context (a number, or a string as `cdk -c` passes it)
    # When synthesizing the table
    # Then that is its recovery period
    spec = _table_pitr({constants.PITR_RECOVERY_DAYS_CONTEXT_KEY: value})
    assert spec == {"PointInTimeRecoveryEnabled": True, "RecoveryPeriodInDays": days}


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (0, "between 1 and 35"),
        (36, "between 1 and 35"),
        ("-3", "whole number"),
        ("a week", "whole number"),
        (7.5, "whole number"),
        (True, "whole number"),
    ],
)
def test_an_impossible_recovery_period_fails_synthesis(value: object, complaint: str) -> None:
    # Given a recovery period DynamoDB would refuse
    # When reading it, Then synthesis stops and says what to fix
    with pytest.raises(DataConfigError, match=complaint):
        pitr_recovery_days({constants.PITR_RECOVERY_DAYS_CONTEXT_KEY: value}.get)
