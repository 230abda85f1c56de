"""The API: public device routes, IAM everywhere else; logged, traced, throttled, validated,
regional; a resource policy admitting only the configured operators (and the operator roles, each
held to its scope) and relying parties to the IAM routes, the operator roles, and a WAF web ACL
limiting each client on the public routes."""

import json

import pytest
from aws_cdk import App, Environment, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk.assertions import Match, Template

from fleetkey_infra import constants, edge
from fleetkey_infra.constructs import Api
from fleetkey_infra.constructs.api import OperatorRoles, policy_path
from infra_template import (
    ACCOUNT,
    PARTITION,
    REGION,
    function_by_service,
    method_paths,
    of_type,
    only,
    render,
)

# Every method of the API: (HTTP method, resource path) -> (function, authorization type).
EXPECTED_METHODS = {
    ("ANY", "/v1/admin/{proxy+}"): (constants.ADMIN_SERVICE_NAME, "AWS_IAM"),
    ("POST", "/v1/introspect"): (constants.INTROSPECT_SERVICE_NAME, "AWS_IAM"),
    ("POST", "/v1/token"): (constants.TOKEN_SERVICE_NAME, "NONE"),
    ("POST", "/v1/challenge"): (constants.TOKEN_SERVICE_NAME, "NONE"),
    ("POST", "/v1/devices/{device_id}/data-key"): (constants.DATA_KEYS_SERVICE_NAME, "NONE"),
    ("GET", "/.well-known/jwks.json"): (constants.DISCOVERY_SERVICE_NAME, "NONE"),
    ("GET", "/.well-known/oauth-authorization-server"): (constants.DISCOVERY_SERVICE_NAME, "NONE"),
    # certificate rotation (issue 9)
    ("POST", "/v1/devices/{device_id}/certificates"): (constants.ROTATION_SERVICE_NAME, "NONE"),
    ("POST", "/v1/devices/{device_id}/certificates/{certificate_id}/commit"): (
        constants.ROTATION_SERVICE_NAME,
        "NONE",
    ),
    ("GET", "/v1/pki/ca"): (constants.ROTATION_SERVICE_NAME, "NONE"),
    ("GET", "/v1/pki/crl"): (constants.ROTATION_SERVICE_NAME, "NONE"),
    ("GET", "/.well-known/est/cacerts"): (constants.ROTATION_SERVICE_NAME, "NONE"),
    ("POST", "/.well-known/est/simplereenroll"): (constants.ROTATION_SERVICE_NAME, "NONE"),
    ("ANY", "/v1/admin/pki"): (constants.ROTATION_SERVICE_NAME, "AWS_IAM"),
    ("ANY", "/v1/admin/pki/{proxy+}"): (constants.ROTATION_SERVICE_NAME, "AWS_IAM"),
    # relying parties' validations (issue 10)
    ("POST", "/v1/validations"): (constants.VALIDATIONS_SERVICE_NAME, "AWS_IAM"),
    ("GET", "/v1/validations/{validation_id}"): (constants.VALIDATIONS_SERVICE_NAME, "AWS_IAM"),
}
PUBLIC = {route for route, (_, auth) in EXPECTED_METHODS.items() if auth == "NONE"}
# Throttling of the public methods: (steady rate, burst).
EXPECTED_THROTTLES = {
    ("POST", "/v1/token"): (50, 100),
    ("POST", "/v1/challenge"): (50, 100),
    ("POST", "/v1/devices/{device_id}/data-key"): (50, 100),
    ("GET", "/.well-known/jwks.json"): (100, 200),
    ("GET", "/.well-known/oauth-authorization-server"): (100, 200),
    ("POST", "/v1/devices/{device_id}/certificates"): (50, 100),
    ("POST", "/v1/devices/{device_id}/certificates/{certificate_id}/commit"): (50, 100),
    ("POST", "/.well-known/est/simplereenroll"): (50, 100),
    ("GET", "/v1/pki/ca"): (100, 200),
    ("GET", "/v1/pki/crl"): (100, 200),
    ("GET", "/.well-known/est/cacerts"): (100, 200),
}


def test_the_api_has_exactly_the_contract_methods(resources: dict[str, dict]) -> None:
    # Given every method of the API
    # When listing them by HTTP method and resource path
    # Then they are exactly the v1 contract's routes
    assert set(method_paths(resources)) == set(EXPECTED_METHODS)


@pytest.mark.parametrize("route", sorted(EXPECTED_METHODS))
def test_method_authorization_and_integration(
    resources: dict[str, dict], route: tuple[str, str]
) -> None:
    # Given one method and the function that should serve it
    service, authorization = EXPECTED_METHODS[route]
    function_id, _ = function_by_service(resources, service)
    props = method_paths(resources)[route]["Properties"]

    # When reading its authorization and integration
    # Then public device routes have none, everything else IAM; each is a Lambda proxy
    # integration to its function
    assert props["AuthorizationType"] == authorization
    assert "AuthorizerId" not in props
    assert props["Integration"]["Type"] == "AWS_PROXY"
    assert f"<{function_id}.Arn>" in render(props["Integration"]["Uri"])


