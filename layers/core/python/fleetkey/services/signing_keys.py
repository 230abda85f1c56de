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

import logging
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey.adapters.kms import KmsKeys, KmsSigner
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.jose import jwk_thumbprint, public_jwk
from fleetkey.domain.audit import ChainHead
from fleetkey.errors import Conflict, FleetkeyError
from fleetkey.store.dynamodb import ConditionFailed, Store

logger = logging.getLogger(__name__)
MAX_TOKEN_LIFETIME_SECONDS = 3600
TAGS = {"fleetkey:purpose": "token-signing"}
STREAM = "signing-keys"


class NoSigningKey(FleetkeyError):
    code = "temporarily_unavailable"
    status = 503


@dataclass(frozen=True, slots=True)
class SigningKey:
    key_id: str
    kid: str
    jwk: dict
    active_from: int
    retire_after: int | None = None

    def to_item(self) -> dict:
        return {"key_id": self.key_id, "kid": self.kid, "jwk": self.jwk,
                "active_from": self.active_from, "retire_after": self.retire_after}

    @classmethod
    def from_item(cls, item: dict) -> "SigningKey":
        return cls(item["key_id"], item["kid"], dict(item["jwk"]), int(item["active_from"]),
                   None if item.get("retire_after") is None else int(item["retire_after"]))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        import jwt

        return jwt.algorithms.ECAlgorithm.from_jwk(self.jwk)


def token_key_policy(signer_role_arn: str) -> str:
    """The key policy of a token signing key: the account's IAM policies govern it (as with
    KMS's default policy), except that nobody but the token function's role may sign with it,
    whatever IAM grants elsewhere in the account."""
    import json

    partition, account = signer_role_arn.split(":")[1], signer_role_arn.split(":")[4]
    return json.dumps(
        {
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
                    "Sid": "OnlyTheTokenFunctionSigns",
                    "Effect": "Deny",
                    "Principal": {"AWS": "*"},
                    "Action": "kms:Sign",
                    "Resource": "*",
                    "Condition": {"ArnNotEquals": {"aws:PrincipalArn": signer_role_arn}},
                },
            ],
        }
    )


def _key_from_kms(kms: KmsKeys, key_id: str, active_from: int) -> SigningKey:
    jwk = public_jwk(kms.public_key(key_id))
    kid = jwk_thumbprint(jwk)
    return SigningKey(key_id, kid, {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}, active_from)


