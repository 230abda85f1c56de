"""The KMS key that wraps the devices' data keys, and the policy a backend attaches to unwrap them.

A device's data key exists only wrapped by this key: the data_keys function creates it with
`GenerateDataKey` (AES_256) under the encryption context `{"fleetkey:device_id": <id>,
"fleetkey:owner": <owner or "-">, "fleetkey:epoch": <epoch>}`, keeps the wrapped blob in the
table, and seals the plaintext to the device's certificate key on each request. An
IAM-authenticated backend reads the wrapped blob and its context from the admin API
(`GET /v1/admin/devices/{device_id}/data-key`) and decrypts it itself with the customer managed
policy `backend_decrypt_policy`: kms:Decrypt on this key only, and only with an encryption
context made of exactly those three keys. One key for every device and epoch (a key costs about
$1 a month and its deletion waits 7 to 30 days): destroying a device's data key deletes its
wrapped blob, which stays in the table's point-in-time recovery for `pitrRecoveryDays`.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey_infra import constants


class DataKeys(Construct):
    """Attributes: `key` (kms.Key: symmetric, rotating, retained), `alias` (kms.Alias:
    `alias/<stack name>/data-keys`), `backend_decrypt_policy` (iam.ManagedPolicy, attached to
    nothing: the backend's deployer attaches it to the backend's role)."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.key = self._build_key()
        self.alias = kms.Alias(
            self,
            "Alias",
            alias_name=f"alias/{Stack.of(self).stack_name}/data-keys",
            target_key=self.key,
        )
        self.backend_decrypt_policy = self._build_backend_decrypt_policy(self.key)

    def _build_key(self) -> kms.Key:
        # Retained: a retained table holds blobs that only this key unwraps. Rotation keeps old
        # key material, so blobs wrapped before a rotation still decrypt.
        return kms.Key(
            self,
            "Key",
            description=constants.DATA_KEY_DESCRIPTION,
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )

    @staticmethod
    def encryption_context_conditions() -> dict[str, dict[str, object]]:
        """The request's encryption context has exactly fleetkey's keys: no key but these
        (`ForAllValues`, which alone would also hold for an empty context), and each of them
        present (`Null` false)."""
        return {
            "ForAllValues:StringEquals": {
                "kms:EncryptionContextKeys": list(constants.DATA_KEY_CONTEXT_KEYS)
            },
            "Null": {
                f"kms:EncryptionContext:{key}": "false" for key in constants.DATA_KEY_CONTEXT_KEYS
            },
        }

    def _build_backend_decrypt_policy(self, key: kms.IKey) -> iam.ManagedPolicy:
        return iam.ManagedPolicy(
            self,
            "BackendDecryptPolicy",
            description="fleetkey: decrypt device data keys (the KMS-wrapped blobs of GET "
            "/v1/admin/devices/{device_id}/data-key), with fleetkey's encryption context only",
            statements=[
                iam.PolicyStatement(
                    sid="DecryptDeviceDataKeys",
                    actions=["kms:Decrypt"],
                    resources=[key.key_arn],
                    conditions=self.encryption_context_conditions(),
                )
            ],
        )

    def deny_key_management(self, roles: Sequence[iam.IRole]) -> None:
        """Deny `roles` (the functions') every management action on the key in its own policy,
        whatever IAM grants them, as for the table's key."""
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="NoFleetkeyFunctionManagesTheDataKeyKey",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=list(constants.TABLE_KEY_DENIED_ACTIONS),
                resources=["*"],
                conditions={"ArnEquals": {"aws:PrincipalArn": [r.role_arn for r in roles]}},
            )
        )
