"""The fleetkey table and the customer managed key that encrypts it."""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey.store import schema
from fleetkey_infra import constants


class Data(Construct):
    """One DynamoDB table (the single-table layout of `fleetkey.store.schema`) and its CMK.

    Attributes: `key` (kms.Key), `table` (dynamodb.Table).
    """

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.key = self._build_key()
        self.table = self._build_table(self.key)

    def _build_key(self) -> kms.Key:
        # Retained: a retained table is unreadable without the key that encrypts it.
        return kms.Key(
            self,
            "Key",
            description="fleetkey: encrypts the device registry table",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )

    def deny_key_management(self, roles: Sequence[iam.IRole]) -> None:
        """Deny `roles` (the functions') every management action on the table's key in the key's
        own policy, whatever IAM grants them: none may tag it (as a signing key, say), change its
        policy or grants, disable it or schedule its deletion."""
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="NoFleetkeyFunctionManagesTheTableKey",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=list(constants.TABLE_KEY_DENIED_ACTIONS),
                resources=["*"],
                conditions={"ArnEquals": {"aws:PrincipalArn": [r.role_arn for r in roles]}},
            )
        )

    def _build_table(self, key: kms.IKey) -> dynamodb.Table:
        # Table (AWS::DynamoDB::Table) rather than TableV2 (AWS::DynamoDB::GlobalTable): fleetkey is
        # single-region, and the plain resource type is what cdk-nag and cfn-lint check fully.
        return dynamodb.Table(
            self,
            "Table",
            partition_key=dynamodb.Attribute(
                name=schema.PARTITION_KEY, type=dynamodb.AttributeType.STRING
            ),
            sort_key=dynamodb.Attribute(name=schema.SORT_KEY, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=key,
            time_to_live_attribute=schema.TTL_ATTRIBUTE,
            # The table is the device registry and audit trail: never lose it to a stack change.
            removal_policy=RemovalPolicy.RETAIN,
            deletion_protection=True,
        )