def test_only_the_device_and_discovery_routes_are_public(resources: dict[str, dict]) -> None:
    # Given every method of the API
    # When collecting the ones without authorization
    public = {
        route
        for route, method in method_paths(resources).items()
        if method["Properties"]["AuthorizationType"] != "AWS_IAM"
    }

    # Then they are token, challenge, the data key, the two discovery documents, rotation (its
    # request and commit, the CA chain and CRL, EST), and nothing under /v1/admin
    assert public == {
        ("POST", "/v1/token"),
        ("POST", "/v1/challenge"),
        ("POST", "/v1/devices/{device_id}/data-key"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/.well-known/oauth-authorization-server"),
        ("POST", "/v1/devices/{device_id}/certificates"),
        ("POST", "/v1/devices/{device_id}/certificates/{certificate_id}/commit"),
        ("GET", "/v1/pki/ca"),
        ("GET", "/v1/pki/crl"),
        ("GET", "/.well-known/est/cacerts"),
        ("POST", "/.well-known/est/simplereenroll"),
    }


def test_admin_proxy_declares_its_path_parameter(resources: dict[str, dict]) -> None:
    # Given the admin proxy method
    props = method_paths(resources)[("ANY", "/v1/admin/{proxy+}")]["Properties"]

    # When reading its request parameters
    # Then the greedy path parameter is declared and required
    assert props["RequestParameters"] == {"method.request.path.proxy": True}


def test_validation_route_declares_the_validation_id(resources: dict[str, dict]) -> None:
    # Given the method that reads a validation's result
    props = method_paths(resources)[("GET", "/v1/validations/{validation_id}")]["Properties"]

    # When reading its request parameters
    # Then the validation id is declared and required
    assert props["RequestParameters"] == {"method.request.path.validation_id": True}


def test_data_key_route_declares_the_device_id(resources: dict[str, dict]) -> None:
    # Given the data-key method
    props = method_paths(resources)[("POST", "/v1/devices/{device_id}/data-key")]["Properties"]

    # When reading its request parameters
    # Then the device id is declared and required (the request validator checks it)
    assert props["RequestParameters"] == {"method.request.path.device_id": True}


def test_only_methods_with_path_parameters_declare_them(resources: dict[str, dict]) -> None:
    # Given every method
    # When reading their request parameters
    # Then exactly the parameterized paths declare them
    for (_, path), method in method_paths(resources).items():
        assert bool(method["Properties"].get("RequestParameters")) == ("{" in path), path


def test_requests_are_validated(resources: dict[str, dict]) -> None:
    # Given the request validator and every method
    validator_id, validator = only(resources, "AWS::ApiGateway::RequestValidator")
    methods = of_type(resources, "AWS::ApiGateway::Method")

    # When reading them
    # Then every method uses the validator, which checks parameters and bodies
    assert methods
    for method in methods.values():
        assert method["Properties"]["RequestValidatorId"] == {"Ref": validator_id}
    assert validator["Properties"]["ValidateRequestParameters"] is True
    assert validator["Properties"]["ValidateRequestBody"] is True


def test_stage_is_logged_traced_throttled_and_measured(template: Template) -> None:
    # Given the synthesized stack
    # When reading the deployment stage
    # Then access logs, execution logs without bodies, X-Ray, metrics and throttling are on
    template.has_resource_properties(
        "AWS::ApiGateway::Stage",
        {
            "StageName": constants.API_STAGE_NAME,
            "TracingEnabled": True,
            "AccessLogSetting": {"DestinationArn": Match.any_value(), "Format": Match.any_value()},
            "MethodSettings": Match.array_with(
                [
                    {
                        "HttpMethod": "*",
                        "ResourcePath": "/*",
                        "LoggingLevel": "INFO",
                        "DataTraceEnabled": False,
                        "MetricsEnabled": True,
                        "ThrottlingRateLimit": constants.API_THROTTLE_RATE,
                        "ThrottlingBurstLimit": constants.API_THROTTLE_BURST,
                    }
                ]
            ),
        },
    )


def test_public_methods_have_their_own_throttling(resources: dict[str, dict]) -> None:
    # Given the stage's method settings
    _, stage = only(resources, "AWS::ApiGateway::Stage")
    settings = stage["Properties"]["MethodSettings"]

    # When reading the per-method ones (a method setting's path is "/" and the resource path
    # with its "/" escaped as "~1": "/~1v1~1token")
    per_method = {
        (s["HttpMethod"], s["ResourcePath"].removeprefix("/").replace("~1", "/")): s
        for s in settings
        if s["ResourcePath"] != "/*"
    }

    # Then each public method, and only those, has its own limits, and keeps the stage's
    # logging (no bodies) and metrics
    assert set(per_method) == PUBLIC
    for route, (rate, burst) in EXPECTED_THROTTLES.items():
        assert per_method[route] == {
            "HttpMethod": route[0],
            "ResourcePath": "/" + route[1].replace("/", "~1"),
            "ThrottlingRateLimit": rate,
            "ThrottlingBurstLimit": burst,
            "LoggingLevel": "INFO",
            "DataTraceEnabled": False,
            "MetricsEnabled": True,
        }, route


def test_throttling_numbers_come_from_the_constants() -> None:
    # Given the constants module
    # When reading the public routes' limits
    # Then they are the reviewed numbers
    assert (constants.TOKEN_THROTTLE_RATE, constants.TOKEN_THROTTLE_BURST) == (50, 100)
    assert (constants.DISCOVERY_THROTTLE_RATE, constants.DISCOVERY_THROTTLE_BURST) == (100, 200)


def test_access_log_records_the_caller_identity(resources: dict[str, dict]) -> None:
    # Given the stage's access log format
    _, stage = only(resources, "AWS::ApiGateway::Stage")
    log_format = stage["Properties"]["AccessLogSetting"]["Format"]

    # When reading it
    # Then each record says which IAM principal called, and from which address
    assert "$context.identity.userArn" in log_format
    assert "$context.identity.sourceIp" in log_format


def test_api_is_regional_with_a_cloudwatch_role(template: Template) -> None:
    # Given the synthesized stack
    # When reading the API and the account settings
    # Then the endpoint is regional and API Gateway has a role to write its logs
    template.has_resource_properties(
        "AWS::ApiGateway::RestApi", {"EndpointConfiguration": {"Types": ["REGIONAL"]}}
    )
    template.resource_count_is("AWS::ApiGateway::Account", 1)


def test_stack_outputs_what_operators_need(template: Template) -> None:
    # Given the synthesized stack
    # When listing its outputs
    outputs = template.to_json()["Outputs"]

    # Then the table, the API URL and issuer, the first token key, the registration function and
    # its failure queue, the maintenance function and its schedule's dead-letter queue, the
    # lifecycle queue and its dead letters, converge, device_events and their queues, the
    # data-key key and the backend's decrypt policy are there
    assert {
        "TableName",
        "ApiUrl",
        "Issuer",
        "TokenSigningKeyId",
        "RegistrationFunctionName",
        "RegistrationRetryQueueUrl",
        "RegistrationFailureQueueUrl",
        "RegistrationRuleErrorQueueUrl",
        "MaintenanceFunctionName",
        "MaintenanceDeadLetterQueueUrl",
        "LifecycleQueueUrl",
        "LifecycleDeadLetterQueueUrl",
        "ConvergeFunctionName",
        "DeviceEventsFunctionName",
        "DeviceEventFailureQueueUrl",
        "TamperRuleErrorQueueUrl",
        "DataKeyId",
        "DataKeyAlias",
        "DataKeyDecryptPolicyArn",
    } <= set(outputs)


def test_issuer_output_is_the_functions_issuer(
    resources: dict[str, dict], template: Template
) -> None:
    # Given the Issuer output and the token function
    _, function = function_by_service(resources, constants.TOKEN_SERVICE_NAME)
    issuer = template.to_json()["Outputs"]["Issuer"]["Value"]

    # When comparing them
    # Then operators read the same issuer URL the functions use
    assert issuer == function["Properties"]["Environment"]["Variables"]["FLEETKEY_ISSUER"]


# ---- who may call what: the resource policy ------------------------------------------------------

OPERATOR = f"arn:{PARTITION}:iam::{ACCOUNT}:role/fleetkey-operator"
RELYING_PARTY = f"arn:{PARTITION}:iam::{ACCOUNT}:role/fleetkey-relying-party"
# The operator roles the stack creates (`<name prefix>-<role>`).
FLEET_ADMIN = f"arn:{PARTITION}:iam::{ACCOUNT}:role/fleetkey-fleet-admin"
RELEASE = f"arn:{PARTITION}:iam::{ACCOUNT}:role/fleetkey-release"
AUDITOR = f"arn:{PARTITION}:iam::{ACCOUNT}:role/fleetkey-auditor"


def _policy_statements(resources: dict[str, dict]) -> dict[str, dict]:
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    return {s["Sid"]: render(s) for s in api["Properties"]["Policy"]["Statement"]}


def test_resource_policy_opens_only_the_public_routes(resources: dict[str, dict]) -> None:
    # Given the REST API's resource policy
    statements = _policy_statements(resources)

    # When collecting what it allows
    allows = [s for s in statements.values() if s["Effect"] == "Allow"]

    # Then the one Allow is for everyone on exactly the public methods (unauthorized methods need
    # an explicit Allow once a policy exists; a path parameter is any value: `*`), and nothing
    # IAM-authorized is allowed by it
    assert len(allows) == 1
    assert allows[0]["Principal"] == "*" and allows[0]["Action"] == "execute-api:Invoke"
    assert sorted(allows[0]["Resource"]) == sorted(
        f"execute-api:/*/{method}{policy_path(path)}" for method, path in PUBLIC
    )
    assert "execute-api:/*/POST/v1/devices/*/data-key" in allows[0]["Resource"]


def test_policy_path_makes_path_parameters_wildcards() -> None:
    # Given resource paths with and without parameters
    # When turning them into resource-policy paths
    # Then each parameter is `*` (a request's ARN holds the actual value), the rest unchanged
    assert policy_path("/v1/devices/{device_id}/data-key") == "/v1/devices/*/data-key"
    assert policy_path("/v1/token") == "/v1/token"


@pytest.mark.parametrize(
    ("sid", "resource", "admitted"),
    [
        (
            "OnlyConfiguredOperators",
            "execute-api:/*/*/v1/admin/*",
            # the configured operators, and the operator roles the stack creates
            [OPERATOR, FLEET_ADMIN, RELEASE, AUDITOR],
        ),
        (
            "OnlyConfiguredRelyingParties",
            # each route, and anything under it (a trailing slash or a sub-path is another
            # resource-policy path)
            [
                "execute-api:/*/*/v1/introspect",
                "execute-api:/*/*/v1/introspect/*",
                "execute-api:/*/*/v1/validations",
                "execute-api:/*/*/v1/validations/*",
            ],
            [RELYING_PARTY],
        ),
    ],
)
def test_iam_routes_are_denied_outside_their_configured_principals(
    resources: dict[str, dict], sid: str, resource: str | list[str], admitted: list[str]
) -> None:
    # Given the resource policy, synthesized with the default edge configuration
    statement = _policy_statements(resources)[sid]

    # When reading the statement guarding one group of IAM routes
    # Then it is an explicit Deny (same-account callers are admitted if EITHER their identity
    # policy or the resource policy allows: only a Deny narrows) for every principal whose ARN is
    # not a configured one
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*" and statement["Action"] == "execute-api:Invoke"
    assert statement["Resource"] == resource
    assert statement["Condition"] == {"ArnNotLike": {"aws:PrincipalArn": admitted}}


# ---- per-client limits: the WAF web ACL ----------------------------------------------------------

# The rate-based rules: name -> (limit, window, the URI path fragments they count)
EXPECTED_RATE_RULES = {
    "token-per-client": (60, 60, ["/v1/token", "/v1/challenge", "/v1/devices/"]),
    "discovery-per-client": (300, 60, ["/v1/pki/", "/.well-known/"]),
}


def _scope_down_fragments(statement: dict) -> list[str]:
    matches = statement["OrStatement"]["Statements"] if "OrStatement" in statement else [statement]
    fragments = []
    for match in matches:
        byte_match = match["ByteMatchStatement"]
        assert byte_match["FieldToMatch"] == {"UriPath": {}}
        assert byte_match["PositionalConstraint"] == "CONTAINS"
        assert [t["Type"] for t in byte_match["TextTransformations"]] == [
            "URL_DECODE",
            "NORMALIZE_PATH",
            "LOWERCASE",
        ]
        fragments.append(byte_match["SearchString"])
    return fragments


def test_web_acl_limits_each_client_on_the_public_routes(resources: dict[str, dict]) -> None:
    # Given the web ACL
    _, acl = only(resources, "AWS::WAFv2::WebACL")
    props = acl["Properties"]
    rules = {rule["Name"]: rule for rule in props["Rules"]}

    # When reading its rules
    # Then it is regional, lets through what no rule blocks, and has one rate-based rule per
    # group of public routes, counting each source IP on those paths alone, with its limit
    assert props["Scope"] == "REGIONAL"
    assert props["DefaultAction"] == {"Allow": {}}
    assert set(rules) == set(EXPECTED_RATE_RULES)
    for name, (limit, window, fragments) in EXPECTED_RATE_RULES.items():
        statement = rules[name]["Statement"]["RateBasedStatement"]
        assert statement["AggregateKeyType"] == "IP", name
        assert (statement["Limit"], statement["EvaluationWindowSec"]) == (limit, window), name
        assert _scope_down_fragments(statement["ScopeDownStatement"]) == fragments, name
        assert rules[name]["VisibilityConfig"]["CloudWatchMetricsEnabled"] is True
        assert rules[name]["VisibilityConfig"]["SampledRequestsEnabled"] is True
    assert props["VisibilityConfig"]["CloudWatchMetricsEnabled"] is True


def test_every_public_route_is_under_exactly_one_rate_rule(resources: dict[str, dict]) -> None:
    # Given the rules' path fragments, and the public routes
    _, acl = only(resources, "AWS::WAFv2::WebACL")
    fragments = {
        rule["Name"]: _scope_down_fragments(
            rule["Statement"]["RateBasedStatement"]["ScopeDownStatement"]
        )
        for rule in acl["Properties"]["Rules"]
    }

    # When matching each public route's stage path against them (as WAF sees it: /prod/...)
    # Then each falls under one rule, and no IAM route under any
    for method, path in EXPECTED_METHODS:
        uri = f"/{constants.API_STAGE_NAME}{path}".lower()
        covering = [name for name, frags in fragments.items() if any(f in uri for f in frags)]
        expected = 1 if (method, path) in PUBLIC else 0
        assert len(covering) == expected, (path, covering)


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        # a device's data key counts with its tokens
        ("/prod/v1/devices/pump-1/data-key", "token-per-client"),
        ("/prod/v1/devices/pump%2D1/DATA-KEY", "token-per-client"),
        # and so do its rotations and their commits
        ("/prod/v1/devices/pump-1/certificates", "token-per-client"),
        ("/prod/v1/devices/pump-1/certificates/ab12/commit", "token-per-client"),
        # the issuing CA's public documents count with the discovery documents
        ("/prod/v1/pki/crl", "discovery-per-client"),
        ("/prod/.well-known/est/cacerts", "discovery-per-client"),
        # the operators' PKI routes are in no rule
        ("/prod/v1/admin/pki/init", None),
        # the backend reading wrapped data keys through the admin API is not counted with devices
        ("/prod/v1/admin/devices/pump-1/data-key", None),
        ("/prod/v1/admin/devices/pump-1/decommission", None),
    ],
)
def test_device_routes_are_limited_with_the_token_endpoint(
    resources: dict[str, dict], path: str, rule: str | None
) -> None:
    # Given the rules' path fragments
    _, acl = only(resources, "AWS::WAFv2::WebACL")
    fragments = {
        r["Name"]: _scope_down_fragments(r["Statement"]["RateBasedStatement"]["ScopeDownStatement"])
        for r in acl["Properties"]["Rules"]
    }

    # When matching a request's path as WAF sees it (decoded, normalized, lowercased)
    seen = edge.normalize_path(path)
    covering = [name for name, frags in fragments.items() if any(f in seen for f in frags)]

    # Then the device-facing data-key route shares the token endpoint's per-client limit, and the
    # admin API's device routes fall under none
    assert covering == ([rule] if rule else [])


