"""IAM derived from the code: each Lambda function's AWS calls, recorded across the test suite,
checked against the synthesized template's roles.

Three parts:

- **Recording.** `install()` wraps botocore's `BaseClient._make_api_call`. A call made while a
  handler loaded by `fleetkey_local.functions.load_function` runs (its `RUNNING_FUNCTION` context
  variable names the function) becomes one or more `Request`s: the IAM action, the resource ARN
  and the condition keys the request carries (`to_requests`). A DynamoDB `TransactWriteItems` is
  one request per item (PutItem, UpdateItem, DeleteItem, ConditionCheckItem), as IAM authorizes
  it. For a KMS key, the key's tags, spec and usage are read once (with a client of its own, so
  counting and fault-injecting test clients never see it) for `aws:ResourceTag/*`,
  `kms:KeySpec` and `kms:KeyUsage`. Names that differ between the tests and a deployment are
  recorded as placeholders: the functions' table (`FLEETKEY_TABLE`) as `<table>`, the stack's
  name inside tag values as `<stack>`.
- **Evaluating.** `evaluate(template, calls)` resolves each function role's identity policy
  (the template's `AWS::IAM::Policy` statements, intrinsic functions resolved to the tests'
  account and region) and decides every recorded request: allowed, denied, or not evaluable
  (a condition key it cannot know, e.g. `aws:SourceIp`; or a KMS key that no longer existed
  when it was read). Then it lists what each role grants that its function never called, minus
  the reviewed `UNCALLED_GRANTS`.
- **Across the suite.** `tests/conftest.py` registers this module as a plugin. Each process
  (each xdist worker) records into memory; a worker hands its records, and the template if it
  synthesized one, to the controller through `workeroutput`; the controller (or the single
  process) evaluates at session end, prints the report and fails the run. The check runs when
  the whole suite ran (`pytest tests`, no -k/-m/--lf/--deselect), or with FLEETKEY_IAM_CHECK=1
  (FLEETKEY_IAM_CHECK=0 turns it off); a partial run records nothing worth judging.

What it cannot prove is written down in infra/README.md ("What the IAM test proves").
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# moto's account, and the tests' region: the template's pseudo parameters resolve to them.
ACCOUNT = "123456789012"
REGION = "eu-west-1"
PARTITION = "aws"
TABLE_PLACEHOLDER = "<table>"
# The lifecycle queue (FLEETKEY_LIFECYCLE_QUEUE_URL) and the data-key KMS key
# (FLEETKEY_DATA_KEY_ID), recorded and resolved under these names.
LIFECYCLE_QUEUE_PLACEHOLDER = "<lifecycle-queue>"
DATA_KEY_PLACEHOLDER = "<data-key>"
STACK_PLACEHOLDER = "<stack>"
FUNCTION_SERVICE_PREFIX = "fleetkey-"  # POWERTOOLS_SERVICE_NAME = fleetkey-<function>
CHECK_ENV = "FLEETKEY_IAM_CHECK"
WORKEROUTPUT_CALLS = "fleetkey_aws_calls"
WORKEROUTPUT_TEMPLATE = "fleetkey_template"

ENDPOINT_REASON = (
    "iot-data's endpoint is read with DescribeEndpoint only when FLEETKEY_IOT_DATA_ENDPOINT is "
    "unset (as deployed); the tests set it, since moto's DescribeEndpoint names a host moto does "
    "not serve"
)
# Granted, and never called by the function's own code: each with the reason it is needed.
# Keys: a function name, or "*" for every function.
UNCALLED_GRANTS: Mapping[str, Mapping[str, str]] = {
    "*": {
        "logs:CreateLogStream": "Lambda writes the function's logs with its role",
        "logs:PutLogEvents": "Lambda writes the function's logs with its role",
        "xray:PutTraceSegments": "active tracing: Lambda sends the segments with its role",
        "xray:PutTelemetryRecords": "active tracing",
        "kms:Decrypt": "DynamoDB decrypts the table (customer managed key) as the caller",
    },
    "registration": {
        "iot:DetachPolicy": "a certificate set aside for a decommissioned device is removed "
        "with whatever is attached (a pending certificate has no policy in the tests)",
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "sqs:SendMessage": "Lambda's on-failure destination (the retry queue) sends with the "
        "function's role",
        "sqs:GetQueueAttributes": "the on-failure destination (CDK's SqsDestination grant), and "
        "Lambda's SQS poller of the retry queue",
        "sqs:GetQueueUrl": "the destination's and the event source's grants (CDK)",
        "sqs:ReceiveMessage": "Lambda's SQS poller receives the retry queue with the function's "
        "role",
        "sqs:DeleteMessage": "Lambda's SQS poller deletes the retries the function finished",
        "sqs:ChangeMessageVisibility": "Lambda's SQS poller, with the function's role",
    },
    "admin": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "iot:DescribeEndpoint": ENDPOINT_REASON,
        "iot:DetachPolicy": "a recommission removes the factory certificate whatever AWS IoT "
        "holds: its policies detached if any (in the tests it is pending, with none)",
        "iot:DetachThingPrincipal": "as DetachPolicy: a thing detached if any",
        # KMS asks for TagResource when CreateKey carries tags: the recorder models it as an
        # implied request of CreateKey, so it is checked like any call.
    },
    "token": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
    },
    "maintenance": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
    },
    "converge": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "iot:DescribeEndpoint": ENDPOINT_REASON,
        "sqs:ReceiveMessage": "Lambda's SQS poller receives with the function's role",
        "sqs:DeleteMessage": "Lambda's SQS poller deletes what the function finished",
        "sqs:ChangeMessageVisibility": "Lambda's SQS poller, with the function's role",
        "sqs:GetQueueAttributes": "Lambda's SQS poller, with the function's role",
        "sqs:GetQueueUrl": "the event source's grant (CDK's SqsEventSource)",
    },
    "device_events": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "iot:DescribeEndpoint": ENDPOINT_REASON,
        "sqs:SendMessage": "the on-failure destination, and the lifecycle queue when the "
        "suspension's convergence could not finish in the invocation",
        "sqs:GetQueueAttributes": "the on-failure destination (CDK's SqsDestination grant)",
        "sqs:GetQueueUrl": "the on-failure destination (CDK's SqsDestination grant)",
    },
    "data_keys": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "dynamodb:DeleteItem": "an assertion with a challenge nonce consumes it (Delete NONCE#), "
        "as at /v1/token; the data-key tests use time-bound assertions",
    },
    "rotation": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "dynamodb:DeleteItem": "a rotation assertion with a challenge nonce consumes it (Delete "
        "NONCE#), as at /v1/token; the rotation tests use time-bound assertions",
        "sqs:SendMessage": "the lifecycle queue, when a commit's deactivation of the old "
        "certificate fails (exercised at the service level: test_rotation_resilience.py)",
        "iot:ListAttachedPolicies": "a registration whose rotation was rolled back and removed "
        "meanwhile takes its certificate out again (a race; not reached through the function in "
        "the tests)",
        "iot:DetachPolicy": "as ListAttachedPolicies",
        "iot:ListPrincipalThings": "as ListAttachedPolicies",
        "iot:DetachThingPrincipal": "as ListAttachedPolicies",
        "iot:DeleteCertificate": "as ListAttachedPolicies",
    },
    "rotation_events": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "iot:DescribeEndpoint": ENDPOINT_REASON,
        "sqs:SendMessage": "the on-failure destination, and the lifecycle queue when a "
        "convergence could not finish in the invocation",
        "sqs:GetQueueAttributes": "the on-failure destination (CDK's SqsDestination grant)",
        "sqs:GetQueueUrl": "the on-failure destination (CDK's SqsDestination grant)",
    },
    "validations": {
        "kms:Encrypt": "DynamoDB encrypts the items written, as the caller",
        "kms:GenerateDataKey": "DynamoDB encrypts the items written, as the caller",
        "iot:DescribeEndpoint": ENDPOINT_REASON,
    },
}


# ---- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One IAM authorization a call needs. `context` holds the condition keys (lowercased) the
    recorder knows for it; `modeled` the condition-key prefixes it models for this action, so
    that a modeled key missing from `context` is absent (not unknown). `complete` is False when
    facts about the resource could not be read (the key did not exist)."""

    action: str
    resource: str
    context: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    modeled: frozenset[str] = frozenset()
    complete: bool = True
    # The KMS key's policy (JSON text) for a request on a key: the resource policy IAM evaluates
    # with the identity policy. None for a request on no key, or a key that could not be read.
    key_policy: str | None = None

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_json(), sort_keys=True))

    @property
    def on_a_key(self) -> bool:
        """A KMS operation on an existing key (its key policy takes part in the decision)."""
        return self.action.lower().startswith("kms:") and ":key/" in self.resource

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "resource": self.resource,
            "context": {k: list(v) for k, v in sorted(self.context.items())},
            "modeled": sorted(self.modeled),
            "complete": self.complete,
            "key_policy": self.key_policy,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Request:
        return cls(
            data["action"],
            data["resource"],
            {k: tuple(v) for k, v in data["context"].items()},
            frozenset(data["modeled"]),
            bool(data["complete"]),
            data.get("key_policy"),
        )


