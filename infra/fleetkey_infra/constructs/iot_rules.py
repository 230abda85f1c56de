"""The AWS IoT rule that turns a certificate's first connection into a registration (JITR)."""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.dead_letters import dead_letter_queue


class RegistrationRule(Construct):
    """`$aws/events/certificates/registered/+` -> the registration function.

    When AWS IoT cannot invoke the function at all (throttled, function missing), the rule's error
    action keeps the event in the `errors` queue. Failures inside the function are the function's
    own async retry and failure destination.

    Attributes: `rule` (iot.CfnTopicRule), `errors` (sqs.Queue), `error_role` (iam.Role),
    `invoke_permission` (lambda.CfnPermission).
    """

    def __init__(self, scope: Construct, construct_id: str, *, function: lambda_.IFunction) -> None:
        super().__init__(scope, construct_id)
        self.errors = self._build_error_queue()
        self.error_role = self._build_error_role(self.errors)
        self.rule = self._build_rule(function)
        self.invoke_permission = self._build_invoke_permission(function)

    def _build_error_queue(self) -> sqs.Queue:
        return dead_letter_queue(
            self,
            "Errors",
            holds="the IoT rule's error action for registration events it could not deliver to "
            "the function. An operator replays them.",
        )

    def _build_error_role(self, errors: sqs.IQueue) -> iam.Role:
        role = iam.Role(
            self,
            "ErrorActionRole",
            assumed_by=iam.ServicePrincipal(
                "iot.amazonaws.com",
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            ),
            description="fleetkey registration rule: deliver failed invocations to the error queue",
        )
        errors.grant_send_messages(role)
        return role

    def _build_rule(self, function: lambda_.IFunction) -> iot.CfnTopicRule:
        return iot.CfnTopicRule(
            self,
            "Rule",
            topic_rule_payload=iot.CfnTopicRule.TopicRulePayloadProperty(
                description="fleetkey just-in-time registration of device certificates",
                sql=constants.REGISTRATION_RULE_SQL,
                aws_iot_sql_version=constants.IOT_SQL_VERSION,
                rule_disabled=False,
                actions=[
                    iot.CfnTopicRule.ActionProperty(
                        lambda_=iot.CfnTopicRule.LambdaActionProperty(
                            function_arn=function.function_arn
                        )
                    )
                ],
                error_action=iot.CfnTopicRule.ActionProperty(
                    sqs=iot.CfnTopicRule.SqsActionProperty(
                        queue_url=self.errors.queue_url,
                        role_arn=self.error_role.role_arn,
                        use_base64=False,
                    )
                ),
            ),
        )

    def _build_invoke_permission(self, function: lambda_.IFunction) -> lambda_.CfnPermission:
        # Only this rule, in this account, may invoke the function.
        return lambda_.CfnPermission(
            self,
            "InvokePermission",
            action="lambda:InvokeFunction",
            function_name=function.function_arn,
            principal="iot.amazonaws.com",
            source_arn=self.rule.attr_arn,
            source_account=Aws.ACCOUNT_ID,
        )
