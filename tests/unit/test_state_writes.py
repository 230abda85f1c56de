"""The device repository is the only writer of a device's state: the check every test runs under
(tests/support/state_writes.py) recognizes every way of writing it, and the codebase addresses a
device item nowhere else."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import state_writes

ROOT = Path(__file__).resolve().parents[2]
DEVICE = {"pk": {"S": "DEVICE#d"}, "sk": {"S": "DEVICE"}}
OTHER = {"pk": {"S": "CERT#c"}, "sk": {"S": "CERT"}}
SET_STATE = {
    "Key": DEVICE,
    "UpdateExpression": "SET #s = :s",
    "ExpressionAttributeNames": {"#s": "state"},
}


@pytest.mark.parametrize(
    "operation, params",
    [
        ("PutItem", {"Item": {**DEVICE, "state": {"S": "ACTIVE"}}}),
        ("UpdateItem", SET_STATE),
        ("UpdateItem", {**SET_STATE, "UpdateExpression": "REMOVE #s"}),
        ("DeleteItem", {"Key": DEVICE}),
        ("TransactWriteItems", {"TransactItems": [{"Update": SET_STATE}]}),
        ("TransactWriteItems", {"TransactItems": [{"Put": {"Item": {**DEVICE, "state": 1}}}]}),
        ("BatchWriteItem", {"RequestItems": {"t": [{"PutRequest": {"Item": DEVICE}}]}}),
        ("UpdateItem", {"Key": DEVICE, "AttributeUpdates": {"state": {"Value": {"S": "X"}}}}),
        ("ExecuteStatement", {"Statement": "UPDATE t SET state='ACTIVE' WHERE pk='DEVICE#d'"}),
        ("ExecuteTransaction", {"TransactStatements": [{"Statement": "DELETE FROM t"}]}),
    ],
)
def test_every_way_of_writing_a_devices_state_is_seen(operation, params):
    assert list(state_writes.state_writes(operation, params))


@pytest.mark.parametrize(
    "operation, params",
    [
        # the condition names the state, the update does not set it
        (
            "UpdateItem",
            {
                "Key": DEVICE,
                "UpdateExpression": "SET audit_seq = :a",
                "ConditionExpression": "#state = :s",
                "ExpressionAttributeNames": {"#state": "state"},
            },
        ),
        ("PutItem", {"Item": {**OTHER, "state": {"S": "registering"}}}),
        ("TransactWriteItems", {"TransactItems": [{"ConditionCheck": {"Key": DEVICE}}]}),
        ("GetItem", {"Key": DEVICE}),
    ],
)
def test_reads_checks_and_other_items_are_not_state_writes(operation, params):
    assert not list(state_writes.state_writes(operation, params))


def test_a_state_write_from_outside_the_repository_fails_the_test(stack, request):
    # Given a device, and a write of its state that bypasses the repository
    from fleetkey.domain.allowlist import AllowlistEntry

    stack.allowlist.add(
        AllowlistEntry(
            device_id="d1", serial_number="S", manufacturer_ca="acme", profile="telemetry-sensor"
        ),
        actor="op",
    )
    before = len(state_writes.VIOLATIONS)
    stack.dynamodb.update_item(
        TableName=stack.settings.table_name,
        Key={"pk": {"S": "DEVICE#d1"}, "sk": {"S": "DEVICE"}},
        UpdateExpression="SET #s = :s",
        ExpressionAttributeNames={"#s": "state"},
        ExpressionAttributeValues={":s": {"S": "ACTIVE"}},
    )
    # Then it is recorded as a violation (taken back here, so this test itself passes)
    assert len(state_writes.VIOLATIONS) == before + 1
    del state_writes.VIOLATIONS[before:]


def test_the_repository_refuses_a_companion_write_that_addresses_a_device(stack):
    # Given a device, and another device's update smuggled in as a companion write
    from fleetkey.clock import timestamp, utc_now
    from fleetkey.domain.allowlist import AllowlistEntry
    from fleetkey.ports import DeviceChange, Write

    for device_id in ("d2", "d3"):
        stack.allowlist.add(
            AllowlistEntry(
                device_id=device_id,
                serial_number="S",
                manufacturer_ca="acme",
                profile="telemetry-sensor",
            ),
            actor="op",
        )
    smuggled = Write(
        "other", {"Update": {"Key": {"pk": {"S": "DEVICE#d3"}, "sk": {"S": "DEVICE"}}}}
    )
    device = stack.store.devices.get("d2")
    change = DeviceChange(action="note", actor="t", at=timestamp(utc_now()))
    # Then it is refused before anything is written
    with pytest.raises(ValueError):
        stack.store.devices.apply(device, change, with_writes=[smuggled])
    assert stack.store.devices.get("d2") == device


def test_only_the_repository_addresses_a_device_item():
    # No module of the core, the functions or the tooling but the repository builds a device's key
    sources = [
        p
        for base in ("layers/core/python/fleetkey", "functions", "tooling")
        for p in (ROOT / base).rglob("*.py")
    ]
    users = {
        str(p.relative_to(ROOT)) for p in sources if "device_key(" in p.read_text(encoding="utf-8")
    }
    assert users == {
        "layers/core/python/fleetkey/store/schema.py",  # where the key is defined
        "layers/core/python/fleetkey/store/devices.py",
    }
