"""KMS signing adapter: the private key never leaves KMS; the public key is fetched once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from fleetkey.adapters.aws import client as aws_client

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_kms.literals import KeySpecType, SigningAlgorithmSpecType
    from mypy_boto3_kms.type_defs import TagTypeDef

# The key specs of fleetkey's signing keys (token signing, the issuing CA).
SIGNING_KEY_SPECS: dict[str, KeySpecType] = {
    "ECC_NIST_P256": "ECC_NIST_P256",
    "ECC_NIST_P384": "ECC_NIST_P384",
}

_ALGORITHMS: dict[str, tuple[SigningAlgorithmSpecType, int]] = {
    "secp256r1": ("ECDSA_SHA_256", 32),
    "secp384r1": ("ECDSA_SHA_384", 48),
}


class KmsSigner:
    """Signs with an ECC_NIST_P256/P384 SIGN_VERIFY key. `client` is a boto3 KMS client."""

    def __init__(
        self,
        key_id: str,
        client: KMSClient | None = None,
        region: str | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> None:
        """`public_key`, when known (it never changes for a key id), saves the GetPublicKey."""
        self.key_id = key_id
        self._client: KMSClient = client or aws_client("kms", region)
        self._public_key = public_key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The verifying key, read from KMS once per signer (it never changes for a key id)."""
        if self._public_key is None:
            der = self._client.get_public_key(KeyId=self.key_id)["PublicKey"]
            self._public_key = _load_verifying_key(der, self.key_id)
        return self._public_key

    def sign_der(self, message: bytes) -> bytes:
        """ECDSA signature over `message`, DER-encoded as KMS returns it (one KMS call)."""
        algorithm, _ = _ALGORITHMS[self.public_key().curve.name]
        response = self._client.sign(
            KeyId=self.key_id, Message=message, MessageType="RAW", SigningAlgorithm=algorithm
        )
        signature: bytes = response["Signature"]
        return signature

    def sign_raw(self, message: bytes) -> bytes:
        """The same signature as fixed-size r||s, the form JWS (RFC 7518 §3.4) requires."""
        _, size = _ALGORITHMS[self.public_key().curve.name]
        r, s = utils.decode_dss_signature(self.sign_der(message))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


class KmsDigestSigner:
    """Signs prehashed digests with an ECC_NIST_P256/P384 SIGN_VERIFY key (the
    `fleetkey.crypto.issuing.DigestSigner` of the issuing CA): `Sign(MessageType="DIGEST")`
    takes the hash, so what it signs (a CRL, a certificate) has no size limit, where
    `MessageType="RAW"` takes at most 4,096 bytes. `client` is a boto3 KMS client.

    AWS calls: `public_key()` one GetPublicKey per signer (the public key never changes for a
    key id; none when `public_key` is given); `sign_digest()` one Sign.
    """

    def __init__(
        self,
        key_id: str,
        client: KMSClient | None = None,
        region: str | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> None:
        """`public_key`, when known, saves the GetPublicKey."""
        self.key_id = key_id
        self._client: KMSClient = client or aws_client("kms", region)
        self._public_key = public_key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The verifying key, read from KMS once per signer.

        Raises:
            ValueError: the key is not a P-256/P-384 key.
        """
        if self._public_key is None:
            der = self._client.get_public_key(KeyId=self.key_id)["PublicKey"]
            self._public_key = _load_verifying_key(der, self.key_id)
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        """DER ECDSA signature over `digest`, the SHA-256 (P-256) or SHA-384 (P-384) hash of the
        message, as KMS returns it: `Sign(MessageType="DIGEST", SigningAlgorithm=ECDSA_SHA_256 |
        ECDSA_SHA_384)`.

        Raises:
            ValueError: `digest` is not the curve's hash size (KMS would refuse it), or the key
                is not a P-256/P-384 key.
        """
        algorithm, size = _ALGORITHMS[self.public_key().curve.name]
        if len(digest) != size:
            raise ValueError(f"a {algorithm} digest is {size} bytes, not {len(digest)}")
        response = self._client.sign(
            KeyId=self.key_id, Message=digest, MessageType="DIGEST", SigningAlgorithm=algorithm
        )
        signature: bytes = response["Signature"]
        return signature


def _load_verifying_key(der: bytes, key_id: str) -> ec.EllipticCurvePublicKey:
    """Raises:
    ValueError: not a P-256/P-384 public key.
    """
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _ALGORITHMS:
        raise ValueError(f"KMS key {key_id} is not a P-256/P-384 signing key")
    return key


@dataclass(frozen=True, slots=True)
class PublicKeyInfo:
    """What KMS GetPublicKey says of a key: its public half, key spec and usage."""

    public_key: ec.EllipticCurvePublicKey
    key_spec: str | None
    key_usage: str | None


@dataclass(frozen=True, slots=True)
class KeyMetadata:
    """What KMS DescribeKey says of a key that matters for trusting it."""

    origin: str | None
    multi_region: bool | None
    key_spec: str | None
    key_usage: str | None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are unique (json keeps the last of duplicates silently, so a
    policy could say one thing to this parser and another to AWS's).

    Raises:
        ValueError: a name occurs twice.
    """
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"duplicate name {name!r} in a JSON object")
        obj[name] = value
    return obj


