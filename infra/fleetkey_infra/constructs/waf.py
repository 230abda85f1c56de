"""Per-client limits on the public routes: a regional AWS WAF web ACL on the API stage.

Stage and method throttling are shared by every caller: one client at the token endpoint's rate
locks the whole fleet out. The web ACL counts each client (source IP: `AggregateKeyType` IP, the
address that connected, not a forwarded header a client can forge) separately, one rate-based
rule per group of public routes (`fleetkey_infra.edge.EdgeConfig.rate_limits`), and answers a
client over its limit `429` with `Retry-After` (WAF's default would be 403) until its rate falls
back under the limit. Everything else passes (default action Allow): the IAM routes are guarded
by SigV4 and the REST API's resource policy.

Visibility: CloudWatch metrics and sampled requests for the web ACL and each rule; the requests
WAF blocks or counts are logged to the `aws-waf-logs-...` log group (WAF's required prefix), with
the `authorization` and `x-amz-security-token` headers redacted (a session token is a
credential).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_cdk import ArnFormat, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_logs as logs
from aws_cdk import aws_wafv2 as wafv2
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.edge import RATE_LIMITED_MESSAGE, RATE_LIMITED_STATUS, RateLimit

RATE_LIMITED_BODY_KEY = "rate-limited"
# The unstaged stack's web ACL metric name (a staged stack passes `<name prefix>-api`).
METRIC_PREFIX = f"{constants.NAME_PREFIX}-api"
# Before matching, as the local gateway does (fleetkey_infra.edge.normalize_path): %-escapes
# decoded, `//`, `/./`, `/../` removed, then lowercased, so an encoded or padded path is counted
# with the route it reaches.
_TEXT_TRANSFORMATIONS = ("URL_DECODE", "NORMALIZE_PATH", "LOWERCASE")
# Redacted from the WAF logs: SigV4 signatures and, above all, session tokens.
_REDACTED_HEADERS = ("authorization", "x-amz-security-token")


class ApiRateLimits(Construct):
    """Attributes: `web_acl` (wafv2.CfnWebACL), `association` (wafv2.CfnWebACLAssociation),
    `log_group` (logs.LogGroup), `logging` (wafv2.CfnLoggingConfiguration), `metric_prefix`
    (str: the web ACL's metric name; each rule's is `<metric_prefix>-<rule name>`).

    The metric names are CloudWatch dimensions (`WebACL`, `Rule` in `AWS/WAFV2`), not scoped to
    the web ACL: a stack of another stage passes its own prefix (`<name prefix>-api`), so the two
    web ACLs' counts never add up in one metric."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        stage: apigateway.Stage,
        rate_limits: Sequence[RateLimit],
        metric_prefix: str = METRIC_PREFIX,
    ) -> None:
        super().__init__(scope, construct_id)
        for rate_limit in rate_limits:
            rate_limit.check_for_waf()
        self.metric_prefix = metric_prefix
        self.web_acl = self._build_web_acl(rate_limits)
        self.association = self._build_association(stage)
        self.log_group = self._build_log_group()
        self.logging = self._build_logging(self.log_group)

    # -- the web ACL -----------------------------------------------------------------------------

    def _build_web_acl(self, rate_limits: Sequence[RateLimit]) -> wafv2.CfnWebACL:
        return wafv2.CfnWebACL(
            self,
            "WebAcl",
            scope="REGIONAL",
            description="fleetkey API: per-client rate limits, by source IP, on the public routes",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=self._visibility(self.metric_prefix),
            custom_response_bodies={
                RATE_LIMITED_BODY_KEY: wafv2.CfnWebACL.CustomResponseBodyProperty(
                    content_type="APPLICATION_JSON",
                    content=f'{{"message":"{RATE_LIMITED_MESSAGE}"}}',
                )
            },
            rules=[
                self._rate_rule(priority, rate_limit)
                for priority, rate_limit in enumerate(rate_limits)
            ],
        )

    def _rate_rule(self, priority: int, rate_limit: RateLimit) -> wafv2.CfnWebACL.RuleProperty:
        return wafv2.CfnWebACL.RuleProperty(
            name=f"{rate_limit.name}-per-client",
            priority=priority,
            statement=wafv2.CfnWebACL.StatementProperty(
                rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                    aggregate_key_type="IP",
                    limit=rate_limit.limit,
                    evaluation_window_sec=rate_limit.window_seconds,
                    scope_down_statement=self._paths(rate_limit.path_fragments),
                )
            ),
            action=wafv2.CfnWebACL.RuleActionProperty(
                block=wafv2.CfnWebACL.BlockActionProperty(
                    custom_response=wafv2.CfnWebACL.CustomResponseProperty(
                        response_code=RATE_LIMITED_STATUS,
                        custom_response_body_key=RATE_LIMITED_BODY_KEY,
                        # WAF blocks until the client's rate over the window falls under the
                        # limit: a full window is the honest upper bound to tell the client.
                        response_headers=[
                            wafv2.CfnWebACL.CustomHTTPHeaderProperty(
                                name="Retry-After", value=str(rate_limit.window_seconds)
                            )
                        ],
                    )
                )
            ),
            visibility_config=self._visibility(
                f"{self.metric_prefix}-{rate_limit.name}-per-client"
            ),
        )

    @staticmethod
    def _paths(fragments: Sequence[str]) -> wafv2.CfnWebACL.StatementProperty:
        matches = [
            wafv2.CfnWebACL.StatementProperty(
                byte_match_statement=wafv2.CfnWebACL.ByteMatchStatementProperty(
                    field_to_match=wafv2.CfnWebACL.FieldToMatchProperty(uri_path={}),
                    positional_constraint="CONTAINS",
                    search_string=fragment,
                    text_transformations=[
                        wafv2.CfnWebACL.TextTransformationProperty(priority=i, type=kind)
                        for i, kind in enumerate(_TEXT_TRANSFORMATIONS)
                    ],
                )
            )
            for fragment in fragments
        ]
        if len(matches) == 1:
            return matches[0]
        return wafv2.CfnWebACL.StatementProperty(
            or_statement=wafv2.CfnWebACL.OrStatementProperty(statements=matches)
        )

    @staticmethod
    def _visibility(metric_name: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
        return wafv2.CfnWebACL.VisibilityConfigProperty(
            cloud_watch_metrics_enabled=True,
            metric_name=metric_name,
            sampled_requests_enabled=True,
        )

    def _build_association(self, stage: apigateway.Stage) -> wafv2.CfnWebACLAssociation:
        # The stage's ARN refers to the Stage resource, so the association follows it.
        return wafv2.CfnWebACLAssociation(
            self, "Association", resource_arn=stage.stage_arn, web_acl_arn=self.web_acl.attr_arn
        )

    # -- logging ---------------------------------------------------------------------------------

    def _build_log_group(self) -> logs.LogGroup:
        stack = Stack.of(self)
        return logs.LogGroup(
            self,
            "Logs",
            # WAF delivers only to log groups whose name starts with aws-waf-logs-.
            log_group_name=f"aws-waf-logs-{stack.stack_name}-api",
            retention=constants.LOG_RETENTION,
        )

    def _build_logging(self, log_group: logs.LogGroup) -> wafv2.CfnLoggingConfiguration:
        # WAF wants the log group's ARN without the ":*" that LogGroup.log_group_arn ends with.
        destination = Stack.of(self).format_arn(
            service="logs",
            resource="log-group",
            resource_name=log_group.log_group_name,
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        logging_filter: dict[str, Any] = {
            "DefaultBehavior": "DROP",
            "Filters": [
                {
                    "Behavior": "KEEP",
                    "Requirement": "MEETS_ANY",
                    "Conditions": [
                        {"ActionCondition": {"Action": "BLOCK"}},
                        {"ActionCondition": {"Action": "COUNT"}},
                    ],
                }
            ],
        }
        return wafv2.CfnLoggingConfiguration(
            self,
            "Logging",
            resource_arn=self.web_acl.attr_arn,
            log_destination_configs=[destination],
            logging_filter=logging_filter,
            redacted_fields=[
                wafv2.CfnLoggingConfiguration.FieldToMatchProperty(single_header={"Name": name})
                for name in _REDACTED_HEADERS
            ],
        )
