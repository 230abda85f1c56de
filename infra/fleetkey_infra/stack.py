"""The fleetkey stack: composes the constructs and grants each function exactly what it uses."""

from __future__ import annotations

from pathlib import Path

from aws_cdk import ArnFormat, CfnOutput, Stack, Tags
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from fleetkey.services.pki import issuing_ca_tags
from fleetkey.services.signing_keys import token_signing_tags
from fleetkey_infra import constants
from fleetkey_infra.constructs import (
    Api,
    ApiDomain,
    ApiDomainConfig,
    CoreLayer,
    Data,
    DataKeys,
    EstDomain,
    Functions,
    IotResources,
    LifecycleQueue,
    Monitoring,
    PresenceRule,
    RedrivePolicy,
    RegistrationConfig,
    RegistrationRule,
    RotationConfig,
    Schedules,
    TamperRule,
    TokenKeys,
)
from fleetkey_infra.nag import acknowledge, wildcard_resource
from fleetkey_infra.retained import add_retained_resources_output
from fleetkey_infra.stage import StageConfig

# AWS IoT actions, by resource type (Service Authorization Reference; infra/README.md). Add an
# action the code starts calling here: the IAM check (tests/support/aws_calls.py) names it.
REGISTRATION_CERTIFICATE_ACTIONS = ("iot:DescribeCertificate", "iot:UpdateCertificate")
# A certificate presented for a decommissioned device is set aside, not revoked: removed from AWS
# IoT (a pending certificate: its policies and things, if any, detached, then deleted), so that
# it registers afresh after a recommission. Authorized on the certificate.
SET_ASIDE_CERTIFICATE_ACTIONS = (
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DeleteCertificate",
)
# ListThingPrincipals: the take-over of an existing thing lists its certificates.
# DescribeThing: a thing that already exists is taken over only if it is fleetkey's.
REGISTRATION_THING_ACTIONS = (
    "iot:CreateThing",
    "iot:DescribeThing",
    "iot:UpdateThing",
    "iot:ListThingPrincipals",
)
ADMIN_CA_REGISTRATION_ACTIONS = ("iot:GetRegistrationCode", "iot:RegisterCACertificate")
# DescribeCACertificate: a CA AWS IoT already has, that fleetkey did not register, is refused.
ADMIN_CA_CERTIFICATE_ACTIONS = ("iot:DescribeCACertificate", "iot:UpdateCACertificate")
# Item-level actions only: TransactWriteItems is authorized per item by
# Put/Update/Delete/ConditionCheck. No Scan, no Batch*: the store does not use them.
TABLE_ITEM_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
)
# The admin function writes devices, CAs and audit records with single puts/updates and
# transactions of them; it checks no other item in a transaction (no ConditionCheckItem).
ADMIN_TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:Query",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
)
# The token function reads devices, the signing-key registry and challenges (GetItem), and writes
# only its own items: challenges (PutItem NONCE#), an assertion's jti with its challenge consumed
# (a transaction of a Put JTI# and a Delete NONCE#). dynamodb:LeadingKeys holds it to those, and
# it deletes challenges only: a recorded jti (replay protection) is never deleted.
TOKEN_READ_ACTIONS = ("dynamodb:GetItem",)
TOKEN_PUT_PARTITIONS = ("JTI#*", "NONCE#*")
# The jti's transaction checks the device is still ACTIVE with that certificate (nothing granted
# once a suspension or decommission committed), and for an attested token that the measured
# firmware is a published release: ConditionChecks of the device and release items, no write.
TOKEN_CHECK_PARTITIONS = ("DEVICE#*", "FIRMWARE#*")
TOKEN_DELETE_PARTITIONS = ("NONCE#*",)
# A device's answer to a validation decides it: validated (an Update in the jti's transaction) or
# refused (an Update of its own). Nothing else of a validation is the token function's to write.
TOKEN_UPDATE_PARTITIONS = ("VALIDATION#*",)
# Validation requests (validations): read the device and the validation (GetItem); record a
# request, pending or already refused (PutItem, conditional on a new id), in VALIDATION#
# partitions only. It never updates one: the token function decides it (expiry is read off its
# deadline). The command goes to the device's validate topic through iot-data.
VALIDATIONS_READ_ACTIONS = ("dynamodb:GetItem",)
VALIDATIONS_WRITE_ACTIONS = ("dynamodb:PutItem",)
VALIDATIONS_WRITABLE_PARTITIONS = ("VALIDATION#*",)
# Discovery (the signing-key registry) and introspection (registry, device, revocation) only read.
READ_TABLE_ACTIONS = ("dynamodb:GetItem",)
# What DynamoDB asks of the caller's principal on a table encrypted with a customer managed key.
TABLE_KEY_ACTIONS = ("kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey")
READ_TABLE_KEY_ACTIONS = ("kms:Decrypt",)
# Every function that reads the signing-key registry trusts a key only once KMS confirms it: its
# origin, spec, usage and single-Region flag (DescribeKey), its public half (GetPublicKey), its tag
# (ListResourceTags) and its key policy (GetKeyPolicy), so a write to the table alone cannot
# publish a key. Read-only: tagging someone else's key as this stack's gains nothing through these.
TOKEN_KEY_CONFIRM_ACTIONS = (
    "kms:DescribeKey",
    "kms:GetPublicKey",
    "kms:ListResourceTags",
    "kms:GetKeyPolicy",
)
# kms:Sign (the token role) and kms:ScheduleKeyDeletion (admin, maintenance) are NOT granted by
# IAM: each signing key's own policy grants them to exactly those roles (token_key_policy), so
# only keys whose policy fleetkey wrote can be signed with or deleted by this stack's roles.
# Scheduled retirement: read the signing-key registry (GetItem), then replace it and append its
# audit record in one transaction of two Puts, both in the STREAM#signing-keys partition.
MAINTENANCE_TABLE_ACTIONS = ("dynamodb:GetItem", "dynamodb:PutItem")
MAINTENANCE_WRITABLE_PARTITIONS = ("STREAM#signing-keys",)

