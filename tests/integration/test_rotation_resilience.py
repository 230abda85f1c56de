"""Certificate rotation loses nothing: a fault at any AWS call of a rotation request, a commit
(by the connected event, by call), a rollback or a renewal (before AWS applied the call, or
after), then the retry its caller makes (the device's repeated request, Lambda's retry of the
event, the next sweep), ends in the state of one clean run; concurrent copies of one request or
event end as one; and the sweep reads only the devices with something due."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import cached_property

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

# Imported here, first: the pool's boto3 session (made later) is mocked only if made after it.
from moto import mock_aws
from moto.iotdata.models import iotdata_backends

from fleetkey.crypto.certificates import certificate_id
from fleetkey.crypto.issuing import spki_sha256
from fleetkey.domain.oauth import OAuthError
from fleetkey.domain.rotation import DUE_SHARDS, all_due_shards
from fleetkey.errors import FleetkeyError
from fleetkey.services.rotation import RotationPending, RotationService
from fleetkey.store.schema import DUE_INDEX, RENEWAL_INDEX, SPARSE_INDEXES
from fleetkey.store.table import de
from fleetkey_local.device import (
    client_assertion,
    rotation_assertion,
    rotation_csr,
    rotation_request,
)
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca

INJECTED = (ClientError, BotoCoreError, FleetkeyError, OAuthError)
DEVICE = "rot-res-1"


class ClientPool:
    """boto3 clients reused from stack to stack: the n-th client of a service a stack asks for
    is the same object in every stack. Each stack still starts from nothing (moto is reset for
    each); what is saved is botocore's building of a client (every operation's method), most of
    what a fresh stack costs. Handlers a test registers on a client must be removed after it
    (`watching`)."""

    def __init__(self) -> None:
        self._make = client_factory()
        self._clients: dict[str, list] = {}

    def for_stack(self):
        handed: Counter[str] = Counter()

        def make(service: str):
            made = self._clients.setdefault(service, [])
            if handed[service] == len(made):
                made.append(self._make(service))
            handed[service] += 1
            return made[handed[service] - 1]

        return make


@pytest.fixture(scope="module")
def client_pool():
    return ClientPool()


@pytest.fixture
def make_stack(client_pool):
    """Overrides conftest's `make_stack`: the same fresh provisioned stack in a moto of its own
    (the previous one stopped), with its clients from the module's pool."""
    mocks = []

    def make() -> EmbeddedStack:
        if mocks:
            mocks.pop().stop()
        mock = mock_aws(config={"iot": {"use_valid_cert": True}})
        mock.start()
        mocks.append(mock)
        return EmbeddedStack(client_pool.for_stack()).provision()

    yield make
    for mock in mocks:
        mock.stop()


@contextlib.contextmanager
def watching(clients, handlers: dict[str, object]):
    """`handlers` (event name -> handler) registered on `clients` for the block's duration."""
    for client in clients:
        for event, handler in handlers.items():
            client.meta.events.register(event, handler)
    try:
        yield
    finally:
        for client in clients:
            for event, handler in handlers.items():
                client.meta.events.unregister(event, handler)


@contextlib.contextmanager
def injecting_faults(stack: EmbeddedStack):
    """A FaultInjector on the stack's service clients, removed afterwards (pooled clients)."""
    faults = FaultInjector()
    # FaultInjector.watch registers these two; registered here so that they can be removed.
    handlers = {"before-call.*.*": faults._before, "after-call.*.*": faults._after}
    with watching(stack.service_clients(), handlers):
        yield faults