def test_a_client_over_its_limit_gets_429_with_retry_after(resources: dict[str, dict]) -> None:
    # Given the web ACL
    _, acl = only(resources, "AWS::WAFv2::WebACL")
    props = acl["Properties"]

    # When reading what its rate rules do
    # Then they block with a 429 (not WAF's default 403), a Retry-After of the window, and a
    # JSON body like API Gateway's own throttling answer
    for rule in props["Rules"]:
        response = rule["Action"]["Block"]["CustomResponse"]
        window = rule["Statement"]["RateBasedStatement"]["EvaluationWindowSec"]
        assert response["ResponseCode"] == 429
        assert response["ResponseHeaders"] == [{"Name": "Retry-After", "Value": str(window)}]
        body = props["CustomResponseBodies"][response["CustomResponseBodyKey"]]
        assert body["ContentType"] == "APPLICATION_JSON"
        assert json.loads(body["Content"]) == {"message": "Too Many Requests"}


def test_web_acl_is_associated_with_the_stage(resources: dict[str, dict]) -> None:
    # Given the web ACL association, the API and its stage
    _, association = only(resources, "AWS::WAFv2::WebACLAssociation")
    acl_id, _ = only(resources, "AWS::WAFv2::WebACL")
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    stage_id, _ = only(resources, "AWS::ApiGateway::Stage")

    # When reading what it associates
    props = render(association["Properties"])

    # Then the ACL protects the API's deployed stage
    assert props["WebACLArn"] == f"<{acl_id}.Arn>"
    assert props["ResourceArn"] == (
        f"arn:{PARTITION}:apigateway:{REGION}::/restapis/<{api_id}>/stages/<{stage_id}>"
    )


