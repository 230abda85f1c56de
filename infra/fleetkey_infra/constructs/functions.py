"""The Lambda functions: registration (JITR, invoked by an IoT rule), behind the API: admin
(operators), token (devices), discovery (JWKS and metadata, public), introspect (relying
parties) and data_keys (devices' data keys), maintenance (signing-key retirement, invoked by an
EventBridge schedule), converge (the lifecycle queue's consumer: teardown in AWS IoT),
device_events (a device's tamper report, invoked by an IoT rule), and certificate rotation:
rotation (behind the API: devices' rotation requests and commits, the CA and CRL, EST, the
operators' PKI routes) and rotation_events (a device's connection, by an IoT rule, and the
one-minute sweep, by an EventBridge schedule); and validations (behind the API: relying parties'
validation requests, a command to the device, and their results, long-polled).

Each function has its own role holding only what the function itself needs to run (writing to its
own log group; X-Ray comes with active tracing). What a function may do to the table, the key and
AWS IoT is granted by the composing stack, where the resources meet.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Duration, Fn, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_destinations as destinations
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.constructs.registration_retries import RegistrationRetries
from fleetkey_infra.dead_letters import dead_letter_queue
from fleetkey_infra.nag import acknowledge


class Functions(Construct):
    """Attributes: `registration`, `admin`, `token`, `discovery`, `introspect`, `maintenance`,
    `converge`, `device_events`, `data_keys`, `rotation`, `rotation_events` and `validations`
    (lambda.Function), each with its own role (`<name>_role`: iam.Role), and
    `registration_retries` (RegistrationRetries: the registration function's on-failure
    destination, consumed by the function itself), `registration_failures` (its dead-letter
    queue), `device_event_failures` and `rotation_event_failures` (sqs.Queue: the on-failure
    destinations of the device_events and rotation_events functions' asynchronous invocations).
    `registration_concurrency` is the registration function's reserved concurrency (None: none).

    `issuer` is the API's base URL (FLEETKEY_ISSUER: token `iss`, the `aud` of device
    assertions); `token_key_id` the first token signing key (FLEETKEY_TOKEN_KEY_ID). Every
    function that reads the signing-key registry (all but registration) gets the first key's id
    and the roles the key policy it trusts names: the token role (FLEETKEY_TOKEN_SIGNER_ROLE_ARN)
    and the admin and maintenance roles (FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS, comma-separated);
    every function gets the stack's name (FLEETKEY_STACK_NAME: its keys' tag value).
    `lifecycle_queue_url` (FLEETKEY_LIFECYCLE_QUEUE_URL) goes to the functions that queue or do
    lifecycle work (admin, device_events, converge); `data_key_id` (FLEETKEY_DATA_KEY_ID, the
    data-key KMS key) to the functions that issue or hand out data keys (data_keys, admin).

    Both rotation functions get the issuer (the assertions' audience; the CRL distribution point
    `{issuer}/v1/pki/crl` in every certificate), the lifecycle queue, `rotation_commit_seconds`
    (FLEETKEY_ROTATION_COMMIT_SECONDS), `renewal_rate_per_minute`
    (FLEETKEY_RENEWAL_RATE_PER_MINUTE) and the roles the issuing CA key's policy lets sign
    (FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS: their own two roles, comma-separated): the same
    settings in both, so that neither acts on a default the other does not share.

    validations gets the issuer (the tokens a validation yields are the issuer's) and no signing
    key: the token function issues the token, the validations function stores and returns it.

    `name_prefix` (FLEETKEY_NAME_PREFIX: the AWS IoT policies and thing types the functions
    attach and own) also makes each function's Powertools service, `<name_prefix>-<function>`
    (POWERTOOLS_SERVICE_NAME: the `service` dimension of every metric it emits, and the service
    of its logs and traces): `fleetkey-registration` and so on unstaged, `fleetkey-<stage>-...`
    in a stage, so that two stages' metrics never add up. `service_name(function)` reads it back.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        layer: lambda_.ILayerVersion,
        table_name: str,
        issuer: str,
        token_key_id: str,
        lifecycle_queue_url: str,
        data_key_id: str,
        name_prefix: str = constants.NAME_PREFIX,
        rotation_commit_seconds: int = constants.DEFAULT_ROTATION_COMMIT_SECONDS,
        renewal_rate_per_minute: int = constants.DEFAULT_RENEWAL_RATE_PER_MINUTE,
        registration_concurrency: int | None = constants.DEFAULT_REGISTRATION_CONCURRENCY,
    ) -> None:
        super().__init__(scope, construct_id)
        self._layer = layer
        self._table_name = table_name
        self._name_prefix = name_prefix
        self._service_names: dict[str, str] = {}
        issuer_env = {constants.ENV_ISSUER: issuer}
        lifecycle_env = {constants.ENV_LIFECYCLE_QUEUE_URL: lifecycle_queue_url}
        # A recommission waits out the converge function's timeout after a teardown completed,
        # so that no late copy of the teardown (SQS delivers at least once) can still run.
        quiet_env = {
            constants.ENV_RECOMMISSION_QUIET_SECONDS: str(
                int(constants.CONVERGE_TIMEOUT.to_seconds())
            )
        }
        data_key_env = {constants.ENV_DATA_KEY_ID: data_key_id}

        self.registration_concurrency = registration_concurrency
        self.registration_failures = self._build_failure_queue()
        self.registration_retries = RegistrationRetries(
            self, "RegistrationRetries", dead_letters=self.registration_failures
        )
        self.registration_role = self._build_role("RegistrationRole", "registration")
        self.registration = self._build_function(
            "Registration",
            role=self.registration_role,
            code_dir=constants.REGISTRATION_CODE_DIR,
            service_name=self._service(constants.REGISTRATION_SERVICE_NAME),
            memory_mb=constants.REGISTRATION_MEMORY_MB,
            timeout=constants.REGISTRATION_TIMEOUT,
            description="fleetkey just-in-time registration of device certificates",
            # Transient failures are re-raised by the handler: Lambda retries, then sends the
            # event to the retry queue, which gives it back to the function; what still fails
            # after that ends in the failure queue for an operator.
            retry_attempts=constants.REGISTRATION_ASYNC_RETRY_ATTEMPTS,
            on_failure=destinations.SqsDestination(self.registration_retries.queue),
            reserved_concurrency=registration_concurrency,
        )
        self.registration_retries.consume(self.registration)
        self.admin_role = self._build_role("AdminRole", "admin")
        self.admin = self._build_function(
            "Admin",
            role=self.admin_role,
            code_dir=constants.ADMIN_CODE_DIR,
            service_name=self._service(constants.ADMIN_SERVICE_NAME),
            memory_mb=constants.ADMIN_MEMORY_MB,
            timeout=constants.ADMIN_TIMEOUT,
            description="fleetkey operator API: allow-list, trust anchors, devices, signing keys",
            environment={**issuer_env, **lifecycle_env, **data_key_env, **quiet_env},
        )
        self.token_role = self._build_role("TokenRole", "token")
        self.token = self._build_function(
            "Token",
            role=self.token_role,
            code_dir=constants.TOKEN_CODE_DIR,
            service_name=self._service(constants.TOKEN_SERVICE_NAME),
            memory_mb=constants.TOKEN_MEMORY_MB,
            timeout=constants.TOKEN_TIMEOUT,
            description="fleetkey token endpoint: access tokens for devices, challenges",
            environment=issuer_env,
        )
        self.discovery_role = self._build_role("DiscoveryRole", "discovery")
        self.discovery = self._build_function(
            "Discovery",
            role=self.discovery_role,
            code_dir=constants.DISCOVERY_CODE_DIR,
            service_name=self._service(constants.DISCOVERY_SERVICE_NAME),
            memory_mb=constants.DISCOVERY_MEMORY_MB,
            timeout=constants.DISCOVERY_TIMEOUT,
            description="fleetkey discovery: JWKS and authorization server metadata",
            environment=issuer_env,
        )
        self.introspect_role = self._build_role("IntrospectRole", "introspect")
        self.introspect = self._build_function(
            "Introspect",
            role=self.introspect_role,
            code_dir=constants.INTROSPECT_CODE_DIR,
            service_name=self._service(constants.INTROSPECT_SERVICE_NAME),
            memory_mb=constants.INTROSPECT_MEMORY_MB,
            timeout=constants.INTROSPECT_TIMEOUT,
            description="fleetkey token introspection for relying parties",
            environment=issuer_env,
        )
        # Scheduled (constructs.Schedules); no issuer (it signs and verifies no token).
        self.maintenance_role = self._build_role("MaintenanceRole", "maintenance")
        self.maintenance = self._build_function(
            "Maintenance",
            role=self.maintenance_role,
            code_dir=constants.MAINTENANCE_CODE_DIR,
            service_name=self._service(constants.MAINTENANCE_SERVICE_NAME),
            memory_mb=constants.MAINTENANCE_MEMORY_MB,
            timeout=constants.MAINTENANCE_TIMEOUT,
            description="fleetkey maintenance: retires expired token signing keys",
        )
        # The lifecycle queue's consumer (constructs.LifecycleQueue.consume); no issuer.
        self.converge_role = self._build_role("ConvergeRole", "converge")
        self.converge = self._build_function(
            "Converge",
            role=self.converge_role,
            code_dir=constants.CONVERGE_CODE_DIR,
            service_name=self._service(constants.CONVERGE_SERVICE_NAME),
            memory_mb=constants.CONVERGE_MEMORY_MB,
            timeout=constants.CONVERGE_TIMEOUT,
            description="fleetkey converge: makes AWS IoT match a device's lifecycle state",
            environment=lifecycle_env,
        )
        # Invoked by the tamper IoT rule (constructs.TamperRule), asynchronously.
        self.device_event_failures = self._build_failure_queue(
            "DeviceEventFailures",
            "the device_events function's on-failure destination for tamper reports that "
            "exhausted their retries. `fleetkey redrive device-event-failures` re-delivers them "
            "once the cause is fixed, or suspend the device through the admin API "
            "(docs/runbook-redrive.md).",
        )
        self.device_events_role = self._build_role("DeviceEventsRole", "device_events")
        self.device_events = self._build_function(
            "DeviceEvents",
            role=self.device_events_role,
            code_dir=constants.DEVICE_EVENTS_CODE_DIR,
            service_name=self._service(constants.DEVICE_EVENTS_SERVICE_NAME),
            memory_mb=constants.DEVICE_EVENTS_MEMORY_MB,
            timeout=constants.DEVICE_EVENTS_TIMEOUT,
            description="fleetkey device events: suspends a device that reports tampering",
            environment=lifecycle_env,
            retry_attempts=constants.DEVICE_EVENTS_ASYNC_RETRY_ATTEMPTS,
            on_failure=destinations.SqsDestination(self.device_event_failures),
        )
        # Device-facing (public route): the client assertion is addressed to the issuer.
        self.data_keys_role = self._build_role("DataKeysRole", "data_keys")
        self.data_keys = self._build_function(
            "DataKeys",
            role=self.data_keys_role,
            code_dir=constants.DATA_KEYS_CODE_DIR,
            service_name=self._service(constants.DATA_KEYS_SERVICE_NAME),
            memory_mb=constants.DATA_KEYS_MEMORY_MB,
            timeout=constants.DATA_KEYS_TIMEOUT,
            description="fleetkey data keys: a device's data key, sealed to its certificate key",
            environment={**issuer_env, **data_key_env},
        )
        rotation_env = {
            **issuer_env,
            **lifecycle_env,
            constants.ENV_ROTATION_COMMIT_SECONDS: str(rotation_commit_seconds),
            constants.ENV_RENEWAL_RATE_PER_MINUTE: str(renewal_rate_per_minute),
        }
        # Device-facing (public routes) and the operators' PKI routes, behind the API.
        self.rotation_role = self._build_role("RotationRole", "rotation")
        self.rotation = self._build_function(
            "Rotation",
            role=self.rotation_role,
            code_dir=constants.ROTATION_CODE_DIR,
            service_name=self._service(constants.ROTATION_SERVICE_NAME),
            memory_mb=constants.ROTATION_MEMORY_MB,
            timeout=constants.ROTATION_TIMEOUT,
            description="fleetkey certificate rotation: new certificates from the issuing CA, "
            "commits, CA chain, CRL, EST, PKI administration",
            environment=rotation_env,
        )
        # Invoked asynchronously by the presence IoT rule (constructs.PresenceRule) and the
        # rotation sweep's schedule (constructs.Schedules).
        self.rotation_event_failures = self._build_failure_queue(
            "RotationEventFailures",
            "the rotation_events function's on-failure destination for presence events and sweeps "
            "that exhausted their retries. A failed sweep is repeated by the next one; a presence "
            "event not re-delivered leaves its rotation to be rolled back at its deadline. "
            "`fleetkey redrive rotation-event-failures` re-delivers them "
            "(docs/runbook-redrive.md).",
        )
        self.rotation_events_role = self._build_role("RotationEventsRole", "rotation_events")
        self.rotation_events = self._build_function(
            "RotationEvents",
            role=self.rotation_events_role,
            code_dir=constants.ROTATION_EVENTS_CODE_DIR,
            service_name=self._service(constants.ROTATION_EVENTS_SERVICE_NAME),
            memory_mb=constants.ROTATION_EVENTS_MEMORY_MB,
            timeout=constants.ROTATION_EVENTS_TIMEOUT,
            description="fleetkey rotation events: commits on connection; the sweep (rollbacks, "
            "retired certificates, renewals, CRL)",
            environment=rotation_env,
            retry_attempts=constants.ROTATION_EVENTS_ASYNC_RETRY_ATTEMPTS,
            on_failure=destinations.SqsDestination(self.rotation_event_failures),
        )
        # Relying parties (IAM routes): a validation request sends the device a command; its
        # result is long-polled (up to 20 s).
        self.validations_role = self._build_role("ValidationsRole", "validations")
        self.validations = self._build_function(
            "Validations",
            role=self.validations_role,
            code_dir=constants.VALIDATIONS_CODE_DIR,
            service_name=self._service(constants.VALIDATIONS_SERVICE_NAME),
            memory_mb=constants.VALIDATIONS_MEMORY_MB,
            timeout=constants.VALIDATIONS_TIMEOUT,
            description="fleetkey validations: a relying party asks a device to prove itself now",
            environment=issuer_env,
        )
        self._share_signing_key_trust(token_key_id)
        self._share_issuing_ca_signers()

    def _share_signing_key_trust(self, token_key_id: str) -> None:
        """What a registry reader needs to trust a signing key: the first key's id and the roles
        named in the key policy it compares (the token role signs, the retirer roles schedule
        deletion). After the roles exist."""
        retirers = Fn.join(",", [role.role_arn for role in self.token_key_retirer_roles])
        for function in (self.admin, self.token, self.discovery, self.introspect, self.maintenance):
            function.add_environment(constants.ENV_TOKEN_KEY_ID, token_key_id)
            function.add_environment(constants.ENV_TOKEN_SIGNER_ROLE_ARN, self.token_role.role_arn)
            function.add_environment(constants.ENV_TOKEN_KEY_RETIRER_ROLE_ARNS, retirers)

    def _share_issuing_ca_signers(self) -> None:
        """The roles the issuing CA key's policy lets sign, for the functions that create the key
        (rotation: `pki init` / `pki csr`) and confirm it before use. Role ARNs from the roles
        themselves: neither role depends on a function, so no cycle."""
        signers = Fn.join(",", [role.role_arn for role in self.issuing_ca_signer_roles])
        for function in (self.rotation, self.rotation_events):
            function.add_environment(constants.ENV_ISSUING_CA_SIGNER_ROLE_ARNS, signers)

    @property
    def issuing_ca_signer_roles(self) -> tuple[iam.Role, ...]:
        """The roles an issuing CA key's policy lets sign: rotation (certificates, the first CRL)
        and rotation_events (the CRL's refresh)."""
        return (self.rotation_role, self.rotation_events_role)

    @property
    def roles(self) -> tuple[iam.Role, ...]:
        """Every function's role."""
        return (
            self.registration_role,
            self.admin_role,
            self.token_role,
            self.discovery_role,
            self.introspect_role,
            self.maintenance_role,
            self.converge_role,
            self.device_events_role,
            self.data_keys_role,
            self.rotation_role,
            self.rotation_events_role,
            self.validations_role,
        )

    @property
    def token_key_retirer_roles(self) -> tuple[iam.Role, ...]:
        """The roles a token signing key's policy lets schedule its deletion: admin (retirement on
        demand, and the undo of a refused rotation) and maintenance (hourly retirement)."""
        return (self.admin_role, self.maintenance_role)

    def service_name(self, function: lambda_.IFunction) -> str:
        """The function's Powertools service (POWERTOOLS_SERVICE_NAME), e.g. for an alarm on one
        of its metrics (dimension `service`)."""
        return self._service_names[function.node.id]

    def _service(self, unstaged: str) -> str:
        """`<name prefix>-<function>` from the unstaged service name (`fleetkey-<function>`)."""
        if not unstaged.startswith(f"{constants.NAME_PREFIX}-"):
            raise ValueError(f"not a fleetkey service name: {unstaged!r}")
        return self._name_prefix + unstaged.removeprefix(constants.NAME_PREFIX)

    def _build_failure_queue(
        self,
        construct_id: str = "RegistrationFailures",
        holds: str = "the registration retry queue moves here the registration events still "
        f"failing after {constants.REGISTRATION_RETRY_MAX_RECEIVE_COUNT} retries (Lambda's "
        "invocation records). `fleetkey redrive registration-failures` re-delivers them once the "
        "cause is fixed (docs/runbook-redrive.md).",
    ) -> sqs.Queue:
        return dead_letter_queue(self, construct_id, holds=holds)

    def _build_role(self, construct_id: str, purpose: str) -> iam.Role:
        return iam.Role(
            self,
            construct_id,
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"fleetkey {purpose} function",
        )

    def _build_log_group(self, construct_id: str) -> logs.LogGroup:
        return logs.LogGroup(self, construct_id, retention=constants.LOG_RETENTION)

    def _build_function(
        self,
        construct_id: str,
        *,
        role: iam.Role,
        code_dir: Path,
        service_name: str,
        memory_mb: int,
        timeout: Duration,
        description: str,
        environment: dict[str, str] | None = None,
        retry_attempts: int | None = None,
        on_failure: lambda_.IDestination | None = None,
        reserved_concurrency: int | None = None,
    ) -> lambda_.Function:
        self._service_names[construct_id] = service_name
        log_group = self._build_log_group(f"{construct_id}Logs")
        # The AWSLambdaBasicExecutionRole equivalent, scoped to this function's own log group.
        log_group.grant_write(role)
        function = lambda_.Function(
            self,
            construct_id,
            runtime=lambda_.Runtime.PYTHON_3_12,
            architecture=lambda_.Architecture.ARM_64,
            code=lambda_.Code.from_asset(str(_existing(code_dir))),
            handler=constants.HANDLER,
            role=role,
            layers=[self._layer],
            tracing=lambda_.Tracing.ACTIVE,
            log_group=log_group,
            memory_size=memory_mb,
            timeout=timeout,
            description=description,
            environment={
                constants.ENV_TABLE: self._table_name,
                constants.ENV_NAME_PREFIX: self._name_prefix,
                constants.ENV_STACK_NAME: Stack.of(self).stack_name,
                "POWERTOOLS_SERVICE_NAME": service_name,
                "POWERTOOLS_METRICS_NAMESPACE": constants.METRICS_NAMESPACE,
                "POWERTOOLS_LOG_LEVEL": constants.LOG_LEVEL,
                **(environment or {}),
            },
            retry_attempts=retry_attempts,
            on_failure=on_failure,
            reserved_concurrent_executions=reserved_concurrency,
        )
        acknowledge(
            function,
            "AwsSolutions-L1",
            "Python 3.12 is deliberate: `make layer` builds the layer's compiled wheels "
            "(cryptography, pydantic-core) for cp312 on arm64, so the runtime moves only together "
            "with the layer build.",
        )
        return function


def _existing(code_dir: Path) -> Path:
    if not (code_dir / "handler.py").is_file():
        raise FileNotFoundError(f"function code not found: {code_dir}/handler.py")
    return code_dir
