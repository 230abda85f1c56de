"""The AWS IoT rules that invoke fleetkey functions: a certificate's first connection becomes a
registration (JITR), a device's tamper report a suspension, a device's connection a rotation's
commit."""

from __future__ import annotations

from aws_cdk import Aws
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.dead_letters import dead_letter_queue


class FunctionRule(Construct):
    """An IoT topic rule (`sql`) -> `function`, invoked asynchronously.

    When AWS IoT cannot invoke the function at all (throttled, function missing), the rule's error
    action keeps the message in the `errors` queue. Failures inside the function are the function's
    own async retry and failure destination.

    Attributes: `rule` (iot.CfnTopicRule), `errors` (sqs.Queue), `error_role` (iam.Role),
    `invoke_permission` (lambda.CfnPermission).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        function: lambda_.IFunction,
        sql: str,
        purpose: str,
        description: str,
        errors_hold: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.errors = dead_letter_queue(self, "Errors", holds=errors_hold)
        self.error_role = self._build_error_role(self.errors, purpose)
        self.rule = self._build_rule(function, sql, description)
        self.invoke_permission = self._build_invoke_permission(function)

    def _build_error_role(self, errors: sqs.IQueue, purpose: str) -> iam.Role:
        role = iam.Role(
            self,
            "ErrorActionRole",
            assumed_by=iam.ServicePrincipal(
                "iot.amazonaws.com",
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            ),
            description=f"fleetkey {purpose} rule: deliver failed invocations to the error queue",
        )
        errors.grant_send_messages(role)
        return role

    def _build_rule(
        self, function: lambda_.IFunction, sql: str, description: str
    ) -> iot.CfnTopicRule:
        return iot.CfnTopicRule(
            self,
            "Rule",
            topic_rule_payload=iot.CfnTopicRule.TopicRulePayloadProperty(
                description=description,
                sql=sql,
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


class RegistrationRule(FunctionRule):
    """`$aws/events/certificates/registered/+` -> the registration function (JITR)."""

    def __init__(self, scope: Construct, construct_id: str, *, function: lambda_.IFunction) -> None:
        super().__init__(
            scope,
            construct_id,
            function=function,
            sql=constants.REGISTRATION_RULE_SQL,
            purpose="registration",
            description="fleetkey just-in-time registration of device certificates",
            errors_hold="the IoT rule's error action for registration events it could not "
            "deliver to the function. `fleetkey redrive registration-rule-errors` re-delivers "
            "them once the cause is fixed (docs/runbook-redrive.md).",
        )


class TamperRule(FunctionRule):
    """`fleetkey/+/events/tamper` -> the device_events function, which suspends the device with
    reason "tamper". The device id is the topic's second level (`topic(2) AS device_id`): a
    device's IoT policy lets it publish under its own thing name only, so a device can report
    only itself."""

    def __init__(self, scope: Construct, construct_id: str, *, function: lambda_.IFunction) -> None:
        super().__init__(
            scope,
            construct_id,
            function=function,
            sql=constants.TAMPER_RULE_SQL,
            purpose="tamper",
            description="fleetkey: a device reporting tampering is suspended",
            errors_hold="the IoT rule's error action for tamper reports it could not deliver to "
            "the device_events function. `fleetkey redrive tamper-rule-errors` re-delivers them, "
            "or suspend the device through the admin API (docs/runbook-redrive.md).",
        )


class PresenceRule(FunctionRule):
    """`$aws/events/presence/connected/+` -> the rotation_events function: a device that connects
    with its pending certificate (`principalIdentifier`, the certificate id) commits its rotation.
    Presence events can arrive late, twice and out of order; the function checks each against the
    device's recorded certificates. Every connection of every device invokes it (AWS IoT rule SQL
    cannot tell a pending certificate from a current one)."""

    def __init__(self, scope: Construct, construct_id: str, *, function: lambda_.IFunction) -> None:
        super().__init__(
            scope,
            construct_id,
            function=function,
            sql=constants.PRESENCE_CONNECTED_RULE_SQL,
            purpose="presence",
            description="fleetkey: a device connecting with its new certificate commits it",
            errors_hold="the IoT rule's error action for presence events it could not deliver "
            "to the rotation_events function. A rotation they would have committed is rolled back "
            "at its deadline; `fleetkey redrive presence-rule-errors` re-delivers them before it "
            "(docs/runbook-redrive.md).",
        )
