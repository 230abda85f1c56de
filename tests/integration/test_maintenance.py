"""The maintenance function as Lambda runs it, from the sample EventBridge scheduled event:
it retires the signing keys whose tokens have all expired (KMS deletion scheduled, key
unpublished), and nothing else."""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError

from fleetkey.adapters.kms import KmsKeys
from fleetkey.composition import from_environ
from fleetkey.errors import Conflict
from fleetkey.services.signing_keys import SigningKeys
from fleetkey_local.stack import TABLE
from tests.conftest import load_event
from tests.support.aws_calls import outside_functions
from tests.support.handlers import LambdaContext, load_handler

ACTOR = "schedule:signing-key-maintenance"


class Clock:
    """Wall time the test moves, for the registry the handler builds (and the rotation)."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def set(self, epoch: float) -> None:
        assert epoch >= self.t, "time only moves forward"
        self.t = float(epoch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def maintenance(stack, clock, monkeypatch):
    """The handler, its registry reading the test's clock (the one seam: the class it builds)."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    function = load_handler("maintenance")
    monkeypatch.setattr(function, "from_environ", functools.partial(from_environ, clock=clock))
    yield function
    function.signing_keys.cache_clear()


@pytest.fixture
def recorded_metrics(monkeypatch) -> list[tuple[str, float]]:
    """The metrics the handler adds (publishing is disabled in the tests)."""
    from fleetkey.observability import metrics

    recorded: list[tuple[str, float]] = []
    add_metric = metrics.add_metric

    def record(name, unit, value, *args, **kwargs):
        recorded.append((name, value))
        return add_metric(name, unit, value, *args, **kwargs)

    monkeypatch.setattr(metrics, "add_metric", record)
    return recorded


def invoke(function, event: dict) -> dict:
    return function.handler(event, LambdaContext())


def key_state(stack, key_id: str) -> str:
    return stack.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]


def published_kids(stack) -> set[str]:
    """The JWKS as a discovery function that just read the registry serves it."""
    return {
        k["kid"]
        for k in SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms)).jwks()["keys"]
    }


def audit_actions(stack) -> list[tuple[str, str]]:
    bodies = [json.loads(body) for body, _ in stack.store.audit.read("stream:signing-keys")]
    return [(b["action"], b["actor"]) for b in bodies]


def rotated(stack, clock):
    """Rotate once at the clock's time: (the first key, now retiring; the new key)."""
    registry = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), clock=clock)
    [first] = registry.keys()
    new = registry.rotate(actor="operator")
    [retiring] = [k for k in registry.keys() if k.key_id == first.key_id]  # noqa: SIM118 (SigningKeys.keys, not a dict)
    assert retiring.retire_after is not None
    return retiring, new


def test_sample_event_retires_nothing_when_nothing_is_due(stack, maintenance, recorded_metrics):
    # Given the provisioned stack: one signing key, current, not superseded
    before = published_kids(stack)

    # When the schedule fires
    result = invoke(maintenance, load_event("scheduled-maintenance"))

    # Then nothing is retired: the key stays enabled and published, and the registry is untouched
    assert result == {"status": "done", "retired": []}
    assert key_state(stack, stack.token_key_id) == "Enabled"
    assert published_kids(stack) == before
    assert [a for a, _ in audit_actions(stack)] == ["signing_key_initialized"]
    assert recorded_metrics == [("SigningKeysRetired", 0)]


def test_superseded_key_is_retired_once_its_tokens_have_expired(
    stack, maintenance, clock, recorded_metrics
):
    # Given a rotation: the first key superseded, published until retire_after
    retiring, new = rotated(stack, clock)
    event = load_event("scheduled-maintenance")

    # When the schedule fires before retire_after (at it, too: tokens may still be live)
    clock.set(retiring.retire_after)
    early = invoke(maintenance, event)

    # Then the old key is kept, in KMS and in the JWKS
    assert early == {"status": "done", "retired": []}
    assert key_state(stack, retiring.key_id) == "Enabled"
    assert published_kids(stack) == {retiring.kid, new.kid}

    # When it fires once retire_after has passed
    clock.set(retiring.retire_after + 1)
    result = invoke(maintenance, event)

    # Then the old key's deletion is scheduled and it is unpublished; the new key stays, and the
    # change is audited under the schedule's name
    assert result == {"status": "done", "retired": [retiring.key_id]}
    assert key_state(stack, retiring.key_id) == "PendingDeletion"
    assert key_state(stack, new.key_id) == "Enabled"
    assert published_kids(stack) == {new.kid}
    assert audit_actions(stack)[-1] == ("signing_keys_retired", ACTOR)
    assert recorded_metrics == [("SigningKeysRetired", 0), ("SigningKeysRetired", 1)]

    # When it fires again
    again = invoke(maintenance, event)

    # Then there is nothing left to do
    assert again == {"status": "done", "retired": []}
    assert published_kids(stack) == {new.kid}


