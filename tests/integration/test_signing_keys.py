"""JWKS continuity across a signing-key rotation: a new key is published before it signs, the old
one stays published until every token it signed has expired, then its KMS key is deleted. Time is
a clock the test moves, shared by the registry, the token service and the registry cache."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import jwt
import pytest

from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.profiles import PROFILES
from fleetkey.errors import Conflict
from fleetkey.services.signing_keys import MAX_TOKEN_LIFETIME_SECONDS, TAGS, NoSigningKey, SigningKeys
from fleetkey.services.tokens import TokenService
from fleetkey_local.device import token_request
from fleetkey_local.instrument import AwsCallCounter
from tests.integration.test_tokens import TELEMETRY, enroll
from tests.support.pki_cache import ca as cached_ca

LEAD = 300
CACHE = 60


class Clock:
    """Wall time and the registry cache's monotonic time, moved together by the test."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.t, timezone.utc)

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def set(self, epoch: float) -> None:
        assert epoch >= self.t, "time only moves forward"
        self.t = float(epoch)


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


def registry(stack, clock) -> SigningKeys:
    return SigningKeys(stack.store, KmsKeys(client=stack.kms), clock=clock, monotonic=clock.monotonic,
                       cache_seconds=CACHE, publish_lead_seconds=LEAD)


def published(stack) -> dict:
    """The JWKS as a discovery function that just read the registry serves it."""
    return SigningKeys(stack.store, KmsKeys(client=stack.kms)).jwks()


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def verifies(stack, token: str, jwks: dict, now: float) -> bool:
    """Does `token` verify against `jwks` at `now` (pyjwt's own clock is the real one)?"""
    keys = {k["kid"]: k for k in jwks["keys"]}
    if kid_of(token) not in keys:
        return False
    key = jwt.PyJWK.from_dict(keys[kid_of(token)])
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=TELEMETRY, issuer=stack.settings.issuer,
                        options={"verify_exp": False, "verify_iat": False})
    return claims["iat"] <= now < claims["exp"]


def assert_unexpired_tokens_verify(stack, issued: list[str], now: float) -> None:
    jwks = published(stack)
    for token in issued:
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        if exp > now:
            assert verifies(stack, token, jwks, now), f"an unexpired token of key {kid_of(token)} no longer verifies"


