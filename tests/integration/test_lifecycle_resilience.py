"""Every lifecycle operation converges: a fault at any AWS call (before AWS applied it, or after),
then a retry of the same request and the queue's redelivery, ends in the state of one clean run;
and concurrent copies of one request end as one."""

from __future__ import annotations

import contextlib
import threading

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.oauth import OAuthError
from fleetkey.errors import FleetkeyError
from fleetkey_local.device import client_assertion
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca

INJECTED = (ClientError, BotoCoreError, FleetkeyError, OAuthError)
DEVICE = "well-1"


class World:
    """A stack with one registered device (its key and certificate)."""

    def __init__(self, stack) -> None:
        self.stack = stack
        acme = cached_ca("acme")
        stack.anchors.get(stack.register_ca(acme).iot_ca_id)
        self.key, cert, event = stack.manufacture(acme, DEVICE)
        self.certificate_id = certificate_id(cert)
        assert stack.register(event).accepted

    def data_key(self) -> dict:
        assertion = client_assertion(
            self.key, self.certificate_id, DEVICE, self.stack.settings.issuer
        )
        return self.stack.data_keys.for_device(DEVICE, {"client_assertion": assertion})


def prepare(stack, operation: str) -> World:
    world = World(stack)
    lifecycle = stack.lifecycle
    if operation == "resume":
        lifecycle.suspend(DEVICE, reason="stolen", actor="op")
    if operation == "decommission":
        world.data_key()
    if operation == "recommission":
        lifecycle.decommission(DEVICE, reason="retired", actor="op")
        assert stack.drain_lifecycle(30)
    return world


def run(world: World, operation: str) -> None:
    lifecycle = world.stack.lifecycle
    if operation == "suspend":
        lifecycle.suspend(DEVICE, reason="stolen", actor="op")
    elif operation == "resume":
        lifecycle.resume(DEVICE, actor="op")
    elif operation == "decommission":
        lifecycle.decommission(DEVICE, reason="retired", actor="op")
    elif operation == "recommission":
        lifecycle.recommission(DEVICE, actor="op", owner="tenant-b")
    elif operation == "data-key":
        world.data_key()


def snapshot(world: World) -> dict:
    """Everything these operations change, with times abstracted away."""
    stack, iot = world.stack, world.stack.harness_iot
    device = stack.store.devices.get(DEVICE)
    try:
        cert = iot.describe_certificate(certificateId=world.certificate_id)
        arn = cert["certificateDescription"]["certificateArn"]
        certificate = (
            cert["certificateDescription"]["status"],
            [p["policyName"] for p in iot.list_attached_policies(target=arn)["policies"]],
            iot.list_principal_things(principal=arn)["things"],
        )
    except iot.exceptions.ResourceNotFoundException:
        certificate = None
    things = [t["thingName"] for t in iot.list_things()["things"]]
    records, _ = stack.devices.audit(f"device:{DEVICE}")  # also verifies the chain
    return {
        "state": device.state.value,
        "epoch": device.epoch,
        "owner": device.owner,
        "certificates": [
            (c.role.value, c.certificate_id == world.certificate_id) for c in device.certificates
        ],
        "teardown": device.teardown.status.value if device.teardown else None,
        "tokens_cut": device.tokens_not_before is not None,
        "aws_certificate": certificate,
        "thing": DEVICE in things,
        "data_keys": len(stack.store.table.query(f"DATAKEY#{DEVICE}")),
        "actions": [r.action for r in records],
    }


def clean_run(make_stack, operation: str) -> tuple[dict, list[str]]:
    stack = make_stack()
    world = prepare(stack, operation)
    faults = FaultInjector().watch(*stack.service_clients())
    faults.arm(None)
    run(world, operation)
    assert stack.drain_lifecycle(30)
    calls = list(faults.calls)
    if operation != "data-key":
        run(world, operation)  # a repeated request changes nothing
        assert stack.drain_lifecycle(30)
    return snapshot(world), calls


OPERATIONS = ["suspend", "resume", "decommission", "recommission", "data-key"]


@pytest.mark.slow
@pytest.mark.parametrize("after", [False, True], ids=["fail-before-call", "fail-after-call"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_fault_at_every_call_then_a_retry_converges(make_stack, operation, after):
    expected, calls = clean_run(make_stack, operation)
    assert calls, "the clean run made no AWS calls"
    for k in range(1, len(calls) + 1):
        # Given a fresh start and a fault at the k-th AWS call of the operation and its queue work
        stack = make_stack()
        world = prepare(stack, operation)
        faults = FaultInjector().watch(*stack.service_clients())
        faults.arm(k, after=after)
        # When the request fails there or finishes (work left for the queue), and the queue runs
        with contextlib.suppress(INJECTED):
            run(world, operation)
        with contextlib.suppress(INJECTED):
            stack.drain_lifecycle(10)
        fired = faults.fired
        assert fired is not None, (k, faults.calls)
        # and the caller retries the request, and the queue runs again
        faults.arm(None)
        run(world, operation)
        assert stack.drain_lifecycle(30)
        # Then the state is that of one clean run
        assert snapshot(world) == expected, f"fault at call {k} ({fired})"


@pytest.mark.parametrize("operation", ["suspend", "decommission", "recommission"])
def test_ten_concurrent_copies_end_as_one_run(make_stack, operation):
    expected, _ = clean_run(make_stack, operation)
    stack = make_stack()
    world = prepare(stack, operation)
    barrier = threading.Barrier(10)
    errors: list[BaseException] = []

    def deliver():
        barrier.wait()
        try:
            run(world, operation)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stack.drain_lifecycle(30)
    assert snapshot(world) == expected
