"""JWKS continuity across a signing-key rotation: a new key is published before it signs, the old
one stays published until every token it signed has expired, then its KMS key is deleted. Time is
a clock the test moves, shared by the registry, the token service and the registry cache."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import jwt
import pytest

from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.profiles import PROFILES
from fleetkey.errors import Conflict
from fleetkey.services.signing_keys import (
    KEY_DESCRIPTION,
    MAX_TOKEN_LIFETIME_SECONDS,
    KeyTrust,
    NoSigningKey,
    SigningKeys,
    same_policy,
    token_key_policy_for,
    token_signing_tags,
)
from fleetkey.services.tokens import TokenService
from fleetkey_local.device import token_request
from fleetkey_local.instrument import AwsCallCounter
from tests.conftest import ROOT
from tests.integration.test_tokens import TELEMETRY, enroll
from tests.support.pki_cache import ca as cached_ca
from tests.support.registry import write_registry_entry

LEAD = 300
CACHE = 60


class Clock:
    """Wall time and the registry cache's monotonic time, moved together by the test."""

    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

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
    return SigningKeys(
        stack.store.signing_keys,
        KmsKeys(client=stack.kms),
        clock=clock,
        monotonic=clock.monotonic,
        cache_seconds=CACHE,
        publish_lead_seconds=LEAD,
    )


def published(stack) -> dict:
    """The JWKS as a discovery function that just read the registry serves it."""
    return SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms)).jwks()


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def verifies(stack, token: str, jwks: dict, now: float) -> bool:
    """Does `token` verify against `jwks` at `now` (pyjwt's own clock is the real one)?"""
    keys = {k["kid"]: k for k in jwks["keys"]}
    if kid_of(token) not in keys:
        return False
    key = jwt.PyJWK.from_dict(keys[kid_of(token)])
    claims = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=TELEMETRY,
        issuer=stack.settings.issuer,
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims["iat"] <= now < claims["exp"]


def assert_unexpired_tokens_verify(stack, issued: list[str], now: float) -> None:
    jwks = published(stack)
    for token in issued:
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        if exp > now:
            assert verifies(stack, token, jwks, now), (
                f"an unexpired token of key {kid_of(token)} no longer verifies"
            )


def test_jwks_continuity_across_a_rotation(stack, acme):
    # Given a registry and a token service on the test's clock, the stack's first key A signing
    clock = Clock()
    keys = registry(stack, clock)
    tokens = TokenService(
        stack.settings, stack.store.devices, stack.store.token_records, keys, clock=clock
    )
    # and a second token function whose cached registry predates the rotation
    stale = TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        registry(stack, clock),
        clock=clock,
    )
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
    retiring = {k.kid: k for k in keys.keys()}[a.kid]  # noqa: SIM118 (SigningKeys.keys, not a dict)
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
    longest = max(
        MAX_TOKEN_LIFETIME_SECONDS, *(p.token_rules.lifetime_seconds for p in PROFILES.values())
    )
    assert retiring.retire_after >= last_a_signature + longest
    a_tokens = [t for t in issued if kid_of(t) == a.kid]
    assert all(
        jwt.decode(t, options={"verify_signature": False})["exp"] <= retiring.retire_after
        for t in a_tokens
    )

    # When retirement runs before A's retire_after (and at it), Then nothing is removed
    for moment in (b.active_from + 1800, retiring.retire_after - 1, retiring.retire_after):
        clock.set(moment)
        assert keys.retire_expired(actor="scheduler") == []
        assert [k["kid"] for k in published(stack)["keys"]] == [a.kid, b.kid]
        assert_unexpired_tokens_verify(stack, issued, clock.t)
        issued.append(token())

    # When it runs after, Then A leaves the JWKS and its KMS key is scheduled for deletion
    clock.set(retiring.retire_after + 1)
    assert all(
        jwt.decode(t, options={"verify_signature": False})["exp"] <= clock.t for t in a_tokens
    ), "A is retired while one of its tokens is still valid"
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
    assert [r.action for r in records] == [
        "signing_key_initialized",
        "signing_key_rotated",
        "signing_keys_retired",
    ]
    assert verification.records == 3
    assert records[1].actor == "operator"
    assert records[1].details == {
        "kid": b.kid,
        "key_id": b.key_id,
        "active_from": b.active_from,
        "previous_retire_after": retiring.retire_after,
    }
    assert records[2].details == {"kids": [a.kid]}