class World:
    """A stack with one registered device that rotates: its current key and certificate, the
    key and CSR of the rotation under way, and a label for every key it made (snapshots name
    certificates by their key, since serials and times differ from run to run)."""

    def __init__(
        self, stack: EmbeddedStack, device_id: str = DEVICE, *, register_ca: bool = True
    ) -> None:
        self.stack = stack
        self.device_id = device_id
        acme = cached_ca("acme")
        if register_ca:
            stack.register_ca(acme)
        self.key, certificate, event = stack.manufacture(acme, device_id)
        self.certificate_id = certificate_id(certificate)
        self.factory_id = self.certificate_id
        assert stack.register(event).accepted
        self.labels = {spki_sha256(self.key.public_key()): "factory"}

    @cached_property
    def harness_dynamodb(self):
        """The test's own client: its reads are neither counted nor failed."""
        return self.stack.make_client("dynamodb")

    # ---- the device's side ---------------------------------------------------------------

    def new_key(self, label: str) -> None:
        """A new key and its CSR: the device keeps both until it has an answer."""
        self.next_key = ec.generate_private_key(ec.SECP256R1())
        self.labels[spki_sha256(self.next_key.public_key())] = label
        self.csr = rotation_csr(self.next_key, self.device_id)

    def request_assertion(self) -> str:
        return rotation_assertion(
            self.key, self.certificate_id, self.device_id, self.stack.settings.issuer, self.csr
        )

    def request(self, assertion: str | None = None) -> tuple[int, dict]:
        """The rotation request for the CSR under way, with a fresh assertion by the current
        key (a used one is refused as a replay)."""
        body = rotation_request(self.csr, assertion or self.request_assertion())
        return self.stack.rotation.request(self.device_id, body)

    def commit_call(self, new_id: str) -> dict:
        """The explicit commit, with a fresh assertion by the new key."""
        assertion = client_assertion(
            self.next_key, new_id, self.device_id, self.stack.settings.issuer
        )
        return self.stack.rotation.commit(self.device_id, new_id, {"client_assertion": assertion})

    def connected(self, cert_id: str, at: datetime | None = None) -> dict:
        """The presence event AWS IoT emits when the device connects with `cert_id`."""
        return {
            "clientId": self.device_id,
            "timestamp": int((at or datetime.now(UTC)).timestamp() * 1000),
            "eventType": "connected",
            "sessionIdentifier": "00000000-0000-0000-0000-000000000000",
            "principalIdentifier": cert_id,
            "ipAddress": "192.0.2.1",
            "versionNumber": 1,
        }

    def rotate(self, label: str) -> dict:
        """A whole rotation: request, then the connection with the new certificate."""
        self.new_key(label)
        status, answer = self.request()
        assert status == 201
        assert self.stack.rotation.on_connected(self.connected(answer["certificate_id"])) == (
            "committed"
        )
        self.key, self.certificate_id = self.next_key, answer["certificate_id"]
        self.rotated_id = self.certificate_id
        return answer

    def start_rotation(self, label: str) -> dict:
        """A rotation requested and pending; the commit deadline passed by a second."""
        self.new_key(label)
        status, self.pending = self.request()
        assert status == 201
        self.event = self.connected(self.pending["certificate_id"])
        self.past_deadline = datetime.fromisoformat(self.pending["commit_deadline"]) + timedelta(
            seconds=1
        )
        return self.pending

    def device(self):
        return self.stack.store.devices.get(self.device_id)


