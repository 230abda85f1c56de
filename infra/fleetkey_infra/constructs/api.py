"""fleetkey's HTTP API: one regional REST API, one stage.

- Device-facing, public (no API Gateway authorization, throttled method by method):
  `POST /v1/token`, `POST /v1/challenge` -> token; `POST /v1/devices/{device_id}/data-key` ->
  data_keys; `GET /.well-known/jwks.json`, `GET /.well-known/oauth-authorization-server` ->
  discovery; `POST /v1/devices/{device_id}/certificates`,
  `POST /v1/devices/{device_id}/certificates/{certificate_id}/commit`, `GET /v1/pki/ca`,
  `GET /v1/pki/crl`, `GET /.well-known/est/cacerts`, `POST /.well-known/est/simplereenroll` ->
  rotation. Devices authenticate to the token, data-key and rotation endpoints with a JWT client
  assertion (RFC 7523), which the function verifies; to EST's simplereenroll with their TLS client
  certificate (mutual TLS on EST's custom domain only: `constructs/rotation.py`).
- IAM (SigV4) authenticated: `POST /v1/introspect` -> introspect, `POST /v1/validations` and
  `GET /v1/validations/{validation_id}` -> validations (relying parties);
  `ANY /v1/admin/{proxy+}` -> admin (the firmware releases' `/v1/admin/firmware...` among its
  routes), `ANY /v1/admin/pki` and `ANY /v1/admin/pki/{proxy+}` -> rotation (operators).
- `application/pkix-crl` is a binary media type: the CRL (DER) goes out as bytes when the
  request's first Accept value is `application/pkix-crl`; with another Accept value (`*/*`, none)
  API Gateway passes the function's base64 text through unchanged (API Gateway developer guide,
  "Binary media types for REST APIs"). Only `*/*` as a binary media type would lift that, and it
  would hand every request body of every route to its function base64-encoded.

Who may call what (`fleetkey_infra.edge`, configured in CDK context):
- a resource policy admits everyone to the public routes, and denies `/v1/admin/*` to every
  principal that is not a configured operator or one of the operator roles, and `/v1/introspect`
  and `/v1/validations` (and anything under them) to every principal that is not a configured
  relying party; configured principals must be of the stack's account (synthesis refuses others,
  or a CloudFormation rule when the account is not known at synthesis);
- three operator roles (`OperatorRoles`: `<name prefix>-fleet-admin`, `-release`, `-auditor`),
  each allowed by its identity policy exactly its job's methods and paths of this API, and held
  to them by explicit Denies of the resource policy too (release: every request but the firmware
  routes; auditor: every admin method but GET), so that a broader identity policy attached later
  cannot widen them;
- a WAF web ACL on the stage (`ApiRateLimits`) limits each client (source IP) on the public
  routes and answers 429 with Retry-After.

The stage's base URL is the token issuer (`issuer`); the functions receive it as FLEETKEY_ISSUER.
The API is built first and the routes added once the functions exist: the functions' environment
refers to the RestApi's id, and the methods to the functions, without a cycle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import cast

from aws_cdk import ArnFormat, Aws, CfnElement, CfnRule, CfnRuleAssertion, Fn, Stack, Token
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.constructs.waf import ApiRateLimits
from fleetkey_infra.edge import (
    OPERATOR_ROLES,
    Audience,
    EdgeConfig,
    EdgeConfigError,
    OperatorRole,
    RateLimit,
    RoleDeny,
    operator_role_denies,
)
from fleetkey_infra.nag import acknowledge, wildcard_resource

# Access log record: who called (for IAM routes, the principal is the operator's or relying
# party's identity), from where, what, and how it ended. One JSON object per line, so CloudWatch
# Logs Insights can query it.
_ACCESS_LOG_FORMAT = {
    "requestId": apigateway.AccessLogField.context_request_id(),
    "extendedRequestId": apigateway.AccessLogField.context_extended_request_id(),
    "requestTime": apigateway.AccessLogField.context_request_time(),
    "ip": apigateway.AccessLogField.context_identity_source_ip(),
    "caller": apigateway.AccessLogField.context_identity_caller(),
    "userArn": apigateway.AccessLogField.context_identity_user_arn(),
    "httpMethod": apigateway.AccessLogField.context_http_method(),
    "resourcePath": apigateway.AccessLogField.context_resource_path(),
    "path": apigateway.AccessLogField.context_path(),
    "status": apigateway.AccessLogField.context_status(),
    "responseLength": apigateway.AccessLogField.context_response_length(),
    "integrationLatency": apigateway.AccessLogField.context_integration_latency(),
    "errorMessage": apigateway.AccessLogField.context_error_message(),
}


@dataclass(frozen=True)
class Throttle:
    rate: int
    burst: int


_TOKEN_THROTTLE = Throttle(constants.TOKEN_THROTTLE_RATE, constants.TOKEN_THROTTLE_BURST)
_DISCOVERY_THROTTLE = Throttle(
    constants.DISCOVERY_THROTTLE_RATE, constants.DISCOVERY_THROTTLE_BURST
)

# The public methods and their own throttling, by (HTTP method, resource path).
PUBLIC_ROUTE_THROTTLES: dict[tuple[str, str], Throttle] = {
    ("POST", constants.TOKEN_PATH): _TOKEN_THROTTLE,
    ("POST", constants.CHALLENGE_PATH): _TOKEN_THROTTLE,
    # Like the token endpoint: an assertion to verify, DynamoDB writes and a KMS call each.
    ("POST", constants.DATA_KEY_PATH): _TOKEN_THROTTLE,
    ("GET", constants.JWKS_PATH): _DISCOVERY_THROTTLE,
    ("GET", constants.METADATA_PATH): _DISCOVERY_THROTTLE,
    # A rotation and its commit: an assertion to verify, KMS and AWS IoT calls, DynamoDB writes.
    ("POST", constants.ROTATION_PATH): _TOKEN_THROTTLE,
    ("POST", constants.ROTATION_COMMIT_PATH): _TOKEN_THROTTLE,
    # EST's re-enrollment issues a certificate like a rotation does.
    ("POST", constants.EST_SIMPLEREENROLL_PATH): _TOKEN_THROTTLE,
    # Public documents, cacheable, one read each: like the discovery documents.
    ("GET", constants.PKI_CA_PATH): _DISCOVERY_THROTTLE,
    ("GET", constants.PKI_CRL_PATH): _DISCOVERY_THROTTLE,
    ("GET", constants.EST_CACERTS_PATH): _DISCOVERY_THROTTLE,
}

# Why each public method has no API Gateway authorization (cdk-nag APIG4 and COG4).
_TOKEN_ENDPOINT_REASON = (
    "Device-facing OAuth 2.0 token endpoint (client-credentials grant, RFC 6749 section 4.4): "
    "the device authenticates in the request body with a JWT client assertion signed by its "
    "own private key (RFC 7523 section 2.2), which the token function verifies against the "
    "device's registered certificate; no API Gateway authorizer can check it. Throttled per "
    "method, and per client by the stage's WAF web ACL."
)
_CHALLENGE_REASON = (
    "Device-facing challenge endpoint of the token flow: it hands out a single-use, "
    "short-lived nonce that a device without a trusted clock puts into its signed client "
    "assertion (RFC 7523). It precedes authentication and grants nothing by itself; throttled "
    "per method, and per client by the stage's WAF web ACL."
)
_DATA_KEY_REASON = (
    "Device-facing data-key endpoint: the device authenticates in the request body with the same "
    "JWT client assertion as at the token endpoint (RFC 7523 section 2.2), signed by its own "
    "private key and verified by the data_keys function against the device's registered "
    "certificate; the answer is sealed to that certificate's public key. No API Gateway "
    "authorizer can check it. Throttled per method, and per client by the stage's WAF web ACL."
)
_DISCOVERY_REASON = (
    "Public by standard: the JWK Set (RFC 7517) and the authorization server metadata "
    "(RFC 8414) are fetched without credentials by devices and relying parties to verify "
    "tokens offline; they hold only public keys and endpoint URLs. Throttled per method, and "
    "per client by the stage's WAF web ACL."
)
_ROTATION_REASON = (
    "Device-facing certificate rotation: the device authenticates in the request body with a JWT "
    "client assertion (RFC 7523 section 2.2) signed by its current certificate's key and bound "
    "to its CSR (a commit: by the new certificate's key), verified by the rotation function "
    "against the device's registered certificates. No API Gateway authorizer can check it. "
    "Throttled per method, and per client by the stage's WAF web ACL."
)
_PKI_DOCUMENT_REASON = (
    "Public by nature: the issuing CA's certificate chain and its CRL (the CRL distribution point "
    "of every certificate fleetkey issues, RFC 5280) and EST's CA certificates (RFC 7030 "
    "section 4.1, no client authentication) are fetched without credentials by devices and "
    "relying parties; they hold only public data. Throttled per method, and per client by the "
    "stage's WAF web ACL."
)
_EST_REENROLL_REASON = (
    "EST simple re-enrollment (RFC 7030 section 4.2.2) authenticates the device by its TLS "
    "client certificate: API Gateway checks it on EST's mutual-TLS custom domain, and the "
    "rotation function refuses a request without one (only that handshake sets "
    "requestContext.identity.clientCert). No API Gateway authorizer applies. Throttled per "
    "method, and per client by the stage's WAF web ACL."
)
_PUBLIC_REASONS = {
    constants.TOKEN_PATH: _TOKEN_ENDPOINT_REASON,
    constants.CHALLENGE_PATH: _CHALLENGE_REASON,
    constants.DATA_KEY_PATH: _DATA_KEY_REASON,
    constants.JWKS_PATH: _DISCOVERY_REASON,
    constants.METADATA_PATH: _DISCOVERY_REASON,
    constants.ROTATION_PATH: _ROTATION_REASON,
    constants.ROTATION_COMMIT_PATH: _ROTATION_REASON,
    constants.PKI_CA_PATH: _PKI_DOCUMENT_REASON,
    constants.PKI_CRL_PATH: _PKI_DOCUMENT_REASON,
    constants.EST_CACERTS_PATH: _PKI_DOCUMENT_REASON,
    constants.EST_SIMPLEREENROLL_PATH: _EST_REENROLL_REASON,
}
_IAM_REASON = (
    "Operators (/v1/admin, /v1/admin/pki) and relying parties (/v1/introspect, "
    "/v1/validations) are AWS principals: the method uses IAM (SigV4) authorization, which the "
    "design requires instead of a Cognito user pool."
)


class Api(Construct):
    """Attributes: `edge` (fleetkey_infra.edge.EdgeConfig, from CDK context), `api`
    (apigateway.RestApi), `access_logs` (logs.LogGroup), `validator`
    (apigateway.RequestValidator), `rate_limits` (ApiRateLimits: the stage's WAF web ACL),
    `issuer` (str: the stage's base URL, no trailing slash), `url` (str: the same with a trailing
    slash), `operator_roles` (OperatorRoles: the roles for people and pipelines, named after
    `name_prefix`), and after `add_routes`, `methods` (dict of (HTTP method, resource path) ->
    apigateway.Method).

    `name_prefix` also names the WAF metrics (`<name_prefix>-api...`); `rest_api_name` names the
    REST API (None: CDK's default, the construct id); `issuer` replaces the stage's URL as the
    issuer (`https://<the API's custom domain>`: constructs/api_domain.py)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name_prefix: str = constants.NAME_PREFIX,
        rest_api_name: str | None = None,
        issuer: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.edge = EdgeConfig.from_context(self.node.try_get_context)
        self._check_principals_account()
        self.access_logs = self._build_access_logs()
        self.api = self._build_api(
            self.access_logs, self._build_resource_policy(self.edge, name_prefix), rest_api_name
        )
        # After the API: their identity policies name its methods. The resource policy names the
        # roles by ARN (made from their names), so neither depends on the other.
        self.operator_roles = OperatorRoles(
            self, "OperatorRoles", api=self.api, name_prefix=name_prefix
        )
        self.validator = self._build_validator()
        self.rate_limits = ApiRateLimits(
            self,
            "RateLimits",
            stage=self.api.deployment_stage,
            rate_limits=self._rate_limits(),
            metric_prefix=f"{name_prefix}-api",
        )
        # Built from the RestApi's id and the stage's name, not from the Stage resource: the
        # Stage depends on the deployment, which depends on the methods, which depend on the
        # functions whose environment holds this URL.
        self.issuer = issuer or (
            f"https://{self.api.rest_api_id}.execute-api.{Aws.REGION}.{Aws.URL_SUFFIX}/"
            f"{constants.API_STAGE_NAME}"
        )
        self.url = self.api.url
        self.methods: dict[tuple[str, str], apigateway.Method] = {}
        self._acknowledge_findings()

    def add_routes(
        self,
        *,
        admin: lambda_.IFunction,
        token: lambda_.IFunction,
        discovery: lambda_.IFunction,
        introspect: lambda_.IFunction,
        data_keys: lambda_.IFunction,
        rotation: lambda_.IFunction,
        validations: lambda_.IFunction,
    ) -> None:
        self._iam_route(
            "ANY",
            constants.ADMIN_PATH,
            admin,
            request_parameters={"method.request.path.proxy": True},
        )
        # The operators' PKI routes are the rotation function's: `/v1/admin/pki` itself (which
        # `/v1/admin/{proxy+}` no longer reaches once the literal resource exists) and below it.
        self._iam_route("ANY", constants.ADMIN_PKI_PATH, rotation)
        self._iam_route(
            "ANY",
            constants.ADMIN_PKI_PROXY_PATH,
            rotation,
            request_parameters={"method.request.path.proxy": True},
        )
        self._iam_route("POST", constants.INTROSPECT_PATH, introspect)
        self._iam_route("POST", constants.VALIDATIONS_PATH, validations)
        self._iam_route(
            "GET",
            constants.VALIDATION_PATH,
            validations,
            request_parameters=_path_parameters(constants.VALIDATION_PATH),
        )
        self._public_route("POST", constants.TOKEN_PATH, token)
        self._public_route("POST", constants.CHALLENGE_PATH, token)
        self._public_route("POST", constants.DATA_KEY_PATH, data_keys)
        self._public_route("GET", constants.JWKS_PATH, discovery)
        self._public_route("GET", constants.METADATA_PATH, discovery)
        self._public_route("POST", constants.ROTATION_PATH, rotation)
        self._public_route("POST", constants.ROTATION_COMMIT_PATH, rotation)
        self._public_route("GET", constants.PKI_CA_PATH, rotation)
        self._public_route("GET", constants.PKI_CRL_PATH, rotation)
        self._public_route("GET", constants.EST_CACERTS_PATH, rotation)
        self._public_route("POST", constants.EST_SIMPLEREENROLL_PATH, rotation)

    # -- routes ----------------------------------------------------------------------------------

    def _add_method(
        self,
        http_method: str,
        path: str,
        function: lambda_.IFunction,
        authorization_type: apigateway.AuthorizationType,
        request_parameters: dict[str, bool] | None = None,
    ) -> apigateway.Method:
        method = self.api.root.resource_for_path(path).add_method(
            http_method,
            apigateway.LambdaIntegration(function, proxy=True),
            authorization_type=authorization_type,
            request_validator=self.validator,
            request_parameters=request_parameters,
        )
        self.methods[(http_method, path)] = method
        return method

    def _iam_route(
        self,
        http_method: str,
        path: str,
        function: lambda_.IFunction,
        request_parameters: dict[str, bool] | None = None,
    ) -> None:
        method = self._add_method(
            http_method, path, function, apigateway.AuthorizationType.IAM, request_parameters
        )
        acknowledge(method, "AwsSolutions-COG4", _IAM_REASON)

    def _public_route(self, http_method: str, path: str, function: lambda_.IFunction) -> None:
        if (http_method, path) not in PUBLIC_ROUTE_THROTTLES:
            raise ValueError(f"public route without its own throttling: {http_method} {path}")
        method = self._add_method(
            http_method,
            path,
            function,
            apigateway.AuthorizationType.NONE,
            _path_parameters(path) or None,
        )
        acknowledge(method, "AwsSolutions-APIG4", _PUBLIC_REASONS[path])
        acknowledge(
            method,
            "AwsSolutions-COG4",
            "No API Gateway authorizer on this public method (see its APIG4 acknowledgement); "
            "a Cognito user pool authenticates users, not devices holding X.509-bound keys. "
            + _PUBLIC_REASONS[path],
        )

    # -- findings --------------------------------------------------------------------------------

    def _acknowledge_findings(self) -> None:
        acknowledge(
            self.api,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonAPIGatewayPushToCloudWatchLogs]",
            "The account-level role API Gateway uses to write execution and access logs; AWS's "
            "managed policy is the documented one for this service role and grants only "
            "CloudWatch Logs actions.",
        )

    # -- who may call what ------------------------------------------------------------------------

    def _check_principals_account(self) -> None:
        """Operators and relying parties of another account could never be admitted (nothing
        allows them): refuse them. With a concrete account, at synthesis; for an
        environment-agnostic stack, by a template rule that fails the deployment in any account
        but the one the ARNs name."""
        account = Stack.of(self).account
        if not Token.is_unresolved(account):
            self.edge.check_account(account)
            return
        named = sorted(self.edge.named_accounts())
        if len(named) > 1:
            raise EdgeConfigError(
                f"operator and relying-party principals name several accounts ({', '.join(named)})"
                ": at most one is the stack's, and principals of another could never be admitted"
            )
        if named:
            CfnRule(
                self,
                "PrincipalsOfThisAccount",
                assertions=[
                    CfnRuleAssertion(
                        assert_=Fn.condition_equals(Aws.ACCOUNT_ID, named[0]),
                        assert_description=(
                            f"operatorPrincipals/relyingPartyPrincipals name account {named[0]}: "
                            "deploy there, or name roles of this account"
                        ),
                    )
                ],
            )

    def _rate_limits(self) -> tuple[RateLimit, ...]:
        """The configured per-client limits; every public route falls under exactly one."""
        limits = self.edge.rate_limits()
        for _, path in PUBLIC_ROUTE_THROTTLES:
            covering = [limit.name for limit in limits if limit.covers(path)]
            if len(covering) != 1:
                raise ValueError(f"public route {path} is under rate limits {covering}, not one")
        return limits

    @staticmethod
    def _build_resource_policy(edge: EdgeConfig, name_prefix: str) -> iam.PolicyDocument:
        """The REST API's resource policy.

        With a resource policy, API Gateway admits a caller of a method without authorization
        only if the policy explicitly allows it: hence the Allow for everyone on the public
        routes, and on nothing else. For IAM-authorized methods called by a principal of the
        API's own account, API Gateway admits the caller if EITHER its identity policy OR the
        resource policy allows it, and refuses on any explicit Deny (API Gateway developer guide,
        "How API Gateway resource policies affect authorization workflow", table A; a principal
        of another account needs both, table B). An Allow here cannot narrow who may call the
        admin routes, only an explicit Deny can: each IAM route group is denied to every
        principal whose `aws:PrincipalArn` (a role session's is its role's ARN; API Gateway
        supports the key for IAM authorization) is not one of its configured principals.
        Operators still need `execute-api:Invoke` in their own identity policy; no principal of
        another account is admitted (nothing here allows one).

        The operator roles are operators; each narrower than every admin route is held to its
        scope by a Deny of its own (`edge.OperatorRole.deny`), for the same reason: its identity
        policy alone would not hold it if a broader one were attached.
        """
        public = iam.PolicyStatement(
            sid="PublicDeviceRoutes",
            effect=iam.Effect.ALLOW,
            principals=[iam.StarPrincipal()],
            actions=["execute-api:Invoke"],
            resources=[
                f"execute-api:/*/{http_method}{policy_path(path)}"
                for http_method, path in PUBLIC_ROUTE_THROTTLES
            ],
        )
        audiences = edge.audiences(Aws.PARTITION, Aws.ACCOUNT_ID, name_prefix)
        scopes = operator_role_denies(Aws.PARTITION, Aws.ACCOUNT_ID, name_prefix)
        return iam.PolicyDocument(
            statements=[
                public,
                *(Api._deny_outside(audience) for audience in audiences),
                *(Api._deny_beyond_scope(deny) for deny in scopes),
            ]
        )

    @staticmethod
    def _deny_beyond_scope(deny: RoleDeny) -> iam.PolicyStatement:
        """An operator role's requests outside its scope (`NotResource` when the Deny is of
        everything but its scope)."""
        resources = deny.resources(Aws.PARTITION, Aws.REGION, Aws.ACCOUNT_ID)
        where = {"not_resources": resources} if deny.outside else {"resources": resources}
        return iam.PolicyStatement(
            sid=deny.sid,
            effect=iam.Effect.DENY,
            principals=[iam.StarPrincipal()],
            actions=["execute-api:Invoke"],
            conditions={"ArnLike": {"aws:PrincipalArn": list(deny.principals)}},
            **where,
        )

    @staticmethod
    def _deny_outside(audience: Audience) -> iam.PolicyStatement:
        sid = "OnlyConfigured" + "".join(word.title() for word in audience.name.split())
        conditions = (
            {"ArnNotLike": {"aws:PrincipalArn": list(audience.principals)}}
            if audience.principals
            else None  # nobody configured: closed to everyone
        )
        return iam.PolicyStatement(
            sid=sid,
            effect=iam.Effect.DENY,
            principals=[iam.StarPrincipal()],
            actions=["execute-api:Invoke"],
            resources=[f"execute-api:/*/*{path}" for path in audience.policy_paths],
            conditions=conditions,
        )

    # -- the API and its stage -------------------------------------------------------------------

    def _build_access_logs(self) -> logs.LogGroup:
        return logs.LogGroup(self, "AccessLogs", retention=constants.LOG_RETENTION)

    def _build_api(
        self,
        access_logs: logs.ILogGroup,
        policy: iam.PolicyDocument,
        rest_api_name: str | None = None,
    ) -> apigateway.RestApi:
        api = apigateway.RestApi(
            self,
            "Api",
            rest_api_name=rest_api_name,
            policy=policy,
            description="fleetkey API: device tokens and discovery (public), introspection and "
            "operators (IAM authenticated)",
            endpoint_configuration=apigateway.EndpointConfiguration(
                types=[apigateway.EndpointType.REGIONAL]
            ),
            # API Gateway writes execution and access logs only once the account has a CloudWatch
            # role; this stack sets it (one per account and region).
            cloud_watch_role=True,
            # The CRL is DER (see the module doc).
            binary_media_types=list(constants.BINARY_MEDIA_TYPES),
            # IAM-authenticated unless a method says otherwise; only the public device routes do.
            default_method_options=apigateway.MethodOptions(
                authorization_type=apigateway.AuthorizationType.IAM
            ),
            deploy_options=apigateway.StageOptions(
                stage_name=constants.API_STAGE_NAME,
                access_log_destination=apigateway.LogGroupLogDestination(access_logs),
                access_log_format=apigateway.AccessLogFormat.custom(json.dumps(_ACCESS_LOG_FORMAT)),
                logging_level=apigateway.MethodLoggingLevel.INFO,
                # Request and response bodies carry manifests, certificates, assertions and
                # tokens: keep them out of the execution logs.
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
                throttling_rate_limit=constants.API_THROTTLE_RATE,
                throttling_burst_limit=constants.API_THROTTLE_BURST,
                method_options=self._public_method_options(),
            ),
        )
        # RestApi adds an "Endpoint" output of its own; the stack publishes the URL under a
        # stable name (ApiUrl) instead of the generated one.
        api.node.try_remove_child("Endpoint")
        return api

    @staticmethod
    def _public_method_options() -> dict[str, apigateway.MethodDeploymentOptions]:
        """Each public method's own throttling. A method setting stands on its own in API
        Gateway, so it repeats the stage's logging and metrics settings."""
        return {
            f"{path}/{http_method}": apigateway.MethodDeploymentOptions(
                throttling_rate_limit=throttle.rate,
                throttling_burst_limit=throttle.burst,
                logging_level=apigateway.MethodLoggingLevel.INFO,
                data_trace_enabled=False,
                metrics_enabled=True,
            )
            for (http_method, path), throttle in PUBLIC_ROUTE_THROTTLES.items()
        }

    def _build_validator(self) -> apigateway.RequestValidator:
        # Bodies are validated by the functions against their own models (one schema, in the
        # code); the validator enforces the declared request parameters and any model added later.
        return self.api.add_request_validator(
            "Validator", validate_request_body=True, validate_request_parameters=True
        )


_PATH_PARAMETER = re.compile(r"\{([A-Za-z0-9_]+)\}")


def policy_path(path: str) -> str:
    """A resource path as a resource-policy path: a request's ARN holds the actual path, so each
    path parameter (`{device_id}`) becomes `*`."""
    return _PATH_PARAMETER.sub("*", path)


def _path_parameters(path: str) -> dict[str, bool]:
    """The path's parameters, declared required (the request validator checks them)."""
    return {f"method.request.path.{name}": True for name in _PATH_PARAMETER.findall(path)}


class OperatorRoles(Construct):
    """The roles for people and pipelines on the admin API, one per job (`edge.OPERATOR_ROLES`):

    - `<name prefix>-fleet-admin`: every method on every admin route (`/v1/admin/*`, the PKI
      routes and the firmware releases included);
    - `<name prefix>-release`: every method on `/v1/admin/firmware` and `/v1/admin/firmware/*`
      only: publish, revoke, list and read firmware releases;
    - `<name prefix>-auditor`: `GET` on the admin routes only (audit trails are GET routes).

    Each trusts the account (`iam.AccountRootPrincipal`: any principal of the account whose own
    policy allows `sts:AssumeRole` on it: grant that to the people and pipelines of each job) for
    sessions of at most an hour. Its identity policy allows `execute-api:Invoke` on exactly its
    methods and paths of this API's stage (each method spelled out); the API's resource policy
    admits it as an operator and denies it anything beyond its scope (`Api._build_resource_policy`).

    Attributes: `roles` (dict of role name without the prefix -> iam.Role).
    """

    def __init__(
        self, scope: Construct, construct_id: str, *, api: apigateway.RestApi, name_prefix: str
    ) -> None:
        super().__init__(scope, construct_id)
        self.roles: dict[str, iam.Role] = {
            role.name: self._build_role(role, api, name_prefix) for role in OPERATOR_ROLES
        }

    def _build_role(
        self, role: OperatorRole, api: apigateway.RestApi, name_prefix: str
    ) -> iam.Role:
        # arn:<partition>:execute-api:<region>:<account>:<api id>/<stage>/<METHOD><path>
        resources = [
            Stack.of(self).format_arn(
                service="execute-api",
                resource=api.rest_api_id,
                resource_name=invocation,
                arn_format=ArnFormat.SLASH_RESOURCE_NAME,
            )
            for invocation in role.invocations()
        ]
        built = iam.Role(
            self,
            "".join(word.title() for word in role.name.split("-")),
            role_name=role.role_name(name_prefix),
            assumed_by=iam.AccountRootPrincipal(),
            max_session_duration=constants.OPERATOR_ROLE_MAX_SESSION,
            description=f"fleetkey {role.name}: {role.job}",
            inline_policies={
                "AdminApi": iam.PolicyDocument(
                    statements=[
                        iam.PolicyStatement(
                            sid="InvokeItsRoutes",
                            actions=["execute-api:Invoke"],
                            resources=resources,
                        )
                    ]
                )
            },
        )
        # cdk-nag names the API by its logical id (`<ApiF70053CD>`) in each finding.
        api_id = Stack.of(self).get_logical_id(cast(CfnElement, api.node.default_child))
        for invocation in role.invocations():
            if "*" in invocation:
                acknowledge(
                    built,
                    wildcard_resource(
                        "arn:<AWS::Partition>:execute-api:<AWS::Region>:<AWS::AccountId>:"
                        f"<{api_id}>/{invocation}"
                    ),
                    f"The {role.name} role may call any admin route under its path: the admin "
                    "API's routes take ids (devices, CAs, releases) chosen at run time; its "
                    "stage, method and path prefix are spelled out, and the API's resource "
                    "policy denies it anything beyond its scope.",
                )
        return built