# Lifecycle in AWS IoT (draft: the IAM check of tests/support/aws_calls.py holds each role to the
# calls its function makes). Suspend and resume (admin; device_events on a tamper report): the
# device's certificates to INACTIVE and back, its MQTT connection closed at once (iot-data
# DeleteConnection, authorized on the client id = the device id), and the iot-data endpoint looked
# up once per process (DescribeEndpoint has no resource-level permissions).
SUSPEND_CERTIFICATE_ACTIONS = ("iot:DescribeCertificate", "iot:UpdateCertificate")
# Teardown after decommission (converge), in the order AWS IoT requires: certificates out of
# ACTIVE, their policies and things detached, then the certificates deleted, then the thing.
# ListAttachedPolicies, DetachPolicy and ListPrincipalThings are authorized on the certificate
# (the target / principal), like AttachPolicy.
TEARDOWN_CERTIFICATE_ACTIONS = (
    "iot:DescribeCertificate",
    "iot:UpdateCertificate",
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DeleteCertificate",
)
TEARDOWN_THING_ACTIONS = ("iot:DescribeThing", "iot:ListThingPrincipals", "iot:DeleteThing")
# The only command converge sends: the reset before the teardown.
RESET_COMMAND_TOPIC = "fleetkey/*/commands/reset"
# Converge and device_events read what they need (GetItem) and apply lifecycle changes: one
# transaction of the device item's Update and its audit record's Put, both in the device's
# partition (DeviceRepository.apply).
LIFECYCLE_READ_ACTIONS = ("dynamodb:GetItem",)
LIFECYCLE_WRITE_ACTIONS = ("dynamodb:PutItem", "dynamodb:UpdateItem")
LIFECYCLE_WRITABLE_PARTITIONS = ("DEVICE#*",)
# Destroying a device's data keys (every life's) is listing and deleting their wrapped blobs:
# converge queries and deletes nothing else.
DATA_KEY_DESTROY_ACTIONS = ("dynamodb:Query", "dynamodb:DeleteItem")
DATA_KEY_PARTITIONS = ("DATAKEY#*",)
# The data_keys function (internet-facing, like token) reads devices, certificates and data keys.
# Its writes: the assertion's jti (Put JTI#) with its challenge consumed (Delete NONCE#) and the
# device checked ACTIVE with that certificate (ConditionCheck DEVICE#), in one transaction; a
# life's first data key (Put DATAKEY#) with its `data_key_created` record in the device's chain
# (Update of the device item, Put of the record: DEVICE#), in another.
DATA_KEYS_READ_ACTIONS = ("dynamodb:GetItem",)
DATA_KEYS_PUT_PARTITIONS = ("DATAKEY#*", "DEVICE#*", "JTI#*")
DATA_KEYS_UPDATE_PARTITIONS = ("DEVICE#*",)
DATA_KEYS_CHECK_PARTITIONS = ("DEVICE#*",)
DATA_KEYS_DELETE_PARTITIONS = ("NONCE#*",)
# Create a device's wrapped data key, and unwrap it to seal it to the device's key. No kms:Sign,
# no token signing keys: the client assertion is verified against the device's certificate.
DATA_KEY_ACTIONS = ("kms:GenerateDataKey", "kms:Decrypt")

# Certificate rotation (draft: the IAM check of tests/support/aws_calls.py holds each role to the
# calls its function makes). The rotation function (internet-facing, like data_keys) reads any
# item; its writes: the assertion's jti (Put JTI#) with a challenge consumed (Delete NONCE#); the
# device's pending certificate and its audit record (Update and Put DEVICE#, ConditionCheck
# DEVICE#); the issued certificate's item (Put CERT#); the public key it certified (Put KEY#, so
# that no key is certified twice); the issuing CA and its audit chain (STREAM#issuing-ca), the CRL
# and revoked certificates (PKI#); a device on its factory certificate, that its manufacturer
# CA is still active (ConditionCheck CA).
ROTATION_READ_ACTIONS = ("dynamodb:GetItem",)
ROTATION_QUERY_PARTITIONS = ("PKI#*",)
ROTATION_PUT_PARTITIONS = ("CERT#*", "DEVICE#*", "JTI#*", "KEY#*", "PKI#*", "STREAM#issuing-ca")
ROTATION_UPDATE_PARTITIONS = ("CERT#*", "DEVICE#*", "PKI#*", "STREAM#issuing-ca")
ROTATION_CHECK_PARTITIONS = ("CA", "DEVICE#*", "KEY#*")
ROTATION_DELETE_PARTITIONS = ("NONCE#*",)
# The sweep and the presence commit (rotation_events): read any item; query the `due` index (its
# own ARN, no LeadingKeys: its partitions are DUE#n, and it holds keys only) and the revoked
# certificates for the CRL (PKI#); write devices (the transition and its audit record), their
# certificates' items (CERT#) and the CA's CRL and revocations (PKI#).
ROTATION_EVENTS_READ_ACTIONS = ("dynamodb:GetItem",)
ROTATION_EVENTS_QUERY_PARTITIONS = ("PKI#*",)
ROTATION_EVENTS_PUT_PARTITIONS = ("CERT#*", "DEVICE#*", "PKI#*")
ROTATION_EVENTS_UPDATE_PARTITIONS = ("CERT#*", "DEVICE#*", "PKI#*")
# The previous CRL's chunks, deleted when the next is published.
ROTATION_EVENTS_DELETE_PARTITIONS = ("PKI#*",)
# The issuing CA (rotation: `pki init` / `pki csr` / `pki install` and every issued certificate):
# its registration with AWS IoT (no resource-level permissions) and the new certificates'.
ROTATION_CA_REGISTRATION_ACTIONS = ("iot:GetRegistrationCode", "iot:RegisterCACertificate")
ISSUE_CERTIFICATE_STAR_ACTIONS = ("iot:RegisterCertificate",)
# A new certificate bound to the device's profile policy and thing, then read back (cert/*).
ISSUE_CERTIFICATE_ACTIONS = ("iot:AttachPolicy", "iot:DescribeCertificate", "iot:UpdateCertificate")
# A commit deactivates the old certificate; a rollback and a retired certificate's deletion (the
# sweep), and a registration that finds its rotation rolled back meanwhile (rotation), take a
# certificate out of AWS IoT in the order AWS IoT requires (out of ACTIVE, policies and things
# detached, deleted). All on the certificate (cert/*); DetachThingPrincipal with the thing's
# condition, beside.
RETIRE_CERTIFICATE_ACTIONS = (
    "iot:DescribeCertificate",
    "iot:UpdateCertificate",
    "iot:ListAttachedPolicies",
    "iot:DetachPolicy",
    "iot:ListPrincipalThings",
    "iot:DeleteCertificate",
)
# The issuing CA's public key, read through IAM (the CA key's policy delegates to the account's
# IAM); kms:Sign is granted by the key policy alone, as for token keys: `_grant_issuing_ca_keys`.
ISSUING_CA_KEY_READ_ACTIONS = ("kms:GetPublicKey",)