def snapshot(world: World) -> dict:
    """Everything rotation changes, with times and serials abstracted away: certificates are
    named by the key they certify ("factory", "first", "second", ...)."""
    stack, iot = world.stack, world.stack.harness_iot
    items = [
        de(item)
        for page in world.harness_dynamodb.get_paginator("scan").paginate(
            TableName=stack.settings.table_name, ConsistentRead=True
        )
        for item in page["Items"]
    ]
    claims = {
        item["certificate_id"]: (item["pk"].removeprefix("KEY#"), item["device_id"])
        for item in items
        if item["pk"].startswith("KEY#")
    }

    def label(cert_id: str) -> str:
        if cert_id == world.factory_id:
            return "factory"
        claim = claims.get(cert_id)
        return world.labels.get(claim[0], "unknown key") if claim else "unclaimed"

    revoked = [item for item in items if item["pk"] == "PKI#REVOKED"]
    by_serial = {int(item["serial"], 16): label(item["certificate_id"]) for item in revoked}
    [counter] = [item for item in items if (item["pk"], item["sk"]) == ("PKI#CRL", "CRL")] or [{}]
    # The CRL as GET /v1/pki/crl serves it after the sweep's next publication (which follows
    # every revocation within a minute).
    stack.pki.refresh_crl()
    served = x509.load_der_x509_crl(stack.pki.crl_der())
    [device_item] = [
        item
        for item in items
        if (item["pk"], item["sk"]) == (f"DEVICE#{world.device_id}", "DEVICE")
    ]
    device = world.device()
    in_iot = []
    for page in iot.get_paginator("list_certificates").paginate():
        for described in page["certificates"]:
            arn = described["certificateArn"]
            policies = iot.list_attached_policies(target=arn)["policies"]
            things = iot.list_principal_things(principal=arn)["things"]
            in_iot.append(
                (
                    label(described["certificateId"]),
                    described["status"],
                    tuple(p["policyName"] for p in policies),
                    tuple(things),
                )
            )
    records, _ = stack.devices.audit(f"device:{world.device_id}")  # verifies the chain too
    # Commands as a set: a fault after a renewal's Publish makes the next sweep publish it again
    # (the record that the device was told failed); a duplicate names the same certificate and
    # costs the device nothing, so it is acceptable.
    topics = {topic for topic, _ in iotdata_backends[ACCOUNT][REGION].published_payloads}
    return {
        "state": device.state.value,
        "certificates": sorted(
            (
                label(c.certificate_id),
                c.role.value,
                c.commit_deadline is not None,
                c.delete_after is not None,
                c.renewal_requested_at is not None,
            )
            for c in device.certificates
        ),
        "held_keys": len(device.held_keys),
        "due": "due_at" in device_item,
        "aws_iot": sorted(in_iot),
        "key_claims": sorted(
            (world.labels.get(key, "unknown key"), owner) for key, owner in claims.values()
        ),
        "revoked": sorted((label(item["certificate_id"]), item["reason"]) for item in revoked),
        "revocation_counter": int(counter.get("revocations", 0)),
        "crl": sorted(by_serial.get(entry.serial_number, "unknown") for entry in served),
        "actions": [r.action for r in records],
        "commands": sorted(topics),
    }


# ---- the operations ------------------------------------------------------------------------

# request: the device asks for a certificate for its new key ("first").
# commit-event / commit-call / rollback: the device rotated once ("first", so the certificate
# being replaced is fleetkey's and goes into the CRL), and asked again ("second", pending).
# renewal: a registered device whose factory certificate its profile replaces (due at once).
OPERATIONS = ["request", "commit-event", "commit-call", "rollback", "renewal"]


def prepare(stack: EmbeddedStack, operation: str) -> World:
    world = World(stack)
    if operation == "request":
        world.new_key("first")
    elif operation in ("commit-event", "commit-call", "rollback"):
        world.rotate("first")
        world.start_rotation("second")
    elif operation == "renewal":
        world.sweep_at = datetime.now(UTC)
    assert stack.drain_lifecycle(30)
    return world


def run(world: World, operation: str) -> object:
    """One delivery of the operation, as its caller makes it (each retry the same way)."""
    stack = world.stack
    if operation == "request":
        # The same CSR, a fresh assertion: the first one's may have been used.
        return world.request()
    if operation == "commit-event":
        return stack.rotation.on_connected(world.event)  # Lambda retries the same event
    if operation == "commit-call":
        return world.commit_call(world.pending["certificate_id"])
    if operation == "rollback":
        return stack.sweep_rotations(world.past_deadline)
    # renewal: the next sweep (a minute later) retries what failed
    return stack.sweep_rotations(world.sweep_at)


def check_answer(world: World, operation: str, answer: object) -> None:
    """What the caller's successful retry answered is what the device then holds."""
    if operation == "request":
        status, body = answer
        assert status in (200, 201)
        pending = world.device().pending_certificate
        assert pending is not None and body["certificate_id"] == pending.certificate_id
        issued = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
        assert issued.public_key() == world.next_key.public_key()
    elif operation == "commit-event":
        assert answer in ("committed", "current")
    elif operation == "commit-call":
        assert answer["committed"] is True
    else:
        assert answer["failed"] == 0, answer