@dataclass(frozen=True)
class RecordedCall:
    """A request made by `function`, first seen in `test` (`service.Operation` made it)."""

    function: str
    operation: str
    request: Request
    test: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "operation": self.operation,
            "request": self.request.to_json(),
            "test": self.test,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordedCall:
        return cls(
            data["function"], data["operation"], Request.from_json(data["request"]), data["test"]
        )


class UnmappedOperation(Exception):
    """An AWS operation the recorder does not know how to authorize: model it in `to_requests`."""


@dataclass(frozen=True)
class KeyFacts:
    """What IAM conditions may ask about a KMS key, and its key policy (JSON text)."""

    tags: Mapping[str, str]
    key_spec: str
    key_usage: str
    origin: str = "AWS_KMS"
    multi_region: bool = False
    policy: str | None = None


# IAM service prefixes of the botocore services fleetkey calls.
IAM_PREFIX = {"dynamodb": "dynamodb", "iot": "iot", "iot-data": "iot", "kms": "kms", "sqs": "sqs"}
DYNAMODB_ITEM_ACTIONS = {
    "GetItem": "GetItem",
    "PutItem": "PutItem",
    "DeleteItem": "DeleteItem",
    "UpdateItem": "UpdateItem",
}
TRANSACT_ITEM_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
}
# AWS IoT, by the Service Authorization Reference: the resource type each action is authorized
# on, and the request parameter naming it.
IOT_CERT_ACTIONS = {"DescribeCertificate", "UpdateCertificate", "DeleteCertificate"}
IOT_THING_ACTIONS = {
    "CreateThing",
    "UpdateThing",
    "DescribeThing",
    "DeleteThing",
    "ListThingPrincipals",
    "ListThingPrincipalsV2",
}
IOT_CACERT_ACTIONS = {"DescribeCACertificate", "UpdateCACertificate", "DeleteCACertificate"}
IOT_NO_RESOURCE_ACTIONS = {
    "GetRegistrationCode",
    "RegisterCACertificate",
    "RegisterCertificate",
    "ListCACertificates",
    "ListCertificates",
    "ListCertificatesByCA",
    "DescribeEndpoint",
}
KMS_KEY_ACTIONS = {
    "GenerateDataKey",
    "Decrypt",
    "Encrypt",
    "Sign",
    "Verify",
    "GetPublicKey",
    "ListResourceTags",
    "GetKeyPolicy",
    "PutKeyPolicy",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "DescribeKey",
    "DisableKey",
    "EnableKey",
    "TagResource",
    "UntagResource",
}
KEY_CONDITION_PREFIXES = frozenset(
    {"aws:resourcetag/", "kms:keyspec", "kms:keyusage", "kms:keyorigin", "kms:multiregion"}
)
# What KMS gives a key created without a policy: the account's IAM governs it.
DEFAULT_KEY_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{PARTITION}:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
)


def _arn(service: str, resource: str, region: str, account: str) -> str:
    return f"arn:{PARTITION}:{service}:{region}:{account}:{resource}"


def _table_arn(name: str, region: str, account: str, table_name: str | None) -> str:
    return _arn(
        "dynamodb", f"table/{TABLE_PLACEHOLDER if name == table_name else name}", region, account
    )


def _stack_neutral(value: str, stack_name: str | None) -> str:
    """A tag value with the stack's name replaced by `<stack>`."""
    if stack_name and value.endswith(f":{stack_name}"):
        return f"{value[: -len(stack_name)]}{STACK_PLACEHOLDER}"
    return value


def _leading_key(item: Mapping[str, Any], partition_key: str) -> str | None:
    value = item.get(partition_key)
    if isinstance(value, Mapping):
        found = value.get("S")
        return found if isinstance(found, str) else None
    return None


def _query_leading_key(params: Mapping[str, Any], partition_key: str) -> str | None:
    """The partition key value of a Query (`pk = :v` in the key condition)."""
    names = {k: v for k, v in params.get("ExpressionAttributeNames", {}).items()}
    values = params.get("ExpressionAttributeValues", {})
    for name, placeholder in re.findall(
        r"([#\w]+)\s*=\s*(:\w+)", params.get("KeyConditionExpression", "")
    ):
        if names.get(name, name) == partition_key:
            return _leading_key({"v": values.get(placeholder, {})}, "v")
    return None


