"""The admin API: IAM everywhere, logged, traced, throttled, validated, regional."""

from aws_cdk.assertions import Match, Template
from fleetkey_infra import constants
from infra_template import function_by_service, of_type, only, render


def test_every_method_requires_iam_authorization(resources: dict[str, dict]) -> None:
    # Given every method of the API
    methods = of_type(resources, "AWS::ApiGateway::Method")

    # When reading their authorization
    # Then there is no unauthenticated method at all
    assert methods
    for method in methods.values():
        assert method["Properties"]["AuthorizationType"] == "AWS_IAM"


def test_admin_proxy_forwards_any_method_to_the_admin_function(
    resources: dict[str, dict],
) -> None:
    # Given the one method and the admin function
    admin_id, _ = function_by_service(resources, constants.ADMIN_SERVICE_NAME)
    _, method = only(resources, "AWS::ApiGateway::Method")
    props = method["Properties"]

    # When following the method's resource up to the root
    path = []
    resource_ref = props["ResourceId"]
    while resources.get(resource_ref.get("Ref"), {}).get("Type") == "AWS::ApiGateway::Resource":
        resource = resources[resource_ref["Ref"]]["Properties"]
        path.insert(0, resource["PathPart"])
        resource_ref = resource["ParentId"]

    # Then ANY /v1/admin/{proxy+} is a Lambda proxy integration to the admin function
    assert path == ["v1", "admin", "{proxy+}"]
    assert props["HttpMethod"] == "ANY"
    assert props["Integration"]["Type"] == "AWS_PROXY"
    assert f"<{admin_id}.Arn>" in render(props["Integration"]["Uri"])


def test_requests_are_validated(resources: dict[str, dict]) -> None:
    # Given the request validator and the method
    validator_id, validator = only(resources, "AWS::ApiGateway::RequestValidator")
    _, method = only(resources, "AWS::ApiGateway::Method")

    # When reading both
    # Then the method uses the validator, which checks parameters and bodies
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
            "MethodSettings": [
                {
                    "HttpMethod": "*",
                    "ResourcePath": "/*",
                    "LoggingLevel": "INFO",
                    "DataTraceEnabled": False,
                    "MetricsEnabled": True,
                    "ThrottlingRateLimit": constants.API_THROTTLE_RATE,
                    "ThrottlingBurstLimit": constants.API_THROTTLE_BURST,
                }
            ],
        },
    )


def test_access_log_records_the_caller_identity(resources: dict[str, dict]) -> None:
    # Given the stage's access log format
    _, stage = only(resources, "AWS::ApiGateway::Stage")
    log_format = stage["Properties"]["AccessLogSetting"]["Format"]

    # When reading it
    # Then each record says which IAM principal called
    assert "$context.identity.userArn" in log_format


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

    # Then the table, the API URL, the registration function and its failure queue are there
    assert {
        "TableName",
        "AdminApiUrl",
        "RegistrationFunctionName",
        "RegistrationFailureQueueUrl",
    } <= set(outputs)