class FleetkeyStack(Stack):
    """Attributes: `rotation_config`, `data`, `token_keys`, `data_keys`, `iot`, `layer`, `api`
    (with the operator roles: `api.operator_roles`), `lifecycle`, `functions`,
    `registration_rule`, `tamper_rule`, `presence_rule`, `schedules`, `monitoring` (the alarms,
    their SNS topic and the lifecycle dashboard), `est_domain` (None without EST's configuration),
    `stage` (StageConfig), `api_domain` (ApiDomain; None without the API's custom domain).
    `name_prefix` (the stage's unless given) names the AWS IoT resources, the operator roles
    (`<name_prefix>-fleet-admin`, `-release`, `-auditor`), the functions' Powertools services and
    the WAF metrics (fleetkey_infra.stage)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        layer_dir: Path | None = None,
        name_prefix: str | None = None,
        stage: StageConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        Tags.of(self).add("project", constants.PROJECT_TAG)
        self.stage = stage or StageConfig.from_context(self.node.try_get_context)
        if self.stage.stage:
            Tags.of(self).add(constants.STAGE_TAG, self.stage.stage)
        name_prefix = name_prefix or self.stage.name_prefix
        self.name_prefix = name_prefix
        self.rotation_config = RotationConfig.from_context(self.node.try_get_context)
        self.registration_config = RegistrationConfig.from_context(self.node.try_get_context)
        api_domain = ApiDomainConfig.from_context(self.node.try_get_context)

        self.data = Data(self, "Data")
        self.token_keys = TokenKeys(self, "TokenKeys")
        self.data_keys = DataKeys(self, "DataKeys")
        self.iot = IotResources(self, "Iot", name_prefix=name_prefix)
        self.layer = CoreLayer(self, "CoreLayer", directory=layer_dir or self._layer_dir())
        # The API first: its base URL is the functions' issuer; the routes follow the functions.
        self.api = Api(
            self,
            "Api",
            name_prefix=name_prefix,
            rest_api_name=self.stage.rest_api_name,
            issuer=api_domain.issuer if api_domain else None,
        )
        # The queue before the functions: its URL is in their environment.
        self.lifecycle = LifecycleQueue(self, "Lifecycle")
        self.functions = Functions(
            self,
            "Functions",
            layer=self.layer.layer,
            table_name=self.data.table.table_name,
            issuer=self.api.issuer,
            token_key_id=self.token_keys.key.key_id,
            lifecycle_queue_url=self.lifecycle.queue.queue_url,
            data_key_id=self.data_keys.key.key_id,
            name_prefix=name_prefix,
            rotation_commit_seconds=self.rotation_config.commit_seconds,
            renewal_rate_per_minute=self.rotation_config.renewal_rate_per_minute,
            registration_concurrency=self.registration_config.reserved_concurrency,
        )
        self.api.add_routes(
            admin=self.functions.admin,
            token=self.functions.token,
            discovery=self.functions.discovery,
            introspect=self.functions.introspect,
            data_keys=self.functions.data_keys,
            rotation=self.functions.rotation,
            validations=self.functions.validations,
        )
        est = self.rotation_config.est
        self.est_domain = EstDomain(self, "Est", api=self.api.api, config=est) if est else None
        self.api_domain = None
        if api_domain:
            self.api_domain = ApiDomain(self, "ApiDomain", api=self.api.api, config=api_domain)
        self.lifecycle.consume(self.functions.converge)
        self.registration_rule = RegistrationRule(
            self, "RegistrationRule", function=self.functions.registration
        )
        self.tamper_rule = TamperRule(self, "TamperRule", function=self.functions.device_events)
        self.presence_rule = PresenceRule(
            self, "PresenceRule", function=self.functions.rotation_events
        )
        self.schedules = Schedules(
            self,
            "Schedules",
            maintenance=self.functions.maintenance,
            rotation_sweep=self.functions.rotation_events,
        )
        # Alarms on all of the above to an SNS topic, and the lifecycle dashboard.
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            functions=self.functions,
            api=self.api,
            lifecycle=self.lifecycle,
            rules=(self.registration_rule, self.tamper_rule, self.presence_rule),
            schedules=self.schedules,
        )
        # What `fleetkey redrive` calls, with an operator's own credentials: docs/runbook-redrive.md
        self.redrive_policy = RedrivePolicy(
            self,
            "RedrivePolicy",
            name_prefix=name_prefix,
            failure_queues=[
                self.lifecycle.dead_letters,
                self.functions.registration_failures,
                self.functions.device_event_failures,
                self.functions.rotation_event_failures,
                self.registration_rule.errors,
                self.tamper_rule.errors,
                self.presence_rule.errors,
                self.schedules.dead_letters,
                self.schedules.rotation_sweep_dead_letters,
            ],
            lifecycle_queue=self.lifecycle.queue,
            functions=[
                self.functions.registration,
                self.functions.device_events,
                self.functions.rotation_events,
                self.functions.maintenance,
            ],
        )

        self._grant_registration(self.functions.registration_role)
        self._grant_admin(self.functions.admin_role)
        self._grant_token(self.functions.token_role)
        self._grant_discovery(self.functions.discovery_role)
        self._grant_introspect(self.functions.introspect_role)
        self._grant_maintenance(self.functions.maintenance_role)
        self._grant_converge(self.functions.converge_role)
        self._grant_device_events(self.functions.device_events_role)
        self._grant_data_keys(self.functions.data_keys_role)
        self._grant_rotation(self.functions.rotation_role)
        self._grant_rotation_events(self.functions.rotation_events_role)
        self._grant_validations(self.functions.validations_role)
        # What IAM does not grant, the signing keys' policy does (the document rotation writes).
        self.token_keys.set_policy(
            self.functions.token_role, self.functions.token_key_retirer_roles
        )
        self._protect_keys()
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
        """Every KMS key of this account and region (always narrowed by `_token_key_conditions`)."""
        return self.format_arn(
            service="kms",
            resource="key",
            resource_name="*",
            arn_format=ArnFormat.SLASH_RESOURCE_NAME,
        )

    def _token_signing_tag(self, prefix: str) -> dict[str, str]:
        """`{<prefix>/fleetkey:purpose: token-signing:<stack name>}`: `aws:ResourceTag` (the key
        carries the tag) or `aws:RequestTag` (the request sets it)."""
        return {
            f"{prefix}/{key}": value for key, value in token_signing_tags(self.stack_name).items()
        }

    @staticmethod
    def _token_key_shape() -> dict[str, str]:
        """A P-256 signing key, material generated by KMS: what every token key is, and the
        table's key (symmetric) is not. Both condition keys apply to CreateKey (the request's
        values) and to operations on an existing key (the key's)."""
        return {
            "kms:KeySpec": constants.TOKEN_KEY_SPEC,
            "kms:KeyUsage": constants.TOKEN_KEY_USAGE,
            "kms:KeyOrigin": constants.TOKEN_KEY_ORIGIN,
        }

    @staticmethod
    def _single_region() -> dict[str, dict[str, str]]:
        """`kms:MultiRegion` is a Boolean condition key."""
        return {"Bool": {"kms:MultiRegion": "false"}}

    def _token_key_conditions(self) -> dict[str, dict[str, str]]:
        """An existing key this stack signs tokens with: its tag names this stack, and it is a
        P-256 signing key."""
        return {
            "StringEquals": {
                **self._token_signing_tag("aws:ResourceTag"),
                **self._token_key_shape(),
            },
            **self._single_region(),
        }

    def _grant_table_items(
        self,
        role: iam.IRole,
        actions: tuple[str, ...] = TABLE_ITEM_ACTIONS,
        key_actions: tuple[str, ...] = TABLE_KEY_ACTIONS,
        *,
        sid: str = "TableItems",
        leading_keys: tuple[str, ...] = (),
    ) -> None:
        """`actions` on the table; with `leading_keys`, only on items whose partition key matches
        one of them (dynamodb:LeadingKeys, checked per item, transactions included)."""
        table: dynamodb.ITable = self.data.table
        conditions = (
            {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": list(leading_keys)}}
            if leading_keys
            else None
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid=sid, actions=list(actions), resources=[table.table_arn], conditions=conditions
            )
        )
        if key_actions:
            key: kms.IKey = self.data.key
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="TableKey", actions=list(key_actions), resources=[key.key_arn]
                )
            )

    def _grant_token_keys(
        self, role: iam.IRole, sid: str, actions: tuple[str, ...] = TOKEN_KEY_CONFIRM_ACTIONS
    ) -> None:
        """`actions` (read-only: confirming a key) on this stack's token signing keys only (tag,
        spec, usage, origin and single-Region conditions)."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid=sid,
                actions=list(actions),
                resources=[self._kms_keys_arn()],
                conditions=self._token_key_conditions(),
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "Token signing keys are created by rotation at run time, their ids unknown at deploy "
            "time: the key/* statements apply only to keys tagged fleetkey:purpose=token-signing:"
            "<this stack> that are ECC_NIST_P256 SIGN_VERIFY keys (aws:ResourceTag, kms:KeySpec, "
            "kms:KeyUsage, kms:KeyOrigin, kms:MultiRegion conditions), and only read them; "
            "TagResource only sets that tag on such a key. Sign and ScheduleKeyDeletion are "
            "granted by each key's own policy, not here.",
        )

    def _grant_registration(self, role: iam.IRole) -> None:
        """JITR: read the certificate, create (or take over) the thing, bind certificate, policy
        and thing, then activate (or revoke) the certificate. Resource types are those of the
        Service Authorization Reference (see infra/README.md)."""
        self._grant_table_items(role)
        certificates = self._iot_arn("cert")
        things = self._iot_arn("thing")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="Certificates",
                actions=list(REGISTRATION_CERTIFICATE_ACTIONS + SET_ASIDE_CERTIFICATE_ACTIONS),
                resources=[certificates],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="Things",
                actions=list(REGISTRATION_THING_ACTIONS),
                resources=[things],
            )
        )
        # Attach/DetachThingPrincipal are authorized on the certificate; the thing is the
        # iot:thingArn condition (this account's and region's things).
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ThingPrincipals",
                actions=["iot:AttachThingPrincipal", "iot:DetachThingPrincipal"],
                resources=[certificates],
                conditions={"ArnLike": {"iot:thingArn": things}},
            )
        )
        # AttachPolicy is authorized on the target (the certificate) only: the reference lists
        # no policy resource and no condition key naming the policy, so IAM cannot limit which
        # policy is attached (the code attaches only its profiles' policies: infra/README.md,
        # `iot:AttachPolicy`, and docs/security-model.md#not-proven-here).
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CertificatePolicies", actions=["iot:AttachPolicy"], resources=[certificates]
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "JITR handles certificates it has never seen: the id arrives in the registration "
            "event, so the grant covers this account's and region's certificates, and only "
            "Describe/UpdateCertificate, AttachPolicy and Attach/DetachThingPrincipal on them, "
            "and the removal of a certificate set aside for a decommissioned device "
            "(List/DetachPolicy, ListPrincipalThings, DeleteCertificate).",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:thing/*"),
            "Things are created at registration under the device id from the allow-list, not "
            "known at deploy time; the grant is limited to Create/UpdateThing and "
            "ListThingPrincipals in this account and region (no DeleteThing).",
        )
        self._acknowledge_tracing(role)

    def _grant_admin(self, role: iam.IRole) -> None:
        """Operators: allow-list and device records in the table, manufacturer CA registration,
        token signing-key rotation (create a key of this stack, confirm it) and retirement
        (schedule the deletion of a key of this stack)."""
        self._grant_table_items(role, ADMIN_TABLE_ACTIONS)
        only_the_purpose_tag = {
            "ForAllValues:StringEquals": {"aws:TagKeys": [constants.TOKEN_SIGNING_TAG_KEY]}
        }
        creates_a_token_key = {
            **self._token_signing_tag("aws:RequestTag"),
            **self._token_key_shape(),
        }
        # CreateKey has no resource before the key exists. It is allowed only for a single-Region
        # P-256 signing key of KMS-generated material whose request tags it for this stack, and
        # with no other tag.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CreateTokenKeys",
                actions=["kms:CreateKey"],
                resources=["*"],
                conditions={
                    "StringEquals": creates_a_token_key,
                    **self._single_region(),
                    **only_the_purpose_tag,
                },
            )
        )
        # CreateKey with Tags also needs TagResource on keys (KMS asks it of an IAM policy). It
        # sets exactly this stack's tag, only on a P-256 signing key (never on the table's key,
        # nor any other kind), and never re-tags a key that carries another purpose tag value
        # (another stack's signing key). It can still tag a P-256 key of the account that carries
        # no purpose tag at all (KMS cannot tell CreateKey's implied TagResource from a later
        # one): that gains nothing, as no IAM grant of this stack signs with or deletes a key,
        # and such a key's policy is not fleetkey's (it is never trusted).
        # The key's shape conditions are IfExists: on an existing key KMS always supplies them
        # (so the table's key and other kinds stay out of reach), while for the TagResource that
        # CreateKey implies AWS does not document that they are supplied; CreateKey itself is
        # conditioned on them, so a rotation cannot be refused by a missing context key.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TagTokenKeys",
                actions=["kms:TagResource"],
                resources=[self._kms_keys_arn()],
                conditions={
                    "StringEquals": self._token_signing_tag("aws:RequestTag"),
                    "StringEqualsIfExists": {
                        **self._token_signing_tag("aws:ResourceTag"),
                        **self._token_key_shape(),
                    },
                    "BoolIfExists": {"kms:MultiRegion": "false"},
                    **only_the_purpose_tag,
                },
            )
        )
        # Confirming the keys it creates and lists; their deletion (retirement, or the undo of a
        # refused rotation) is granted by their key policy.
        self._grant_token_keys(role, "ConfirmTokenKeys")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CaRegistration",
                actions=list(ADMIN_CA_REGISTRATION_ACTIONS),
                resources=["*"],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CaCertificates",
                actions=list(ADMIN_CA_CERTIFICATE_ACTIONS),
                resources=[self._iot_arn("cacert")],
            )
        )
        # Suspend and resume; decommission queues the teardown for converge; recommission first
        # removes the factory certificate from AWS IoT, whatever it holds for it.
        self._grant_suspend(role)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RecommissionCertificates",
                actions=list(SET_ASIDE_CERTIFICATE_ACTIONS),
                resources=[self._iot_arn("cert")],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RecommissionThingPrincipals",
                actions=["iot:DetachThingPrincipal"],
                resources=[self._iot_arn("cert")],
                conditions={"ArnLike": {"iot:thingArn": self._iot_arn("thing")}},
            )
        )
        self._grant_lifecycle_queue(role)
        acknowledge(
            role,
            wildcard_resource("*"),
            "iot:GetRegistrationCode and iot:RegisterCACertificate do not support resource-level "
            "permissions (the CA does not exist before it is registered), nor does kms:CreateKey "
            "(allowed only for ECC_NIST_P256 SIGN_VERIFY keys tagged for this stack), nor "
            "iot:DescribeEndpoint (the account's iot-data endpoint, read once per process); "
            "X-Ray's PutTraceSegments/PutTelemetryRecords, added by active tracing, do not either.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cacert/*"),
            "Manufacturer CAs are registered by operators at run time, their ids unknown at "
            "deploy time; only UpdateCACertificate is granted on them.",
        )

    def _grant_token(self, role: iam.IRole) -> None:
        """Devices' tokens: read devices, challenges and the registry; write only its own items
        (put JTI#, NONCE#; delete NONCE#) and the validations a device answers (update
        VALIDATION#); check devices and firmware releases in the jti's transaction; confirm this
        stack's token keys. It signs with them by their key policy, which lets no other principal
        sign."""
        self._grant_table_items(role, TOKEN_READ_ACTIONS, TABLE_KEY_ACTIONS, sid="TableReads")
        self._grant_table_items(
            role,
            ("dynamodb:PutItem",),
            (),
            sid="PutOwnItemsOnly",
            leading_keys=TOKEN_PUT_PARTITIONS,
        )
        self._grant_table_items(
            role,
            ("dynamodb:DeleteItem",),
            (),
            sid="DeleteChallengesOnly",
            leading_keys=TOKEN_DELETE_PARTITIONS,
        )
        self._grant_table_items(
            role,
            ("dynamodb:ConditionCheckItem",),
            (),
            sid="CheckDevicesAndReleasesOnly",
            leading_keys=TOKEN_CHECK_PARTITIONS,
        )
        self._grant_table_items(
            role,
            ("dynamodb:UpdateItem",),
            (),
            sid="DecideValidationsOnly",
            leading_keys=TOKEN_UPDATE_PARTITIONS,
        )
        self._grant_token_keys(role, "ConfirmTokenKeys")
        self._acknowledge_tracing(role)

    def _grant_discovery(self, role: iam.IRole) -> None:
        """JWKS and metadata: read the signing-key registry, each key confirmed with KMS."""
        self._grant_table_items(role, READ_TABLE_ACTIONS, READ_TABLE_KEY_ACTIONS)
        self._grant_token_keys(role, "ConfirmTokenKeys")
        self._acknowledge_tracing(role)

    def _grant_introspect(self, role: iam.IRole) -> None:
        """Introspection: read the registry (each key confirmed with KMS), the device and the
        revocation list."""
        self._grant_table_items(role, READ_TABLE_ACTIONS, READ_TABLE_KEY_ACTIONS)
        self._grant_token_keys(role, "ConfirmTokenKeys")
        self._acknowledge_tracing(role)

    def _grant_maintenance(self, role: iam.IRole) -> None:
        """Scheduled retirement of token signing keys: read and rewrite the signing-key registry
        (with its audit record, in the registry's partition only) and confirm its keys; the key
        policy lets it schedule the deletion of the ones it retires. No CreateKey, no Sign."""
        self._grant_table_items(
            role,
            MAINTENANCE_TABLE_ACTIONS,
            leading_keys=MAINTENANCE_WRITABLE_PARTITIONS,
        )
        self._grant_token_keys(role, "ConfirmTokenKeys")
        self._acknowledge_tracing(role)

    def _grant_suspend(self, role: iam.IRole) -> None:
        """Suspend and resume in AWS IoT: the device's certificates to INACTIVE (REVOKED is final)
        and back, its MQTT connection closed at once, the iot-data endpoint looked up."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="SuspendCertificates",
                actions=list(SUSPEND_CERTIFICATE_ACTIONS),
                resources=[self._iot_arn("cert")],
            )
        )
        self._grant_close_connections(role)
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "A suspension or resumption acts on the certificates of a device chosen at run time "
            "(recorded in its item): only Describe/UpdateCertificate (INACTIVE <-> ACTIVE) on "
            "this account's and region's certificates; no deletion.",
        )

    def _grant_iot_data_endpoint(self, role: iam.IRole) -> None:
        """iot:DescribeEndpoint, which finds the account's iot-data endpoint once per process (no
        resource-level permissions: '*')."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="IotDataEndpoint", actions=["iot:DescribeEndpoint"], resources=["*"]
            )
        )

    def _grant_command(self, role: iam.IRole, sid: str, topic: str) -> None:
        """iot-data Publish of one command (`topic`: fleetkey/*/commands/<command>) and the
        endpoint lookup it needs."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid=sid, actions=["iot:Publish"], resources=[self._iot_arn("topic", topic)]
            )
        )
        self._grant_iot_data_endpoint(role)

    def _grant_close_connections(self, role: iam.IRole) -> None:
        """iot-data DeleteConnection (authorized on the client id, the device id) and the
        DescribeEndpoint that finds the account's iot-data endpoint (no resource-level
        permissions: '*')."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CloseConnections",
                actions=["iot:DeleteConnection"],
                resources=[self._iot_arn("client")],
            )
        )
        self._grant_iot_data_endpoint(role)
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:client/*"),
            "The MQTT client id is the device id, chosen at run time: only iot:DeleteConnection "
            "(closing a suspended or decommissioned device's connection) on this account's and "
            "region's clients.",
        )

    def _grant_lifecycle_queue(self, role: iam.IRole) -> None:
        """Queue lifecycle work for converge (SQS-managed encryption: no KMS grant needed)."""
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="LifecycleQueue",
                actions=["sqs:SendMessage"],
                resources=[self.lifecycle.queue.queue_arn],
            )
        )

    def _grant_converge(self, role: iam.IRole) -> None:
        """Make AWS IoT match a device's recorded state: after decommission, the reset command,
        the connection closed and the teardown (certificates out of ACTIVE, policies and thing
        principals detached, certificates and thing deleted), then the data key destroyed (its
        item deleted, nothing else). Receiving from the lifecycle queue is granted by its event
        source (LifecycleQueue.consume)."""
        self._grant_lifecycle_table_items(role)
        self._grant_table_items(
            role,
            DATA_KEY_DESTROY_ACTIONS,
            (),
            sid="DestroyDataKeysOnly",
            leading_keys=DATA_KEY_PARTITIONS,
        )
        certificates = self._iot_arn("cert")
        things = self._iot_arn("thing")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TeardownCertificates",
                actions=list(TEARDOWN_CERTIFICATE_ACTIONS),
                resources=[certificates],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="TeardownThings", actions=list(TEARDOWN_THING_ACTIONS), resources=[things]
            )
        )
        # Authorized on the certificate; the thing is the iot:thingArn condition (as registration).
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DetachThingPrincipals",
                actions=["iot:DetachThingPrincipal"],
                resources=[certificates],
                conditions={"ArnLike": {"iot:thingArn": things}},
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ResetCommands",
                actions=["iot:Publish"],
                resources=[self._iot_arn("topic", RESET_COMMAND_TOPIC)],
            )
        )
        self._grant_close_connections(role)
        acknowledge(
            role,
            wildcard_resource("*"),
            "Only iot:DescribeEndpoint (the account's iot-data endpoint, read once per process) "
            "and X-Ray's PutTraceSegments/PutTelemetryRecords (active tracing) use '*': neither "
            "supports resource-level permissions.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "The teardown acts on the certificates of a decommissioned device, known only at run "
            "time (recorded in its item); the code deletes only certificates it recorded for that "
            "device, after taking them out of ACTIVE and detaching their policies and things.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:thing/*"),
            "The teardown deletes a decommissioned device's thing, named by its device id at run "
            "time: only Describe/DeleteThing and ListThingPrincipals on this account's and "
            "region's things.",
        )
        acknowledge(
            role,
            wildcard_resource(
                "arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:topic/"
                + RESET_COMMAND_TOPIC
            ),
            "The reset command goes to fleetkey/<device id>/commands/reset of the device being "
            "decommissioned, known at run time: only iot:Publish, and only on reset topics.",
        )

    def _grant_device_events(self, role: iam.IRole) -> None:
        """A device's tamper report: suspend it (device item and audit chain, certificates to
        INACTIVE, connection closed); it may queue lifecycle work."""
        self._grant_lifecycle_table_items(role)
        self._grant_suspend(role)
        self._grant_lifecycle_queue(role)
        acknowledge(
            role,
            wildcard_resource("*"),
            "Only iot:DescribeEndpoint (the account's iot-data endpoint, read once per process) "
            "and X-Ray's PutTraceSegments/PutTelemetryRecords (active tracing) use '*': neither "
            "supports resource-level permissions.",
        )

    def _grant_lifecycle_table_items(self, role: iam.IRole) -> None:
        """Read items; write only in devices' partitions (the device item and its audit chain)."""
        self._grant_table_items(role, LIFECYCLE_READ_ACTIONS, TABLE_KEY_ACTIONS, sid="TableReads")
        self._grant_table_items(
            role,
            LIFECYCLE_WRITE_ACTIONS,
            (),
            sid="DeviceWritesOnly",
            leading_keys=LIFECYCLE_WRITABLE_PARTITIONS,
        )

    def _grant_data_keys(self, role: iam.IRole) -> None:
        """Devices' data keys: read devices, certificates and data keys; write only the
        assertion's jti (consuming its challenge, checking the device), a life's first data key
        and its record in the device's chain; create and unwrap data keys with the data-key KMS
        key. No token signing key, no kms:Sign."""
        self._grant_table_items(role, DATA_KEYS_READ_ACTIONS, TABLE_KEY_ACTIONS, sid="TableReads")
        for sid, action, partitions in (
            ("PutOwnItemsOnly", "dynamodb:PutItem", DATA_KEYS_PUT_PARTITIONS),
            ("UpdateDevicesOnly", "dynamodb:UpdateItem", DATA_KEYS_UPDATE_PARTITIONS),
            ("CheckDevicesOnly", "dynamodb:ConditionCheckItem", DATA_KEYS_CHECK_PARTITIONS),
            ("DeleteChallengesOnly", "dynamodb:DeleteItem", DATA_KEYS_DELETE_PARTITIONS),
        ):
            self._grant_table_items(role, (action,), (), sid=sid, leading_keys=partitions)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DataKeyKey",
                actions=list(DATA_KEY_ACTIONS),
                resources=[self.data_keys.key.key_arn],
            )
        )
        self._acknowledge_tracing(role)

    # -- certificate rotation --------------------------------------------------------------------

    def _issuing_ca_tag(self, prefix: str) -> dict[str, str]:
        """`{<prefix>/fleetkey:purpose: issuing-ca:<stack name>}` (`aws:ResourceTag` or
        `aws:RequestTag`)."""
        return {f"{prefix}/{key}": value for key, value in issuing_ca_tags(self.stack_name).items()}

    @staticmethod
    def _issuing_ca_key_shape() -> dict[str, object]:
        """An ECC P-256 or P-384 signing key of KMS's own material: what every issuing CA key
        is (a list under StringEquals: any of them)."""
        return {
            "kms:KeySpec": list(constants.ISSUING_CA_KEY_SPECS),
            "kms:KeyUsage": constants.ISSUING_CA_KEY_USAGE,
            "kms:KeyOrigin": constants.ISSUING_CA_KEY_ORIGIN,
        }

    def _grant_issuing_ca_keys(self, role: iam.IRole, *, create: bool) -> None:
        """Read (DescribeKey, GetPublicKey) this stack's issuing CA keys: `key/*` tagged
        `issuing-ca:<stack>`, of the CA's shape, single-Region. With `create`, also create such a
        key (CreateKey with that tag and no other) and the TagResource that CreateKey with tags
        implies, conditioned as the admin role's token-key pair is.

        No kms:Sign here: the key policy the rotation function writes on the CA key names the
        signer roles (FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS) and lets them sign. An IAM grant on
        tagged keys would reach any ECC signing key of the account whose policy delegates to IAM
        once it carried the tag, and the rotation role can set that tag on an untagged key (KMS
        cannot tell CreateKey's implied TagResource from a later one)."""
        if create:
            only_the_purpose_tag = {
                "ForAllValues:StringEquals": {"aws:TagKeys": list(issuing_ca_tags(self.stack_name))}
            }
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="CreateIssuingCaKeys",
                    actions=["kms:CreateKey"],
                    resources=["*"],
                    conditions={
                        "StringEquals": {
                            **self._issuing_ca_tag("aws:RequestTag"),
                            **self._issuing_ca_key_shape(),
                        },
                        **self._single_region(),
                        **only_the_purpose_tag,
                    },
                )
            )
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="TagIssuingCaKeys",
                    actions=["kms:TagResource"],
                    resources=[self._kms_keys_arn()],
                    conditions={
                        "StringEquals": self._issuing_ca_tag("aws:RequestTag"),
                        "StringEqualsIfExists": {
                            **self._issuing_ca_tag("aws:ResourceTag"),
                            **self._issuing_ca_key_shape(),
                        },
                        "BoolIfExists": {"kms:MultiRegion": "false"},
                        **only_the_purpose_tag,
                    },
                )
            )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="ReadIssuingCaKeys",
                actions=list(ISSUING_CA_KEY_READ_ACTIONS),
                resources=[self._kms_keys_arn()],
                conditions={
                    "StringEquals": {
                        **self._issuing_ca_tag("aws:ResourceTag"),
                        **self._issuing_ca_key_shape(),
                    },
                    **self._single_region(),
                },
            )
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:kms:<AWS::Region>:<AWS::AccountId>:key/*"),
            "The issuing CA's keys are created at run time (pki init / pki csr), their ids "
            "unknown at deploy time: the key/* statements apply only to keys tagged "
            "fleetkey:purpose=issuing-ca:<this stack> that are ECC_NIST_P256/P384 SIGN_VERIFY keys "
            "of KMS material, single-Region (aws:ResourceTag, kms:KeySpec, kms:KeyUsage, "
            "kms:KeyOrigin, kms:MultiRegion conditions), and only read them; TagResource only sets "
            "that tag on such a key. kms:Sign is granted by each key's own policy, not here.",
        )

    def _grant_retire_certificates(self, role: iam.IRole) -> None:
        """Take certificates out of AWS IoT (deactivate, detach policies and things, delete)."""
        certificates = self._iot_arn("cert")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RetireCertificates",
                actions=list(RETIRE_CERTIFICATE_ACTIONS),
                resources=[certificates],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DetachThingPrincipals",
                actions=["iot:DetachThingPrincipal"],
                resources=[certificates],
                conditions={"ArnLike": {"iot:thingArn": self._iot_arn("thing")}},
            )
        )

    def _grant_issue_certificates(self, role: iam.IRole) -> None:
        """Register a certificate fleetkey issued with AWS IoT (no resource-level permissions),
        attach the device's profile policy and thing to it (authorized on the certificate: see
        `_grant_registration`), read it back and set its status."""
        certificates = self._iot_arn("cert")
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="RegisterIssuedCertificates",
                actions=list(ISSUE_CERTIFICATE_STAR_ACTIONS),
                resources=["*"],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="AttachThingPrincipals",
                actions=["iot:AttachThingPrincipal"],
                resources=[certificates],
                conditions={"ArnLike": {"iot:thingArn": self._iot_arn("thing")}},
            )
        )

    def _grant_rotation_table_items(
        self,
        role: iam.IRole,
        reads: tuple[str, ...],
        grants: tuple[tuple[str, str, tuple[str, ...]], ...],
    ) -> None:
        """`reads` on the table (+ its key), then each (sid, action, partitions) conditioned on
        dynamodb:LeadingKeys."""
        self._grant_table_items(role, reads, TABLE_KEY_ACTIONS, sid="TableReads")
        for sid, action, partitions in grants:
            self._grant_table_items(role, (action,), (), sid=sid, leading_keys=partitions)

    def _grant_rotation(self, role: iam.IRole) -> None:
        """Certificate rotation behind the API: read items; write the assertion's jti, the
        device's pending certificate with its audit record, the issued certificate's and key's
        items and the CA's (PKI#); create and read the issuing CA's key (signing is the key
        policy's); register the CA and the certificates it issues with AWS IoT and bind them to
        the device's policy and thing; queue lifecycle work."""
        self._grant_rotation_table_items(
            role,
            ROTATION_READ_ACTIONS,
            (
                ("QueryPkiOnly", "dynamodb:Query", ROTATION_QUERY_PARTITIONS),
                ("PutOwnItemsOnly", "dynamodb:PutItem", ROTATION_PUT_PARTITIONS),
                ("UpdateOwnItemsOnly", "dynamodb:UpdateItem", ROTATION_UPDATE_PARTITIONS),
                (
                    "CheckDevicesAndKeysOnly",
                    "dynamodb:ConditionCheckItem",
                    ROTATION_CHECK_PARTITIONS,
                ),
                ("DeleteChallengesOnly", "dynamodb:DeleteItem", ROTATION_DELETE_PARTITIONS),
            ),
        )
        self._grant_issuing_ca_keys(role, create=True)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="CaRegistration",
                actions=list(ROTATION_CA_REGISTRATION_ACTIONS),
                resources=["*"],
            )
        )
        self._grant_issue_certificates(role)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="IssuedCertificates",
                actions=list(ISSUE_CERTIFICATE_ACTIONS),
                resources=[self._iot_arn("cert")],
            )
        )
        # A registration that finds its rotation rolled back (and the certificate removed)
        # meanwhile takes the certificate it just registered out again.
        self._grant_retire_certificates(role)
        self._grant_lifecycle_queue(role)
        acknowledge(
            role,
            wildcard_resource("*"),
            "iot:GetRegistrationCode, iot:RegisterCACertificate and iot:RegisterCertificate do "
            "not support resource-level permissions (the certificate does not exist before it is "
            "registered), nor does kms:CreateKey (allowed only for ECC P-256/P-384 SIGN_VERIFY "
            "keys tagged as this stack's issuing CA); X-Ray's PutTraceSegments/"
            "PutTelemetryRecords, added by active tracing, do not either.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "A certificate fleetkey issues is registered at run time, its id (the SHA-256 of its "
            "DER) unknown before: only Describe/UpdateCertificate, AttachPolicy and "
            "Attach/DetachThingPrincipal (iot:thingArn of this account's and region's things) "
            "on this account's and region's certificates; no deletion.",
        )

    def _grant_rotation_events(self, role: iam.IRole) -> None:
        """The presence commit and the sweep: read items and the `due` index; write devices,
        certificates' items and the CRL; read the issuing CA's key (signing the CRL is the key
        policy's); in AWS IoT, deactivate, detach and delete retired certificates (and bind a
        certificate as a commit or rollback requires); send renewal commands; queue lifecycle
        work."""
        self._grant_rotation_table_items(
            role,
            ROTATION_EVENTS_READ_ACTIONS,
            (
                ("QueryPkiOnly", "dynamodb:Query", ROTATION_EVENTS_QUERY_PARTITIONS),
                ("PutOwnItemsOnly", "dynamodb:PutItem", ROTATION_EVENTS_PUT_PARTITIONS),
                ("UpdateOwnItemsOnly", "dynamodb:UpdateItem", ROTATION_EVENTS_UPDATE_PARTITIONS),
                ("DeleteOldCrlChunks", "dynamodb:DeleteItem", ROTATION_EVENTS_DELETE_PARTITIONS),
            ),
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="DueIndexes",
                actions=["dynamodb:Query"],
                resources=[self.data.due_index_arn, self.data.renewal_index_arn],
            )
        )
        self._grant_issuing_ca_keys(role, create=False)
        self._grant_retire_certificates(role)
        self._grant_command(role, "RotateCommands", constants.ROTATE_COMMAND_TOPIC)
        self._grant_lifecycle_queue(role)
        acknowledge(
            role,
            wildcard_resource("*"),
            "iot:DescribeEndpoint (the account's iot-data endpoint, read once per process) and "
            "X-Ray's PutTraceSegments/PutTelemetryRecords (active tracing) use '*': neither "
            "supports resource-level permissions.",
        )
        acknowledge(
            role,
            wildcard_resource("arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:cert/*"),
            "A commit, a rollback and a retired certificate's deletion act on the certificates "
            "recorded for a device chosen at run time (its pending, current and retired ones): "
            "only the calls that take a certificate out of AWS IoT in the order it requires "
            "(Update, ListAttachedPolicies, DetachPolicy, ListPrincipalThings, "
            "DetachThingPrincipal, DeleteCertificate), on this account's and region's "
            "certificates.",
        )
        acknowledge(
            role,
            wildcard_resource(
                "arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:topic/"
                + constants.ROTATE_COMMAND_TOPIC
            ),
            "The renewal command goes to fleetkey/<device id>/commands/rotate of a device due "
            "for renewal, known at run time: only iot:Publish, and only on rotate topics.",
        )

    def _grant_validations(self, role: iam.IRole) -> None:
        """Relying parties' validations: read the device and the validation; write only
        validations (VALIDATION#); publish the command on the device's validate topic (iot-data,
        its endpoint looked up once per process). No token key: the token function issues the
        validation's token."""
        self._grant_table_items(role, VALIDATIONS_READ_ACTIONS, TABLE_KEY_ACTIONS, sid="TableReads")
        self._grant_table_items(
            role,
            VALIDATIONS_WRITE_ACTIONS,
            (),
            sid="ValidationWritesOnly",
            leading_keys=VALIDATIONS_WRITABLE_PARTITIONS,
        )
        self._grant_command(role, "ValidateCommands", constants.VALIDATE_COMMAND_TOPIC)
        acknowledge(
            role,
            wildcard_resource("*"),
            "iot:DescribeEndpoint (the account's iot-data endpoint, read once per process) and "
            "X-Ray's PutTraceSegments/PutTelemetryRecords (active tracing) use '*': neither "
            "supports resource-level permissions.",
        )
        acknowledge(
            role,
            wildcard_resource(
                "arn:<AWS::Partition>:iot:<AWS::Region>:<AWS::AccountId>:topic/"
                + constants.VALIDATE_COMMAND_TOPIC
            ),
            "The validate command goes to fleetkey/<device id>/commands/validate of the device a "
            "relying party names, known at run time: only iot:Publish, and only on validate "
            "topics.",
        )

    def _protect_keys(self) -> None:
        """The table's key policy and the data-key key's deny every function role the key's
        management."""
        roles = self.functions.roles
        self.data.deny_key_management(roles)
        self.data_keys.deny_key_management(roles)

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
        CfnOutput(
            self,
            "AlarmTopicArn",
            value=self.monitoring.topic.topic.topic_arn,
            description="Every alarm notifies this SNS topic: subscribe the operators to it "
            "(context alarmEmail subscribes one address); docs/runbook.md",
        )
        CfnOutput(self, "DashboardName", value=self.monitoring.dashboard.dashboard_name)
        CfnOutput(
            self,
            "RedrivePolicyArn",
            value=self.redrive_policy.policy.managed_policy_arn,
            description="Attach to the role or permission set of the operators who run "
            "`fleetkey redrive` (docs/runbook-redrive.md)",
        )
        CfnOutput(self, "ApiUrl", value=self.api.url)
        CfnOutput(self, "Issuer", value=self.api.issuer)
        CfnOutput(self, "TokenSigningKeyId", value=self.token_keys.key.key_id)
        CfnOutput(self, "RegistrationFunctionName", value=self.functions.registration.function_name)
        CfnOutput(
            self,
            "RegistrationRetryQueueUrl",
            value=self.functions.registration_retries.queue.queue_url,
            description="Failed registrations wait here and are retried by the registration "
            "function itself; docs/load.md",
        )
        CfnOutput(
            self,
            "RegistrationFailureQueueUrl",
            value=self.functions.registration_failures.queue_url,
        )
        CfnOutput(
            self, "RegistrationRuleErrorQueueUrl", value=self.registration_rule.errors.queue_url
        )
        CfnOutput(self, "MaintenanceFunctionName", value=self.functions.maintenance.function_name)
        CfnOutput(
            self,
            "MaintenanceDeadLetterQueueUrl",
            value=self.schedules.dead_letters.queue_url,
        )
        CfnOutput(self, "LifecycleQueueUrl", value=self.lifecycle.queue.queue_url)
        CfnOutput(self, "LifecycleDeadLetterQueueUrl", value=self.lifecycle.dead_letters.queue_url)
        CfnOutput(self, "ConvergeFunctionName", value=self.functions.converge.function_name)
        CfnOutput(
            self, "DeviceEventsFunctionName", value=self.functions.device_events.function_name
        )
        CfnOutput(
            self,
            "DeviceEventFailureQueueUrl",
            value=self.functions.device_event_failures.queue_url,
        )
        CfnOutput(self, "TamperRuleErrorQueueUrl", value=self.tamper_rule.errors.queue_url)
        CfnOutput(self, "RotationFunctionName", value=self.functions.rotation.function_name)
        CfnOutput(
            self, "RotationEventsFunctionName", value=self.functions.rotation_events.function_name
        )
        CfnOutput(
            self,
            "RotationEventFailureQueueUrl",
            value=self.functions.rotation_event_failures.queue_url,
        )
        CfnOutput(self, "PresenceRuleErrorQueueUrl", value=self.presence_rule.errors.queue_url)
        CfnOutput(
            self,
            "RotationSweepDeadLetterQueueUrl",
            value=self.schedules.rotation_sweep_dead_letters.queue_url,
        )
        if self.est_domain is not None:
            CfnOutput(
                self,
                "EstDomainTarget",
                value=self.est_domain.domain.domain_name_alias_domain_name,
                description="Point EST's DNS name at this (CNAME, or an alias record with "
                "EstDomainHostedZoneId)",
            )
            CfnOutput(
                self,
                "EstDomainHostedZoneId",
                value=self.est_domain.domain.domain_name_alias_hosted_zone_id,
            )
        if self.api_domain is not None:
            CfnOutput(
                self,
                "ApiDomainTarget",
                value=self.api_domain.domain.domain_name_alias_domain_name,
                description="Point the issuer's DNS name at this (CNAME, or an alias record with "
                "ApiDomainHostedZoneId)",
            )
            CfnOutput(
                self,
                "ApiDomainHostedZoneId",
                value=self.api_domain.domain.domain_name_alias_hosted_zone_id,
            )
        CfnOutput(
            self,
            "NamePrefix",
            value=self.name_prefix,
            description="Prefix of this stack's AWS IoT policies and thing types, operator roles "
            "and metrics' service dimension",
        )
        add_retained_resources_output(self)
        CfnOutput(self, "ValidationsFunctionName", value=self.functions.validations.function_name)
        for name, role in self.api.operator_roles.roles.items():
            CfnOutput(
                self,
                "".join(word.title() for word in name.split("-")) + "RoleArn",
                value=role.role_arn,
                description=f"Assume for the admin API as {name}",
            )
        CfnOutput(self, "DataKeyId", value=self.data_keys.key.key_id)
        CfnOutput(self, "DataKeyAlias", value=self.data_keys.alias.alias_name)
        CfnOutput(
            self,
            "DataKeyDecryptPolicyArn",
            value=self.data_keys.backend_decrypt_policy.managed_policy_arn,
            description="Attach to the IAM-authenticated backend that decrypts devices' data keys",
        )
