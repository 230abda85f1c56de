"""The fleetkey table and the customer managed key that encrypts it.

Point-in-time recovery keeps `pitrRecoveryDays` (cdk.json context, 1 to 35, default 7) days of
the table restorable. That is also how long a data key destroyed at decommission (its KMS-wrapped
blob deleted from the table) survives in the table's backups: only wrapped, usable only with
kms:Decrypt on the data-key key.

The sparse global secondary indexes `due` (partition `due_shard`, sort `due_at`) and `renewal`
(partition `renewal_shard`, sort `renew_at`), keys only, hold the devices with a rotation
deadline or a renewal due (`fleetkey.domain.rotation`): the sweep queries their eight shards for
moments up to now, so its cost follows what is due, not the fleet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey.store import schema
from fleetkey_infra import constants


class DataConfigError(ValueError):
    """The table's configuration (CDK context) cannot be deployed as given."""


def pitr_recovery_days(get: Callable[[str], object]) -> int:
    """`pitrRecoveryDays` from CDK context (`node.try_get_context`, or a dict's `get`): a whole
    number of days within DynamoDB's 1 to 35; absent, the default (7).

    Raises:
        DataConfigError: not a whole number, or out of range.
    """
    key = constants.PITR_RECOVERY_DAYS_CONTEXT_KEY
    value = get(key)
    if value is None:
        return constants.DEFAULT_PITR_RECOVERY_DAYS
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # `cdk synth -c pitrRecoveryDays=14` passes a string
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataConfigError(f"{key} must be a whole number of days, not {value!r}")
    low, high = constants.PITR_RECOVERY_DAYS_RANGE
    if not low <= value <= high:
        raise DataConfigError(
            f"{key} must be between {low} and {high} days (DynamoDB's recovery period), not {value}"
        )
    return value


class Data(Construct):
    """One DynamoDB table (the single-table layout of `fleetkey.store.schema`) with its `due`
    index, and its CMK.

    Attributes: `key` (kms.Key), `table` (dynamodb.Table), `recovery_period_days` (int: how far
    back point-in-time recovery reaches, from context `pitrRecoveryDays`), `due_index_arn` (str:
    the `due` index's ARN, which IAM authorizes queries of the index on).
    """

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.recovery_period_days = pitr_recovery_days(self.node.try_get_context)
        self.key = self._build_key()
        self.table = self._build_table(self.key)
        self._add_sparse_indexes(self.table)
        self.due_index_arn = f"{self.table.table_arn}/index/{constants.DUE_INDEX_NAME}"
        self.renewal_index_arn = f"{self.table.table_arn}/index/{constants.RENEWAL_INDEX_NAME}"

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

    @staticmethod
    def _add_sparse_indexes(table: dynamodb.Table) -> None:
        # Keys only: the sweep reads each due device's item anyway, to act on its current state.
        for name, (partition, sort) in constants.SPARSE_INDEXES.items():
            table.add_global_secondary_index(
                index_name=name,
                partition_key=dynamodb.Attribute(
                    name=partition, type=dynamodb.AttributeType.STRING
                ),
                sort_key=dynamodb.Attribute(name=sort, type=dynamodb.AttributeType.NUMBER),
                projection_type=dynamodb.ProjectionType.KEYS_ONLY,
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
            # A short recovery period bounds how long deleted items (a destroyed data key's
            # wrapped blob among them) stay restorable.
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True,
                recovery_period_in_days=self.recovery_period_days,
            ),
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=key,
            time_to_live_attribute=schema.TTL_ATTRIBUTE,
            # The table is the device registry and audit trail: never lose it to a stack change.
            removal_policy=RemovalPolicy.RETAIN,
            deletion_protection=True,
        )