def test_jwks_continuity_across_a_rotation(stack, acme):
    # Given a registry and a token service on the test's clock, the stack's first key A signing
    clock = Clock()
    keys = registry(stack, clock)
    tokens = TokenService(stack.settings, stack.store, keys, clock=clock)
    # and a second token function whose cached registry predates the rotation
    stale = TokenService(stack.settings, stack.store, registry(stack, clock), clock=clock)
    dev = enroll(stack, acme, "sensor-rotation")
    issued: list[str] = []

    def token(service=tokens) -> str:
        issued.append(service.issue(token_request(dev.assertion(stack)))["access_token"])
        return issued[-1]

    a = keys.current()[0]
    assert kid_of(token()) == a.kid and kid_of(token(stale)) == a.kid

    # When an operator rotates
    clock.advance(5)
    b = keys.rotate(actor="operator")

    # Then B is published at once (A stays), and signs only from its active_from
    assert b.active_from == clock.t + LEAD
    assert [k["kid"] for k in published(stack)["keys"]] == [a.kid, b.kid]
    retiring = {k.kid: k for k in keys.keys()}[a.kid]
    assert retiring.retire_after == b.active_from + MAX_TOKEN_LIFETIME_SECONDS + CACHE
    assert kid_of(token()) == a.kid
    clock.advance(CACHE - 10)  # the stale function still signs from its cache
    assert kid_of(token(stale)) == a.kid
    assert_unexpired_tokens_verify(stack, issued, clock.t)
    clock.set(b.active_from - 1)  # the last second before B; the stale function has re-read
    assert kid_of(token()) == a.kid and kid_of(token(stale)) == a.kid
    assert_unexpired_tokens_verify(stack, issued, clock.t)

    # When B's active_from comes, Then new tokens are B's, and A's still verify
    clock.set(b.active_from)
    assert kid_of(token()) == b.kid and kid_of(token(stale)) == b.kid
    assert_unexpired_tokens_verify(stack, issued, clock.t)

    # and A's retirement waits for the longest token A could have signed
    last_a_signature = b.active_from - 1
    longest = max(MAX_TOKEN_LIFETIME_SECONDS, *(p.token_rules.lifetime_seconds for p in PROFILES.values()))
    assert retiring.retire_after >= last_a_signature + longest
    a_tokens = [t for t in issued if kid_of(t) == a.kid]
    assert all(jwt.decode(t, options={"verify_signature": False})["exp"] <= retiring.retire_after for t in a_tokens)

    # When retirement runs before A's retire_after (and at it), Then nothing is removed
    for moment in (b.active_from + 1800, retiring.retire_after - 1, retiring.retire_after):
        clock.set(moment)
        assert keys.retire_expired(actor="scheduler") == []
        assert [k["kid"] for k in published(stack)["keys"]] == [a.kid, b.kid]
        assert_unexpired_tokens_verify(stack, issued, clock.t)
        issued.append(token())

    # When it runs after, Then A leaves the JWKS and its KMS key is scheduled for deletion
    clock.set(retiring.retire_after + 1)
    assert all(jwt.decode(t, options={"verify_signature": False})["exp"] <= clock.t for t in a_tokens), \
        "A is retired while one of its tokens is still valid"
    assert keys.retire_expired(actor="scheduler") == [a.key_id]
    assert [k["kid"] for k in published(stack)["keys"]] == [b.kid]
    assert stack.kms.describe_key(KeyId=a.key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    assert stack.kms.describe_key(KeyId=b.key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    assert_unexpired_tokens_verify(stack, issued, clock.t)
    assert kid_of(token()) == b.kid and verifies(stack, issued[-1], published(stack), clock.t)
    # and a second run has nothing left to do
    assert keys.retire_expired(actor="scheduler") == []

    # and every change is in the signing-keys audit chain, which verifies
    records, verification = stack.devices.audit("stream:signing-keys")
    assert [r.action for r in records] == ["signing_key_initialized", "signing_key_rotated", "signing_keys_retired"]
    assert verification.records == 3
    assert records[1].actor == "operator"
    assert records[1].details == {"kid": b.kid, "key_id": b.key_id, "active_from": b.active_from,
                                  "previous_retire_after": retiring.retire_after}
    assert records[2].details == {"kids": [a.kid]}


def test_two_rotations_before_the_first_takes_effect(stack, acme):
    # Given a rotation to B, and a second one to C before B signs
    clock = Clock()
    keys = registry(stack, clock)
    tokens = TokenService(stack.settings, stack.store, keys, clock=clock)
    dev = enroll(stack, acme, "sensor-double")
    issued: list[str] = []
    a = keys.current()[0]
    b = keys.rotate(actor="op")
    clock.advance(100)
    c = keys.rotate(actor="op")
    by_kid = {k.kid: k for k in keys.keys()}
    # Then A keeps its first retire_after; B gets one covering its short signing window
    assert by_kid[a.kid].retire_after == b.active_from + MAX_TOKEN_LIFETIME_SECONDS + CACHE
    assert by_kid[b.kid].retire_after == c.active_from + MAX_TOKEN_LIFETIME_SECONDS + CACHE
    assert by_kid[c.kid].retire_after is None
    # and each signs in turn, with every token verifiable until it expires
    for moment, signer in ((b.active_from - 1, a), (b.active_from, b), (c.active_from, c)):
        clock.set(moment)
        issued.append(tokens.issue(token_request(dev.assertion(stack)))["access_token"])
        assert kid_of(issued[-1]) == signer.kid
        assert_unexpired_tokens_verify(stack, issued, clock.t)
    # and retirement takes A, then B, each only once its tokens are over
    clock.set(by_kid[a.kid].retire_after + 1)
    assert keys.retire_expired(actor="op") == [a.key_id]
    clock.set(by_kid[b.kid].retire_after + 1)
    assert keys.retire_expired(actor="op") == [b.key_id]
    assert [k["kid"] for k in published(stack)["keys"]] == [c.kid]
    stack.devices.audit("stream:signing-keys")


def test_initialize_is_idempotent(stack):
    # Given the stack's registry, initialized with its first key at provisioning
    first = stack.signing_keys.keys()
    assert len(first) == 1 and first[0].key_id == stack.token_key_id

    # When initialization runs again, with that key or another
    other_key = KmsKeys(client=stack.kms).create_signing_key("spare", TAGS)
    again = stack.signing_keys.initialize(stack.token_key_id, actor="token-function")
    other = stack.signing_keys.initialize(other_key, actor="token-function")

    # Then the registry keeps its first key, and nothing more is audited
    assert again == other == first[0]
    assert [k["kid"] for k in published(stack)["keys"]] == [first[0].kid]
    records, verification = stack.devices.audit("stream:signing-keys")
    assert [r.action for r in records] == ["signing_key_initialized"] and verification.records == 1


class StaleReads:
    """A store whose signing-key registry reads return what another function saw earlier."""

    def __init__(self, store, stale: tuple) -> None:
        self._store = store
        self._stale = [stale]

    def get_signing_keys(self):
        return self._stale.pop() if self._stale else self._store.get_signing_keys()

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_concurrent_initialization_adopts_the_winners_key(stack):
    # Given a function that saw an empty registry, while another initialized it meanwhile
    racer = SigningKeys(StaleReads(stack.store, (ChainHead(), [])), KmsKeys(client=stack.kms))
    spare = KmsKeys(client=stack.kms).create_signing_key("spare", TAGS)
    # When it initializes with its own key
    adopted = racer.initialize(spare, actor="token-function")
    # Then it adopts the winner's key, and the registry has that one key only
    assert adopted.key_id == stack.token_key_id
    assert [k["kid"] for k in published(stack)["keys"]] == [adopted.kid]


def test_a_rotation_racing_another_is_a_conflict_and_changes_nothing(stack):
    # Given an operator's rotation read the registry before another rotation landed
    clock = Clock()
    before = stack.store.get_signing_keys()
    winner = registry(stack, clock).rotate(actor="op-1")
    loser = SigningKeys(StaleReads(stack.store, before), KmsKeys(client=stack.kms), clock=clock,
                        monotonic=clock.monotonic)
    # When the late rotation writes, Then it is a conflict and the winner's registry stands
    with pytest.raises(Conflict) as conflict:
        loser.rotate(actor="op-2")
    assert "unused" in conflict.value.message
    assert [k["kid"] for k in published(stack)["keys"]] == [stack.signing_keys.keys()[0].kid, winner.kid]
    records, _ = stack.devices.audit("stream:signing-keys")
    assert [r.actor for r in records] == ["provisioning", "op-1"]


def test_the_registry_is_read_once_per_cache_period(stack):
    # Given a registry on the test's clock, read once
    clock = Clock()
    keys = registry(stack, clock)
    keys.current()
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When the current key is asked for within the cache period, Then no AWS call is made
    clock.advance(CACHE)
    keys.current()
    keys.jwks()
    assert counter.reset() == []
    # and after it, one registry read (never a KMS public-key read)
    clock.advance(1)
    keys.current()
    assert counter.reset() == ["dynamodb.GetItem"]


def test_no_signing_key_before_initialization():
    # Given an empty registry (the stack's key not adopted yet)
    class EmptyStore:
        def get_signing_keys(self):
            return ChainHead(), []

    keys = SigningKeys(EmptyStore(), KmsKeys(client=object()), clock=Clock())
    # When a token would be signed, Then the service is temporarily unavailable (not a 500)
    with pytest.raises(NoSigningKey) as unavailable:
        keys.current()
    assert unavailable.value.status == 503 and keys.jwks() == {"keys": []}


def test_rotated_keys_let_only_the_token_role_sign(stack):
    import json as _json

    from fleetkey.services.signing_keys import token_key_policy

    # Given the token function's role
    role = "arn:aws:iam::123456789012:role/fleetkey-token"
    # When a rotation creates a key with fleetkey's key policy
    key = stack.signing_keys.rotate(actor="op", policy=token_key_policy(role))
    # Then its policy keeps the account's IAM in charge and denies kms:Sign to everyone but the role
    policy = _json.loads(stack.kms.get_key_policy(KeyId=key.key_id, PolicyName="default")["Policy"])
    allow, deny = policy["Statement"]
    assert allow["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"} and allow["Action"] == "kms:*"
    assert deny["Effect"] == "Deny" and deny["Action"] == "kms:Sign"
    assert deny["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role}}