def test_two_rotations_before_the_first_takes_effect(stack, acme):
    # Given a rotation to B, and a second one to C before B signs
    clock = Clock()
    keys = registry(stack, clock)
    tokens = TokenService(
        stack.settings, stack.store.devices, stack.store.token_records, keys, clock=clock
    )
    dev = enroll(stack, acme, "sensor-double")
    issued: list[str] = []
    a = keys.current()[0]
    b = keys.rotate(actor="op")
    clock.advance(100)
    c = keys.rotate(actor="op")
    by_kid = {k.kid: k for k in keys.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)
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
    other_key = spare_key(stack)
    again = stack.signing_keys.initialize(stack.token_key_id, actor="token-function")
    other = stack.signing_keys.initialize(other_key, actor="token-function")

    # Then the registry keeps its first key, and nothing more is audited
    assert again == other == first[0]
    assert [k["kid"] for k in published(stack)["keys"]] == [first[0].kid]
    records, verification = stack.devices.audit("stream:signing-keys")
    assert [r.action for r in records] == ["signing_key_initialized"] and verification.records == 1


def spare_key(
    stack, trust: KeyTrust | None = None, policy: dict | None = None, policy_text: str = ""
) -> str:
    """A key as fleetkey creates one (this stack's tags and key policy, unless told otherwise)."""
    trust = trust or stack.key_trust
    return KmsKeys(client=stack.kms).create_signing_key(
        KEY_DESCRIPTION, dict(trust.tags), policy_text or json.dumps(policy or trust.policy)
    )


def key_state(stack, key_id: str) -> str:
    return stack.kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]


class StaleReads:
    """A store whose signing-key registry reads return what another function saw earlier."""

    def __init__(self, store, stale: tuple) -> None:
        self._store = store
        self._stale = [stale]

    def get(self):
        return self._stale.pop() if self._stale else self._store.get()

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_concurrent_initialization_adopts_the_winners_key(stack):
    # Given a function that saw an empty registry, while another initialized it meanwhile
    racer = SigningKeys(
        StaleReads(stack.store.signing_keys, (ChainHead(), [])), KmsKeys(client=stack.kms)
    )
    spare = spare_key(stack)
    # When it initializes with its own key
    adopted = racer.initialize(spare, actor="token-function")
    # Then it adopts the winner's key, and the registry has that one key only
    assert adopted.key_id == stack.token_key_id
    assert [k["kid"] for k in published(stack)["keys"]] == [adopted.kid]


def test_a_rotation_racing_another_is_a_conflict_and_changes_nothing(stack):
    # Given an operator's rotation read the registry before another rotation landed
    clock = Clock()
    before = stack.store.signing_keys.get()
    winner = registry(stack, clock).rotate(actor="op-1")
    loser = SigningKeys(
        StaleReads(stack.store.signing_keys, before),
        KmsKeys(client=stack.kms),
        clock=clock,
        monotonic=clock.monotonic,
    )
    keys_before = {k["KeyId"] for k in stack.kms.list_keys()["Keys"]}
    # When the late rotation writes, Then it is a conflict and the winner's registry stands
    with pytest.raises(Conflict) as conflict:
        loser.rotate(actor="op-2")
    assert "nothing was changed" in conflict.value.message
    assert [k["kid"] for k in published(stack)["keys"]] == [
        stack.signing_keys.keys()[0].kid,
        winner.kid,
    ]
    records, _ = stack.devices.audit("stream:signing-keys")
    assert [r.actor for r in records] == ["provisioning", "op-1"]
    # and the key the refused rotation created is already on its way out (nothing left behind)
    [created] = {k["KeyId"] for k in stack.kms.list_keys()["Keys"]} - keys_before
    assert key_state(stack, created) == "PendingDeletion"


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
        def get(self):
            return ChainHead(), []

    keys = SigningKeys(EmptyStore(), KmsKeys(client=object()), clock=Clock())
    # When a token would be signed, Then the service is temporarily unavailable (not a 500)
    with pytest.raises(NoSigningKey) as unavailable:
        keys.current()
    assert unavailable.value.status == 503 and keys.jwks() == {"keys": []}