def test_blocked_requests_are_logged_without_credentials(resources: dict[str, dict]) -> None:
    # Given the web ACL's logging configuration and its log group
    _, logging = only(resources, "AWS::WAFv2::LoggingConfiguration")
    acl_id, _ = only(resources, "AWS::WAFv2::WebACL")
    props = render(logging["Properties"])
    [destination] = props["LogDestinationConfigs"]
    group_id = destination.rsplit(":log-group:<", 1)[1].rstrip(">")

    # When reading them
    # Then the ACL logs what it blocks or counts, to an aws-waf-logs- group (WAF's required
    # prefix) with a retention, and redacts SigV4 signatures and session tokens
    assert props["ResourceArn"] == f"<{acl_id}.Arn>"
    assert resources[group_id]["Properties"]["LogGroupName"].startswith("aws-waf-logs-")
    assert resources[group_id]["Properties"]["RetentionInDays"] > 0
    assert props["LoggingFilter"]["DefaultBehavior"] == "DROP"
    assert {
        c["ActionCondition"]["Action"] for c in props["LoggingFilter"]["Filters"][0]["Conditions"]
    } == {"BLOCK", "COUNT"}
    assert {f["SingleHeader"]["Name"] for f in props["RedactedFields"]} == {
        "authorization",
        "x-amz-security-token",
    }


