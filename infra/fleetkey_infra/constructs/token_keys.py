"""The first access-token signing key: KMS ECC_NIST_P256 SIGN_VERIFY, its private key never
leaves KMS.

The token function adopts it as the registry's first key on its first call
(`FLEETKEY_TOKEN_KEY_ID`). Later keys are not CloudFormation resources: the admin function's
rotation creates them with KMS and the same tag, and retires old ones by scheduling their
deletion. Access to all of them is granted by the tag, not by key id (see the stack's grants).
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy, Tags
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey_infra import constants


class TokenKeys(Construct):
    """Attribute: `key` (kms.Key), tagged `fleetkey:purpose=token-signing`, retained."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.key = self._build_key()

    def _build_key(self) -> kms.Key:
        # No enable_key_rotation: KMS rotates only symmetric keys. fleetkey rotates signing keys
        # itself (a new key, published before it signs), so cdk-nag's KMS5 (symmetric keys only)
        # does not apply.
        key = kms.Key(
            self,
            "Key",
            key_spec=kms.KeySpec.ECC_NIST_P256,
            key_usage=kms.KeyUsage.SIGN_VERIFY,
            description=constants.TOKEN_KEY_DESCRIPTION,
            # Retained: tokens it signed stay verifiable (its public key stays in the JWKS until
            # they expire), and the admin function's retirement schedules its deletion in KMS.
            removal_policy=RemovalPolicy.RETAIN,
        )
        Tags.of(key).add(constants.TOKEN_SIGNING_TAG_KEY, constants.TOKEN_SIGNING_TAG_VALUE)
        return key
