"""Only the device repository writes a device's state, and only by applying a transition (or
creating the device): checked on every DynamoDB call of every test.

`install()` wraps botocore's `BaseClient._make_api_call` (once per process). A call that writes a
device item's `state` (a Put of a DEVICE# item holding it, an Update whose update expression sets
or removes it, a Delete of a device item; alone, in a transaction or in a batch) is a violation
unless it was made from `DynamoDeviceRepository.apply` or `.create` (fleetkey/store/devices.py).
The autouse fixture in tests/conftest.py fails the test during which a violation happened.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

REPOSITORY_FILE = "fleetkey/store/devices.py"
REPOSITORY_FUNCTIONS = frozenset({"apply", "create"})
STATE = "state"
VIOLATIONS: list[str] = []
_installed = False


def _is_device_key(key: Mapping[str, Any]) -> bool:
    pk = (key.get("pk") or {}).get("S", "")
    sk = (key.get("sk") or {}).get("S", "")
    return pk.startswith("DEVICE#") and sk == "DEVICE"


def _sets_state(update: Mapping[str, Any]) -> bool:
    if STATE in (update.get("AttributeUpdates") or {}):  # the legacy form
        return True
    names = update.get("ExpressionAttributeNames") or {}
    placeholders = [name for name, value in names.items() if value == STATE]
    expression = update.get("UpdateExpression", "")
    return any(re.search(re.escape(p) + r"(?![A-Za-z0-9_])", expression) for p in placeholders)


def state_writes(operation: str, params: Mapping[str, Any]) -> Iterator[str]:
    """What in this call writes a device's state (descriptions; none for other calls)."""
    if operation == "PutItem" and _is_device_key(params.get("Item", {})):
        if STATE in params["Item"]:
            yield "PutItem"
    elif operation == "UpdateItem" and _is_device_key(params.get("Key", {})):
        if _sets_state(params):
            yield "UpdateItem"
    elif operation == "DeleteItem" and _is_device_key(params.get("Key", {})):
        yield "DeleteItem"
    elif operation == "TransactWriteItems":
        for item in params.get("TransactItems", []):
            for kind, body in item.items():
                if kind == "Put" and _is_device_key(body.get("Item", {})):
                    if STATE in body["Item"]:
                        yield "TransactWriteItems.Put"
                elif kind == "Update" and _is_device_key(body.get("Key", {})):
                    if _sets_state(body):
                        yield "TransactWriteItems.Update"
                elif kind == "Delete" and _is_device_key(body.get("Key", {})):
                    yield "TransactWriteItems.Delete"
    elif operation in ("ExecuteStatement", "BatchExecuteStatement", "ExecuteTransaction"):
        # PartiQL: fleetkey never uses it; any write statement on the table is suspect.
        statements = [params] if operation == "ExecuteStatement" else []
        statements += params.get("Statements") or params.get("TransactStatements") or []
        for statement in statements:
            text = str(statement.get("Statement", "")).lstrip().upper()
            if text.startswith(("UPDATE", "INSERT", "DELETE")):
                yield f"{operation} (PartiQL)"
    elif operation == "BatchWriteItem":
        for requests in (params.get("RequestItems") or {}).values():
            for request in requests:
                put = request.get("PutRequest", {}).get("Item", {})
                if _is_device_key(put):
                    yield "BatchWriteItem.Put"
                delete = request.get("DeleteRequest", {}).get("Key", {})
                if _is_device_key(delete):
                    yield "BatchWriteItem.Delete"


def _from_the_repository() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.replace("\\", "/").endswith(REPOSITORY_FILE) and (
            code.co_name in REPOSITORY_FUNCTIONS
        ):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def install() -> None:
    global _installed
    if _installed:
        return
    from botocore.client import BaseClient

    original = BaseClient._make_api_call  # type: ignore[attr-defined]

    def _make_api_call(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        if client.meta.service_model.service_name == "dynamodb":
            writes = list(state_writes(operation_name, api_params))
            if writes and not _from_the_repository():
                VIOLATIONS.append(f"{', '.join(writes)} outside the device repository")
        return original(client, operation_name, api_params)

    BaseClient._make_api_call = _make_api_call  # type: ignore[attr-defined]
    _installed = True