# ---- the edge configuration, from CDK context ----------------------------------------------------


def _api_template(context: dict[str, object], account: str | None = None) -> dict[str, dict]:
    """The Api construct alone, in a stack with `context` (a stand-in method: the API must have
    one to synthesize); environment-agnostic unless `account` is given."""
    app = App(context=context)
    env = Environment(account=account, region="eu-west-1") if account else None
    stack = Stack(app, "EdgeTest", env=env)
    api = Api(stack, "Api")
    api.api.root.add_method("GET", apigateway.MockIntegration())
    return Template.from_stack(stack).to_json()["Resources"]


def test_operators_relying_parties_and_limits_come_from_context() -> None:
    # Given context naming operators (an ARN with a wildcard, a role of the stack's account),
    # no relying party, and other limits
    context = {
        edge.OPERATOR_PRINCIPALS_KEY: ["arn:aws:iam::111122223333:role/ops/*", "role/break-glass"],
        edge.RELYING_PARTY_PRINCIPALS_KEY: [],
        edge.TOKEN_RATE_LIMIT_KEY: "120",  # as `cdk -c tokenRateLimit=120` passes it
        edge.RATE_LIMIT_WINDOW_KEY: 300,
    }

    # When synthesizing the API with it
    resources = _api_template(context)
    statements = _policy_statements(resources)
    _, acl = only(resources, "AWS::WAFv2::WebACL")
    rules = {r["Name"]: r["Statement"]["RateBasedStatement"] for r in acl["Properties"]["Rules"]}

    # Then the admin routes admit exactly those operators, introspection nobody, and the limits
    # are the configured ones
    assert statements["OnlyConfiguredOperators"]["Condition"] == {
        "ArnNotLike": {
            "aws:PrincipalArn": [
                "arn:aws:iam::111122223333:role/ops/*",
                f"arn:{PARTITION}:iam::{ACCOUNT}:role/break-glass",
                FLEET_ADMIN,
                RELEASE,
                AUDITOR,
            ]
        }
    }
    assert "Condition" not in statements["OnlyConfiguredRelyingParties"]
    assert statements["OnlyConfiguredRelyingParties"]["Effect"] == "Deny"
    assert (
        rules["token-per-client"]["Limit"],
        rules["token-per-client"]["EvaluationWindowSec"],
    ) == (
        120,
        300,
    )
    assert rules["discovery-per-client"]["Limit"] == edge.DEFAULT_DISCOVERY_RATE_LIMIT


