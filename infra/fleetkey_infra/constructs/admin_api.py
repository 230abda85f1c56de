"""The operator API: `/v1/admin/{proxy+}` on a regional REST API, IAM (SigV4) authenticated."""

from __future__ import annotations

import json

from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.nag import acknowledge

# Access log record: who called (the IAM principal is the operator's identity), what, and how it
# ended. One JSON object per line, so CloudWatch Logs Insights can query it.
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


class AdminApi(Construct):
    """Attributes: `api` (apigateway.RestApi), `access_logs` (logs.LogGroup), `validator`
    (apigateway.RequestValidator), `proxy_method` (apigateway.Method), `url` (str)."""

    def __init__(
        self, scope: Construct, construct_id: str, *, function: lambda_.IFunction
    ) -> None:
        super().__init__(scope, construct_id)
        self.access_logs = self._build_access_logs()
        self.api = self._build_api(self.access_logs)
        self.validator = self._build_validator()
        self.proxy_method = self._build_routes(function)
        self.url = self.api.url
        self._acknowledge_findings()

    def _acknowledge_findings(self) -> None:
        acknowledge(
            self.api,
            "AwsSolutions-COG4",
            "Operators and relying parties are AWS principals: every method uses IAM (SigV4) "
            "authorization, which the design requires instead of a Cognito user pool.",
        )
        acknowledge(
            self.api,
            "AwsSolutions-APIG3",
            "IAM-authorized operator API: API Gateway rejects unsigned requests before any "
            "integration runs and the stage is throttled. A WAF web ACL is an account-level "
            "choice (rules, cost) and can be associated with the stage at deployment.",
        )
        acknowledge(
            self.api,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonAPIGatewayPushToCloudWatchLogs]",
            "The account-level role API Gateway uses to write execution and access logs; AWS's "
            "managed policy is the documented one for this service role and grants only "
            "CloudWatch Logs actions.",
        )

    def _build_access_logs(self) -> logs.LogGroup:
        return logs.LogGroup(self, "AccessLogs", retention=constants.LOG_RETENTION)

    def _build_api(self, access_logs: logs.ILogGroup) -> apigateway.RestApi:
        api = apigateway.RestApi(
            self,
            "Api",
            description="fleetkey operator API (IAM authenticated)",
            endpoint_configuration=apigateway.EndpointConfiguration(
                types=[apigateway.EndpointType.REGIONAL]
            ),
            # API Gateway writes execution and access logs only once the account has a CloudWatch
            # role; this stack sets it (one per account and region).
            cloud_watch_role=True,
            # Everything is IAM-authenticated unless a method says otherwise, and none does.
            default_method_options=apigateway.MethodOptions(
                authorization_type=apigateway.AuthorizationType.IAM
            ),
            deploy_options=apigateway.StageOptions(
                stage_name=constants.API_STAGE_NAME,
                access_log_destination=apigateway.LogGroupLogDestination(access_logs),
                access_log_format=apigateway.AccessLogFormat.custom(
                    json.dumps(_ACCESS_LOG_FORMAT)
                ),
                logging_level=apigateway.MethodLoggingLevel.INFO,
                # Request and response bodies carry manifests and certificates: keep them out of
                # the execution logs.
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
                throttling_rate_limit=constants.API_THROTTLE_RATE,
                throttling_burst_limit=constants.API_THROTTLE_BURST,
            ),
        )
        # RestApi adds an "Endpoint" output of its own; the stack publishes the URL under a
        # stable name (AdminApiUrl) instead of the generated one.
        api.node.try_remove_child("Endpoint")
        return api

    def _build_validator(self) -> apigateway.RequestValidator:
        # Bodies are validated by the admin function against its own models (one schema, in the
        # code); the validator enforces the declared request parameters and any model added later.
        return self.api.add_request_validator(
            "Validator", validate_request_body=True, validate_request_parameters=True
        )

    def _build_routes(self, function: lambda_.IFunction) -> apigateway.Method:
        admin = self.api.root
        for segment in constants.API_PATH:
            admin = admin.add_resource(segment)
        proxy = admin.add_resource("{proxy+}")
        return proxy.add_method(
            "ANY",
            apigateway.LambdaIntegration(function, proxy=True),
            authorization_type=apigateway.AuthorizationType.IAM,
            request_validator=self.validator,
            request_parameters={"method.request.path.proxy": True},
        )