def test_rotated_keys_let_only_the_token_role_sign(stack):
    # Given the stack's trust (the token function's role in its key policy)
    role = stack.settings.token_signer_role_arn
    retirers = list(stack.settings.token_key_retirer_role_arns)
    # When a rotation creates a key
    key = stack.signing_keys.rotate(actor="op")
    # Then its policy keeps the account's IAM in charge, grants kms:Sign to the token role and
    # kms:ScheduleKeyDeletion to the admin and maintenance roles (IAM grants neither), and denies
    # kms:Sign to everyone but the token role
    policy = json.loads(stack.kms.get_key_policy(KeyId=key.key_id, PolicyName="default")["Policy"])
    delegate, sign, retire, deny = policy["Statement"]
    assert (
        delegate["Principal"] == {"AWS": "arn:aws:iam::123456789012:root"}
        and delegate["Action"] == "kms:*"
    )
    assert (sign["Effect"], sign["Principal"], sign["Action"]) == (
        "Allow",
        {"AWS": role},
        "kms:Sign",
    )
    assert (retire["Effect"], retire["Principal"], retire["Action"]) == (
        "Allow",
        {"AWS": retirers},
        "kms:ScheduleKeyDeletion",
    )
    assert deny["Effect"] == "Deny" and deny["Action"] == "kms:Sign"
    assert deny["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": role}}
    # and KMS made its material, in this region only
    metadata = stack.kms.describe_key(KeyId=key.key_id)["KeyMetadata"]
    assert (metadata["Origin"], metadata["MultiRegion"]) == ("AWS_KMS", False)
    # and it carries this stack's tag
    tags = KmsKeys(client=stack.kms).tags(key.key_id)
    assert tags == token_signing_tags(stack.settings.stack_name)


def rotation_to(stack, key_id: str) -> None:
    """Write a registry entry for `key_id` as a rotation would (the table alone: no KMS check)."""
    write_registry_entry(stack, key_id, KmsKeys(client=stack.kms).public_key(key_id))


@pytest.mark.parametrize(
    "variant",
    ["policy_lets_another_role_sign", "policy_without_the_deny", "tagged_for_another_stack"],
)
def test_a_registry_entry_is_refused_unless_tags_and_key_policy_are_fleetkeys(stack, variant):
    # Given a P-256 signing key, tagged and with a policy differing from fleetkey's in one way
    trust = stack.key_trust
    if variant == "policy_lets_another_role_sign":
        key_id = spare_key(
            stack, policy=token_key_policy_for("arn:aws:iam::123456789012:role/other", RETIRERS)
        )
    elif variant == "policy_without_the_deny":
        key_id = spare_key(
            stack, policy={**trust.policy, "Statement": trust.policy["Statement"][:1]}
        )
    else:
        key_id = spare_key(
            stack,
            trust=KeyTrust.for_stack(
                "another-stack",
                stack.settings.token_signer_role_arn,
                retirer_role_arns=stack.settings.token_key_retirer_role_arns,
            ),
        )
    # When an entry for it lands in the registry (a write to the table alone)
    rotation_to(stack, key_id)
    # Then no registry reader publishes it or signs with it
    reader = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=trust)
    assert key_id not in {k.key_id for k in reader.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)
    assert reader.current()[0].key_id == stack.token_key_id


def test_a_key_policy_naming_a_member_twice_is_not_trusted(stack):
    # Given a key whose policy text names "Statement" twice: first a grant of everything to
    # everyone, then fleetkey's statements (Python's json keeps the last; another reader may keep
    # the first, or refuse the document)
    fleetkeys = json.dumps(stack.key_trust.policy["Statement"])
    everyone = json.dumps(
        [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}]
    )
    text = f'{{"Version": "2012-10-17", "Statement": {everyone}, "Statement": {fleetkeys}}}'
    key_id = spare_key(stack, policy_text=text)
    # When an entry for it lands in the registry
    rotation_to(stack, key_id)
    # Then no reader trusts it
    reader = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=stack.key_trust)
    assert key_id not in {k.key_id for k in reader.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)


class Describing:
    """A KMS client whose DescribeKey reports other metadata for one key (moto cannot make a
    P-256 key of imported material that still answers GetPublicKey)."""

    def __init__(self, client, key_id: str, **metadata) -> None:
        self._client, self._key_id, self._metadata = client, key_id, metadata

    def describe_key(self, **kwargs):
        response = self._client.describe_key(**kwargs)
        if kwargs["KeyId"] == self._key_id:
            response["KeyMetadata"].update(self._metadata)
        return response

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.mark.parametrize(
    "metadata",
    [{"Origin": "EXTERNAL"}, {"Origin": "AWS_CLOUDHSM"}, {"MultiRegion": True}],
    ids=["imported", "cloudhsm", "multi-region"],
)
def test_a_key_of_imported_material_or_multi_region_is_not_trusted(stack, metadata):
    # Given a key with fleetkey's tags and policy, whose material KMS did not generate (or that
    # is replicated to other regions)
    key_id = spare_key(stack)
    rotation_to(stack, key_id)
    kms = Describing(stack.kms, key_id, **metadata)
    # When a reader confirms the registry's entries
    reader = SigningKeys(stack.store.signing_keys, KmsKeys(client=kms), trust=stack.key_trust)
    # Then that key is not trusted; the same key, as KMS really describes it, is
    assert key_id not in {k.key_id for k in reader.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)
    honest = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=stack.key_trust)
    assert key_id in {k.key_id for k in honest.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)