@pytest.mark.parametrize(
    ("context", "complaint"),
    [
        ({edge.OPERATOR_PRINCIPALS_KEY: []}, "admit nobody"),
        ({edge.OPERATOR_PRINCIPALS_KEY: ["*"]}, "not an IAM role or user"),
        ({edge.OPERATOR_PRINCIPALS_KEY: ["role/*"]}, "matches every role"),
        (
            {edge.OPERATOR_PRINCIPALS_KEY: ["arn:aws:sts::111122223333:assumed-role/ops/s"]},
            "name the role",
        ),
        ({edge.OPERATOR_PRINCIPALS_KEY: ["arn:aws:iam::*:role/ops"]}, "no wildcard"),
        (
            {
                edge.OPERATOR_PRINCIPALS_KEY: ["arn:aws:iam::111122223333:role/ops"],
                edge.RELYING_PARTY_PRINCIPALS_KEY: ["arn:aws:iam::444455556666:role/rp"],
            },
            "several accounts",
        ),
        ({edge.RATE_LIMIT_WINDOW_KEY: 30}, "evaluation windows"),
        ({edge.TOKEN_RATE_LIMIT_KEY: 5}, "between 10"),
        ({edge.DISCOVERY_RATE_LIMIT_KEY: "many"}, "whole number"),
    ],
)
def test_an_unsafe_or_impossible_edge_configuration_fails_synthesis(
    context: dict[str, object], complaint: str
) -> None:
    # Given context that admits nobody or everybody, or a limit WAF cannot apply
    # When building the API, Then synthesis stops with a message saying what to fix
    with pytest.raises(edge.EdgeConfigError, match=complaint):
        _api_template(context)


@pytest.mark.parametrize(
    "key", [edge.OPERATOR_PRINCIPALS_KEY, edge.RELYING_PARTY_PRINCIPALS_KEY], ids=["ops", "rps"]
)
def test_a_principal_of_another_account_fails_synthesis(key: str) -> None:
    # Given a stack in account 111122223333 and a principal of another account (the resource
    # policy allows no principal of another account: it could never be admitted)
    context = {key: ["arn:aws:iam::444455556666:role/ops"]}

    # When synthesizing, Then synthesis stops and says why
    with pytest.raises(edge.EdgeConfigError, match="could never be admitted"):
        _api_template(context, account="111122223333")
    # and the same principal in the stack's own account is accepted
    _api_template({key: ["arn:aws:iam::111122223333:role/ops"]}, account="111122223333")


def test_an_environment_agnostic_stack_asserts_the_named_account_at_deployment() -> None:
    # Given an environment-agnostic stack (the account unknown at synthesis) whose operators are
    # named by full ARN
    context = {edge.OPERATOR_PRINCIPALS_KEY: ["arn:aws:iam::111122223333:role/ops"]}

    # When synthesizing it
    app = App(context=context)
    stack = Stack(app, "EdgeTest")
    Api(stack, "Api").api.root.add_method("GET", apigateway.MockIntegration())
    rules = Template.from_stack(stack).to_json().get("Rules", {})

    # Then a template rule fails the deployment in any other account
    (assertion,) = rules["ApiPrincipalsOfThisAccountF4FCC660"]["Assertions"]
    assert assertion["Assert"] == {"Fn::Equals": [{"Ref": "AWS::AccountId"}, "111122223333"]}


# ---- the operator roles: people and pipelines, each held to its job ------------------------------

FIRMWARE_ROUTES = ["/v1/admin/firmware", "/v1/admin/firmware/*"]


