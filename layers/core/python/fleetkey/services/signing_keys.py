"""Access-token signing keys: KMS keys whose public halves are published in the JWKS.

Lifecycle of a key, kept in one registry item (conditional writes, audited in the
`stream:signing-keys` chain):

    published (in the JWKS, not yet signing) --active_from--> current (signing)
      --superseded--> retiring (in the JWKS until retire_after) --retire--> deletion scheduled

Rotation publishes the new key `publish_lead_seconds` before it signs, so relying parties that
cache the JWKS have it before they meet a token it signed; the key it supersedes stays published
until every token it may have signed has expired (the longest token lifetime, plus the time a
token function may keep using its cached registry).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric import ec

from fleetkey.adapters.aws import is_transient
from fleetkey.adapters.kms import KmsKeys, KmsSigner
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.jose import jwk_thumbprint, public_jwk
from fleetkey.domain.audit import ChainHead
from fleetkey.errors import Conflict, FleetkeyError
from fleetkey.ports import SigningKeyRegistry, StaleRecord
from fleetkey.settings import (
    LOCAL_STACK_NAME,
    LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS,
    LOCAL_TOKEN_SIGNER_ROLE_ARN,
    Settings,
)

logger = logging.getLogger(__name__)
MAX_TOKEN_LIFETIME_SECONDS = 3600
STREAM = "signing-keys"
KEY_SPEC = "ECC_NIST_P256"
KEY_USAGE = "SIGN_VERIFY"
# Key material KMS generated (not imported, not in an external or CloudHSM key store).
KEY_ORIGIN = "AWS_KMS"
KEY_DESCRIPTION = "fleetkey access-token signing key"
# The tag that marks a token signing key, and whose value names the stack that owns it: IAM grants
# on KMS keys are conditioned on it, so one stack's roles cannot reach another stack's keys.
TAG_KEY = "fleetkey:purpose"
TAG_VALUE_PREFIX = "token-signing:"


def token_signing_tags(stack_name: str) -> dict[str, str]:
    """The tags of `stack_name`'s token signing keys: `{fleetkey:purpose: token-signing:<stack>}`.
    CloudFormation stack names are unique in an account and region, as KMS keys are."""
    return {TAG_KEY: f"{TAG_VALUE_PREFIX}{stack_name}"}


class NoSigningKey(FleetkeyError):
    code = "temporarily_unavailable"
    status = 503


@dataclass(frozen=True, slots=True)
class SigningKey:
    key_id: str
    kid: str
    jwk: dict[str, Any]
    active_from: int
    retire_after: int | None = None

    def to_item(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "kid": self.kid,
            "jwk": self.jwk,
            "active_from": self.active_from,
            "retire_after": self.retire_after,
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> SigningKey:
        """Raises:
        ValueError: the registry item is not a signing-key entry (a field missing or of the
            wrong type: the table is written from outside the code too).
        """
        key_id, kid, jwk = item.get("key_id"), item.get("kid"), item.get("jwk")
        active_from, retire_after = item.get("active_from"), item.get("retire_after")
        if not (
            isinstance(key_id, str)
            and isinstance(kid, str)
            and isinstance(jwk, Mapping)
            and type(active_from) is int
            and (retire_after is None or type(retire_after) is int)
        ):
            raise ValueError("not a signing-key registry entry")
        return cls(key_id, kid, dict(jwk), active_from, retire_after)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """Raises:
        ValueError: the JWK is not an EC public key.
        """
        import jwt

        key = jwt.algorithms.ECAlgorithm.from_jwk(self.jwk)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("a signing key's JWK must be a public key")
        return key


def token_key_policy(
    *,
    partition: str,
    account: str,
    signer_role_arn: str,
    retirer_role_arns: Sequence[str],
) -> dict[str, Any]:
    """The key policy of every token signing key (the stack's first key in CDK, the keys rotation
    creates, the local stack's). The key policy, not IAM, grants what only fleetkey's own roles
    may do to its keys: the token function's role signs, the admin and maintenance roles
    (`retirer_role_arns`) schedule its deletion; and nobody but the token role may sign, whatever
    IAM grants elsewhere in the account. The account's IAM policies govern the rest (as with KMS's
    default policy): the functions' roles read the key through IAM grants conditioned on its tag.
    So no role of the stack holds `kms:Sign` or `kms:ScheduleKeyDeletion` in IAM, and a key that
    is not fleetkey's (whatever its tags) is not one they can sign with or delete. The arguments
    may be CDK tokens: nothing here parses them.

    Raises:
        ValueError: no retirer role.
    """
    if not retirer_role_arns:
        raise ValueError("a token key policy needs the roles that retire keys")
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "EnableIamPolicies",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "TheTokenFunctionSigns",
                "Effect": "Allow",
                "Principal": {"AWS": signer_role_arn},
                "Action": "kms:Sign",
                "Resource": "*",
            },
            {
                "Sid": "FleetkeyRetiresKeys",
                "Effect": "Allow",
                "Principal": {"AWS": list(retirer_role_arns)},
                "Action": "kms:ScheduleKeyDeletion",
                "Resource": "*",
            },
            {
                "Sid": "OnlyTheTokenFunctionSigns",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:Sign",
                "Resource": "*",
                "Condition": {"ArnNotEquals": {"aws:PrincipalArn": signer_role_arn}},
            },
        ],
    }


def _role_arn_parts(role_arn: str) -> list[str]:
    """Raises:
    ValueError: not an IAM role ARN.
    """
    parts = role_arn.split(":")
    if (
        len(parts) != 6
        or parts[0] != "arn"
        or parts[2] != "iam"
        or not parts[4]
        or not parts[5].startswith("role/")
    ):
        raise ValueError(f"not an IAM role ARN: {role_arn!r}")
    return parts


def token_key_policy_for(signer_role_arn: str, retirer_role_arns: Sequence[str]) -> dict[str, Any]:
    """`token_key_policy` for concrete role ARNs (partition and account read from the signer's;
    every role must be of that account).

    Raises:
        ValueError: not IAM role ARNs of one account, or no retirer.
    """
    parts = _role_arn_parts(signer_role_arn)
    for arn in retirer_role_arns:
        if _role_arn_parts(arn)[1::3] != parts[1::3]:
            raise ValueError(f"{arn!r} is not a role of the signer's account")
    return token_key_policy(
        partition=parts[1],
        account=parts[4],
        signer_role_arn=signer_role_arn,
        retirer_role_arns=retirer_role_arns,
    )


def _as_sorted(value: object, *, lower: bool = False) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return sorted(str(v).lower() if lower else str(v) for v in values)


_STATEMENT_ELEMENTS = frozenset(
    {
        "Sid",
        "Effect",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Principal",
        "NotPrincipal",
        "Condition",
    }
)


def _lowercased_keys(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """`mapping` with its keys lowercased. Two keys that differ only in case both stay in force
    in IAM (which compares them case-insensitively), so folding them into one would lose one:

    Raises:
        ValueError: two keys differ only in case.
    """
    folded = {str(key).lower(): value for key, value in mapping.items()}
    if len(folded) != len(mapping):
        raise ValueError("policy names that differ only in case")
    return folded


def _canonical_statement(statement: Mapping[str, Any]) -> str:
    """One statement in a canonical form: the Sid dropped (it changes nothing), single values and
    lists alike sorted, actions and condition operators/keys lowercased (IAM compares them
    case-insensitively), the principal `"*"` written as `{"AWS": ["*"]}`.

    Raises:
        ValueError, TypeError, AttributeError: the statement is not a policy statement fleetkey
            can read unambiguously (unknown elements, names that collide once lowercased,
            values of the wrong shape).
    """
    if not set(statement) <= _STATEMENT_ELEMENTS:
        raise ValueError("unknown policy statement element")
    canonical: dict[str, Any] = {"Effect": statement.get("Effect")}
    for name in ("Action", "NotAction"):
        if name in statement:
            canonical[name] = _as_sorted(statement[name], lower=True)
    for name in ("Resource", "NotResource"):
        if name in statement:
            canonical[name] = _as_sorted(statement[name])
    for name in ("Principal", "NotPrincipal"):
        if name in statement:
            principal = statement[name]
            if principal == "*":
                principal = {"AWS": "*"}
            canonical[name] = {k: _as_sorted(v) for k, v in dict(principal).items()}
    if statement.get("Condition"):
        canonical["Condition"] = {
            operator: {key: _as_sorted(v) for key, v in _lowercased_keys(dict(keys)).items()}
            for operator, keys in _lowercased_keys(dict(statement["Condition"])).items()
        }
    return json.dumps(canonical, sort_keys=True)


def same_policy(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two IAM policy documents say the same (the same version and the same statements,
    in any order and layout, Sids aside). Not a full policy-equivalence decision: two documents
    that grant the same through different wording compare as different, which errs on the safe
    side (the key is not trusted), and so does a document fleetkey cannot read unambiguously
    (odd shapes, names that differ only in case)."""
    try:
        statements_a = a.get("Statement", [])
        statements_b = b.get("Statement", [])
        as_list_a = statements_a if isinstance(statements_a, list) else [statements_a]
        as_list_b = statements_b if isinstance(statements_b, list) else [statements_b]
        return a.get("Version") == b.get("Version") and sorted(
            map(_canonical_statement, as_list_a)
        ) == sorted(map(_canonical_statement, as_list_b))
    except (ValueError, TypeError, AttributeError, KeyError):
        return False