def test_a_key_with_fleetkeys_policy_in_another_layout_is_confirmed(stack):
    # Given a key whose policy says the same as fleetkey's, reordered, re-spelled and without Sids
    allow, sign, retire, deny = stack.key_trust.policy["Statement"]
    relaid = {
        "Version": "2012-10-17",
        "Statement": [
            {
                **{k: v for k, v in deny.items() if k != "Sid"},
                "Action": ["KMS:Sign"],
                "Principal": "*",
            },
            {**retire, "Principal": {"AWS": list(reversed(retire["Principal"]["AWS"]))}},
            {**allow, "Resource": ["*"], "Sid": "Other"},
            {**sign, "Principal": {"AWS": [sign["Principal"]["AWS"]]}},
        ],
    }
    key_id = spare_key(stack, policy=relaid)
    # When it is registered, Then it is confirmed and published
    rotation_to(stack, key_id)
    reader = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=stack.key_trust)
    assert key_id in {k.key_id for k in reader.keys()}  # noqa: SIM118 (SigningKeys.keys, not a dict)


RETIRERS = ("arn:aws:iam::123456789012:role/admin", "arn:aws:iam::123456789012:role/maint")


def test_same_policy_compares_by_meaning():
    # Given fleetkey's policy for one role
    policy = token_key_policy_for("arn:aws:iam::123456789012:role/token", RETIRERS)
    # Then statement order, Sids and list-vs-string do not matter; a different role does, and so
    # does a different retirer
    swapped = {**policy, "Statement": list(reversed(policy["Statement"]))}
    assert same_policy(policy, swapped)
    assert not same_policy(
        policy, token_key_policy_for("arn:aws:iam::123456789012:role/other", RETIRERS)
    )
    assert not same_policy(
        policy,
        token_key_policy_for("arn:aws:iam::123456789012:role/token", RETIRERS[:1]),
    )
    assert not same_policy(policy, {**policy, "Version": "2008-10-17"})


def _deny_statement(policy: dict) -> dict:
    return next(st for st in policy["Statement"] if st["Effect"] == "Deny")


@pytest.mark.parametrize("collide", ["condition key", "condition operator"])
def test_a_policy_whose_names_collide_once_lowercased_is_not_the_same(collide):
    # Given fleetkey's policy, and one whose Deny holds a second condition differing only in case
    # (IAM applies both: the Deny then spares whoever the first one names, e.g. an attacker)
    policy = token_key_policy_for("arn:aws:iam::123456789012:role/token", RETIRERS)
    attacker = "arn:aws:iam::123456789012:role/attacker"
    deny = _deny_statement(policy)
    [(operator, keys)] = deny["Condition"].items()
    [(key, signer)] = keys.items()
    if collide == "condition key":
        condition = {operator: {key: attacker, key.upper(): signer}}
    else:
        condition = {operator: {key: attacker}, operator.lower(): {key: signer}}
    forged = {
        **policy,
        "Statement": [st for st in policy["Statement"] if st is not deny]
        + [{**deny, "Condition": condition}],
    }

    # When / Then: not the same policy (it cannot be read unambiguously)
    assert not same_policy(forged, policy)


@pytest.mark.parametrize(
    "odd",
    [
        {"Statement": ["x"]},
        {"Statement": [{"Effect": "Allow", "Principal": 5, "Action": "kms:*"}]},
        {"Statement": [{"Effect": "Allow", "Condition": [1], "Action": "kms:*"}]},
        {"Statement": [{"Effect": "Allow", "Actions": "kms:*"}]},
    ],
    ids=["statement-not-an-object", "principal-number", "condition-list", "unknown-element"],
)
def test_a_policy_of_an_odd_shape_is_not_the_same_and_does_not_raise(odd):
    # Given fleetkey's policy and a document of an odd shape (KMS validates its grammar, but a
    # policy is read from outside the function all the same)
    policy = token_key_policy_for("arn:aws:iam::123456789012:role/token", RETIRERS)

    # When / Then: not the same, and no exception (the token path must answer, not crash)
    assert not same_policy({**policy, **odd}, policy)