def _operator_roles(resources: dict[str, dict]) -> dict[str, dict]:
    """The operator roles by name (`fleetkey-<role>`)."""
    return {
        r["Properties"]["RoleName"]: r["Properties"]
        for lid, r in of_type(resources, "AWS::IAM::Role").items()
        if lid.startswith("ApiOperatorRoles")
    }


def _invocations(resources: dict[str, dict], role: dict) -> list[str]:
    """The role's allowed `execute-api:Invoke` resources on this API, as
    `<stage>/<METHOD><path>`."""
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    [policy] = role["Policies"]
    [statement] = render(policy["PolicyDocument"]["Statement"])
    assert statement["Action"] == "execute-api:Invoke" and statement["Effect"] == "Allow"
    granted = statement["Resource"]
    granted = granted if isinstance(granted, list) else [granted]
    prefix = f"arn:{PARTITION}:execute-api:{REGION}:{ACCOUNT}:<{api_id}>/"
    assert all(resource.startswith(prefix) for resource in granted), granted
    return sorted(resource.removeprefix(prefix) for resource in granted)


def test_the_stack_creates_three_operator_roles_trusting_the_account(
    resources: dict[str, dict],
) -> None:
    # Given the operator roles
    roles = _operator_roles(resources)

    # When reading their names, trust and sessions
    # Then there are fleet-admin, release and auditor, named after the stack's name prefix, each
    # assumable by principals of the account (whose own policy allows it) only, for an hour at
    # most, with no managed policy and one inline policy
    assert set(roles) == {"fleetkey-fleet-admin", "fleetkey-release", "fleetkey-auditor"}
    for name, role in roles.items():
        [trust] = role["AssumeRolePolicyDocument"]["Statement"]
        assert render(trust) == {
            "Action": "sts:AssumeRole",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:{PARTITION}:iam::{ACCOUNT}:root"},
        }, name
        assert role["MaxSessionDuration"] == 3600, name
        assert "ManagedPolicyArns" not in role and len(role["Policies"]) == 1, name
        assert role["Description"].startswith(f"fleetkey {name.removeprefix('fleetkey-')}: ")


METHODS = ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]


@pytest.mark.parametrize(
    ("role", "invocations"),
    [
        # every method on every admin route (the PKI routes and firmware included)
        ("fleetkey-fleet-admin", [f"prod/{m}/v1/admin/*" for m in METHODS]),
        # the firmware routes only
        ("fleetkey-release", [f"prod/{m}{p}" for m in METHODS for p in FIRMWARE_ROUTES]),
        # reading only
        ("fleetkey-auditor", ["prod/GET/v1/admin/*"]),
    ],
)
def test_each_operator_role_may_invoke_exactly_its_routes(
    resources: dict[str, dict], role: str, invocations: list[str]
) -> None:
    # Given one operator role's identity policy
    # When reading what it allows
    # Then it is execute-api:Invoke on this API's stage, method by method (a `*` in the method's
    # place would match paths that merely end like an admin route), on its routes only
    granted = _invocations(resources, _operator_roles(resources)[role])
    assert granted == sorted(invocations)


def test_the_release_role_is_denied_everything_but_the_firmware_routes(
    resources: dict[str, dict],
) -> None:
    # Given the resource policy
    statement = _policy_statements(resources)["ScopeOfRelease"]

    # When reading the statement that holds the release role to its job
    # Then it denies the release role every request of the API but the firmware routes' (a
    # broader identity policy attached to the role would otherwise admit it: same-account
    # principals need only their identity policy); stage and methods spelled out, so that no
    # other path is carved out of the Deny; full ARNs (any API of the account), since API Gateway
    # documents expanding `execute-api:/...` for Resource only
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*" and statement["Action"] == "execute-api:Invoke"
    assert statement["Condition"] == {"ArnLike": {"aws:PrincipalArn": [RELEASE]}}
    assert "Resource" not in statement
    arn = "arn:<AWS::Partition>:execute-api:<AWS::Region>:<AWS::AccountId>:*"
    assert sorted(statement["NotResource"]) == sorted(
        f"{arn}/prod/{m}{p}" for m in METHODS for p in FIRMWARE_ROUTES
    )


def test_the_auditor_is_denied_every_admin_method_but_get(resources: dict[str, dict]) -> None:
    # Given the resource policy
    statement = _policy_statements(resources)["ScopeOfAuditor"]

    # When reading the statement that holds the auditor to reading
    # Then every other method on every admin route is denied to it, on any stage
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*" and statement["Action"] == "execute-api:Invoke"
    assert statement["Condition"] == {"ArnLike": {"aws:PrincipalArn": [AUDITOR]}}
    assert sorted(statement["Resource"]) == sorted(
        f"execute-api:/*/{m}/v1/admin/*" for m in METHODS if m != "GET"
    )


def test_the_fleet_admin_needs_no_scope_of_its_own(resources: dict[str, dict]) -> None:
    # Given the resource policy
    statements = _policy_statements(resources)

    # When looking for Denies naming the fleet admin
    naming = [s for s in statements.values() if FLEET_ADMIN in json.dumps(s)]

    # Then only the operators' statement names it (as admitted): it may call every admin route
    assert [s["Sid"] for s in naming] == ["OnlyConfiguredOperators"]


