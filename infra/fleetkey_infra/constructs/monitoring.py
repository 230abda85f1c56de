"""Alarms to an SNS topic the operators subscribe to, and a CloudWatch dashboard of the lifecycle.

What is watched, and where its metric comes from (docs/runbook.md: what each alarm means and
what to do):

- failure queues (SQS `ApproximateNumberOfMessagesVisible`): the lifecycle queue's dead-letter
  queue, the registration retry queue's dead-letter queue, the device_events and rotation_events
  functions' asynchronous on-failure queues, the three IoT rules' error-action queues and the two
  schedules' dead-letter queues. Nothing consumes them: a message there is work fleetkey gave up
  on (`fleetkey redrive`). The registration retry queue itself is on the dashboard, not alarmed:
  the registration function consumes it;
- every function's `Errors` and `Throttles` (AWS/Lambda), except registration's `Throttles`: its
  reserved concurrency throttles it by design, so its alarm is the age of the oldest event
  waiting in Lambda's asynchronous queue (`AsyncEventAge`);
- the API: `5XXError` of the stage (AWS/ApiGateway), the requests API Gateway throttled (a metric
  filter on the stage's access log: status 429 with API Gateway's own `Too Many Requests`,
  REST APIs publish no throttling metric), and the requests the WAF web ACL blocked for a client
  over its per-client limit (AWS/WAFV2 `BlockedRequests`, all rules: the rate rules are its only
  blocking rules; answered 429 too);
- KMS throttling: `KmsThrottles`, which the functions emit for every throttled KMS response
  (fleetkey.adapters.aws), summed over the functions that call KMS;
- each IoT rule: `RuleMessageThrottled` (AWS/IoT, by `RuleName`) and `ErrorActionFailure` (its
  error action failed too: the message is lost), the latter by a Metrics Insights query on
  `RuleName` (AWS/IoT publishes rule-action metrics with more dimensions than the rule's);
- registrations: a spike of `RegistrationsRefused` (every reason but `unknown_ca`: a Metrics
  Insights query over the `reason` dimension) and any refusal for `clone_suspected`. Every
  stage's registration rule sees every certificate registered in the account and Region (AWS
  IoT's events are the account's), so each stage refuses the others' devices as `unknown_ca`:
  those refusals are on the dashboard, never in the spike;
- deadlines: `RotationsOverdue` (the rotation sweep: devices whose rollback or retired
  certificate's deletion is more than five minutes late) and `TeardownsOverdue` (converge: a
  teardown still pending half an hour after the decommission).

Custom metrics are the functions' Powertools metrics: namespace `fleetkey`, dimension `service`
= the function's POWERTOOLS_SERVICE_NAME (`Functions.service_name`: stage-prefixed in a staged
stack, so a stage's alarms count its own functions only), plus the dimensions the code adds
(`reason`, `error`). The one log-derived metric, `ApiThrottledRequests`, is in the stack's own
namespace `fleetkey/<stack name>` (a metric filter cannot add a constant dimension).

Every alarm is named `<stack name>-<alarm>`, treats missing data as not breaching (no traffic is
not a fault), and notifies the topic when it goes into ALARM and back to OK. The topic is
encrypted with a key of its own, which CloudWatch may use, and the topic publish to, only for
these alarms (`aws:SourceAccount`, `aws:SourceArn` each alarm's ARN); the context value
`alarmEmail` subscribes an address at deploy (it must confirm the subscription). Neither the
topic nor its key is retained: they hold nothing once the stack is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aws_cdk import Aws, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey.adapters.aws import KMS_THROTTLE_METRIC
from fleetkey.composition import LIFECYCLE_METRICS, VALIDATION_METRICS
from fleetkey.domain.rejection import RejectionReason
from fleetkey.domain.validation import RefusalReason, ValidationStatus
from fleetkey_infra import constants
from fleetkey_infra.constructs.api import Api
from fleetkey_infra.constructs.functions import Functions
from fleetkey_infra.constructs.iot_rules import FunctionRule
from fleetkey_infra.constructs.lifecycle import LifecycleQueue
from fleetkey_infra.constructs.schedules import Schedules

# `cdk deploy -c alarmEmail=ops@example.com`: subscribe that address to the alarm topic.
ALARM_EMAIL_CONTEXT_KEY = "alarmEmail"
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
RUNBOOK = "docs/runbook.md"
PERIOD = Duration.minutes(5)

# Metric names as the code emits them (namespace `fleetkey`, dimension `service`).
REGISTRATIONS_ACCEPTED = "RegistrationsAccepted"
REGISTRATIONS_REFUSED = "RegistrationsRefused"  # + dimension `reason`
REGISTRATION_RETRIES_FAILED = "RegistrationRetriesFailed"  # + dimension `kind` (registration)
VALIDATIONS_VALIDATED = VALIDATION_METRICS[ValidationStatus.VALIDATED]  # token
VALIDATIONS_REFUSED = VALIDATION_METRICS[ValidationStatus.REFUSED]  # token, validations; `reason`
ROTATIONS_OVERDUE = "RotationsOverdue"  # functions/rotation_events
TEARDOWNS_OVERDUE = LIFECYCLE_METRICS["teardown_overdue"]  # services/lifecycle.py, converge
KMS_THROTTLES = KMS_THROTTLE_METRIC  # adapters/aws.py, every function with a KMS client
API_THROTTLED = "ApiThrottledRequests"  # the access-log metric filter below
API_GATEWAY_THROTTLED_MESSAGE = "Too Many Requests"  # $context.error.message of THROTTLED

# The functions, by their attribute of `Functions`.
FUNCTIONS = (
    "registration",
    "admin",
    "token",
    "discovery",
    "introspect",
    "maintenance",
    "converge",
    "device_events",
    "data_keys",
    "rotation",
    "rotation_events",
    "validations",
)
# The functions that call KMS themselves (token keys, data keys, the issuing CA; the others reach
# the table's key through DynamoDB only): the sum of their KmsThrottles is the KMS alarm's.
KMS_FUNCTIONS = (
    "admin",
    "token",
    "discovery",
    "introspect",
    "maintenance",
    "data_keys",
    "rotation",
    "rotation_events",
)


@dataclass(frozen=True)
class Threshold:
    """Alarm when the statistic over `period` is >= `value` in `datapoints` of the last
    `evaluation_periods` periods."""

    value: float
    evaluation_periods: int = 1
    datapoints: int = 1
    period: Duration = PERIOD


# Anything at all: a message in a failure queue, a throttled function, a clone.
ANY = Threshold(1)
# Lambda Errors. A function answering a caller (API routes) answers 502 for each: every error.
# A function that Lambda or SQS retries, with a failure queue behind it, fails transiently in
# normal operation (AWS IoT settling, a throttled call retried); persistent failure is the alarm:
# ten in each of two consecutive five-minute periods. converge counts a batch whose every record
# is left for later (AWS IoT not settled) as an error. maintenance runs hourly: all three
# attempts of a run failed.
EVERY_ERROR = ANY
# The functions with an on-failure destination (constructs/functions.py).
ON_FAILURE_DESTINATION_FUNCTIONS = ("registration", "device_events", "rotation_events")
# The registration retry queue holds visible messages and nothing received any, for 15 minutes:
# its event source mapping long-polls, so a visible message is received within seconds while it
# works (throttled deliveries are receives too). The age of the oldest message would not do: SQS
# leaves a message received three times or more out of it.
REGISTRATION_RETRIES_STALLED = Threshold(1, evaluation_periods=3, datapoints=3)
# The registration function's oldest waiting event (AsyncEventAge, milliseconds): half an hour.
REGISTRATION_BACKLOG = Threshold(30 * 60 * 1000)
PERSISTENT_ERRORS = Threshold(10, evaluation_periods=2, datapoints=2)
ERROR_THRESHOLDS: Mapping[str, Threshold] = {
    "registration": PERSISTENT_ERRORS,
    "device_events": PERSISTENT_ERRORS,
    "rotation_events": PERSISTENT_ERRORS,
    "converge": PERSISTENT_ERRORS,
    "maintenance": Threshold(3, period=Duration.hours(1)),
}
# API 5XX: Lambda errors (502, also their functions' alarms), `temporarily_unavailable` (503: AWS
# failed transiently), timeouts (504).
API_SERVER_ERRORS = Threshold(5)
# API Gateway's stage or method limit reached: every device shares it.
API_THROTTLED_THRESHOLD = Threshold(10)
# A client over its per-client limit for the better part of five minutes (at the token route's
# 60 a minute, about 100 refused requests).
API_CLIENTS_BLOCKED = Threshold(100)
# A spike of refusals: more than a misprovisioned device or two retrying.
REGISTRATIONS_REFUSED_SPIKE = Threshold(20)
# Refusals the spike leaves out: a certificate of a CA this stage does not manage is another
# stage's device (or another team's): every stage's registration rule sees every certificate the
# account registers, and AWS IoT registers a CA's certificates only once fleetkey recorded the CA.
# These count the others' onboarding, not this stage's trouble (the dashboard shows them).
REGISTRATIONS_REFUSED_SPIKE_EXCLUDES = (RejectionReason.UNKNOWN_CA.value,)


def insights_query(
    metric: str,
    namespace: str,
    where: Mapping[str, str],
    *,
    excluding: Sequence[tuple[str, str]] = (),
    schema: Sequence[str] | None = None,
    group_by: str | None = None,
) -> str:
    """A CloudWatch Metrics Insights query: `SELECT SUM(metric)` in `namespace` (only the metrics
    with exactly the dimensions `schema`, if given: SCHEMA), `where` each dimension equals its
    value and, for each (dimension, value) of `excluding`, the dimension is not that value
    (`!=`), optionally `GROUP BY` one. Names are double-quoted (Metrics Insights' reserved words
    include common ones), values single-quoted; neither may hold a quote (they are this stack's
    own names and CloudFormation references, never input)."""
    excluded = [word for pair in excluding for word in pair]
    words = [metric, namespace, *where, *where.values(), *excluded, *(schema or ()), group_by or ""]
    if any(quote in word for word in words for quote in "'\""):
        raise ValueError(f"a quote in a Metrics Insights name or value: {words}")

    def name(word: str) -> str:
        return '"' + word + '"'

    source = name(namespace)
    if schema:
        source = "SCHEMA(" + ", ".join(map(name, (namespace, *sorted(set(schema))))) + ")"
    conditions = " AND ".join(
        [f"{name(key)} = '{value}'" for key, value in where.items()]
        + [f"{name(key)} != '{value}'" for key, value in excluding]
    )
    query = f"SELECT SUM({name(metric)}) FROM {source} WHERE {conditions}"  # noqa: S608 (not SQL)
    return query + (f" GROUP BY {name(group_by)}" if group_by else "")


class MonitoringConfigError(ValueError):
    """The monitoring context (alarmEmail) is not usable."""


def alarm_email_from_context(get: Callable[[str], Any]) -> str | None:
    """The address `alarmEmail` subscribes to the alarm topic, or None (absent or empty: nobody
    is subscribed at deploy).

    Raises:
        MonitoringConfigError: not one e-mail address.
    """
    email = get(ALARM_EMAIL_CONTEXT_KEY)
    if email is None or email == "":
        return None
    if not isinstance(email, str) or not _EMAIL.fullmatch(email):
        raise MonitoringConfigError(
            f"{ALARM_EMAIL_CONTEXT_KEY} must be one e-mail address, not {email!r}"
        )
    return email


class AlarmTopic(Construct):
    """The SNS topic every alarm notifies, encrypted with a KMS key of its own (rotating, not
    retained). TLS-only. `email`, if given, is subscribed. CloudWatch may use the key and
    publish to the topic only for the alarms `admit` names, by ARN: a name prefix would not do,
    as `Fleetkey-*` also matches a stage's `Fleetkey-<stage>-...`.

    Attributes: `key` (kms.Key), `topic` (sns.Topic), `action` (the alarms' SNS action)."""

    def __init__(self, scope: Construct, construct_id: str, *, email: str | None = None) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        if email is not None and not _EMAIL.fullmatch(email):
            raise MonitoringConfigError(
                f"{ALARM_EMAIL_CONTEXT_KEY} must be one e-mail address, not {email!r}"
            )
        self.key = kms.Key(
            self,
            "Key",
            description=f"fleetkey: encrypts the alarm notifications of {stack.stack_name}",
            enable_key_rotation=True,
            # It encrypts notifications in flight, nothing kept: deleted with the stack.
            removal_policy=RemovalPolicy.DESTROY,
            pending_window=Duration.days(7),
        )
        self.topic = sns.Topic(
            self,
            "Topic",
            display_name=f"fleetkey alarms ({stack.stack_name})",
            master_key=self.key,
            enforce_ssl=True,
        )
        if email is not None:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        self.action = cloudwatch_actions.SnsAction(self.topic)

    def admit(self, alarm_names: Sequence[str]) -> None:
        """Let CloudWatch publish to the topic, and encrypt with its key (SNS encrypts each
        message with the publisher's permissions on the key), for these alarms of this account
        and Region only (ARNs made from the names: a reference to the alarms would make the key
        depend on the alarms, which depend on the topic, which depends on the key)."""
        arns = [
            f"arn:{Aws.PARTITION}:cloudwatch:{Aws.REGION}:{Aws.ACCOUNT_ID}:alarm:{name}"
            for name in alarm_names
        ]
        these_alarms = {
            "StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID},
            "ArnEquals": {"aws:SourceArn": arns},
        }
        cloudwatch_alarms = iam.ServicePrincipal("cloudwatch.amazonaws.com")
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsOfThisStack",
                principals=[cloudwatch_alarms],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions=these_alarms,
            )
        )
        self.topic.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsOfThisStack",
                principals=[cloudwatch_alarms],
                actions=["sns:Publish"],
                resources=[self.topic.topic_arn],
                conditions=these_alarms,
            )
        )