def clean_run(make_stack, operation: str) -> tuple[dict, list[str]]:
    """The state after one clean run and a repeated delivery (which changes nothing), and the
    AWS calls of the clean run."""
    stack = make_stack()
    world = prepare(stack, operation)
    with injecting_faults(stack) as faults:
        faults.arm(None)
        answer = run(world, operation)
        assert stack.drain_lifecycle(30)
    calls = list(faults.calls)
    check_answer(world, operation, answer)
    check_answer(world, operation, run(world, operation))
    assert stack.drain_lifecycle(30)
    return snapshot(world), calls


def faulted_run(make_stack, operation: str, k: int, after: bool) -> tuple[World, str]:
    """A fresh stack, a fault at the k-th AWS call of the operation (and of the queue's work),
    then the caller's retry and the queue's redelivery. The world and the call that failed."""
    stack = make_stack()
    world = prepare(stack, operation)
    with injecting_faults(stack) as faults:
        faults.arm(k, after=after)
        with contextlib.suppress(INJECTED):
            run(world, operation)
        with contextlib.suppress(INJECTED):
            stack.drain_lifecycle(10)
    fired = faults.fired
    assert fired is not None, (k, faults.calls)
    check_answer(world, operation, run(world, operation))
    assert stack.drain_lifecycle(30)
    return world, fired