def test_the_stack_outputs_the_operator_roles(
    resources: dict[str, dict], template: Template
) -> None:
    # Given the outputs and the operator roles
    outputs = template.to_json()["Outputs"]
    roles = {
        props["RoleName"]: lid
        for lid, r in of_type(resources, "AWS::IAM::Role").items()
        if lid.startswith("ApiOperatorRoles")
        for props in [r["Properties"]]
    }

    # When reading the role outputs
    # Then each role's ARN is there, for the people and pipelines that assume it
    assert {
        name: outputs[name]["Value"]
        for name in ("FleetAdminRoleArn", "ReleaseRoleArn", "AuditorRoleArn")
    } == {
        "FleetAdminRoleArn": {"Fn::GetAtt": [roles["fleetkey-fleet-admin"], "Arn"]},
        "ReleaseRoleArn": {"Fn::GetAtt": [roles["fleetkey-release"], "Arn"]},
        "AuditorRoleArn": {"Fn::GetAtt": [roles["fleetkey-auditor"], "Arn"]},
    }


# Requests as API Gateway authorizes them: (method, path) -> the roles whose scope holds it.
SCOPED_REQUESTS = {
    ("GET", "/v1/admin/devices/pump-1"): {"fleet-admin", "auditor"},
    ("POST", "/v1/admin/devices/pump-1/suspend"): {"fleet-admin"},
    ("GET", "/v1/admin/devices/pump-1/audit"): {"fleet-admin", "auditor"},
    ("POST", "/v1/admin/allowlist/import"): {"fleet-admin"},
    ("GET", "/v1/admin/pki"): {"fleet-admin", "auditor"},
    ("POST", "/v1/admin/pki/init"): {"fleet-admin"},
    ("POST", "/v1/admin/signing-keys/rotate"): {"fleet-admin"},
    ("GET", "/v1/admin/firmware"): {"fleet-admin", "release", "auditor"},
    ("POST", "/v1/admin/firmware"): {"fleet-admin", "release"},
    ("GET", "/v1/admin/firmware/infusion-pump/ab12"): {"fleet-admin", "release", "auditor"},
    ("POST", "/v1/admin/firmware/infusion-pump/ab12/revoke"): {"fleet-admin", "release"},
    ("DELETE", "/v1/admin/firmware/infusion-pump/ab12"): {"fleet-admin", "release"},
    ("HEAD", "/v1/admin/devices"): {"fleet-admin"},
    # a path that only looks like the firmware routes is not one of them
    ("GET", "/v1/admin/firmwares"): {"fleet-admin", "auditor"},
    ("POST", "/v1/admin/devices/x/v1/admin/firmware"): {"fleet-admin"},
    # nothing outside the admin API
    ("POST", "/v1/introspect"): set(),
    ("POST", "/v1/validations"): set(),
    ("GET", "/v1/validations/v-1"): set(),
}


@pytest.mark.parametrize(("method", "path"), sorted(SCOPED_REQUESTS))
def test_a_roles_scope_and_its_resource_policy_deny_agree(method: str, path: str) -> None:
    # Given each operator role, its identity policy's scope and its Deny in the resource policy
    for role in edge.OPERATOR_ROLES:
        arn = role.arn("aws", "111122223333", "fleetkey")
        deny = role.deny("aws", "111122223333", "fleetkey")

        # When deciding one request
        permitted = role.permits(method, path)
        denied = deny is not None and deny.refuses(arn, method, path)

        # Then the scope holds exactly the expected requests, and on the admin routes the
        # resource policy denies it exactly what its scope does not hold
        assert permitted == (role.name in SCOPED_REQUESTS[(method, path)]), role.name
        if path.startswith("/v1/admin/"):
            assert denied == (not permitted), role.name


def test_operator_roles_follow_the_name_prefix() -> None:
    # Given a stack whose name prefix is not the default
    app = App()
    stack = Stack(app, "PrefixTest")
    api = Api(stack, "Api", name_prefix="acme-fk")
    api.api.root.add_method("GET", apigateway.MockIntegration())
    resources = Template.from_stack(stack).to_json()["Resources"]

    # When reading the roles and the resource policy
    names = {r["Properties"].get("RoleName") for r in of_type(resources, "AWS::IAM::Role").values()}
    statements = _policy_statements(resources)

    # Then roles, admitted operators and scoped principals follow it
    assert {"acme-fk-fleet-admin", "acme-fk-release", "acme-fk-auditor"} <= names
    operators = statements["OnlyConfiguredOperators"]["Condition"]["ArnNotLike"]
    assert f"arn:{PARTITION}:iam::{ACCOUNT}:role/acme-fk-release" in operators["aws:PrincipalArn"]
    assert statements["ScopeOfAuditor"]["Condition"] == {
        "ArnLike": {"aws:PrincipalArn": [f"arn:{PARTITION}:iam::{ACCOUNT}:role/acme-fk-auditor"]}
    }
    assert isinstance(api.operator_roles, OperatorRoles)