def _dynamodb_requests(
    operation: str,
    params: Mapping[str, Any],
    region: str,
    account: str,
    table_name: str | None,
    partition_key: str,
) -> list[Request]:
    modeled = frozenset({"dynamodb:leadingkeys"})

    def item_request(action: str, table: str, leading: str | None) -> Request:
        context = {"dynamodb:leadingkeys": (leading,)} if leading is not None else {}
        return Request(
            f"dynamodb:{action}", _table_arn(table, region, account, table_name), context, modeled
        )

    if operation in DYNAMODB_ITEM_ACTIONS:
        item = params.get("Item") if operation == "PutItem" else params.get("Key")
        return [
            item_request(
                DYNAMODB_ITEM_ACTIONS[operation],
                params["TableName"],
                _leading_key(item or {}, partition_key),
            )
        ]
    if operation == "Query":
        if params.get("IndexName"):
            # A query of an index is authorized on the index's ARN. Its key condition names the
            # index's keys, not the table's partition key: dynamodb:LeadingKeys is left unmodeled,
            # so a grant conditioned on it is undecided (reviewed), never vacuously true.
            table = _table_arn(params["TableName"], region, account, table_name)
            return [Request("dynamodb:Query", f"{table}/index/{params['IndexName']}")]
        return [
            item_request("Query", params["TableName"], _query_leading_key(params, partition_key))
        ]
    if operation == "TransactWriteItems":
        requests = []
        for entry in params["TransactItems"]:
            ((kind, body),) = entry.items()
            item = body.get("Item") if kind == "Put" else body.get("Key")
            requests.append(
                item_request(
                    TRANSACT_ITEM_ACTIONS[kind],
                    body["TableName"],
                    _leading_key(item or {}, partition_key),
                )
            )
        return requests
    if operation == "TransactGetItems":
        return [
            item_request(
                "GetItem",
                entry["Get"]["TableName"],
                _leading_key(entry["Get"].get("Key", {}), partition_key),
            )
            for entry in params["TransactItems"]
        ]
    raise UnmappedOperation(f"dynamodb.{operation}")


def _iot_requests(
    operation: str, params: Mapping[str, Any], region: str, account: str
) -> list[Request]:
    action = f"iot:{operation}"
    if operation in IOT_CERT_ACTIONS:
        return [Request(action, _arn("iot", f"cert/{params['certificateId']}", region, account))]
    if operation in IOT_THING_ACTIONS:
        return [Request(action, _arn("iot", f"thing/{params['thingName']}", region, account))]
    if operation in IOT_CACERT_ACTIONS:
        return [Request(action, _arn("iot", f"cacert/{params['certificateId']}", region, account))]
    if operation in IOT_NO_RESOURCE_ACTIONS:
        return [Request(action, "*")]
    if operation in ("AttachThingPrincipal", "DetachThingPrincipal"):
        # Authorized on the certificate; the thing is the iot:thingArn condition key.
        thing = _arn("iot", f"thing/{params['thingName']}", region, account)
        return [
            Request(
                action,
                params["principal"],
                {"iot:thingarn": (thing,)},
                frozenset({"iot:thingarn"}),
            )
        ]
    if operation in ("AttachPolicy", "DetachPolicy", "ListAttachedPolicies"):
        # Authorized on the target (a certificate or thing group), not on the policy.
        return [Request(action, params["target"])]
    if operation == "ListPrincipalThings":
        # Authorized on the principal (the certificate).
        return [Request(action, params["principal"])]
    raise UnmappedOperation(f"iot.{operation}")


def _iot_data_requests(
    operation: str, params: Mapping[str, Any], region: str, account: str
) -> list[Request]:
    if operation == "Publish":
        return [Request("iot:Publish", _arn("iot", f"topic/{params['topic']}", region, account))]
    if operation == "DeleteConnection":
        client_id = params["clientId"]
        return [
            Request("iot:DeleteConnection", _arn("iot", f"client/{client_id}", region, account))
        ]
    raise UnmappedOperation(f"iot-data.{operation}")


def _key_arn(key_id: str, region: str, account: str) -> str:
    data_key = os.environ.get("FLEETKEY_DATA_KEY_ID")
    if data_key and key_id.rsplit("/", 1)[-1] == data_key.rsplit("/", 1)[-1]:
        return _arn("kms", f"key/{DATA_KEY_PLACEHOLDER}", region, account)
    return _key_arn_of(key_id, region, account)


def _key_arn_of(key_id: str, region: str, account: str) -> str:
    return key_id if key_id.startswith("arn:") else _arn("kms", f"key/{key_id}", region, account)


def key_context(facts: KeyFacts | None, stack_name: str | None) -> dict[str, tuple[str, ...]]:
    if facts is None:
        return {}
    context: dict[str, tuple[str, ...]] = {
        f"aws:resourcetag/{k.lower()}": (_stack_neutral(v, stack_name),)
        for k, v in facts.tags.items()
    }
    context["kms:keyspec"] = (facts.key_spec,)
    context["kms:keyusage"] = (facts.key_usage,)
    context["kms:keyorigin"] = (facts.origin,)
    context["kms:multiregion"] = (str(facts.multi_region).lower(),)
    return context


def _kms_requests(
    operation: str,
    params: Mapping[str, Any],
    region: str,
    account: str,
    facts: KeyFacts | None,
    stack_name: str | None,
) -> list[Request]:
    if operation == "CreateKey":
        tags = {t["TagKey"]: t["TagValue"] for t in params.get("Tags", [])}
        context: dict[str, tuple[str, ...]] = {
            f"aws:requesttag/{k.lower()}": (_stack_neutral(v, stack_name),) for k, v in tags.items()
        }
        context["aws:tagkeys"] = tuple(tags)
        context["kms:keyspec"] = (params.get("KeySpec", "SYMMETRIC_DEFAULT"),)
        context["kms:keyusage"] = (params.get("KeyUsage", "ENCRYPT_DECRYPT"),)
        context["kms:keyorigin"] = (params.get("Origin", "AWS_KMS"),)
        context["kms:multiregion"] = (str(bool(params.get("MultiRegion", False))).lower(),)
        modeled = frozenset({"aws:requesttag/", "aws:tagkeys"} | KEY_CONDITION_PREFIXES)
        requests = [Request("kms:CreateKey", "*", context, modeled)]
        if tags:
            # KMS asks for TagResource (in an IAM policy) when CreateKey carries tags: the key
            # being created is the resource, with the spec and usage of the request.
            new_key = _arn("kms", "key/<created>", region, account)
            # The key being created carries no tag yet: aws:ResourceTag/* are absent.
            # Its key policy is the one the request gives it (or KMS's default).
            requests.append(
                Request(
                    "kms:TagResource",
                    new_key,
                    context,
                    modeled,
                    key_policy=params.get("Policy") or DEFAULT_KEY_POLICY,
                )
            )
        return requests
    if operation in KMS_KEY_ACTIONS:
        arn = _key_arn(params["KeyId"], region, account)
        context = key_context(facts, stack_name)
        modeled = KEY_CONDITION_PREFIXES
        if operation == "TagResource":
            tags = {t["TagKey"]: t["TagValue"] for t in params.get("Tags", [])}
            context.update(
                {
                    f"aws:requesttag/{k.lower()}": (_stack_neutral(v, stack_name),)
                    for k, v in tags.items()
                }
            )
            context["aws:tagkeys"] = tuple(tags)
            modeled = modeled | {"aws:requesttag/", "aws:tagkeys"}
        return [
            Request(
                f"kms:{operation}",
                arn,
                context,
                modeled,
                complete=facts is not None,
                key_policy=facts.policy if facts is not None else None,
            )
        ]
    raise UnmappedOperation(f"kms.{operation}")