@pytest.mark.parametrize(
    "event",
    [
        {**load_event("scheduled-maintenance"), "source": "aws.s3"},
        {**load_event("scheduled-maintenance"), "detail-type": "Object Created"},
        load_event("certificate-registered"),
        {},
        [],
    ],
    ids=["other-source", "other-detail-type", "other-event", "empty", "not-an-object"],
)
def test_unexpected_event_is_ignored(stack, maintenance, clock, recorded_metrics, event):
    # Given a key due for retirement
    retiring, _ = rotated(stack, clock)
    clock.set(retiring.retire_after + 1)

    # When the function receives something other than a scheduled event
    result = invoke(maintenance, event)

    # Then it does nothing
    assert result == {"status": "ignored"}
    assert key_state(stack, retiring.key_id) == "Enabled"
    assert retiring.kid in published_kids(stack)
    assert recorded_metrics == []


def test_kms_failure_propagates_and_leaves_the_key_published(
    stack, maintenance, clock, monkeypatch
):
    # Given a key due for retirement, and KMS throttling
    retiring, new = rotated(stack, clock)
    clock.set(retiring.retire_after + 1)
    kms = maintenance.signing_keys()._kms.client
    schedule_key_deletion = kms.schedule_key_deletion
    outage = {"on": True}

    def throttled(**kwargs):
        if outage["on"]:
            raise ClientError(
                {"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
                "ScheduleKeyDeletion",
            )
        return schedule_key_deletion(**kwargs)

    monkeypatch.setattr(kms, "schedule_key_deletion", throttled)

    # When the schedule fires
    # Then the error reaches Lambda (which retries the asynchronous invocation)
    with pytest.raises(ClientError, match="ThrottlingException"):
        invoke(maintenance, load_event("scheduled-maintenance"))

    # and nothing changed: the key is enabled and still published, ready for the retry
    assert key_state(stack, retiring.key_id) == "Enabled"
    assert published_kids(stack) == {retiring.kid, new.kid}

    # When KMS recovers and the retry runs
    outage["on"] = False
    result = invoke(maintenance, load_event("scheduled-maintenance"))

    # Then the key is retired
    assert result == {"status": "done", "retired": [retiring.key_id]}
    assert key_state(stack, retiring.key_id) == "PendingDeletion"
    assert published_kids(stack) == {new.kid}


def test_registry_changed_meanwhile_propagates_and_the_retry_completes(
    stack, maintenance, clock, monkeypatch
):
    # Given a key due for retirement, and an operator rotating again while the function
    # schedules its deletion
    retiring, new = rotated(stack, clock)
    clock.set(retiring.retire_after + 1)
    kms = maintenance.signing_keys()._kms.client
    schedule_key_deletion = kms.schedule_key_deletion
    newer = []

    def rotate_meanwhile(**kwargs):
        result = schedule_key_deletion(**kwargs)
        if not newer:
            with outside_functions():  # the operator's rotation, not the maintenance function's
                newer.append(
                    SigningKeys(
                        stack.store.signing_keys, KmsKeys(client=stack.kms), clock=clock
                    ).rotate(actor="operator")
                )
        return result

    monkeypatch.setattr(kms, "schedule_key_deletion", rotate_meanwhile)

    # When the schedule fires
    # Then the conflict reaches Lambda (which retries): the deletion is scheduled, the key still
    # published
    with pytest.raises(Conflict):
        invoke(maintenance, load_event("scheduled-maintenance"))
    assert key_state(stack, retiring.key_id) == "PendingDeletion"
    assert retiring.kid in published_kids(stack)

    # When the retry runs
    result = invoke(maintenance, load_event("scheduled-maintenance"))

    # Then the key is unpublished (its deletion, already scheduled, counts as done), and the keys
    # of both rotations stay
    assert result == {"status": "done", "retired": [retiring.key_id]}
    assert published_kids(stack) == {new.kid, newer[0].kid}
