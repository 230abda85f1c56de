"""The table and its key: the single-table layout of the core, encrypted, recoverable, retained."""

from aws_cdk.assertions import Match, Template

from fleetkey.store import schema
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
                    "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
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
