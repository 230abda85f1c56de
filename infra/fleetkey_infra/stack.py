"""The fleetkey stack: composes the constructs and grants each function exactly what it uses."""

from __future__ import annotations

from pathlib import Path

from aws_cdk import ArnFormat, CfnOutput, Stack, Tags
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.constructs import (
    Api,
    CoreLayer,
    Data,
    Functions,
    IotResources,
    RegistrationRule,
    Schedules,
    TokenKeys,
)
from fleetkey_infra.nag import acknowledge, wildcard_resource

# Item-level actions only: TransactWriteItems is authorized per item by
# Put/Update/Delete/ConditionCheck. No Scan, no Batch*: the store does not use them.
TABLE_ITEM_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
)
# The token function: read devices and the signing-key registry (GetItem); store challenges
# (PutItem); record an assertion's jti and consume its challenge in one transaction (Put +
# Delete); adopt the first signing key into the registry (a transaction of Puts).
TOKEN_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:DeleteItem")
# Discovery (the signing-key registry) and introspection (registry, device, revocation) only read.
READ_TABLE_ACTIONS = ("dynamodb:GetItem",)
# What DynamoDB asks of the caller's principal on a table encrypted with a customer managed key.
TABLE_KEY_ACTIONS = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey")
READ_TABLE_KEY_ACTIONS = ("kms:Decrypt",)
# Token signing keys. Only the token function signs; GetPublicKey reads a key's public half when
# it joins the registry (the token function's adoption of the first key, the admin's rotation).
TOKEN_KEY_SIGNING_ACTIONS = ("kms:Sign", "kms:GetPublicKey", "kms:ListResourceTags")
TOKEN_KEY_ADMIN_ACTIONS = ("kms:GetPublicKey", "kms:ListResourceTags", "kms:ScheduleKeyDeletion")
# Scheduled retirement: read the signing-key registry (GetItem), then replace it and append its
# audit record in one transaction of two Puts (PutItem); schedule the retired keys' deletion.
MAINTENANCE_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:PutItem")
TOKEN_KEY_RETIREMENT_ACTIONS = ("kms:ScheduleKeyDeletion",)
# Every function that reads the signing-key registry trusts an entry only once KMS confirms it
# (the key's public half and its tag), so a write to the table alone cannot publish a key.
TOKEN_KEY_CONFIRM_ACTIONS = ("kms:GetPublicKey", "kms:ListResourceTags")