def to_requests(
    service: str,
    operation: str,
    params: Mapping[str, Any],
    *,
    region: str = REGION,
    account: str = ACCOUNT,
    table_name: str | None = None,
    stack_name: str | None = None,
    key_facts: KeyFacts | None = None,
    partition_key: str = "pk",
) -> list[Request]:
    """The IAM requests one AWS call needs.

    Raises:
        UnmappedOperation: the operation is not modeled (add it here, by the Service
            Authorization Reference).
    """
    if service == "dynamodb":
        return _dynamodb_requests(operation, params, region, account, table_name, partition_key)
    if service == "iot":
        return _iot_requests(operation, params, region, account)
    if service == "iot-data":
        return _iot_data_requests(operation, params, region, account)
    if service == "kms":
        return _kms_requests(operation, params, region, account, key_facts, stack_name)
    if service == "sqs":
        return _sqs_requests(operation, params, region, account)
    raise UnmappedOperation(f"{service}.{operation}")


SQS_QUEUE_ACTIONS = {
    "SendMessage",
    "ReceiveMessage",
    "DeleteMessage",
    "ChangeMessageVisibility",
    "GetQueueAttributes",
}


def _sqs_requests(
    operation: str, params: Mapping[str, Any], region: str, account: str
) -> list[Request]:
    if operation in SQS_QUEUE_ACTIONS:
        # Authorized on the queue, named by its URL's last path segment.
        name = params["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
        lifecycle = os.environ.get("FLEETKEY_LIFECYCLE_QUEUE_URL", "").rstrip("/")
        if lifecycle and name == lifecycle.rsplit("/", 1)[-1]:
            name = LIFECYCLE_QUEUE_PLACEHOLDER
        return [Request(f"sqs:{operation}", _arn("sqs", name, region, account))]
    raise UnmappedOperation(f"sqs.{operation}")


# ---- policy evaluation -------------------------------------------------------------------------


class Decision(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNEVALUATED = "not evaluable"
    # A statement the evaluator refuses to reason about (NotAction, NotResource, NotPrincipal):
    # its meaning is "everything but", which a reviewer misreads as easily as the evaluator would.
    REFUSED = "refused"


@dataclass(frozen=True)
class Verdict:
    """A decision, and for UNEVALUATED the condition keys (or `<key policy>`) it could not
    decide; for REFUSED, why."""

    decision: Decision
    unknown: frozenset[str] = frozenset()
    why: str = ""


# "Not evaluable" fails the check, except for these (action, condition key) pairs, each reviewed:
# the request is right whatever the unknown value is. Keys are lowercased; "*" matches any action.
REVIEWED_UNEVALUABLE: Mapping[tuple[str, str], str] = {}
UNREADABLE_KEY_POLICY = "<key policy>"
MISSING_KEY = "<missing key>"
# AWS managed policies a function role may carry (the evaluator cannot read them): none.
REVIEWED_MANAGED_POLICIES: Mapping[str, str] = {}


class _Unknown(Exception):
    """A condition the evaluator cannot decide."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _Unsupported(Exception):
    """A statement form the evaluator refuses (NotAction, NotResource, NotPrincipal)."""


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _wildcard(pattern: str, value: str) -> bool:
    """`*` any run, `?` one character, nothing else special (IAM has no character classes)."""
    regex = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern
    )
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _matches(pattern: str, value: str, *, case: bool = True) -> bool:
    """IAM wildcard matching (`*` any run, `?` one character). An ARN is matched part by part
    (partition, service, region, account, resource), so a wildcard never spans a `:` between
    them, as in AWS."""
    if not case:
        pattern, value = pattern.lower(), value.lower()
    if pattern.startswith("arn:") and value.startswith("arn:"):
        pattern_parts, value_parts = pattern.split(":", 5), value.split(":", 5)
        return len(pattern_parts) == len(value_parts) and all(
            _wildcard(p, v) for p, v in zip(pattern_parts, value_parts, strict=True)
        )
    return _wildcard(pattern, value)


def _context_values(request: Request, key: str) -> tuple[str, ...] | None:
    """The request's values for a condition key; None when the key is modeled and absent.

    Raises:
        _Unknown: a key the recorder does not model for this request.
    """
    key = key.lower()
    if key in request.context:
        return request.context[key]
    if any(key.startswith(prefix) for prefix in request.modeled):
        if not request.complete:
            raise _Unknown(MISSING_KEY)
        return None
    raise _Unknown(key)


def _operator_holds(
    operator: str, key: str, wanted: list[str], present: tuple[str, ...] | None
) -> bool:
    """One condition operator. Raises _Unknown for operators it does not implement."""
    qualifier, _, base = operator.rpartition(":")
    negated = base.startswith(("StringNot", "ArnNot"))
    if base.endswith("IfExists"):
        if present is None:
            return True
        base = base[: -len("IfExists")]
    comparisons: dict[str, Callable[[str, str], bool]] = {
        "StringEquals": lambda p, v: p == v,
        "StringNotEquals": lambda p, v: p == v,
        "StringEqualsIgnoreCase": lambda p, v: p.lower() == v.lower(),
        "StringLike": lambda p, v: _matches(p, v),
        "StringNotLike": lambda p, v: _matches(p, v),
        "ArnEquals": lambda p, v: _matches(p, v),
        "ArnLike": lambda p, v: _matches(p, v),
        "ArnNotEquals": lambda p, v: _matches(p, v),
        "ArnNotLike": lambda p, v: _matches(p, v),
        "Bool": lambda p, v: p.lower() == v.lower(),
    }
    compare = comparisons.get(base)
    if compare is None:
        raise _Unknown(f"{key} ({operator})")

    def one(value: str) -> bool:
        hit = any(compare(p, value) for p in wanted)
        return not hit if negated else hit

    if qualifier == "ForAllValues":
        return all(one(v) for v in present or ())
    if qualifier == "ForAnyValue":
        return any(one(v) for v in present or ())
    if qualifier:
        raise _Unknown(f"{key} ({operator})")
    if present is None:
        return negated  # a negated operator holds on an absent key, a positive one does not
    return any(one(v) for v in present)


def _conditions_hold(condition: Mapping[str, Mapping[str, Any]], request: Request) -> bool:
    """False as soon as one condition is known not to hold (an unknown elsewhere then does not
    matter: every condition must hold). Raises _Unknown when it may hold but one cannot be
    decided."""
    unknown: _Unknown | None = None
    for operator, keys in condition.items():
        for key, wanted in keys.items():
            try:
                present = _context_values(request, key)
                holds = _operator_holds(operator, key, [str(w) for w in _as_list(wanted)], present)
            except _Unknown as exc:
                unknown = unknown or exc
                continue
            if not holds:
                return False
    if unknown is not None:
        raise unknown
    return True


UNSUPPORTED_ELEMENTS = ("NotAction", "NotResource", "NotPrincipal")


def unsupported(statement: Mapping[str, Any]) -> str | None:
    found = [name for name in UNSUPPORTED_ELEMENTS if name in statement]
    if statement.get("Effect") not in ("Allow", "Deny"):
        found.append(f"Effect {statement.get('Effect')!r}")
    return ", ".join(found) or None


def _statement_applies(statement: Mapping[str, Any], request: Request) -> bool:
    """Whether the statement's action, resource and conditions hold for the request.

    Raises:
        _Unknown: a condition that cannot be decided (action and resource match).
        _Unsupported: NotAction/NotResource/NotPrincipal.
    """
    refused = unsupported(statement)
    if refused:
        raise _Unsupported(f"a statement with {refused}: {json.dumps(statement, sort_keys=True)}")
    actions = [str(a) for a in _as_list(statement.get("Action", []))]
    if not any(_matches(a, request.action, case=False) for a in actions):
        return False
    resources = [str(r) for r in _as_list(statement.get("Resource", []))]
    if not any(_matches(r, request.resource) for r in resources):
        return False
    return _conditions_hold(statement.get("Condition", {}), request)


@dataclass
class _Scan:
    """What one policy says of one request: `allowed` (an Allow applies; in a key policy, one
    naming the principal itself), `delegated` (a key policy's Allow naming the account: the
    identity policy decides), `denied`, and the condition keys an Allow or a Deny that may
    apply could not decide."""

    allowed: bool = False
    delegated: bool = False
    denied: bool = False
    allow_unknown: set[str] = field(default_factory=set)
    deny_unknown: set[str] = field(default_factory=set)


def _principal_match(statement: Mapping[str, Any], principal: str | None) -> str | None:
    """For a resource (key) policy: "self" if the statement names `principal` (or everyone),
    "account" if it names the principal's account, None if neither. An identity policy
    (`principal` None) has no Principal element: "self"."""
    if principal is None:
        return "self"
    value = statement.get("Principal")
    if value == "*":
        return "self"
    if not isinstance(value, Mapping):
        return None
    aws = [str(p) for p in _as_list(value.get("AWS", []))]
    if "*" in aws or principal in aws:
        return "self"
    account = principal.split(":")[4]
    if f"arn:{PARTITION}:iam::{account}:root" in aws or account in aws:
        return "account"
    return None


def _scan(
    statements: Sequence[Mapping[str, Any]], request: Request, principal: str | None = None
) -> _Scan:
    """Raises _Unsupported."""
    scan = _Scan()
    for statement in statements:
        whom = _principal_match(statement, principal)
        if whom is None and not unsupported(statement):
            continue
        deny = statement.get("Effect") == "Deny"
        try:
            applies = _statement_applies(statement, request)
        except _Unknown as exc:
            (scan.deny_unknown if deny else scan.allow_unknown).add(exc.key)
            continue
        if not applies:
            continue
        if deny:
            scan.denied = True  # a Deny naming the account covers its principals too
        elif whom == "self":
            scan.allowed = True
        else:
            scan.delegated = True
    return scan


def verdict(
    statements: Sequence[Mapping[str, Any]], request: Request, principal: str | None = None
) -> Verdict:
    """The answer of AWS's policy evaluation (same account) to one request: an explicit Deny in
    the identity policy or, for a KMS key, in its key policy wins; a Deny whose condition cannot
    be decided makes the answer UNEVALUATED, never ALLOWED. Then an Allow: for a request on no
    key, the identity policy's; for a key, the key policy's naming the principal, or the
    identity policy's where the key policy delegates to the account (a key policy that does not
    delegate makes IAM grants void). `principal` is the role's ARN (`aws:PrincipalArn`).
    Statements with NotAction/NotResource/NotPrincipal are REFUSED."""
    if principal is not None:
        request = dataclasses.replace(
            request, context={**request.context, "aws:principalarn": (principal,)}
        )
    key_statements: list[Mapping[str, Any]] = []
    if request.on_a_key:
        if request.key_policy is None:
            return Verdict(
                Decision.UNEVALUATED,
                frozenset({MISSING_KEY if not request.complete else UNREADABLE_KEY_POLICY}),
            )
        try:
            document = json.loads(request.key_policy, object_pairs_hook=_unique_names)
        except ValueError:
            return Verdict(Decision.UNEVALUATED, frozenset({UNREADABLE_KEY_POLICY}))
        key_statements = _as_list(document.get("Statement", []))
        if principal is None:  # no role to name: the key policy cannot be read for it
            return Verdict(Decision.UNEVALUATED, frozenset({"aws:principalarn"}))
    try:
        identity = _scan(statements, request)
        key = _scan(key_statements, request, principal) if request.on_a_key else None
    except _Unsupported as exc:
        return Verdict(Decision.REFUSED, why=str(exc))
    scans = [identity] + ([key] if key else [])
    if any(s.denied for s in scans):
        return Verdict(Decision.DENIED)
    deny_unknown = frozenset().union(*(s.deny_unknown for s in scans))
    if deny_unknown:
        return Verdict(Decision.UNEVALUATED, deny_unknown)
    if key is None:
        allowed = identity.allowed
        allow_unknown = frozenset(identity.allow_unknown)
    else:
        allowed = key.allowed or (key.delegated and identity.allowed)
        allow_unknown = frozenset(key.allow_unknown) | (
            frozenset(identity.allow_unknown) if key.delegated or key.allow_unknown else frozenset()
        )
    if allowed:
        return Verdict(Decision.ALLOWED)
    if allow_unknown:
        return Verdict(Decision.UNEVALUATED, allow_unknown)
    return Verdict(Decision.DENIED)


def decide(
    statements: Sequence[Mapping[str, Any]], request: Request, principal: str | None = None
) -> Decision:
    """`verdict`'s decision alone."""
    return verdict(statements, request, principal).decision


def reviewed_unevaluable(action: str, unknown: Iterable[str]) -> bool:
    """Whether every undecidable key of an UNEVALUATED request is on the reviewed list."""
    keys = list(unknown)
    return bool(keys) and all(
        (action.lower(), k) in REVIEWED_UNEVALUABLE or ("*", k) in REVIEWED_UNEVALUABLE
        for k in keys
    )


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a policy naming a member twice is not evaluated (AWS and Python may
    read it differently)."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate names in a policy: {names}")
    return dict(pairs)