def test_a_refused_key_is_checked_again_after_the_cache_time(stack):
    # Given a registry entry for a key KMS does not (yet) show as this stack's: its tag is missing
    now = [1000.0]
    reader = SigningKeys(
        stack.store.signing_keys,
        KmsKeys(client=stack.kms),
        trust=stack.key_trust,
        cache_seconds=60,
        monotonic=lambda: now[0],
    )
    key_id = KmsKeys(client=stack.kms).create_signing_key(
        KEY_DESCRIPTION, {}, json.dumps(stack.key_trust.policy)
    )
    rotation_to(stack, key_id)
    assert key_id not in {k.key_id for k in reader.keys()}  # noqa: SIM118 (not a dict)

    # When the key gets its tag, Then it stays refused until the cache time has passed ...
    stack.kms.tag_resource(
        KeyId=key_id, Tags=[{"TagKey": k, "TagValue": v} for k, v in stack.key_trust.tags.items()]
    )
    now[0] += 30
    assert key_id not in {k.key_id for k in reader.keys()}  # noqa: SIM118 (not a dict)
    # ... and is confirmed once it has (a warm function is never left without its new key)
    now[0] += 61
    assert key_id in {k.key_id for k in reader.keys()}  # noqa: SIM118 (not a dict)


class EmptyRegistry:
    """The store of a deployed stack that never rotated: the registry item does not exist."""

    def __init__(self, store) -> None:
        self._store = store

    def get(self):
        return ChainHead(), []

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_an_empty_registry_serves_the_stacks_first_key_without_writing(stack):
    # Given a deployed stack's view: no registry item, the first key named in settings
    trust = KeyTrust.for_stack(
        stack.settings.stack_name,
        stack.settings.token_signer_role_arn,
        stack.token_key_id,
        retirer_role_arns=stack.settings.token_key_retirer_role_arns,
    )
    reader = SigningKeys(
        EmptyRegistry(stack.store.signing_keys), KmsKeys(client=stack.kms), trust=trust
    )
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When a reader asks for the current key and the JWKS
    key, _ = reader.current()
    jwks = reader.jwks()
    # Then the first key is current and published, confirmed with KMS, and nothing was written
    assert key.key_id == stack.token_key_id and [k["kid"] for k in jwks["keys"]] == [key.kid]
    calls = counter.reset()
    assert "kms.GetKeyPolicy" in calls and "kms.ListResourceTags" in calls
    assert not [
        c for c in calls if c.split(".")[1] in {"PutItem", "TransactWriteItems", "UpdateItem"}
    ]


def test_an_empty_registry_reads_the_first_key_from_kms_once(stack):
    # Given a warm reader of an empty registry that has served the first key
    now = [1000.0]
    trust = KeyTrust.for_stack(
        stack.settings.stack_name,
        stack.settings.token_signer_role_arn,
        stack.token_key_id,
        retirer_role_arns=stack.settings.token_key_retirer_role_arns,
    )
    reader = SigningKeys(
        EmptyRegistry(stack.store.signing_keys),
        KmsKeys(client=stack.kms),
        trust=trust,
        cache_seconds=60,
        monotonic=lambda: now[0],
    )
    reader.current()
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When its registry cache expires and it signs again
    now[0] += 61
    reader.current()
    # Then KMS is not asked again (the first key never changes; the registry read is the fake's)
    assert [c for c in counter.reset() if c.startswith("kms.")] == []


def test_an_empty_registry_refuses_a_first_key_that_is_not_fleetkeys(stack):
    # Given settings naming a key created without fleetkey's policy
    other = KmsKeys(client=stack.kms).create_signing_key(
        KEY_DESCRIPTION, dict(stack.key_trust.tags)
    )
    trust = KeyTrust.for_stack(
        stack.settings.stack_name,
        stack.settings.token_signer_role_arn,
        other,
        retirer_role_arns=stack.settings.token_key_retirer_role_arns,
    )
    reader = SigningKeys(
        EmptyRegistry(stack.store.signing_keys), KmsKeys(client=stack.kms), trust=trust
    )
    # When a token would be signed, Then there is no key (503), not that key
    with pytest.raises(NoSigningKey):
        reader.current()


