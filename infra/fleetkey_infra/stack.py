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
    AdminApi,
    CoreLayer,
    Data,
    Functions,
    IotResources,
    RegistrationRule,
)
from fleetkey_infra.nag import acknowledge, wildcard_resource

# Item-level actions only: TransactWriteItems is authorized per item by Put/Update/ConditionCheck.
# No Scan, no DeleteItem, no Batch*: the store does not use them.
TABLE_ITEM_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
)
# What DynamoDB asks of the caller's principal on a table encrypted with a customer managed key.
TABLE_KEY_ACTIONS = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey")


class FleetkeyStack(Stack):
    """Attributes: `data`, `iot`, `layer`, `functions`, `registration_rule`, `admin_api`."""

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
        self.iot = IotResources(self, "Iot", name_prefix=name_prefix)
        self.layer = CoreLayer(self, "CoreLayer", directory=layer_dir or self._layer_dir())
        self.functions = Functions(
            self,
            "Functions",
            layer=self.layer.layer,
            table_name=self.data.table.table_name,
            name_prefix=name_prefix,
        )
        self.registration_rule = RegistrationRule(
            self, "RegistrationRule", function=self.functions.registration
        )
        self.admin_api = AdminApi(self, "AdminApi", function=self.functions.admin)

        self._grant_registration(self.functions.registration_role)
        self._grant_admin(self.functions.admin_role)
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

    def _grant_table_items(self, role: iam.IRole) -> None:
        table: dynamodb.ITable = self.data.table
        key: kms.IKey = self.data.key
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TableItems", actions=list(TABLE_ITEM_ACTIONS), resources=[table.table_arn]
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TableKey", actions=list(TABLE_KEY_ACTIONS), resources=[key.key_arn]
            )
        )

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
        """Operators: allow-list and device records in the table, manufacturer CA registration."""
        self._grant_table_items(role)
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
            "permissions (the CA does not exist before it is registered); X-Ray's "
            "PutTraceSegments/PutTelemetryRecords, added by active tracing, do not either.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cacert/*"),
            "Manufacturer CAs are registered by operators at run time, their ids unknown at "
            "deploy time; only Describe/UpdateCACertificate are granted on them.",
        )

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
        CfnOutput(self, "AdminApiUrl", value=self.admin_api.url)
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