def allowed_actions(statements: Iterable[Mapping[str, Any]]) -> set[str]:
    return {
        str(a)
        for s in statements
        if s.get("Effect") == "Allow"
        for a in _as_list(s.get("Action", []))
    }


# ---- the template ------------------------------------------------------------------------------


def resolve(value: Any, resources: Mapping[str, Any], stack_name: str) -> Any:
    """Intrinsic functions resolved to the tests' account and region; each resource's ARN is what
    the recorder writes for it (the table as `<table>`); the stack's name in tag values as
    `<stack>`.

    Raises:
        ValueError: an intrinsic function it does not resolve.
    """
    if isinstance(value, list):
        return [resolve(v, resources, stack_name) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Fn::Join"}:
        separator, parts = value["Fn::Join"]
        return separator.join(str(resolve(p, resources, stack_name)) for p in parts)
    if set(value) == {"Ref"}:
        pseudo = {
            "AWS::Partition": PARTITION,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": stack_name,
        }
        ref = value["Ref"]
        return pseudo.get(ref, f"<{ref}>")
    if set(value) == {"Fn::GetAtt"}:
        logical_id, attribute = value["Fn::GetAtt"]
        return _attribute(logical_id, attribute, resources)
    resolved = {k: resolve(v, resources, stack_name) for k, v in value.items()}
    if "Condition" in resolved:
        resolved["Condition"] = {
            operator: {
                key: [_stack_neutral(str(v), stack_name) for v in _as_list(values)]
                if key.lower().startswith(("aws:resourcetag/", "aws:requesttag/"))
                else values
                for key, values in keys.items()
            }
            for operator, keys in resolved["Condition"].items()
        }
    return resolved


# Local role names that are not the function's name (`fleetkey.settings`' local defaults: the
# issuing CA key's policy names `fleetkey-local-rotation-events`).
LOCAL_ROLE_NAMES: Mapping[str, str] = {"rotation_events": "rotation-events"}


def role_arn(function: str) -> str:
    """The ARN a function's role has in the tests: the local stack's naming (`fleetkey-local-
    <function>`, as `fleetkey.settings` names the roles in the local signing keys' and issuing CA
    key's policies), so that a key policy recorded in the tests and the template's role name the
    same principal."""
    from fleetkey.settings import LOCAL_STACK_NAME

    name = LOCAL_ROLE_NAMES.get(function, function)
    return f"arn:{PARTITION}:iam::{ACCOUNT}:role/{LOCAL_STACK_NAME}-{name}"


def _function_of_role(logical_id: str, resources: Mapping[str, Any]) -> str | None:
    for name, role_id in function_roles({"Resources": resources}).items():
        if role_id == logical_id:
            return name
    return None


def _is_lifecycle_queue(logical_id: str) -> bool:
    """The CDK's lifecycle queue (not its dead-letter queue)."""
    return logical_id.startswith("LifecycleQueue") and "Dead" not in logical_id


def _attribute(logical_id: str, attribute: str, resources: Mapping[str, Any]) -> str:
    resource = resources.get(logical_id, {})
    kind = resource.get("Type")
    if attribute == "Arn" and kind == "AWS::IAM::Role":
        function = _function_of_role(logical_id, resources)
        if function is not None:
            return role_arn(function)
    if attribute == "Arn" and kind == "AWS::DynamoDB::Table":
        return _arn("dynamodb", f"table/{TABLE_PLACEHOLDER}", REGION, ACCOUNT)
    if attribute == "Arn" and kind == "AWS::SQS::Queue" and _is_lifecycle_queue(logical_id):
        return _arn("sqs", LIFECYCLE_QUEUE_PLACEHOLDER, REGION, ACCOUNT)
    if attribute == "Arn" and kind == "AWS::KMS::Key" and logical_id.startswith("DataKeys"):
        return _arn("kms", f"key/{DATA_KEY_PLACEHOLDER}", REGION, ACCOUNT)
    if attribute == "Arn" and kind == "AWS::IoT::Policy":
        name = resource["Properties"].get("PolicyName", logical_id)
        return _arn("iot", f"policy/{name}", REGION, ACCOUNT)
    # Anything else (log groups, queues, the table's key, roles): a name the recorder never
    # produces, so that a grant on it proves no call.
    return f"arn:{PARTITION}:<{logical_id}.{attribute}>"


def function_roles(template: Mapping[str, Any]) -> dict[str, str]:
    """Function name (functions/<name>) -> the logical id of its role."""
    roles = {}
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::Lambda::Function":
            continue
        env = resource["Properties"].get("Environment", {}).get("Variables", {})
        service = env.get("POWERTOOLS_SERVICE_NAME", "")
        if service.startswith(FUNCTION_SERVICE_PREFIX):
            roles[service[len(FUNCTION_SERVICE_PREFIX) :]] = resource["Properties"]["Role"][
                "Fn::GetAtt"
            ][0]
    return roles


class UnreadablePolicy(ValueError):
    """A role carries a policy the evaluator cannot read (an AWS managed policy not reviewed)."""


def role_policy(template: Mapping[str, Any], role_id: str, stack_name: str) -> list[dict[str, Any]]:
    """Every statement of the role's identity policies, resolved: `AWS::IAM::Policy` and
    `AWS::IAM::ManagedPolicy` resources naming the role, its inline policies, and customer
    managed policies of the template in its `ManagedPolicyArns`.

    Raises:
        UnreadablePolicy: a managed policy ARN that is not the template's and not in
            REVIEWED_MANAGED_POLICIES (an AWS managed policy, whose statements it cannot see).
    """
    resources = template["Resources"]
    statements: list[dict[str, Any]] = []
    managed: set[str] = set()
    for logical_id, resource in resources.items():
        kind = resource["Type"]
        if kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy") and {"Ref": role_id} in resource[
            "Properties"
        ].get("Roles", []):
            statements.extend(_as_list(resource["Properties"]["PolicyDocument"]["Statement"]))
            if kind == "AWS::IAM::ManagedPolicy":
                managed.add(logical_id)
    for inline in resources[role_id]["Properties"].get("Policies", []):
        statements.extend(_as_list(inline["PolicyDocument"]["Statement"]))
    for arn in resources[role_id]["Properties"].get("ManagedPolicyArns", []):
        ref = arn.get("Ref") if isinstance(arn, Mapping) else None
        if ref in resources and resources[ref]["Type"] == "AWS::IAM::ManagedPolicy":
            if ref not in managed:
                managed.add(ref)
                statements.extend(
                    _as_list(resources[ref]["Properties"]["PolicyDocument"]["Statement"])
                )
            continue
        resolved = str(resolve(arn, resources, stack_name))
        if resolved not in REVIEWED_MANAGED_POLICIES:
            raise UnreadablePolicy(
                f"{role_id} carries the managed policy {resolved}, which the evaluator cannot "
                "read: grant with the template's own policies, or review it into "
                "REVIEWED_MANAGED_POLICIES"
            )
    return [resolve(s, resources, stack_name) for s in statements]