def forget_registry(stack) -> None:
    """Delete the registry and its audit chain: the state of a deployed stack before any rotation
    (the local stack's provisioning writes its first key in)."""
    items = stack.dynamodb.query(
        TableName=stack.settings.table_name,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": "STREAM#signing-keys"}},
    )["Items"]
    for item in items:
        stack.dynamodb.delete_item(
            TableName=stack.settings.table_name, Key={"pk": item["pk"], "sk": item["sk"]}
        )


def test_the_first_rotation_writes_the_first_key_into_the_registry(stack, monkeypatch):
    # Given a deployed stack's empty registry (the local stack's provisioning wrote one: remove it)
    forget_registry(stack)
    trust = KeyTrust.for_stack(
        stack.settings.stack_name,
        stack.settings.token_signer_role_arn,
        stack.token_key_id,
        retirer_role_arns=stack.settings.token_key_retirer_role_arns,
    )
    keys = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=trust)
    first = keys.current()[0]
    # When an operator rotates
    new = keys.rotate(actor="op")
    # Then the registry holds the first key (now retiring) and the new one
    _, items = stack.store.signing_keys.get()
    assert [i["key_id"] for i in items] == [stack.token_key_id, new.key_id]
    assert items[0]["retire_after"] is not None and items[0]["kid"] == first.kid


def test_the_token_function_never_writes_the_registry(stack, acme, monkeypatch):
    # Given a deployed stack's token function: empty registry, the first key from its settings
    from tests.support.handlers import LambdaContext, load_handler

    forget_registry(stack)
    monkeypatch.setenv("FLEETKEY_TABLE", stack.settings.table_name)
    monkeypatch.setenv("FLEETKEY_ISSUER", stack.settings.issuer)
    monkeypatch.setenv("FLEETKEY_TOKEN_KEY_ID", stack.token_key_id)
    token = load_handler("token")
    dev = enroll(stack, acme, "sensor-first-key")
    event = json.loads((ROOT / "events" / "token-request.json").read_text())
    event["body"] = urlencode(token_request(dev.assertion(stack)))
    try:
        # When a device asks for a token
        response = token.handler(event, LambdaContext())
    finally:
        token.service.cache_clear()
    # Then it is signed by the first key, and the registry is still not written
    assert response["statusCode"] == 200, response["body"]
    first = KeyTrust.for_stack(
        stack.settings.stack_name,
        stack.settings.token_signer_role_arn,
        stack.token_key_id,
        retirer_role_arns=stack.settings.token_key_retirer_role_arns,
    )
    first_kid = (
        SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=first).keys()[0].kid
    )
    assert kid_of(json.loads(response["body"])["access_token"]) == first_kid
    assert stack.store.signing_keys.get() == (ChainHead(), [])


def test_settings_name_the_roles_that_retire_keys():
    from fleetkey.settings import LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS, Settings

    # Given a function's environment naming the retirer roles (comma-separated, as CDK joins)
    base = {"FLEETKEY_TABLE": "t", "AWS_REGION": "eu-west-1"}
    arns = "arn:aws:iam::1:role/a, arn:aws:iam::1:role/m"
    # Then the settings hold them, in order; unset, the local stack's
    named = Settings.from_environ({**base, "FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS": arns})
    assert named.token_key_retirer_role_arns == ("arn:aws:iam::1:role/a", "arn:aws:iam::1:role/m")
    local = Settings.from_environ(base)
    assert local.token_key_retirer_role_arns == LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS


@pytest.mark.parametrize(
    "spoil",
    [
        {"jwk": "garbage"},
        {"jwk": 5},
        {"kid": None},
        {"active_from": "soon"},
        {"key_id": ["x"]},
    ],
    ids=["jwk-string", "jwk-number", "no-kid", "active-from-text", "key-id-list"],
)
def test_an_unreadable_registry_entry_is_ignored_and_the_others_still_serve(stack, spoil):
    # Given a registry whose good entry sits behind an unreadable one written to the table
    head, items = stack.store.signing_keys.get()
    good = items[0]
    bad = {k: v for k, v in {**good, **spoil}.items() if v is not None}
    record = head.next_record(
        subject="stream:signing-keys",
        at="2026-01-01T00:00:00Z",
        action="forged",
        actor="intruder",
        details={},
    )
    stack.store.signing_keys.put(head, [bad, good], record)
    reader = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms), trust=stack.key_trust)

    # When a reader serves the JWKS and signs
    jwks = reader.jwks()
    key, _ = reader.current()

    # Then the good key still serves, and the unreadable entry is not trusted
    assert [k["kid"] for k in jwks["keys"]] == [good["kid"]]
    assert key.kid == good["kid"]