def strict_json(text: str) -> Any:
    """`json.loads`, refusing duplicate names in any object.

    Raises:
        ValueError: not JSON, or a duplicate name.
    """
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


class KmsKeys:
    """Creating, reading and retiring fleetkey's KMS signing keys. `client` is a boto3 KMS
    client."""

    def __init__(self, client: KMSClient | None = None, region: str | None = None) -> None:
        self._client: KMSClient = client or aws_client("kms", region)

    @property
    def client(self) -> KMSClient:
        return self._client

    def create_signing_key(
        self,
        description: str,
        tags: dict[str, str],
        policy: str | None = None,
        key_spec: str = "ECC_NIST_P256",
    ) -> str:
        """A new `key_spec` (ECC_NIST_P256 or ECC_NIST_P384) SIGN_VERIFY key (its private key
        never leaves KMS): material KMS generates (origin AWS_KMS), single-Region; its key id.
        One CreateKey.

        With `policy`, KMS's lockout check would ask that the caller may change the policy later;
        the policy keeps the account's IAM in charge of the key (root `kms:*`), so nobody is
        locked out and the check is skipped rather than granting the caller PutKeyPolicy.

        Raises:
            ValueError: `key_spec` is neither ECC_NIST_P256 nor ECC_NIST_P384 (before any call).
        """
        spec = SIGNING_KEY_SPECS.get(key_spec)
        if spec is None:
            raise ValueError(f"signing keys are ECC_NIST_P256 or ECC_NIST_P384, not {key_spec!r}")
        key_tags: list[TagTypeDef] = [{"TagKey": k, "TagValue": v} for k, v in tags.items()]
        if policy:
            response = self._client.create_key(
                KeySpec=spec,
                KeyUsage="SIGN_VERIFY",
                Origin="AWS_KMS",
                MultiRegion=False,
                Description=description,
                Tags=key_tags,
                Policy=policy,
                BypassPolicyLockoutSafetyCheck=True,
            )
        else:
            response = self._client.create_key(
                KeySpec=spec,
                KeyUsage="SIGN_VERIFY",
                Origin="AWS_KMS",
                MultiRegion=False,
                Description=description,
                Tags=key_tags,
            )
        key_id: str = response["KeyMetadata"]["KeyId"]
        return key_id

    def public_key(self, key_id: str) -> ec.EllipticCurvePublicKey:
        """Raises:
        ValueError: not a P-256/P-384 key.
        """
        return KmsSigner(key_id, client=self._client).public_key()

    def describe_public_key(self, key_id: str) -> PublicKeyInfo:
        """The key's public half, spec and usage, in one GetPublicKey.

        Raises:
            ValueError: not a P-256/P-384 key.
        """
        response: dict[str, Any] = dict(self._client.get_public_key(KeyId=key_id))
        return PublicKeyInfo(
            _load_verifying_key(response["PublicKey"], key_id),
            # moto answers with the older name only
            response.get("KeySpec") or response.get("CustomerMasterKeySpec"),
            response.get("KeyUsage"),
        )

    def describe(self, key_id: str) -> KeyMetadata:
        """The key's origin, multi-Region flag, spec and usage (one DescribeKey)."""
        metadata: dict[str, Any] = dict(self._client.describe_key(KeyId=key_id)["KeyMetadata"])
        multi_region = metadata.get("MultiRegion")
        return KeyMetadata(
            metadata.get("Origin"),
            multi_region if isinstance(multi_region, bool) else None,
            metadata.get("KeySpec") or metadata.get("CustomerMasterKeySpec"),
            metadata.get("KeyUsage"),
        )

    def key_policy(self, key_id: str) -> dict[str, Any]:
        """The key's (default, and only) key policy, parsed strictly.

        Raises:
            ValueError: the policy is not a JSON object, or names a member twice in an object.
        """
        policy = strict_json(
            self._client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
        )
        if not isinstance(policy, dict):
            raise ValueError(f"the key policy of {key_id} is not a JSON object")
        return policy

    def tags(self, key_id: str) -> dict[str, str]:
        tags: dict[str, str] = {}
        for page in self._client.get_paginator("list_resource_tags").paginate(KeyId=key_id):
            tags.update({t["TagKey"]: t["TagValue"] for t in page.get("Tags", [])})
        return tags

    def schedule_deletion(self, key_id: str, days: int = 7) -> None:
        """Schedule the key's deletion; a key already pending deletion counts as done."""
        from botocore.exceptions import ClientError

        try:
            self._client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=days)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "KMSInvalidStateException":
                raise