class FleetkeyStack(Stack):
    """Attributes: `data`, `token_keys`, `iot`, `layer`, `api`, `functions`,
    `registration_rule`, `schedules`."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        layer_dir: Path | None = None,
        name_prefix: str = constants.NAME_PREFIX,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        Tags.of(self).add("project", constants.PROJECT_TAG)

        self.data = Data(self, "Data")
        self.token_keys = TokenKeys(self, "TokenKeys")
        self.iot = IotResources(self, "Iot", name_prefix=name_prefix)
        self.layer = CoreLayer(self, "CoreLayer", directory=layer_dir or self._layer_dir())
        # The API first: its base URL is the functions' issuer; the routes follow the functions.
        self.api = Api(self, "Api")
        self.functions = Functions(
            self,
            "Functions",
            layer=self.layer.layer,
            table_name=self.data.table.table_name,
            issuer=self.api.issuer,
            token_key_id=self.token_keys.key.key_id,
            name_prefix=name_prefix,
        )
        self.api.add_routes(
            admin=self.functions.admin,
            token=self.functions.token,
            discovery=self.functions.discovery,
            introspect=self.functions.introspect,
        )
        self.registration_rule = RegistrationRule(
            self, "RegistrationRule", function=self.functions.registration
        )
        self.schedules = Schedules(self, "Schedules", maintenance=self.functions.maintenance)

        self._grant_registration(self.functions.registration_role)
        self._grant_admin(self.functions.admin_role)
        self._grant_token(self.functions.token_role)
        self._grant_discovery(self.functions.discovery_role)
        self._grant_introspect(self.functions.introspect_role)
        self._grant_maintenance(self.functions.maintenance_role)
        self._build_outputs()

    def _layer_dir(self) -> Path:
        override = self.node.try_get_context(constants.LAYER_DIR_CONTEXT_KEY)
        if not override:
            return constants.DEFAULT_LAYER_DIR
        return (constants.REPO_ROOT / override).resolve()

    # -- grants ----------------------------------------------------------------------------------

    def _iot_arn(self, resource: str, name: str = "*") -> str:
        return self.format_arn(
            service="iot",
            resource=resource,
            resource_name=name,
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )

    def _kms_keys_arn(self) -> str:
        """Every KMS key of this account and region (narrowed by tag conditions where used)."""
        return self.format_arn(
            service="kms",
            resource="key",
            resource_name="*",
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )

    def _grant_table_items(
        self,
        role: iam.IRole,
        actions: tuple[str, ...] = TABLE_ITEM_ACTIONS,
        key_actions: tuple[str, ...] = TABLE_KEY_ACTIONS,
    ) -> None:
        table: dynamodb.ITable = self.data.table
        key: kms.IKey = self.data.key
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TableItems", actions=list(actions), resources=[table.table_arn]
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(sid="TableKey", actions=list(key_actions), resources=[key.key_arn])
        )

    @staticmethod
    def _token_signing_tag(prefix: str) -> dict[str, str]:
        """`{<prefix>/fleetkey:purpose: token-signing}`: `aws:ResourceTag` (the key carries the
        tag) or `aws:RequestTag` (the request sets it)."""
        return {f"{prefix}/{constants.TOKEN_SIGNING_TAG_KEY}": constants.TOKEN_SIGNING_TAG_VALUE}

    def _grant_registration(self, role: iam.IRole) -> None:
        """JITR: read the certificate, create the thing, bind certificate, policy and thing,
        then activate (or revoke) the certificate."""
        self._grant_table_items(role)
        certificates = self._iot_arn("cert")
        things = self._iot_arn("thing")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="Certificates",
                actions=["iot:DescribeCertificate", "iot:UpdateCertificate"],
                resources=[certificates],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="Things", actions=["iot:CreateThing", "iot:UpdateThing"], resources=[things]
            )
        )
        # AWS IoT's documentation names the thing for AttachThingPrincipal in one place and the
        # certificate in another; both are granted, neither as "*".
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ThingPrincipals",
                actions=["iot:AttachThingPrincipal"],
                resources=[things, certificates],
            )
        )
        # AttachPolicy is authorized on the target (the certificate); the profile policies are
        # listed too, so that a future policy-scoped check keeps working.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ProfilePolicies",
                actions=["iot:AttachPolicy"],
                resources=[certificates, *self.iot.policy_arns],
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "JITR handles certificates it has never seen: the id arrives in the registration "
            "event, so the grant covers this account's and region's certificates, and only "
            "Describe/UpdateCertificate, AttachPolicy and AttachThingPrincipal on them.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:thing/*"),
            "Things are created at registration under the device id from the allow-list, not "
            "known at deploy time; the grant is limited to Create/UpdateThing and "
            "AttachThingPrincipal in this account and region (no DeleteThing).",
        )
        self._acknowledge_tracing(role)

    def _grant_admin(self, role: iam.IRole) -> None:
        """Operators: allow-list and device records in the table, manufacturer CA registration,
        token signing-key rotation (create a tagged key, read its public key) and retirement
        (schedule the deletion of a tagged key)."""
        self._grant_table_items(role)
        tagged_keys = self._kms_keys_arn()
        only_the_purpose_tag = {
            "ForAllValues:StringEquals": {"aws:TagKeys": [constants.TOKEN_SIGNING_TAG_KEY]}
        }
        # CreateKey has no resource before the key exists. It is allowed only for a P-256 signing
        # key whose request tags it for token signing, and with no other tag.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CreateTokenKeys",
                actions=["kms:CreateKey"],
                resources=["*"],
                conditions={
                    "StringEquals": {
                        **self._token_signing_tag("aws:RequestTag"),
                        "kms:KeySpec": "ECC_NIST_P256",
                        "kms:KeyUsage": "SIGN_VERIFY",
                    },
                    **only_the_purpose_tag,
                },
            )
        )
        # CreateKey with Tags also needs TagResource, on (at least) every key of the account and
        # region; it is limited to setting exactly the token-signing tag.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TagTokenKeys",
                actions=["kms:TagResource"],
                resources=[tagged_keys],
                conditions={
                    "StringEquals": self._token_signing_tag("aws:RequestTag"),
                    **only_the_purpose_tag,
                },
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ManageTokenKeys",
                actions=list(TOKEN_KEY_ADMIN_ACTIONS),
                resources=[tagged_keys],
                conditions={"StringEquals": self._token_signing_tag("aws:ResourceTag")},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CaRegistration",
                actions=["iot:GetRegistrationCode", "iot:RegisterCACertificate"],
                resources=["*"],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CaCertificates",
                actions=["iot:UpdateCACertificate", "iot:DescribeCACertificate"],
                resources=[self._iot_arn("cacert")],
            )
        )
        acknowledge(
            role,
            wildcard_resource("*"),
            "iot:GetRegistrationCode and iot:RegisterCACertificate do not support resource-level "
            "permissions (the CA does not exist before it is registered), nor does kms:CreateKey "
            "(allowed only for ECC_NIST_P256 SIGN_VERIFY keys tagged fleetkey:purpose="
            "token-signing); X-Ray's PutTraceSegments/PutTelemetryRecords, added by active "
            "tracing, do not either.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "Rotation creates token signing keys at run time, ids unknown at deploy time: "
            "GetPublicKey and ScheduleKeyDeletion only on keys tagged fleetkey:purpose="
            "token-signing (aws:ResourceTag condition); TagResource only to set that one tag "
            "(aws:RequestTag and aws:TagKeys conditions), which KMS requires for CreateKey with "
            "tags on every key of the account and region.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cacert/*"),
            "Manufacturer CAs are registered by operators at run time, their ids unknown at "
            "deploy time; only Describe/UpdateCACertificate are granted on them.",
        )

    def _grant_token(self, role: iam.IRole) -> None:
        """Devices' tokens: read devices and the registry, record assertions and challenges, and
        sign with the token signing keys. No other role may sign with them."""
        self._grant_table_items(role, TOKEN_TABLE_ACTIONS)
        # Whatever IAM grants elsewhere in the account, nobody else may sign with the stack's key;
        # rotation gives its keys the same policy (fleetkey.services.signing_keys.token_key_policy,
        # with the role ARN passed to the admin function).
        self.token_keys.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyTheTokenFunctionSigns",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["kms:Sign"],
                resources=["*"],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": role.role_arn}},
            )
        )
        self.functions.admin.add_environment(constants.ENV_TOKEN_SIGNER_ROLE_ARN, role.role_arn)
        # The stack's first key by ARN; the keys rotation adds (created at run time) by their tag.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="FirstTokenKey",
                actions=list(TOKEN_KEY_SIGNING_ACTIONS),
                resources=[self.token_keys.key.key_arn],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RotatedTokenKeys",
                actions=list(TOKEN_KEY_SIGNING_ACTIONS),
                resources=[self._kms_keys_arn()],
                conditions={"StringEquals": self._token_signing_tag("aws:ResourceTag")},
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "Signing keys added by rotation are created at run time, their ids unknown at deploy "
            "time: kms:Sign and kms:GetPublicKey apply only to keys tagged fleetkey:purpose="
            "token-signing (aws:ResourceTag condition) in this account and region.",
        )
        self._acknowledge_tracing(role)

    def _grant_confirm_token_keys(self, role: iam.IRole) -> None:
        """Read a token signing key's public half and tags, to confirm a registry entry."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ConfirmTokenKeys",
                actions=list(TOKEN_KEY_CONFIRM_ACTIONS),
                resources=[self._kms_keys_arn()],
                conditions={"StringEquals": self._token_signing_tag("aws:ResourceTag")},
            )
        )

    def _grant_discovery(self, role: iam.IRole) -> None:
        """JWKS and metadata: read the signing-key registry, each entry confirmed with KMS."""
        self._grant_table_items(role, READ_TABLE_ACTIONS, READ_TABLE_KEY_ACTIONS)
        self._grant_confirm_token_keys(role)
        self._acknowledge_confirmation(role)
        self._acknowledge_tracing(role)

    def _grant_introspect(self, role: iam.IRole) -> None:
        """Introspection: read the registry (each entry confirmed with KMS), the device and the
        revocation list."""
        self._grant_table_items(role, READ_TABLE_ACTIONS, READ_TABLE_KEY_ACTIONS)
        self._grant_confirm_token_keys(role)
        self._acknowledge_confirmation(role)
        self._acknowledge_tracing(role)

    @staticmethod
    def _acknowledge_confirmation(role: iam.IRole) -> None:
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "Token signing keys are created by rotation at run time, their ids unknown at deploy "
            "time: kms:GetPublicKey and kms:ListResourceTags (to confirm a registry entry against "
            "KMS) apply only to keys tagged fleetkey:purpose=token-signing.",
        )

    def _grant_maintenance(self, role: iam.IRole) -> None:
        """Scheduled retirement of token signing keys: read and rewrite the signing-key registry
        (with its audit record), and schedule the deletion of the keys it retires. No CreateKey,
        no Sign, no GetPublicKey."""
        self._grant_table_items(role, MAINTENANCE_TABLE_ACTIONS)
        self._grant_confirm_token_keys(role)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RetireTokenKeys",
                actions=list(TOKEN_KEY_RETIREMENT_ACTIONS),
                resources=[self._kms_keys_arn()],
                conditions={"StringEquals": self._token_signing_tag("aws:ResourceTag")},
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "The keys to retire were created by rotation at run time, their ids unknown at deploy "
            "time: kms:ScheduleKeyDeletion applies only to keys tagged fleetkey:purpose="
            "token-signing (aws:ResourceTag condition) in this account and region.",
        )
        self._acknowledge_tracing(role)

    @staticmethod
    def _acknowledge_tracing(role: iam.IRole) -> None:
        acknowledge(
            role,
            wildcard_resource("*"),
            "Only X-Ray's PutTraceSegments and PutTelemetryRecords (added by active tracing) use "
            "'*': X-Ray does not support resource-level permissions.",
        )

    # -- outputs ---------------------------------------------------------------------------------

    def _build_outputs(self) -> None:
        CfnOutput(self, "TableName", value=self.data.table.table_name)
        CfnOutput(self, "ApiUrl", value=self.api.url)
        CfnOutput(self, "Issuer", value=self.api.issuer)
        CfnOutput(self, "TokenSigningKeyId", value=self.token_keys.key.key_id)
        CfnOutput(
            self, "RegistrationFunctionName", value=self.functions.registration.function_name
        )
        CfnOutput(
            self,
            "RegistrationFailureQueueUrl",
            value=self.functions.registration_failures.queue_url,
        )
        CfnOutput(
            self, "RegistrationRuleErrorQueueUrl", value=self.registration_rule.errors.queue_url
        )
        CfnOutput(
            self, "MaintenanceFunctionName", value=self.functions.maintenance.function_name
        )
        CfnOutput(
            self,
            "MaintenanceDeadLetterQueueUrl",
            value=self.schedules.dead_letters.queue_url,
        )
