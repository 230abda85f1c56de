"""The first access-token signing key: KMS ECC_NIST_P256 SIGN_VERIFY, its private key never
leaves KMS.

While the signing-key registry is empty, every function reads this key from
`FLEETKEY_TOKEN_KEY_ID` as the sole current key; the first rotation writes it into the registry.
Later keys are not CloudFormation resources: the admin function's rotation creates them with KMS,
the same tags and the same key policy, and retires old ones by scheduling their deletion. Access
to all of them is granted by the stack's tag, key spec and usage, not by key id (see the stack's
grants).
"""

from __future__ import annotations

from aws_cdk import Aws, RemovalPolicy, Stack, Tags
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey.services.signing_keys import token_key_policy, token_signing_tags
from fleetkey_infra import constants


class TokenKeys(Construct):
    """Attribute: `key` (kms.Key), tagged `fleetkey:purpose=token-signing:<stack name>`,
    retained. Its key policy is set by `restrict_signing_to` (the token role is created later)."""

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
        for tag_key, tag_value in token_signing_tags(Stack.of(self).stack_name).items():
            Tags.of(key).add(tag_key, tag_value)
        return key

    def restrict_signing_to(self, signer: iam.IRole) -> None:
        """Give the key exactly the policy fleetkey writes on every signing key
        (`fleetkey.services.signing_keys.token_key_policy`, the document the functions compare a
        key's policy with before trusting it): the account's IAM governs the key, and nobody but
        `signer` may sign with it. Set whole, as a property override, so that nothing CDK adds
        makes it differ from the document rotation writes."""
        policy = token_key_policy(
            partition=Aws.PARTITION, account=Aws.ACCOUNT_ID, signer_role_arn=signer.role_arn
        )
        cfn_key = self.key.node.default_child
        if not isinstance(cfn_key, kms.CfnKey):  # the L2 key's own resource, always
            raise TypeError(f"unexpected default child of the token key: {cfn_key!r}")
        cfn_key.add_property_override("KeyPolicy", policy)