def canonical_statement(statement: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved statement for the snapshot: Sid dropped, actions and resources sorted lists."""
    canonical: dict[str, Any] = {"Effect": statement.get("Effect")}
    for name in ("Action", "NotAction", "Resource", "NotResource"):
        if name in statement:
            canonical[name] = sorted(str(v) for v in _as_list(statement[name]))
    for name in ("Principal", "NotPrincipal", "Condition"):
        if name in statement:
            canonical[name] = statement[name]
    return canonical


def role_snapshot(template: Mapping[str, Any], stack_name: str) -> dict[str, list[dict[str, Any]]]:
    """Each function role's resolved statements (actions, resources, conditions), in a stable
    order: what `tests/infra/iam_snapshot.json` pins."""
    return {
        function: sorted(
            (canonical_statement(s) for s in role_policy(template, role_id, stack_name)),
            key=lambda s: json.dumps(s, sort_keys=True),
        )
        for function, role_id in sorted(function_roles(template).items())
    }


# ---- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    """The verdict on every function: `problems` fail the run, `notes` are what it could not
    evaluate."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    called: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        summary = ", ".join(f"{name} {count}" for name, count in sorted(self.checked.items()))
        out = [f"IAM derived from the code: requests checked per function: {summary or 'none'}"]
        out += [
            f"  {name} called: {', '.join(actions)}"
            for name, actions in sorted(self.called.items())
        ]
        out += [f"  FAIL {p}" for p in self.problems]
        out += [f"  note {n}" for n in self.notes]
        return out


def uncalled_grants_for(function: str) -> Mapping[str, str]:
    return {**UNCALLED_GRANTS["*"], **UNCALLED_GRANTS.get(function, {})}


def evaluate(
    template: Mapping[str, Any],
    calls: Iterable[RecordedCall],
    *,
    stack_name: str,
    unmapped: Iterable[tuple[str, str, str]] = (),
) -> Report:
    """Check every recorded request against its function's role in `template`, and every grant
    of each role against what its function called. `unmapped` holds (function, operation,
    test) of calls the recorder could not model: each is a problem."""
    report = Report()
    roles = function_roles(template)
    by_function: dict[str, list[RecordedCall]] = {name: [] for name in roles}
    for call in calls:
        by_function.setdefault(call.function, []).append(call)
    for function, operation, test in sorted(set(unmapped)):
        report.problems.append(
            f"{function}: {operation} is not modeled by tests/support/aws_calls.py (in {test})"
        )
    for function, recorded in sorted(by_function.items()):
        if function not in roles:
            report.problems.append(f"{function}: calls AWS but the template has no such function")
            continue
        try:
            statements = role_policy(template, roles[function], stack_name)
        except UnreadablePolicy as exc:
            report.problems.append(f"{function}: {exc}")
            continue
        for statement in statements:
            refused = unsupported(statement)
            if refused:
                report.problems.append(
                    f"{function}: its role has a statement with {refused}, which the check "
                    f"refuses to evaluate: {json.dumps(statement, sort_keys=True)}"
                )
        report.checked[function] = len(recorded)
        if not recorded:
            report.problems.append(
                f"{function}: no AWS call recorded (no test runs its handler: the check would "
                "prove nothing)"
            )
            continue
        _check_requests(report, function, statements, recorded, role_arn(function))
        called = {c.request.action for c in recorded}
        report.called[function] = sorted(called)
        reviewed = uncalled_grants_for(function)
        never = sorted(a for a in allowed_actions(statements) if a not in called | set(reviewed))
        if never:
            report.problems.append(
                f"{function}: granted but never called: {', '.join(never)} (remove the grant, "
                "exercise the path in a test, or review it into UNCALLED_GRANTS)"
            )
    return report


def _check_requests(
    report: Report,
    function: str,
    statements: Sequence[Mapping[str, Any]],
    recorded: Sequence[RecordedCall],
    principal: str,
) -> None:
    """Every recorded request must be ALLOWED; UNEVALUATED passes (as a note) only when every
    key it could not decide is on REVIEWED_UNEVALUABLE for the action."""
    seen: set[Request] = set()
    for call in recorded:
        if call.request in seen:
            continue
        seen.add(call.request)
        found = verdict(statements, call.request, principal)
        where = f"{call.request.action} on {call.request.resource}"
        if call.request.context:
            where += f" with {dict(call.request.context)}"
        if found.decision is Decision.DENIED:
            report.problems.append(
                f"{function}: its role (or the key's policy) does not allow {where} "
                f"({call.operation}, in {call.test})"
            )
        elif found.decision is Decision.REFUSED:
            report.problems.append(f"{function}: {where}: refused to evaluate {found.why}")
        elif found.decision is Decision.UNEVALUATED:
            unknown = ", ".join(sorted(found.unknown))
            if reviewed_unevaluable(call.request.action, found.unknown):
                report.notes.append(
                    f"{function}: not evaluable (reviewed): {where}: {unknown} (in {call.test})"
                )
            else:
                report.problems.append(
                    f"{function}: could not evaluate {where}: {unknown} (in {call.test}); "
                    "review it into REVIEWED_UNEVALUABLE only if the request is right whatever "
                    "the value"
                )


# ---- recording ---------------------------------------------------------------------------------


class Recorder:
    """Records the requests of the calls made inside a running function (see module doc)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, Request], RecordedCall] = {}
        self.unmapped: set[tuple[str, str, str]] = set()
        self.templates: list[dict[str, Any]] = []
        self._key_facts: dict[tuple[str | None, str], KeyFacts | None] = {}
        self._fact_clients: dict[tuple[str | None, str], Any] = {}
        self._installed = False

    # the hook -----------------------------------------------------------------------------

    def install(self) -> None:
        """Wrap botocore's BaseClient._make_api_call (once per process)."""
        if self._installed:
            return
        from botocore.client import BaseClient

        original = BaseClient._make_api_call  # type: ignore[attr-defined]
        recorder = self

        def _make_api_call(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
            try:
                recorder.observe(client, operation_name, api_params)
            except Exception as exc:  # noqa: BLE001 - a recorder fault must not fail the call
                recorder.unmapped.add(("?", f"recorder error: {exc!r}", operation_name))
            return original(client, operation_name, api_params)

        BaseClient._make_api_call = _make_api_call  # type: ignore[attr-defined]
        self._installed = True

    def observe(self, client: Any, operation: str, params: Mapping[str, Any]) -> None:
        """Record the call if a function is running; never fails the call itself."""
        from fleetkey_local.functions import RUNNING_FUNCTION

        function = RUNNING_FUNCTION.get()
        if function is None or _READING_FACTS.get():
            return
        service = client.meta.service_model.service_name
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        region = client.meta.region_name or REGION
        facts = None
        if service == "kms" and "KeyId" in params:
            facts = self._facts(client, str(params["KeyId"]), region)
        try:
            requests = to_requests(
                service,
                operation,
                params,
                region=region,
                account=ACCOUNT,
                table_name=os.environ.get("FLEETKEY_TABLE"),
                stack_name=_running_stack_name(),
                key_facts=facts,
            )
        except (UnmappedOperation, KeyError, ValueError):
            self.unmapped.add((function, f"{service}.{operation}", test))
            return
        for request in requests:
            self.calls.setdefault(
                (function, request), RecordedCall(function, f"{service}.{operation}", request, test)
            )

    def _facts(self, client: Any, key_id: str, region: str) -> KeyFacts | None:
        """The key's tags, spec, usage, origin, multi-Region flag and key policy, read once per
        key with a client of the recorder's own
        (not the function's: counting and fault-injecting clients must not see these calls)."""
        endpoint = client.meta.endpoint_url
        cache_key = (endpoint, key_id)
        if cache_key in self._key_facts:
            return self._key_facts[cache_key]
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        kms = self._fact_clients.get((endpoint, region))
        if kms is None:
            kms = boto3.session.Session().client("kms", region_name=region, endpoint_url=endpoint)
            self._fact_clients[(endpoint, region)] = kms
        token = _READING_FACTS.set(True)
        try:
            metadata = kms.describe_key(KeyId=key_id)["KeyMetadata"]
            tags = {
                t["TagKey"]: t["TagValue"]
                for t in kms.list_resource_tags(KeyId=key_id).get("Tags", [])
            }
            policy = kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
            facts: KeyFacts | None = KeyFacts(
                tags,
                metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec", ""),
                metadata.get("KeyUsage", ""),
                metadata.get("Origin", ""),
                bool(metadata.get("MultiRegion", False)),
                policy,
            )
        except (ClientError, BotoCoreError):
            facts = None  # no such key: its conditions cannot be evaluated
        finally:
            _READING_FACTS.reset(token)
        if facts is not None:
            self._key_facts[cache_key] = facts
        return facts

    # across processes ------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        return {
            "calls": [c.to_json() for c in self.calls.values()],
            "unmapped": sorted(self.unmapped),
        }

    def merge(self, exported: Mapping[str, Any]) -> None:
        for data in exported.get("calls", []):
            call = RecordedCall.from_json(data)
            self.calls.setdefault((call.function, call.request), call)
        self.unmapped.update(tuple(u) for u in exported.get("unmapped", []))


@contextmanager
def outside_functions() -> Iterator[None]:
    """Code a test runs from inside a handler (a hook standing for another actor, e.g. an
    operator racing the function): its AWS calls are not the function's."""
    from fleetkey_local.functions import RUNNING_FUNCTION

    token = RUNNING_FUNCTION.set(None)
    try:
        yield
    finally:
        RUNNING_FUNCTION.reset(token)


def _running_stack_name() -> str:
    from fleetkey.settings import LOCAL_STACK_NAME

    return os.environ.get("FLEETKEY_STACK_NAME") or LOCAL_STACK_NAME


RECORDER = Recorder()
# Set while the recorder reads a key's facts (per thread: the local API serves in threads).
_READING_FACTS: ContextVar[bool] = ContextVar("fleetkey_reading_key_facts", default=False)


def remember_template(template: Mapping[str, Any]) -> None:
    """Called by the infrastructure tests' synthesis: the template the check evaluates."""
    RECORDER.templates[:] = [dict(template)]


# ---- the pytest plugin -------------------------------------------------------------------------


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _whole_suite(config: pytest.Config) -> bool:
    """Whether this run is the whole suite (`pytest tests`, nothing deselected)."""
    forced = os.environ.get(CHECK_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    option = config.option
    if option.keyword or option.markexpr or getattr(option, "lf", False):
        return False
    if getattr(option, "deselect", None):
        return False
    tests_root = (ROOT / "tests").resolve()
    args = [Path(str(a).split("::", 1)[0]).resolve() for a in config.args] or [tests_root]
    return all(a in (tests_root, ROOT.resolve()) for a in args)


def pytest_configure(config: pytest.Config) -> None:
    RECORDER.install()
    config.stash[_REPORT] = None


_REPORT = pytest.StashKey[Report | None]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: collect a worker's records (and template)."""
    output = getattr(node, "workeroutput", {}) or {}
    if WORKEROUTPUT_CALLS in output:
        RECORDER.merge(json.loads(output[WORKEROUTPUT_CALLS]))
    if output.get(WORKEROUTPUT_TEMPLATE):
        RECORDER.templates[:] = [json.loads(output[WORKEROUTPUT_TEMPLATE])]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _is_worker(config):
        output = config.workeroutput  # type: ignore[attr-defined]
        output[WORKEROUTPUT_CALLS] = json.dumps(RECORDER.export())
        if RECORDER.templates:
            output[WORKEROUTPUT_TEMPLATE] = json.dumps(RECORDER.templates[0])
        return
    if not _whole_suite(config):
        return
    template = RECORDER.templates[0] if RECORDER.templates else _synthesize()
    from fleetkey_infra import constants

    report = evaluate(
        template,
        RECORDER.calls.values(),
        stack_name=constants.STACK_ID,
        unmapped=RECORDER.unmapped,
    )
    config.stash[_REPORT] = report
    if not report.ok and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None:
        return
    terminalreporter.section("IAM derived from the code", red=not report.ok, green=report.ok)
    for line in report.lines():
        terminalreporter.write_line(line)


def _synthesize() -> dict[str, Any]:
    """The template, when no infrastructure test synthesized it in this run."""
    import tempfile

    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    from fleetkey_infra import constants
    from fleetkey_infra.application import create_app

    with tempfile.TemporaryDirectory() as outdir:
        app = create_app(outdir=outdir, context={"aws:cdk:disable-asset-staging": True})
        assembly = app.synth()
        template: dict[str, Any] = assembly.get_stack_by_name(constants.STACK_ID).template
        return template


def iter_problems(report: Report) -> Iterator[str]:
    yield from report.problems
