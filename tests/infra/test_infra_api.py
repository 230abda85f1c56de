"""The API: public device routes, IAM everywhere else; logged, traced, throttled, validated,
regional."""

import pytest
from aws_cdk.assertions import Match, Template
from fleetkey_infra import constants
from infra_template import function_by_service, method_paths, of_type, only, render

# Every method of the API: (HTTP method, resource path) -> (function, authorization type).
EXPECTED_METHODS = {
    ("ANY", "/v1/admin/{proxy+}"): (constants.ADMIN_SERVICE_NAME, "AWS_IAM"),
    ("POST", "/v1/introspect"): (constants.INTROSPECT_SERVICE_NAME, "AWS_IAM"),
    ("POST", "/v1/token"): (constants.TOKEN_SERVICE_NAME, "NONE"),
    ("POST", "/v1/challenge"): (constants.TOKEN_SERVICE_NAME, "NONE"),
    ("GET", "/.well-known/jwks.json"): (constants.DISCOVERY_SERVICE_NAME, "NONE"),
    ("GET", "/.well-known/oauth-authorization-server"): (constants.DISCOVERY_SERVICE_NAME, "NONE"),
}
PUBLIC = {route for route, (_, auth) in EXPECTED_METHODS.items() if auth == "NONE"}
# Throttling of the public methods: (steady rate, burst).
EXPECTED_THROTTLES = {
    ("POST", "/v1/token"): (50, 100),
    ("POST", "/v1/challenge"): (50, 100),
    ("GET", "/.well-known/jwks.json"): (100, 200),
    ("GET", "/.well-known/oauth-authorization-server"): (100, 200),
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

    # Then they are token, challenge and the two discovery documents, and nothing under /v1/admin
    assert public == {
        ("POST", "/v1/token"),
        ("POST", "/v1/challenge"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/.well-known/oauth-authorization-server"),
    }


def test_admin_proxy_declares_its_path_parameter(resources: dict[str, dict]) -> None:
    # Given the admin proxy method
    props = method_paths(resources)[("ANY", "/v1/admin/{proxy+}")]["Properties"]

    # When reading its request parameters
    # Then the greedy path parameter is declared and required
    assert props["RequestParameters"] == {"method.request.path.proxy": True}


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
    # its failure queue, the maintenance function and its schedule's dead-letter queue are there
    assert {
        "TableName",
        "ApiUrl",
        "Issuer",
        "TokenSigningKeyId",
        "RegistrationFunctionName",
        "RegistrationFailureQueueUrl",
        "MaintenanceFunctionName",
        "MaintenanceDeadLetterQueueUrl",
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