@dataclass(frozen=True, slots=True)
class KeyTrust:
    """What a token signing key must be for this stack to trust it: its tags (naming the stack),
    its key policy (the one fleetkey writes), and the stack's first key, which is the sole key
    while the registry is empty (the first rotation writes it into the registry)."""

    tags: Mapping[str, str]
    policy: Mapping[str, Any]
    first_key_id: str | None = None

    @classmethod
    def for_stack(
        cls,
        stack_name: str,
        signer_role_arn: str,
        first_key_id: str | None = None,
        *,
        retirer_role_arns: Sequence[str],
    ) -> KeyTrust:
        """Raises:
        ValueError: the roles are not IAM role ARNs of one account (or no retirer).
        """
        return cls(
            token_signing_tags(stack_name),
            token_key_policy_for(signer_role_arn, retirer_role_arns),
            first_key_id,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyTrust:
        """Raises:
        ValueError: the settings' token signer role is not an IAM role ARN.
        """
        return cls.for_stack(
            settings.stack_name,
            settings.token_signer_role_arn,
            settings.token_key_id,
            retirer_role_arns=settings.token_key_retirer_role_arns,
        )

    @classmethod
    def local(cls, first_key_id: str | None = None) -> KeyTrust:
        """The local stack's (the default of `SigningKeys`: outside it, keys do not confirm)."""
        return cls.for_stack(
            LOCAL_STACK_NAME,
            LOCAL_TOKEN_SIGNER_ROLE_ARN,
            first_key_id,
            retirer_role_arns=LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS,
        )

    def policy_json(self) -> str:
        return json.dumps(self.policy)


def _key_from_kms(kms: KmsKeys, key_id: str, active_from: int) -> SigningKey:
    jwk = public_jwk(kms.public_key(key_id))
    kid = jwk_thumbprint(jwk)
    return SigningKey(key_id, kid, {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}, active_from)


def _entry(item: Any) -> SigningKey | None:
    """A registry item as a signing key, or None (logged) when it is not one: an unreadable entry
    is never trusted, and it must not stop the others from being read. A later rotation or
    retirement rewrites the registry without it (that change is audited)."""
    try:
        return SigningKey.from_item(item)
    except (ValueError, TypeError, AttributeError):
        logger.error("signing-key registry entry is unreadable; ignored")
        return None


class SigningKeys:
    """The registry, as the token, discovery, introspection, admin and maintenance functions see
    it.

    Reads are cached for `cache_seconds` (the token function signs with the cached current key;
    `retire_after` allows for it). While the registry is empty (a stack that never rotated), the
    stack's first key (`trust.first_key_id`) is its sole, current key; the first rotation writes it
    into the registry. So the functions that only read (token included) never write it."""

    def __init__(
        self,
        registry: SigningKeyRegistry,
        kms: KmsKeys,
        *,
        trust: KeyTrust | None = None,
        clock: Clock = utc_now,
        cache_seconds: int = 60,
        publish_lead_seconds: int = 300,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry_store = registry
        self._kms = kms
        # Without `trust`, the local stack's: keys of any other stack are then never confirmed.
        self._trust = trust or KeyTrust.local()
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._publish_lead = publish_lead_seconds
        self._monotonic = monotonic
        self._cached: tuple[float, ChainHead, list[SigningKey]] | None = None
        # The stack's first key as read from KMS, while the registry is empty
        self._first_key: SigningKey | None = None
        self._signers: dict[str, KmsSigner] = {}
        # key id -> whether KMS confirmed the registry's entry for it: a confirmation holds for
        # the process; a refusal is checked again after `cache_seconds` (it may have been KMS
        # answering just after the key was created), so a warm function cannot stay without a key
        self._confirmed: dict[str, bool] = {}
        self._refused_at: dict[str, float] = {}
        # kid -> public key, parsed once (a kid is the key's thumbprint: it never changes)
        self._public_keys: dict[str, ec.EllipticCurvePublicKey] = {}

    @property
    def trust(self) -> KeyTrust:
        return self._trust

    def _now(self) -> int:
        return int(self._clock().timestamp())

    def _registry(self) -> tuple[ChainHead, list[SigningKey]]:
        """The registry's entries, or, while it was never written, the stack's first key (active
        since the epoch). Unconfirmed either way.

        Raises:
            ClientError: KMS failed reading the first key's public half (a missing key
                included).
        """
        head, items = self._registry_store.get()
        if items or head != ChainHead() or not self._trust.first_key_id:
            return head, [key for key in map(_entry, items) if key is not None]
        if self._first_key is not None:  # a key id's public key never changes
            return head, [self._first_key]
        try:
            first = self._first_key = _key_from_kms(self._kms, self._trust.first_key_id, 0)
        except ValueError:  # not an EC P-256/P-384 key: _confirm refuses it below
            return head, [SigningKey(self._trust.first_key_id, "", {}, 0)]
        except ClientError as exc:
            if is_transient(exc):
                raise
            logger.error(
                "the stack's first signing key is not readable; ignored",
                extra={"key_id": self._trust.first_key_id},
            )
            return head, []
        return head, [first]

    def _read(self, fresh: bool = False) -> tuple[ChainHead, list[SigningKey]]:
        if (
            fresh
            or self._cached is None
            or self._monotonic() - self._cached[0] > self._cache_seconds
        ):
            head, entries = self._registry()
            keys = [k for k in entries if self._confirm(k)]
            self._cached = (self._monotonic(), head, keys)
        return self._cached[1], self._cached[2]

    def _confirm(self, key: SigningKey) -> bool:
        """A registry entry is trusted only if KMS agrees: the key is an ECC_NIST_P256
        SIGN_VERIFY key whose material KMS generated (origin AWS_KMS: never imported material,
        which someone outside KMS holds, nor an external key store) in this region only (not
        multi-Region), tagged as this stack's token-signing key, its key policy is the one
        fleetkey writes (compared by meaning, not byte for byte), and its public key is the
        entry's JWK. So a write to the table alone cannot publish or introduce a key, and neither
        can a key someone else created and tagged. A confirmation holds for the process (none of
        these changes for a key id without an administrator, whom the account's IAM governs); a
        refusal is checked again after `cache_seconds`.

        Raises:
            ClientError: a passing KMS failure (the entry is checked again next time).
        """
        confirmed = self._confirmed.get(key.key_id)
        if confirmed is False and (
            self._monotonic() - self._refused_at.get(key.key_id, 0.0) > self._cache_seconds
        ):
            confirmed = None
        if confirmed is None:
            try:
                metadata = self._kms.describe(key.key_id)
                described = self._kms.describe_public_key(key.key_id)
                jwk = public_jwk(described.public_key)
                tags = self._kms.tags(key.key_id)
                confirmed = (
                    metadata.origin == KEY_ORIGIN
                    and metadata.multi_region is False
                    and metadata.key_spec == KEY_SPEC
                    and metadata.key_usage == KEY_USAGE
                    and described.key_spec == KEY_SPEC
                    and described.key_usage == KEY_USAGE
                    and all(tags.get(k) == v for k, v in self._trust.tags.items())
                    and jwk_thumbprint(jwk) == key.kid
                    and all(key.jwk.get(name) == value for name, value in jwk.items())
                    and same_policy(self._kms.key_policy(key.key_id), self._trust.policy)
                )
            except ValueError:  # not an EC P-256/P-384 key, or a policy that is not strict JSON
                confirmed = False
            except ClientError as exc:
                # No such key, or one this function may not read (IAM only allows this stack's
                # tagged keys); a passing failure propagates and the entry is checked again.
                if is_transient(exc):
                    raise
                confirmed = False
            if not confirmed:
                logger.error(
                    "signing-key registry entry not confirmed by KMS; ignored",
                    extra={"key_id": key.key_id, "kid": key.kid},
                )
            self._confirmed[key.key_id] = confirmed
            if not confirmed:
                self._refused_at[key.key_id] = self._monotonic()
        return confirmed

    def keys(self) -> list[SigningKey]:
        """Every key a relying party may need: published, current and retiring."""
        return self._read()[1]

    def verification_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The public key of a currently published (confirmed) key, or None: a retired kid is
        unknown again. Only the parsing is cached."""
        published = next((k for k in self.keys() if k.kid == kid), None)
        if published is None:
            return None
        key = self._public_keys.get(kid)
        if key is None:
            key = self._public_keys[kid] = published.public_key()
        return key

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        return {"keys": [k.jwk for k in self.keys()]}

    def current(self) -> tuple[SigningKey, KmsSigner]:
        """The key to sign with now: the newest whose active_from has come.

        Raises:
            NoSigningKey: none is active (no confirmed key).
        """
        now = self._now()
        active = [k for k in self.keys() if k.active_from <= now]
        if not active:
            raise NoSigningKey("no token signing key is active")
        key = max(active, key=lambda k: k.active_from)
        signer = self._signers.get(key.key_id)
        if signer is None:
            signer = self._signers[key.key_id] = KmsSigner(
                key.key_id, client=self._kms.client, public_key=self.verification_key(key.kid)
            )
        return key, signer

    def _write(
        self,
        head: ChainHead,
        keys: list[SigningKey],
        action: str,
        actor: str,
        details: dict[str, Any],
    ) -> None:
        record = head.next_record(
            subject=f"stream:{STREAM}",
            at=timestamp(self._clock()),
            action=action,
            actor=actor,
            details=details,
        )
        self._registry_store.put(head, [k.to_item() for k in keys], record)
        self._cached = None

    def initialize(self, key_id: str, *, actor: str) -> SigningKey:
        """Write `key_id` into an empty registry as its first, immediately active key. Idempotent.
        A provisioning step of the local stack only: in AWS the registry starts empty (the stack's
        first key is read from settings) and the first rotation writes it.

        Raises:
            NoSigningKey: `key_id` is not a key this stack trusts.
        """
        head, keys = self._read(fresh=True)
        if head != ChainHead():
            if not keys:
                raise NoSigningKey("the signing-key registry has no confirmed key")
            return keys[0]
        key = _key_from_kms(self._kms, key_id, self._now())
        if not self._confirm(key):
            raise NoSigningKey(f"KMS key {key_id} is not a token signing key of this stack")
        try:
            self._write(
                head, [key], "signing_key_initialized", actor, {"kid": key.kid, "key_id": key_id}
            )
        except StaleRecord:
            return self._read(fresh=True)[1][0]
        return key

    def rotate(self, *, actor: str) -> SigningKey:
        """Create a new KMS key (with the trusted key policy and tags), publish it now, sign with
        it from now + publish lead; the key it supersedes stays published until its tokens have
        expired. A registry still empty gets the stack's first key written in as the superseded
        one. A rotation refused by a concurrent change leaves nothing behind: the new key's
        deletion is scheduled.

        Raises:
            Conflict: the registry changed meanwhile (retry).
        """
        now = self._now()
        head, keys = self._read(fresh=True)
        key_id = self._kms.create_signing_key(
            KEY_DESCRIPTION, dict(self._trust.tags), self._trust.policy_json()
        )
        try:
            new = _key_from_kms(self._kms, key_id, now + self._publish_lead)
        except (ValueError, ClientError, BotoCoreError):
            self._undo_create(key_id)  # the registry was not touched
            raise
        retire_after = new.active_from + MAX_TOKEN_LIFETIME_SECONDS + self._cache_seconds
        updated = [
            k
            if k.retire_after is not None
            else SigningKey(k.key_id, k.kid, k.jwk, k.active_from, retire_after)
            for k in keys
        ] + [new]
        try:
            self._write(
                head,
                updated,
                "signing_key_rotated",
                actor,
                {
                    "kid": new.kid,
                    "key_id": key_id,
                    "active_from": new.active_from,
                    "previous_retire_after": retire_after,
                },
            )
        except StaleRecord:
            # Refused, so certainly not written: undo the key. (Any other failure may have
            # written it: the key is kept, and a retry's read tells.)
            self._undo_create(key_id)
            raise Conflict(
                "signing keys changed during rotation; nothing was changed (the "
                "new KMS key's deletion is scheduled): retry"
            ) from None
        return new

    def _undo_create(self, key_id: str) -> None:
        """Schedule the deletion of a key a refused rotation created (never published). A failure
        here is logged, not raised over the rotation's own error: the key is then an unused,
        unpublished key that nothing trusts (it is in no registry)."""
        try:
            self._kms.schedule_deletion(key_id)
        except (ClientError, BotoCoreError):
            logger.error(
                "could not schedule the deletion of an unused signing key", extra={"key_id": key_id}
            )

    def retire_expired(self, *, actor: str) -> list[str]:
        """Schedule deletion of keys whose tokens have all expired, then unpublish them.

        Raises:
            Conflict: the registry changed meanwhile (retry; deletions already scheduled count as
                done).
        """
        now = self._now()
        head, keys = self._read(fresh=True)
        expired = [k for k in keys if k.retire_after is not None and k.retire_after < now]
        if not expired:
            return []
        for key in expired:
            self._kms.schedule_deletion(key.key_id)
        remaining = [k for k in keys if k not in expired]
        try:
            self._write(
                head, remaining, "signing_keys_retired", actor, {"kids": [k.kid for k in expired]}
            )
        except StaleRecord:
            raise Conflict(
                "signing keys changed meanwhile; retry (deletions already scheduled are kept)"
            ) from None
        return [k.key_id for k in expired]
