"""The fleetkey table, as the adapters share it: item (de)serialization, strongly consistent
reads, and transactions whose cancelled conditions come back named.

Every state change is one conditional write (a transaction where a change and its audit record
must land together); nothing is ever read-modify-written without a condition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code
from fleetkey.domain.audit import AuditRecord
from fleetkey.errors import TransientAwsError
from fleetkey.ports import Write
from fleetkey.store import schema

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()

MAX_TRANSACTION_ATTEMPTS = 8
# Cancellation reasons a retry can outlast (the others, e.g. ValidationError, are our bug).
TRANSIENT_CANCELLATION_CODES = frozenset(
    {
        "TransactionConflict",
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "RequestLimitExceeded",
    }
)


def plain(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal; fleetkey stores whole numbers only."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, Decimal):
        return int(value)
    return value


def ser(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _serializer.serialize(v) for k, v in item.items() if v is not None}


def de(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deserializer.deserialize(v) for k, v in item.items()}


@dataclass
class ConditionFailed(Exception):
    """A transaction was cancelled because named conditions failed (internal to the adapters:
    they turn it into the domain exception the failed write names).

    `failed` names the actions whose condition failed; `items` holds, by name, the item as it was
    (for the actions that asked for it).
    """

    failed: list[str]
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"conditions failed: {', '.join(self.failed)}"


# An action of a transaction is a `Write` whose body is a TransactWriteItem.
Action = Write


class Table:
    """The fleetkey table. `client` is a boto3 DynamoDB client; None builds a real one."""

    def __init__(
        self, name: str, client: DynamoDBClient | None = None, region: str | None = None
    ) -> None:
        self.name = name
        self.client: DynamoDBClient = client or aws_client("dynamodb", region)

    def get(self, key: Mapping[str, str]) -> dict[str, Any] | None:
        """One item, strongly consistent. AWS calls: 1 (GetItem)."""
        response = self.client.get_item(TableName=self.name, Key=ser(key), ConsistentRead=True)
        item = response.get("Item")
        return de(item) if item else None

    def query(self, pk: str, sk_prefix: str | None = None) -> list[dict[str, Any]]:
        """Every item of a partition (with a sort key prefix), strongly consistent, all pages."""
        condition = "pk = :pk"
        values: dict[str, Any] = {":pk": pk}
        if sk_prefix:
            condition += " AND begins_with(sk, :prefix)"
            values[":prefix"] = sk_prefix
        kwargs: dict[str, Any] = {
            "TableName": self.name,
            "KeyConditionExpression": condition,
            "ExpressionAttributeValues": ser(values),
            "ConsistentRead": True,
        }
        items: list[dict[str, Any]] = []
        while True:
            response = self.client.query(**kwargs)
            items.extend(de(i) for i in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                return items
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def audit_put(self, record: AuditRecord) -> Action:
        """The Put of an audit record; a record at that position already is a conflict."""
        item = {
            **schema.audit_key(record.subject, record.seq),
            "subject": record.subject,
            "seq": record.seq,
            "at": record.at,
            "action": record.action,
            "body": record.body,
            "hash": record.hash,
        }
        return Action(
            f"audit:{record.subject}:{record.seq}",
            {
                "Put": {
                    "TableName": self.name,
                    "Item": ser(item),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
        )

    def transact(self, actions: Sequence[Action]) -> None:
        """Run a transaction; a cancelled one raises ConditionFailed naming the failed actions.

        Raises:
            ConditionFailed: conditions failed (items attached where the action asked for them).
            TransientAwsError: cancelled by a concurrent transaction or a capacity limit.
            botocore ClientError/BotoCoreError: any other failure.
        """
        try:
            self.client.transact_write_items(TransactItems=[a.body for a in actions])
        except ClientError as exc:
            if error_code(exc) != "TransactionCanceledException":
                raise
            reasons = exc.response.get("CancellationReasons") or []
            failed, items, other = [], {}, set()
            # AWS gives one reason per action; none at all when the response carries no reasons.
            for action, reason in zip(actions, reasons, strict=False):
                code = reason.get("Code")
                if code == "ConditionalCheckFailed":
                    failed.append(action.name)
                    if reason.get("Item"):
                        items[action.name] = de(reason["Item"])
                elif code not in (None, "None"):
                    other.add(code)
            if failed:
                raise ConditionFailed(failed, items) from None
            if other and other <= TRANSIENT_CANCELLATION_CODES:
                # Another transaction touched the same items, or capacity ran short; a retry of
                # the same request converges.
                raise TransientAwsError(
                    f"transaction cancelled: {', '.join(sorted(other))}"
                ) from exc
            raise

    def transact_or_refuse(self, actions: Sequence[Action]) -> None:
        """`transact`, with a failed condition turned into the domain exception of the first
        failed action that names one (`Write.refusal`, called with the reported items).

        Raises:
            the refusal of the first failed action that has one; ConditionFailed otherwise.
        """
        try:
            self.transact(actions)
        except ConditionFailed as failure:
            for action in actions:
                if action.name in failure.failed and action.refusal is not None:
                    raise action.refusal(failure.items) from None
            raise