class SigningKeys:
    """The registry, as the token, discovery and admin functions see it.

    Reads are cached for `cache_seconds` (the token function signs with the cached current key;
    `retire_after` allows for it)."""

    def __init__(
        self,
        store: Store,
        kms: KmsKeys,
        *,
        clock: Clock = utc_now,
        cache_seconds: int = 60,
        publish_lead_seconds: int = 300,
        monotonic=time.monotonic,
    ) -> None:
        self._store = store
        self._kms = kms
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._publish_lead = publish_lead_seconds
        self._monotonic = monotonic
        self._cached: tuple[float, ChainHead, list[SigningKey]] | None = None
        self._signers: dict[str, KmsSigner] = {}
        # key id -> whether KMS confirmed the registry's entry for it (checked once per process)
        self._confirmed: dict[str, bool] = {}
        # kid -> public key, parsed once (a kid is the key's thumbprint: it never changes)
        self._public_keys: dict[str, ec.EllipticCurvePublicKey] = {}

    def _now(self) -> int:
        return int(self._clock().timestamp())

    def _read(self, fresh: bool = False) -> tuple[ChainHead, list[SigningKey]]:
        if (
            fresh
            or self._cached is None
            or self._monotonic() - self._cached[0] > self._cache_seconds
        ):
            head, items = self._store.get_signing_keys()
            keys = [k for k in map(SigningKey.from_item, items) if self._confirm(k)]
            self._cached = (self._monotonic(), head, keys)
        return self._cached[1], self._cached[2]

    def _confirm(self, key: SigningKey) -> bool:
        """A registry entry is trusted only if KMS agrees: the key is tagged as a token-signing
        key and its public key is the entry's JWK (so a write to the table alone cannot publish
        or introduce a key). Once per key per process: neither ever changes for a key id."""
        confirmed = self._confirmed.get(key.key_id)
        if confirmed is None:
            try:
                jwk = public_jwk(self._kms.public_key(key.key_id))
                tagged = all(self._kms.tags(key.key_id).get(k) == v for k, v in TAGS.items())
                confirmed = (
                    tagged
                    and jwk_thumbprint(jwk) == key.kid
                    and all(key.jwk.get(name) == value for name, value in jwk.items())
                )
            except ValueError:  # not an EC P-256/P-384 key
                confirmed = False
            except ClientError as exc:
                # No such key, or one this function may not read (IAM only allows tagged keys);
                # a passing failure propagates and the entry is checked again next time.
                if is_transient(exc):
                    raise
                confirmed = False
            if not confirmed:
                logger.error("signing-key registry entry not confirmed by KMS; ignored",
                             extra={"key_id": key.key_id, "kid": key.kid})
            self._confirmed[key.key_id] = confirmed
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

    def jwks(self) -> dict:
        return {"keys": [k.jwk for k in self.keys()]}

    def current(self) -> tuple[SigningKey, KmsSigner]:
        """The key to sign with now: the newest whose active_from has come.

        Raises:
            NoSigningKey: none is active (not initialized).
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

    def _write(self, head: ChainHead, keys: list[SigningKey], action: str, actor: str, details: dict):
        record = head.next_record(
            subject=f"stream:{STREAM}", at=timestamp(self._clock()), action=action, actor=actor,
            details=details,
        )
        self._store.put_signing_keys(head, [k.to_item() for k in keys], record)
        self._cached = None

    def initialize(self, key_id: str, *, actor: str) -> SigningKey:
        """Adopt `key_id` (created with the stack) as the first, immediately active key, if the
        registry is empty. Idempotent."""
        head, keys = self._read(fresh=True)
        if keys:
            return keys[0]
        key = _key_from_kms(self._kms, key_id, self._now())
        try:
            self._write(head, [key], "signing_key_initialized", actor, {"kid": key.kid, "key_id": key_id})
        except ConditionFailed:
            return self._read(fresh=True)[1][0]
        return key

    def rotate(self, *, actor: str, policy: str | None = None) -> SigningKey:
        """Create a new KMS key, publish it now, sign with it from now + publish lead; the key it
        supersedes stays published until its tokens have expired.

        Raises:
            Conflict: the registry changed meanwhile (retry).
        """
        now = self._now()
        key_id = self._kms.create_signing_key("fleetkey access-token signing key", TAGS, policy)
        new = _key_from_kms(self._kms, key_id, now + self._publish_lead)
        head, keys = self._read(fresh=True)
        retire_after = new.active_from + MAX_TOKEN_LIFETIME_SECONDS + self._cache_seconds
        updated = [
            k if k.retire_after is not None else SigningKey(k.key_id, k.kid, k.jwk, k.active_from, retire_after)
            for k in keys
        ] + [new]
        try:
            self._write(head, updated, "signing_key_rotated", actor,
                        {"kid": new.kid, "key_id": key_id, "active_from": new.active_from,
                         "previous_retire_after": retire_after})
        except ConditionFailed:
            raise Conflict("signing keys changed during rotation; the new KMS key is unused: "
                           f"{key_id} (schedule its deletion or retry)") from None
        return new

    def retire_expired(self, *, actor: str) -> list[str]:
        """Schedule deletion of keys whose tokens have all expired, then unpublish them."""
        now = self._now()
        head, keys = self._read(fresh=True)
        expired = [k for k in keys if k.retire_after is not None and k.retire_after < now]
        if not expired:
            return []
        for key in expired:
            self._kms.schedule_deletion(key.key_id)
        remaining = [k for k in keys if k not in expired]
        try:
            self._write(head, remaining, "signing_keys_retired", actor,
                        {"kids": [k.kid for k in expired]})
        except ConditionFailed:
            raise Conflict("signing keys changed meanwhile; retry (deletions already scheduled "
                           "are kept)") from None
        return [k.key_id for k in expired]