# Fault points where the retry does not converge (none): (operation, after, k) -> the AWS call.
KNOWN_DIVERGENT: dict[tuple[str, bool, int], str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("after", [False, True], ids=["fail-before-call", "fail-after-call"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_fault_at_every_call_then_a_retry_converges(make_stack, operation, after):
    expected, calls = clean_run(make_stack, operation)
    assert calls, "the clean run made no AWS calls"
    for k in range(1, len(calls) + 1):
        if (operation, after, k) in KNOWN_DIVERGENT:
            assert calls[k - 1] == KNOWN_DIVERGENT[operation, after, k], calls
            continue
        # Given a fresh stack and a fault at the k-th AWS call of the operation
        # When it fails there (or leaves work to the queue), and its caller retries
        world, fired = faulted_run(make_stack, operation, k, after)
        # Then the state is that of one clean run
        assert snapshot(world) == expected, f"fault at call {k} ({fired})"


def test_a_connected_event_retried_after_its_commit_landed_deactivates_the_old_certificate(
    make_stack,
):
    # Given a fault after the commit's transaction landed (AWS applied it, the function saw a
    # timeout): the invocation fails before the replaced certificate is deactivated
    world, fired = faulted_run(make_stack, "commit-event", 2, after=True)
    assert fired == "TransactWriteItems"
    # Then, after Lambda's retry of the event, the replaced certificate is INACTIVE
    assert world.device().current_certificate.certificate_id == world.pending["certificate_id"]
    assert world.stack.registry.certificate_status(world.rotated_id) == "INACTIVE"


# ---- concurrency ---------------------------------------------------------------------------


def deliver_at_once(copies: list) -> tuple[list, list[BaseException]]:
    """Run each callable in a thread of its own (named copy-<its index>), all released
    together. The results and the errors, in the order they came."""
    barrier = threading.Barrier(len(copies))
    results: list = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def deliver(call):
        barrier.wait()
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - collected and asserted by the caller
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(result)

    threads = [
        threading.Thread(target=deliver, args=(call,), name=f"copy-{n}")
        for n, call in enumerate(copies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def decisions_meet(stack: EmbeddedStack, parties: int, first: str | None = None):
    """For a `with` block: hold each thread's first write of a device (the decision it took on
    the device as it read it) until `parties` threads are there, so that all decided on the same
    read (the worst overlap of concurrent copies); then, if `first` names a thread, let it write
    first."""
    meeting = threading.Barrier(parties, timeout=30)
    written = threading.Event()
    met: set[str] = set()

    def before(params, **_: object) -> None:
        name = threading.current_thread().name
        writes_a_device = any(
            item.get("Update", {}).get("Key", {}).get("pk", {}).get("S", "").startswith("DEVICE#")
            for item in params.get("TransactItems", [])
        )
        if writes_a_device and name not in met:
            met.add(name)
            meeting.wait()
            if first is not None and name != first:
                written.wait(30)

    def after(**_: object) -> None:
        if threading.current_thread().name == first and first in met:
            written.set()

    return watching(
        [stack.dynamodb],
        {
            "before-parameter-build.dynamodb.TransactWriteItems": before,
            "after-call.dynamodb.TransactWriteItems": after,
        },
    )


@pytest.mark.slow
def test_ten_copies_of_one_presence_event_commit_once(make_stack):
    expected, _ = clean_run(make_stack, "commit-event")
    stack = make_stack()
    world = prepare(stack, "commit-event")
    with decisions_meet(stack, 10):
        results, errors = deliver_at_once(
            [lambda: stack.rotation.on_connected(world.event) for _ in range(10)]
        )
    assert errors == []
    assert set(results) <= {"committed", "current"}
    assert stack.drain_lifecycle(30)
    state = snapshot(world)
    assert state["actions"].count("rotation_committed") == 2  # "first", then this one
    assert state == expected


def ten_copies_of_one_request(world: World) -> tuple[list, list[BaseException]]:
    """The same rotation request (same CSR, each copy with an assertion of its own) ten times at
    once, every copy deciding on the same read of the device."""
    assertions = [world.request_assertion() for _ in range(10)]
    with decisions_meet(world.stack, 10):
        return deliver_at_once(
            [lambda assertion=assertion: world.request(assertion) for assertion in assertions]
        )


@pytest.mark.slow
def test_ten_copies_of_one_rotation_request_make_one_pending_certificate(make_stack):
    expected, _ = clean_run(make_stack, "request")
    stack = make_stack()
    world = prepare(stack, "request")
    results, errors = ten_copies_of_one_request(world)
    # One copy made the certificate; the others were answered (the answers are the test below's)
    assert [status for status, _ in results].count(201) == 1, (results, errors)
    assert all(isinstance(error, OAuthError) for error in errors), errors
    assert {body["certificate_id"] for _, body in results} == {
        world.device().pending_certificate.certificate_id
    }
    assert stack.drain_lifecycle(30)
    state = snapshot(world)
    assert state["actions"].count("rotation_requested") == 1
    assert state == expected


def test_copies_of_one_rotation_request_that_lose_the_race_answer_200_or_pending(make_stack):
    stack = make_stack()
    world = prepare(stack, "request")
    results, errors = ten_copies_of_one_request(world)
    # One 201; each other copy gets the same certificate again (200) or rotation_pending (409).
    assert sorted(status for status, _ in results) == [200] * (len(results) - 1) + [201]
    assert all(isinstance(error, RotationPending) for error in errors), errors


@pytest.mark.slow
def test_a_commit_racing_the_rollback_at_the_deadline_ends_one_way(make_stack):
    committed, _ = clean_run(make_stack, "commit-call")
    rolled_back, _ = clean_run(make_stack, "rollback")
    outcomes = []
    # As the threads run; then with both decisions taken on the same read of the device, the
    # commit's written first (copy-0), then the rollback's (copy-1).
    for first in (None, None, "copy-0", "copy-1"):
        stack = make_stack()
        world = prepare(stack, "commit-call")
        new_id = world.pending["certificate_id"]
        meeting = decisions_meet(stack, 2, first) if first else contextlib.nullcontext()
        with meeting:
            results, errors = deliver_at_once(
                [
                    lambda world=world, new_id=new_id: world.commit_call(new_id),
                    lambda world=world: world.stack.sweep_rotations(world.past_deadline),
                ]
            )
        # The loser is refused (a commit of a rolled-back rotation) or finds nothing to do (a
        # sweep after the commit); nothing fails halfway.
        assert all(isinstance(error, OAuthError) for error in errors), errors
        assert all(result["failed"] == 0 for result in results if "failed" in result), results
        assert stack.drain_lifecycle(30)
        state = snapshot(world)
        assert state in (committed, rolled_back), state
        outcomes.append("committed" if state == committed else "rolled back")
        if first is not None:
            assert outcomes[-1] == ("committed" if first == "copy-0" else "rolled back")
    print("outcomes:", outcomes)  # which side won varies from run to run


def test_a_commit_call_after_the_deadline_is_refused_as_a_late_connection_is(make_stack):
    # Given a pending rotation whose commit deadline has passed, the sweep not yet run
    stack = make_stack()
    world = prepare(stack, "commit-call")
    new_id = world.pending["certificate_id"]
    # The rotation service as of one second past the deadline (the assertion is checked by the
    # stack's token service, on the real clock, which pyjwt's own checks use too).
    late = RotationService(
        stack.settings,
        stack.store.devices,
        stack.pki,
        stack.store.pki,
        stack.tokens,
        stack.registry,
        stack.components.channel,
        stack.components.lifecycle_queue,
        clock=lambda: world.past_deadline,
    )
    assert late.on_connected(world.connected(new_id, at=world.past_deadline)) == "late"
    assertion = client_assertion(world.next_key, new_id, world.device_id, stack.settings.issuer)
    # When the device calls commit, Then it is refused and the sweep rolls the rotation back
    with pytest.raises(OAuthError):
        late.commit(world.device_id, new_id, {"client_assertion": assertion})
    assert stack.sweep_rotations(world.past_deadline)["rolled_back"] == 1


# ---- the sweep's reads ---------------------------------------------------------------------


class DynamoRequests:
    """The DynamoDB requests of watched clients, with their parameters."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []

    def watch(self, client) -> DynamoRequests:
        client.meta.events.register("before-parameter-build.dynamodb.*", self._record)
        return self

    def _record(self, params, model, **_: object) -> None:
        self.requests.append((model.name, dict(params)))

    def device_reads(self) -> list[str]:
        return [
            params["Key"]["pk"]["S"].removeprefix("DEVICE#")
            for name, params in self.requests
            if name == "GetItem" and params["Key"]["pk"]["S"].startswith("DEVICE#")
        ]


def test_the_sweep_reads_only_the_devices_with_something_due(stack):
    # Given 30 registered devices, each already asked to renew its factory certificate (so its
    # next renewal request is hours away), and 3 of them with a rotation pending
    acme = cached_ca("acme")
    stack.register_ca(acme)
    worlds = [World(stack, f"rot-due-{n:02d}", register_ca=False) for n in range(30)]
    first = stack.sweep_rotations()
    assert first["renewals_requested"] == 30 and first["failed"] == 0
    due = worlds[:3]
    for world in due:
        world.start_rotation("first")
    later = max(world.past_deadline for world in due)
    index = stack.make_client("dynamodb")

    def indexed(name: str) -> int:
        shard_key, _ = SPARSE_INDEXES[name]
        return sum(
            index.query(
                TableName=stack.settings.table_name,
                IndexName=name,
                KeyConditionExpression="#shard = :shard",
                ExpressionAttributeNames={"#shard": shard_key},
                ExpressionAttributeValues={":shard": {"S": shard}},
                Select="COUNT",
            )["Count"]
            for shard in all_due_shards()
        )

    # every device is in an index: the 3 with a deadline in `due`, the 27 others' renewals
    # (hours later) in `renewal`
    assert (indexed(DUE_INDEX), indexed(RENEWAL_INDEX)) == (3, 27)
    # When the sweep runs past their commit deadline
    counter = AwsCallCounter().watch(*stack.service_clients())
    requests = DynamoRequests().watch(stack.dynamodb)
    counts = stack.sweep_rotations(later)
    # Then it reads those 3 devices, from the `due` index, and nothing else of the fleet
    assert counts["due"] == 3 and counts["rolled_back"] == 3, counts
    calls = counter.by_operation()
    assert calls["dynamodb.Scan"] == 0
    assert sorted(requests.device_reads()) == sorted(world.device_id for world in due)
    # One GetItem per due device, + 1 of the CRL item (is it up to date?).
    assert calls["dynamodb.GetItem"] == len(due) + 1, calls
    index_queries = [p for name, p in requests.requests if name == "Query" and "IndexName" in p]
    # One Query per shard of each sparse index (deadlines, renewals).
    assert len(index_queries) == 2 * DUE_SHARDS