class Monitoring(Construct):
    """The alarms (module doc) on `functions`, `api`, `lifecycle`, `rules` (the IoT rules) and
    `schedules`, the topic they notify, and the lifecycle dashboard.

    Attributes: `topic` (AlarmTopic), `alarms` (dict of alarm id -> cloudwatch.Alarm; each alarm
    is named `<stack name>-<alarm id>`), `throttled_filter` (logs.MetricFilter on the API's access
    log), `dashboard` (cloudwatch.Dashboard, `<stack name>-lifecycle`).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        functions: Functions,
        api: Api,
        lifecycle: LifecycleQueue,
        rules: Sequence[FunctionRule],
        schedules: Schedules,
        namespace: str = constants.METRICS_NAMESPACE,
    ) -> None:
        super().__init__(scope, construct_id)
        stack_name = Stack.of(self).stack_name
        self._prefix = f"{stack_name}-"
        self._namespace = namespace
        self._functions = functions
        self.topic = AlarmTopic(
            self, "Alarms", email=alarm_email_from_context(self.node.try_get_context)
        )
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        self._failure_queues = self._failure_queue_alarms(lifecycle, functions, rules, schedules)
        self._function_alarms(functions)
        self.throttled_filter = self._api_alarms(api, f"{namespace}/{stack_name}")
        self._kms_alarm()
        self._rule_alarms(rules)
        self._registration_alarms()
        self._registration_retry_alarms()
        self._deadline_alarms()
        self.dashboard = self._build_dashboard(lifecycle)
        self.topic.admit([self._prefix + alarm_id for alarm_id in self.alarms])

    # -- helpers ---------------------------------------------------------------------------------

    def _service(self, function: str) -> str:
        return self._functions.service_name(getattr(self._functions, function))

    def _metric(
        self, name: str, function: str, statistic: str = "Sum", **dimensions: str
    ) -> cloudwatch.Metric:
        """A metric `function` emits: the namespace, its `service`, and `dimensions`."""
        return cloudwatch.Metric(
            namespace=self._namespace,
            metric_name=name,
            dimensions_map={"service": self._service(function), **dimensions},
            statistic=statistic,
            period=PERIOD,
            label=f"{name} ({function})",
        )

    def _insights(
        self,
        name: str,
        function: str,
        dimensions: Sequence[str] = (),
        *,
        excluding: Sequence[tuple[str, str]] = (),
        group_by: str | None = None,
    ) -> cloudwatch.MathExpression:
        """A Metrics Insights query: the sum of `name` over the metrics `function` emits with
        `service` and `dimensions` (exactly those: SCHEMA), but for the (dimension, value) pairs
        `excluding`, optionally by one of the dimensions."""
        query = insights_query(
            name,
            self._namespace,
            {"service": self._service(function)},
            excluding=excluding,
            schema=("service", *dimensions),
            group_by=group_by,
        )
        if group_by:
            # One series per value, each labelled with it by CloudWatch (no label of ours).
            return cloudwatch.MathExpression(expression=query, using_metrics={}, period=PERIOD)
        return cloudwatch.MathExpression(
            expression=query, using_metrics={}, period=PERIOD, label=name
        )

    def _alarm(
        self,
        alarm_id: str,
        metric: cloudwatch.IMetric,
        threshold: Threshold,
        *,
        meaning: str,
        runbook: str,
    ) -> cloudwatch.Alarm:
        """`<stack name>-<alarm_id>`: ALARM when the metric reaches `threshold`; both ALARM and
        the return to OK notify the topic. `runbook` is the section of docs/runbook.md."""
        alarm = cloudwatch.Alarm(
            self,
            alarm_id,
            alarm_name=self._prefix + alarm_id,
            alarm_description=f"{meaning} What to do: {RUNBOOK}#{runbook}",
            metric=metric.with_(period=threshold.period)
            if isinstance(metric, cloudwatch.Metric)
            else metric,
            threshold=threshold.value,
            evaluation_periods=threshold.evaluation_periods,
            datapoints_to_alarm=threshold.datapoints,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        alarm.add_alarm_action(self.topic.action)
        alarm.add_ok_action(self.topic.action)
        self.alarms[alarm_id] = alarm
        return alarm

    # -- alarms ----------------------------------------------------------------------------------

    def _failure_queue_alarms(
        self,
        lifecycle: LifecycleQueue,
        functions: Functions,
        rules: Sequence[FunctionRule],
        schedules: Schedules,
    ) -> dict[str, sqs.IQueue]:
        queues: dict[str, sqs.IQueue] = {
            "LifecycleDeadLetters": lifecycle.dead_letters,
            "RegistrationFailures": functions.registration_failures,
            "DeviceEventFailures": functions.device_event_failures,
            "RotationEventFailures": functions.rotation_event_failures,
            **{f"{rule.node.id}Errors": rule.errors for rule in rules},
            "MaintenanceDeadLetters": schedules.dead_letters,
            "RotationSweepDeadLetters": schedules.rotation_sweep_dead_letters,
        }
        for name, queue in queues.items():
            self._alarm(
                f"{name}NotEmpty",
                queue.metric_approximate_number_of_messages_visible(
                    statistic="Maximum", period=PERIOD
                ),
                ANY,
                meaning=f"The failure queue {name} holds messages: events fleetkey gave up on.",
                runbook="failure-queue-not-empty",
            )
        return queues

    def _function_alarms(self, functions: Functions) -> None:
        for name in FUNCTIONS:
            function: lambda_.Function = getattr(functions, name)
            construct_name = function.node.id
            self._alarm(
                f"{construct_name}Errors",
                function.metric_errors(statistic="Sum", period=PERIOD),
                ERROR_THRESHOLDS.get(name, EVERY_ERROR),
                meaning=f"The {name} function failed (Lambda Errors).",
                runbook="function-errors",
            )
            if name in ON_FAILURE_DESTINATION_FUNCTIONS:
                self._alarm(
                    f"{construct_name}DestinationFailures",
                    function.metric("DestinationDeliveryFailures", statistic="Sum", period=PERIOD),
                    ANY,
                    meaning=f"Lambda could not send the record of a failed {name} event to its "
                    "on-failure destination: the event is lost.",
                    runbook="destination-delivery-failures",
                )
            if name == "registration":
                # How long events wait in Lambda's asynchronous queue: its reserved concurrency
                # makes them wait by design during an onboarding, so its throttles alarm only
                # when nothing is reserved (then they are the account's concurrency exhausted).
                self._alarm(
                    f"{construct_name}Backlog",
                    function.metric("AsyncEventAge", statistic="Maximum", period=PERIOD),
                    REGISTRATION_BACKLOG,
                    meaning="Registration events waited more than 30 minutes in Lambda's "
                    "asynchronous queue: devices are onboarding faster than AWS IoT's quotas "
                    "let fleetkey register them.",
                    runbook="registration-backlog",
                )
                if functions.registration_concurrency is not None:
                    continue
            self._alarm(
                f"{construct_name}Throttles",
                function.metric_throttles(statistic="Sum", period=PERIOD),
                ANY,
                meaning=f"Lambda throttled the {name} function (concurrency exhausted).",
                runbook="function-throttles",
            )

    def _api_alarms(self, api: Api, log_namespace: str) -> logs.MetricFilter:
        stage = api.api.deployment_stage
        self._alarm(
            "ApiServerErrors",
            stage.metric_server_error(statistic="Sum", period=PERIOD),
            API_SERVER_ERRORS,
            meaning="The API answered 5XX (502 function error, 503 AWS unavailable, 504 timeout).",
            runbook="api-server-errors",
        )
        throttled_filter = logs.MetricFilter(
            self,
            "ApiThrottledFilter",
            log_group=api.access_logs,
            metric_namespace=log_namespace,
            metric_name=API_THROTTLED,
            metric_value="1",
            filter_pattern=logs.FilterPattern.all(
                logs.FilterPattern.string_value("$.status", "=", "429"),
                logs.FilterPattern.string_value(
                    "$.errorMessage", "=", API_GATEWAY_THROTTLED_MESSAGE
                ),
            ),
        )
        self._alarm(
            "ApiThrottled",
            throttled_filter.metric(statistic="Sum", period=PERIOD),
            API_THROTTLED_THRESHOLD,
            meaning="API Gateway throttled requests (429): a stage or method limit every device "
            "shares was reached.",
            runbook="api-throttled",
        )
        self._alarm(
            "ApiClientsRateLimited",
            cloudwatch.Metric(
                namespace="AWS/WAFV2",
                metric_name="BlockedRequests",
                dimensions_map={
                    "WebACL": api.rate_limits.metric_prefix,
                    "Rule": "ALL",
                    "Region": Aws.REGION,
                },
                statistic="Sum",
                period=PERIOD,
            ),
            API_CLIENTS_BLOCKED,
            meaning="The WAF web ACL answered 429 to clients over their per-client rate limit.",
            runbook="api-clients-rate-limited",
        )
        return throttled_filter

    def _kms_alarm(self) -> None:
        throttles = {
            f"k{i}": self._metric(KMS_THROTTLES, name) for i, name in enumerate(KMS_FUNCTIONS)
        }
        self._alarm(
            "KmsThrottled",
            cloudwatch.MathExpression(
                # FILL: a function that was not throttled has no datapoint, not a zero.
                expression=" + ".join(f"FILL({key}, 0)" for key in throttles),
                using_metrics=throttles,
                period=PERIOD,
                label=KMS_THROTTLES,
            ),
            ANY,
            meaning="KMS throttled the functions' calls (token signing, data keys, the issuing "
            "CA): a KMS request quota was reached.",
            runbook="kms-throttled",
        )

    def _rule_alarms(self, rules: Sequence[FunctionRule]) -> None:
        for rule in rules:
            name = rule.rule.ref  # the rule's name
            self._alarm(
                f"{rule.node.id}Throttled",
                cloudwatch.Metric(
                    namespace="AWS/IoT",
                    metric_name="RuleMessageThrottled",
                    dimensions_map={"RuleName": name},
                    statistic="Sum",
                    period=PERIOD,
                ),
                ANY,
                meaning=f"AWS IoT throttled messages of the {rule.node.id} (not delivered).",
                runbook="iot-rule-throttled",
            )
            self._alarm(
                f"{rule.node.id}ErrorActionFailed",
                cloudwatch.MathExpression(
                    expression=insights_query("ErrorActionFailure", "AWS/IoT", {"RuleName": name}),
                    using_metrics={},
                    period=PERIOD,
                    label="ErrorActionFailure",
                ),
                ANY,
                meaning=f"The {rule.node.id} could not invoke its function nor keep the message "
                "in its error queue: messages are lost.",
                runbook="iot-rule-error-action-failed",
            )

    def _registration_alarms(self) -> None:
        self._alarm(
            "RegistrationsRefusedSpike",
            self._insights(
                REGISTRATIONS_REFUSED,
                "registration",
                ("reason",),
                excluding=[("reason", reason) for reason in REGISTRATIONS_REFUSED_SPIKE_EXCLUDES],
            ),
            REGISTRATIONS_REFUSED_SPIKE,
            meaning="Many certificates were refused at registration (every reason but "
            "unknown_ca: other stages' devices).",
            runbook="registrations-refused-spike",
        )
        self._alarm(
            "CloneSuspected",
            self._metric(
                REGISTRATIONS_REFUSED,
                "registration",
                reason=RejectionReason.CLONE_SUSPECTED.value,
            ),
            ANY,
            meaning="A certificate was refused as a suspected clone of a registered device.",
            runbook="clone-suspected",
        )

    def _registration_retry_alarms(self) -> None:
        self._alarm(
            "RegistrationRetriesFailing",
            self._metric(REGISTRATION_RETRIES_FAILED, "registration", kind="persistent"),
            ANY,
            meaning="A registration retried from the retry queue failed for a reason retrying "
            "cannot fix (a thing name clash, a missing policy or permission): it keeps being "
            "retried for six hours, then waits in the registration failure queue.",
            runbook="registration-retries-failing",
        )
        retries = self._functions.registration_retries.queue
        self._alarm(
            "RegistrationRetriesStalled",
            cloudwatch.MathExpression(
                expression="IF(visible >= 1 AND FILL(received, 0) == 0, 1, 0)",
                using_metrics={
                    "visible": retries.metric_approximate_number_of_messages_visible(
                        statistic="Minimum", period=PERIOD
                    ),
                    "received": retries.metric_number_of_messages_received(
                        statistic="Sum", period=PERIOD
                    ),
                },
                period=PERIOD,
                label="retries waiting, none received",
            ),
            REGISTRATION_RETRIES_STALLED,
            meaning="Registration retries have waited 15 minutes in the registration retry queue "
            "and nothing received one: nothing consumes the queue.",
            runbook="registration-retries-stalled",
        )

    def _deadline_alarms(self) -> None:
        self._alarm(
            "RotationsOverdue",
            self._metric(ROTATIONS_OVERDUE, "rotation_events", statistic="Maximum"),
            ANY,
            meaning="Rotations are stuck past their deadline (rollbacks or retired certificates' "
            "deletions more than five minutes late).",
            runbook="rotations-overdue",
        )
        self._alarm(
            "TeardownsOverdue",
            self._metric(TEARDOWNS_OVERDUE, "converge"),
            ANY,
            meaning="Teardowns of decommissioned devices are still pending 30 minutes after "
            "the decommission.",
            runbook="teardowns-overdue",
        )

    # -- the dashboard ---------------------------------------------------------------------------

    def _build_dashboard(self, lifecycle: LifecycleQueue) -> cloudwatch.Dashboard:
        m = self._metric

        def graph(title: str, metrics: Sequence[cloudwatch.IMetric]) -> cloudwatch.GraphWidget:
            return cloudwatch.GraphWidget(title=title, left=list(metrics), width=12, height=6)

        queues = [
            queue.metric_approximate_number_of_messages_visible(
                statistic="Maximum", period=PERIOD, label=name
            )
            for name, queue in {
                "Lifecycle": lifecycle.queue,
                # Consumed by the registration function: its depth is retries under way (the
                # alarm is its dead-letter queue's, RegistrationFailures).
                "RegistrationRetries": self._functions.registration_retries.queue,
                **self._failure_queues,
            }.items()
        ]
        widgets: list[list[cloudwatch.IWidget]] = [
            [
                cloudwatch.TextWidget(
                    markdown=f"# fleetkey lifecycle ({Stack.of(self).stack_name})\n"
                    f"Alarms and what to do about each: `{RUNBOOK}`.",
                    width=24,
                    height=2,
                )
            ],
            [
                graph(
                    "Registrations by outcome",
                    [
                        m(REGISTRATIONS_ACCEPTED, "registration"),
                        self._insights(
                            REGISTRATIONS_REFUSED, "registration", ("reason",), group_by="reason"
                        ),
                        m("RegistrationEventsRepeated", "registration"),
                        m("RegistrationEventsRetried", "registration"),
                        self._insights(
                            REGISTRATION_RETRIES_FAILED, "registration", ("kind",), group_by="kind"
                        ),
                        m("RegistrationEventsMalformed", "registration"),
                        m("RegistrationEventsMismatched", "registration"),
                    ],
                ),
                graph(
                    "Tokens and data keys",
                    [
                        m("TokensIssued", "token"),
                        self._insights("TokensRefused", "token", ("error",), group_by="error"),
                        m("DataKeysIssued", "data_keys"),
                        m("DataKeysIssued", "admin"),
                        self._insights(
                            "DataKeysRefused", "data_keys", ("error",), group_by="error"
                        ),
                    ],
                ),
            ],
            [
                graph(
                    "Validations",
                    [
                        m("ValidationsRequested", "validations"),
                        m(VALIDATIONS_VALIDATED, "token"),
                        # Refused when answered, by reason; refused when asked (the device is
                        # not ACTIVE) is the validations function's. Expired is not counted:
                        # it is computed on read (requested, less validated and refused).
                        self._insights(
                            VALIDATIONS_REFUSED, "token", ("reason",), group_by="reason"
                        ),
                        m(
                            VALIDATIONS_REFUSED,
                            "validations",
                            reason=RefusalReason.DEVICE_NOT_ACTIVE.value,
                        ),
                        self._functions.validations.metric_invocations(
                            statistic="Sum", period=PERIOD, label="validations invocations"
                        ),
                    ],
                ),
                graph(
                    "Rotations",
                    [
                        m("RotationsRequested", "rotation"),
                        m("RotationsCommitted", "rotation"),
                        m("RotationsCommitted", "rotation_events"),
                        m("RotationsRolledBack", "rotation_events"),
                        self._insights(
                            "RotationsRefused", "rotation", ("error",), group_by="error"
                        ),
                        m("RenewalsRequested", "rotation_events"),
                        m("RetiredCertificatesDeleted", "rotation_events"),
                        m("CrlsPublished", "rotation_events"),
                        m("RotationSweepFailures", "rotation_events"),
                        m(ROTATIONS_OVERDUE, "rotation_events", statistic="Maximum"),
                    ],
                ),
            ],
            [
                graph(
                    "Suspensions",
                    [
                        m(LIFECYCLE_METRICS["suspended"], "admin"),
                        m(LIFECYCLE_METRICS["suspended"], "device_events"),
                        m(LIFECYCLE_METRICS["resumed"], "admin"),
                        m("TamperEvents", "device_events"),
                        m("TamperEventsIgnored", "device_events"),
                    ],
                ),
                graph(
                    "Decommissions",
                    [
                        m(LIFECYCLE_METRICS["decommissioned"], "admin"),
                        m(LIFECYCLE_METRICS["teardown_completed"], "converge"),
                        m("TeardownRetries", "converge"),
                        m(TEARDOWNS_OVERDUE, "converge"),
                        m(LIFECYCLE_METRICS["recommissioned"], "admin"),
                        m(LIFECYCLE_METRICS["ownership_transferred"], "admin"),
                    ],
                ),
            ],
            [
                cloudwatch.GraphWidget(
                    title="Queue depths (messages visible)",
                    left=queues,
                    width=12,
                    height=6,
                    period=PERIOD,
                ),
                cloudwatch.AlarmStatusWidget(
                    title="Alarms",
                    alarms=list(self.alarms.values()),
                    width=12,
                    height=6,
                ),
            ],
        ]
        dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{Stack.of(self).stack_name}-lifecycle",
            default_interval=Duration.days(1),
        )
        for row in widgets:
            dashboard.add_widgets(*row)
        return dashboard
