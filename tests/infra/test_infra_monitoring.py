"""Monitoring on the synthesized template: the alarms (each failure queue, each function, the API,
KMS, the IoT rules, registrations, overdue rotations and teardowns), the encrypted topic they
notify, the lifecycle dashboard, and that every custom metric they read is one the code emits,
with the `service` of a function of this stack."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Stack
from aws_cdk.assertions import Template

from fleetkey.adapters.aws import KMS_THROTTLE_METRIC
from fleetkey.composition import LIFECYCLE_METRICS, VALIDATION_METRICS
from fleetkey_infra import constants
from fleetkey_infra.constructs.monitoring import (
    AlarmTopic,
    MonitoringConfigError,
    alarm_email_from_context,
    insights_query,
)
from infra_template import of_type, only, output_ref, render, role_of

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs" / "runbook.md"
STACK = constants.STACK_ID
NAMESPACE = constants.METRICS_NAMESPACE
FIVE_MINUTES = 300

# The reviewed alarm list: a new alarm (or a lost one) is a change of this list and the runbook.
FUNCTION_IDS = [
    "Registration",
    "Admin",
    "Token",
    "Discovery",
    "Introspect",
    "Maintenance",
    "Converge",
    "DeviceEvents",
    "DataKeys",
    "Rotation",
    "RotationEvents",
    "Validations",
]
FAILURE_QUEUES = [
    "LifecycleDeadLetters",
    "RegistrationFailures",
    "DeviceEventFailures",
    "RotationEventFailures",
    "RegistrationRuleErrors",
    "TamperRuleErrors",
    "PresenceRuleErrors",
    "MaintenanceDeadLetters",
    "RotationSweepDeadLetters",
]
RULES = ["RegistrationRule", "TamperRule", "PresenceRule"]
EXPECTED_ALARMS = {
    *(f"{queue}NotEmpty" for queue in FAILURE_QUEUES),
    *(f"{function}Errors" for function in FUNCTION_IDS),
    *(f"{function}Throttles" for function in FUNCTION_IDS if function != "Registration"),
    "RegistrationBacklog",
    *(
        f"{function}DestinationFailures"
        for function in ("Registration", "DeviceEvents", "RotationEvents")
    ),
    "RegistrationRetriesFailing",
    "RegistrationRetriesStalled",
    "ApiServerErrors",
    "ApiThrottled",
    "ApiClientsRateLimited",
    "KmsThrottled",
    *(f"{rule}Throttled" for rule in RULES),
    *(f"{rule}ErrorActionFailed" for rule in RULES),
    "RegistrationsRefusedSpike",
    "CloneSuspected",
    "RotationsOverdue",
    "TeardownsOverdue",
}
# Functions Lambda or SQS retries (a failure queue behind them): persistent errors only.
RETRIED = {"Registration", "DeviceEvents", "RotationEvents", "Converge"}


def alarms(resources: dict[str, dict], stack: str = STACK) -> dict[str, tuple[str, dict]]:
    """Every alarm by its name without the `<stack name>-` prefix: (logical id, properties)."""
    found = {}
    for lid, alarm in of_type(resources, "AWS::CloudWatch::Alarm").items():
        props = alarm["Properties"]
        assert props["AlarmName"].startswith(f"{stack}-"), props["AlarmName"]
        found[props["AlarmName"].removeprefix(f"{stack}-")] = (lid, props)
    return found


def alarm(resources: dict[str, dict], name: str) -> dict:
    return alarms(resources)[name][1]


def dimensions(props: dict) -> dict[str, Any]:
    return {d["Name"]: d["Value"] for d in props["Dimensions"]}


def stat_metrics(props: dict) -> list[dict]:
    """The MetricStat metrics of a math alarm, by id order."""
    return [m for m in props["Metrics"] if "MetricStat" in m]


def expression(props: dict) -> str:
    [returned] = [m for m in props["Metrics"] if m.get("ReturnData", True)]
    return render(returned["Expression"])


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def topic_id(resources: dict[str, dict]) -> str:
    topic_id, _ = only(resources, "AWS::SNS::Topic")
    return topic_id


def test_the_alarms_are_the_reviewed_list(resources: dict[str, dict]) -> None:
    # Given the synthesized stack
    # When listing its alarms by name
    # Then they are exactly the reviewed ones, each named after the stack
    assert set(alarms(resources)) == EXPECTED_ALARMS


def test_every_alarm_notifies_the_topic_and_says_where_the_runbook_is(
    resources: dict[str, dict],
) -> None:
    # Given every alarm, the topic and the runbook's sections
    topic = {"Ref": topic_id(resources)}
    anchors = runbook_anchors()

    for name, (_, props) in alarms(resources).items():
        # Then ALARM and OK both notify the topic, no traffic is not a fault, and the
        # description links a section of the runbook that exists
        assert props["AlarmActions"] == [topic], name
        assert props["OKActions"] == [topic], name
        assert props["TreatMissingData"] == "notBreaching", name
        assert props["ComparisonOperator"] == "GreaterThanOrEqualToThreshold", name
        [anchor] = re.findall(r"docs/runbook\.md#([\w-]+)", props["AlarmDescription"])
        assert anchor in anchors, (name, anchor)


def test_every_failure_queue_has_a_depth_alarm(resources: dict[str, dict]) -> None:
    # Given every queue the stack keeps failed work in: the lifecycle queue's dead-letter
    # queue, the functions' on-failure destinations, the IoT rules' error actions and the
    # schedules' dead-letter queues
    queues = of_type(resources, "AWS::SQS::Queue")
    failure_queues = set()
    for queue in queues.values():
        redrive = queue["Properties"].get("RedrivePolicy")
        if redrive:
            failure_queues.add(redrive["deadLetterTargetArn"]["Fn::GetAtt"][0])
    for config in of_type(resources, "AWS::Lambda::EventInvokeConfig").values():
        destination = config["Properties"]["DestinationConfig"]["OnFailure"]["Destination"]
        failure_queues.add(destination["Fn::GetAtt"][0])
    for rule in of_type(resources, "AWS::IoT::TopicRule").values():
        error = rule["Properties"]["TopicRulePayload"]["ErrorAction"]["Sqs"]["QueueUrl"]
        failure_queues.add(error["Ref"])
    for rule in of_type(resources, "AWS::Events::Rule").values():
        for target in rule["Properties"]["Targets"]:
            failure_queues.add(target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0])
    # A queue a function consumes is work under way, not work given up on: the lifecycle queue,
    # and the registration retry queue (the registration function's on-failure destination,
    # whose own dead-letter queue is the registration failure queue)
    consumed = {
        mapping["Properties"]["EventSourceArn"]["Fn::GetAtt"][0]
        for mapping in of_type(resources, "AWS::Lambda::EventSourceMapping").values()
    }
    failure_queues -= consumed

    # When reading the queue-depth alarms
    watched = {}
    for _, props in alarms(resources).values():
        if props.get("MetricName") == "ApproximateNumberOfMessagesVisible":
            watched[dimensions(props)["QueueName"]["Fn::GetAtt"][0]] = props

    # Then every failure queue (nine: all queues but the two consumed) alarms on its first
    # visible message
    assert len(consumed) == 2
    assert len(failure_queues) == len(FAILURE_QUEUES) == len(queues) - len(consumed)
    assert set(watched) == failure_queues
    for props in watched.values():
        assert props["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert (props["Statistic"], props["Period"], props["Threshold"]) == (
            "Maximum",
            FIVE_MINUTES,
            1,
        )
        assert (props["EvaluationPeriods"], props["DatapointsToAlarm"]) == (1, 1)


@pytest.mark.parametrize("function", FUNCTION_IDS)
def test_every_function_has_an_errors_and_a_throttles_alarm(
    resources: dict[str, dict], function: str
) -> None:
    # Given the function's alarms
    [function_id] = [
        lid
        for lid in of_type(resources, "AWS::Lambda::Function")
        if re.fullmatch(rf"Functions{function}[0-9A-F]{{8}}", lid)
    ]
    errors = alarm(resources, f"{function}Errors")
    watched = [(errors, "Errors")]
    # (registration's reserved concurrency throttles it by design: its throttles alarm only
    # when nothing is reserved, test_registration_backlog_alarm and the staged stack's test)
    throttles = None if function == "Registration" else alarm(resources, f"{function}Throttles")
    if throttles is not None:
        watched.append((throttles, "Throttles"))

    # Then both watch this function's AWS/Lambda metric, summed over five minutes
    for props, metric in watched:
        assert (props["Namespace"], props["MetricName"]) == ("AWS/Lambda", metric)
        assert dimensions(props) == {"FunctionName": {"Ref": function_id}}
        assert props["Statistic"] == "Sum"
    # every throttle alarms
    if throttles is not None:
        assert (throttles["Threshold"], throttles["Period"], throttles["EvaluationPeriods"]) == (
            1,
            FIVE_MINUTES,
            1,
        )
    # an error alarms at once for a function answering a caller; for one that is retried (a
    # failure queue behind it), ten in each of two consecutive periods; maintenance (hourly):
    # the three attempts of a run
    expected = {
        **{f: (1, FIVE_MINUTES, 1, 1) for f in FUNCTION_IDS},
        **{f: (10, FIVE_MINUTES, 2, 2) for f in RETRIED},
        "Maintenance": (3, 3600, 1, 1),
    }[function]
    assert (
        errors["Threshold"],
        errors["Period"],
        errors["EvaluationPeriods"],
        errors["DatapointsToAlarm"],
    ) == expected


def test_every_function_of_the_template_is_watched(resources: dict[str, dict]) -> None:
    # Given every function in the template and the functions the Lambda alarms name
    functions = set(of_type(resources, "AWS::Lambda::Function"))
    watched = {
        dimensions(props)["FunctionName"]["Ref"]
        for props in (p for _, p in alarms(resources).values())
        if props.get("Namespace") == "AWS/Lambda"
    }

    # Then none is left out
    assert watched == functions


def test_api_5xx_is_the_stages_5xx_error(resources: dict[str, dict]) -> None:
    # Given the REST API, its stage and the alarm
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    stage_id, _ = only(resources, "AWS::ApiGateway::Stage")
    props = alarm(resources, "ApiServerErrors")

    # Then it sums the stage's 5XXError (by API name and stage)
    assert (props["Namespace"], props["MetricName"], props["Statistic"]) == (
        "AWS/ApiGateway",
        "5XXError",
        "Sum",
    )
    assert dimensions(props) == {"ApiName": api["Properties"]["Name"], "Stage": {"Ref": stage_id}}
    assert (props["Threshold"], props["Period"]) == (5, FIVE_MINUTES)


def test_api_gateway_throttling_is_counted_from_the_access_log(resources: dict[str, dict]) -> None:
    # Given the metric filter and the API stage's access log group
    _, metric_filter = only(resources, "AWS::Logs::MetricFilter")
    [stage] = of_type(resources, "AWS::ApiGateway::Stage").values()
    destination = json.dumps(stage["Properties"]["AccessLogSetting"]["DestinationArn"])
    props = metric_filter["Properties"]
    [transformation] = props["MetricTransformations"]

    # Then it counts the access log's 429s API Gateway answered itself (THROTTLED: its own
    # message), in the stack's own namespace, and the alarm reads that metric
    [log_group] = of_type(resources, "AWS::Logs::LogGroup").keys() & {props["LogGroupName"]["Ref"]}
    assert f'"{log_group}"' in destination
    assert props["FilterPattern"] == (
        '{ ($.status = "429") && ($.errorMessage = "Too Many Requests") }'
    )
    assert transformation == {
        "MetricName": "ApiThrottledRequests",
        "MetricNamespace": f"{NAMESPACE}/{STACK}",
        "MetricValue": "1",
    }
    throttled = alarm(resources, "ApiThrottled")
    assert (throttled["Namespace"], throttled["MetricName"]) == (
        f"{NAMESPACE}/{STACK}",
        "ApiThrottledRequests",
    )
    assert (throttled["Statistic"], throttled["Threshold"]) == ("Sum", 10)


def test_a_client_over_its_rate_limit_is_the_web_acls_blocked_requests(
    resources: dict[str, dict],
) -> None:
    # Given the web ACL (its rate rules are its only blocking rules) and the alarm
    _, web_acl = only(resources, "AWS::WAFv2::WebACL")
    acl = web_acl["Properties"]
    props = alarm(resources, "ApiClientsRateLimited")

    # Then it sums the ACL's BlockedRequests over all its rules, by its metric name
    assert acl["DefaultAction"] == {"Allow": {}}
    assert all("Block" in rule["Action"] for rule in acl["Rules"])
    assert (props["Namespace"], props["MetricName"], props["Statistic"]) == (
        "AWS/WAFV2",
        "BlockedRequests",
        "Sum",
    )
    assert dimensions(props) == {
        "WebACL": acl["VisibilityConfig"]["MetricName"],
        "Rule": "ALL",
        "Region": {"Ref": "AWS::Region"},
    }
    assert props["Threshold"] == 100


def kms_calling_services(resources: dict[str, dict]) -> set[str]:
    """The services of the functions whose role is granted a KMS action on anything but the
    table's key (which DynamoDB uses on the caller's behalf)."""
    [table] = of_type(resources, "AWS::DynamoDB::Table").values()
    table_key = table["Properties"]["SSESpecification"]["KMSMasterKeyId"]
    services = set()
    for function in of_type(resources, "AWS::Lambda::Function").values():
        role = role_of(function)
        for policy in of_type(resources, "AWS::IAM::Policy").values():
            if {"Ref": role} not in policy["Properties"]["Roles"]:
                continue
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                actions = statement["Action"]
                actions = actions if isinstance(actions, list) else [actions]
                if any(a.startswith("kms:") for a in actions) and statement["Resource"] != (
                    table_key
                ):
                    services.add(
                        function["Properties"]["Environment"]["Variables"][
                            "POWERTOOLS_SERVICE_NAME"
                        ]
                    )
    return services


def test_kms_throttling_sums_every_kms_calling_functions_own_metric(
    resources: dict[str, dict],
) -> None:
    # Given the KMS alarm
    props = alarm(resources, "KmsThrottled")
    metrics = stat_metrics(props)

    # Then it adds up the KmsThrottles of each function that calls KMS itself (a missing
    # datapoint is a zero), by the function's service
    services = {
        dimensions(m["MetricStat"]["Metric"])["service"]
        for m in metrics
        if m["MetricStat"]["Metric"]["MetricName"] == KMS_THROTTLE_METRIC
    }
    assert len(metrics) == len(services) <= 10  # CloudWatch's limit for an alarm's metrics
    assert services == kms_calling_services(resources)
    assert {m["MetricStat"]["Metric"]["Namespace"] for m in metrics} == {NAMESPACE}
    assert {m["MetricStat"]["Stat"] for m in metrics} == {"Sum"}
    assert expression(props) == " + ".join(f"FILL({m['Id']}, 0)" for m in metrics)
    assert props["Threshold"] == 1


@pytest.mark.parametrize("rule", RULES)
def test_each_iot_rules_throttling_and_lost_errors_alarm(
    resources: dict[str, dict], rule: str
) -> None:
    # Given the IoT rule and its alarms
    [rule_id] = [
        lid
        for lid in of_type(resources, "AWS::IoT::TopicRule")
        if re.fullmatch(rf"{rule}[0-9A-F]{{8}}", lid)
    ]
    throttled = alarm(resources, f"{rule}Throttled")
    lost = alarm(resources, f"{rule}ErrorActionFailed")

    # Then throttled messages and error actions that failed too alarm at the first, by the
    # rule's name
    assert (throttled["Namespace"], throttled["MetricName"]) == ("AWS/IoT", "RuleMessageThrottled")
    assert dimensions(throttled) == {"RuleName": {"Ref": rule_id}}
    assert (throttled["Statistic"], throttled["Threshold"]) == ("Sum", 1)
    assert expression(lost) == (
        f'SELECT SUM("ErrorActionFailure") FROM "AWS/IoT" WHERE "RuleName" = \'<{rule_id}>\''  # noqa: S608
    )
    assert lost["Metrics"][0]["Period"] == FIVE_MINUTES
    assert lost["Threshold"] == 1


def test_registration_alarms_a_spike_of_refusals_and_any_clone(resources: dict[str, dict]) -> None:
    # Given the registration alarms and the registration function's service
    spike = alarm(resources, "RegistrationsRefusedSpike")
    clone = alarm(resources, "CloneSuspected")
    service = constants.REGISTRATION_SERVICE_NAME

    # Then every refusal but `unknown_ca` counts towards the spike (the metric's `reason`
    # dimension summed by Metrics Insights: another stage's devices are refused as `unknown_ca`
    # by this stage's rule, which sees every certificate the account registers), and one refusal
    # as a clone alarms
    spike_query = (
        'SELECT SUM("RegistrationsRefused") FROM SCHEMA("fleetkey", "reason", "service") '
        "WHERE \"service\" = '%s' AND \"reason\" != 'unknown_ca'"
    )
    assert expression(spike) == spike_query % service
    assert spike["Threshold"] == 20
    [metric] = stat_metrics(clone)
    assert metric["MetricStat"]["Metric"]["MetricName"] == "RegistrationsRefused"
    assert dimensions(metric["MetricStat"]["Metric"]) == {
        "service": service,
        "reason": "clone_suspected",
    }
    assert (metric["MetricStat"]["Stat"], clone["Threshold"]) == ("Sum", 1)


@pytest.mark.parametrize(
    ("name", "service", "statistic"),
    [
        ("RotationsOverdue", constants.ROTATION_EVENTS_SERVICE_NAME, "Maximum"),
        ("TeardownsOverdue", constants.CONVERGE_SERVICE_NAME, "Sum"),
    ],
)
def test_stuck_rotations_and_teardowns_alarm(
    resources: dict[str, dict], name: str, service: str, statistic: str
) -> None:
    # Given the deadline alarm
    props = alarm(resources, name)
    [metric] = stat_metrics(props)

    # Then the first overdue device the sweep (rotations) or converge (teardowns) reports alarms
    assert metric["MetricStat"]["Metric"] == {
        "Namespace": NAMESPACE,
        "MetricName": name,
        "Dimensions": [{"Name": "service", "Value": service}],
    }
    assert (metric["MetricStat"]["Stat"], props["Threshold"]) == (statistic, 1)


def test_the_topic_is_encrypted_with_its_own_key_for_this_stacks_alarms_only(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the alarm topic, its key, its policy and the output
    topic_logical_id, topic = only(resources, "AWS::SNS::Topic")
    key_id = topic["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0]
    key = resources[key_id]
    _, policy = only(resources, "AWS::SNS::TopicPolicy")
    these_alarms = {
        "StringEquals": {"aws:SourceAccount": "<AWS::AccountId>"},
        "ArnEquals": {
            "aws:SourceArn": [
                f"arn:<AWS::Partition>:cloudwatch:<AWS::Region>:<AWS::AccountId>:alarm:{name}"
                for name in sorted(props["AlarmName"] for _, props in alarms(resources).values())
            ]
        },
    }

    # Then the key rotates, is deleted with the stack (it keeps nothing), and lets CloudWatch
    # encrypt only for this account's alarms of this stack, each named (not by a prefix: a
    # stage's alarms, `Fleetkey-<stage>-...`, share the unstaged stack's)
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Delete"
    [cloudwatch] = [
        s
        for s in key["Properties"]["KeyPolicy"]["Statement"]
        if s.get("Principal") == {"Service": "cloudwatch.amazonaws.com"}
    ]

    def sorted_arns(condition: dict) -> dict:
        arns = condition["ArnEquals"]["aws:SourceArn"]
        return {**condition, "ArnEquals": {"aws:SourceArn": sorted(arns)}}

    assert sorted_arns(render(cloudwatch["Condition"])) == these_alarms
    assert sorted(cloudwatch["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey*"]
    # the same for publishing; and TLS only
    statements = {s["Sid"]: render(s) for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    assert sorted_arns(statements["CloudWatchAlarmsOfThisStack"]["Condition"]) == these_alarms
    assert statements["CloudWatchAlarmsOfThisStack"]["Action"] == "sns:Publish"
    assert statements["AllowPublishThroughSSLOnly"]["Effect"] == "Deny"
    # without alarmEmail, nobody is subscribed; the ARN is an output to subscribe to
    assert of_type(resources, "AWS::SNS::Subscription") == {}
    assert output_ref(template_outputs, "AlarmTopicArn") == topic_logical_id


def bare_topic(**options: Any) -> dict[str, dict]:
    stack = Stack(App(), "Bare")
    AlarmTopic(stack, "Alarms", **options).admit(["Bare-Alarm"])
    return Template.from_stack(stack).to_json()["Resources"]


def test_alarm_email_subscribes_one_address() -> None:
    # Given the topic with `alarmEmail` set
    resources = bare_topic(email="ops@example.com")

    # Then that address is subscribed by e-mail
    [subscription] = of_type(resources, "AWS::SNS::Subscription").values()
    assert subscription["Properties"]["Protocol"] == "email"
    assert subscription["Properties"]["Endpoint"] == "ops@example.com"


@pytest.mark.parametrize("email", ["ops", "ops@example.com,dev@example.com", "a b@example.com"])
def test_an_alarm_email_that_is_not_one_address_fails_synthesis(email: str) -> None:
    # Given `alarmEmail` that is not one address (as `cdk -c alarmEmail=...` passes it)
    # Then synthesis stops, naming the setting
    with pytest.raises(MonitoringConfigError, match="alarmEmail"):
        alarm_email_from_context({"alarmEmail": email}.get)
    with pytest.raises(MonitoringConfigError, match="alarmEmail"):
        bare_topic(email=email)


def test_alarm_email_comes_from_context() -> None:
    # Given context with and without `alarmEmail`
    # Then the address is read, and absent or empty means nobody is subscribed
    assert alarm_email_from_context({"alarmEmail": "ops@example.com"}.get) == "ops@example.com"
    assert alarm_email_from_context({}.get) is None
    assert alarm_email_from_context({"alarmEmail": ""}.get) is None


def dashboard_body(resources: dict[str, dict]) -> dict:
    _, dashboard = only(resources, "AWS::CloudWatch::Dashboard")
    return json.loads(render(dashboard["Properties"]["DashboardBody"]))


def test_the_lifecycle_dashboard(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the dashboard
    _, dashboard = only(resources, "AWS::CloudWatch::Dashboard")
    body = dashboard_body(resources)
    titles = [w["properties"].get("title") for w in body["widgets"]]

    # Then it shows the lifecycle: registrations by outcome, tokens, validations, rotations,
    # suspensions, decommissions, the queues, and the alarms
    assert dashboard["Properties"]["DashboardName"] == f"{STACK}-lifecycle"
    assert (
        output_ref(template_outputs, "DashboardName")
        == only(resources, "AWS::CloudWatch::Dashboard")[0]
    )
    assert titles[1:] == [
        "Registrations by outcome",
        "Tokens and data keys",
        "Validations",
        "Rotations",
        "Suspensions",
        "Decommissions",
        "Queue depths (messages visible)",
        "Alarms",
    ]
    # every queue's depth: the lifecycle queue and each failure queue
    [queues] = [w for w in body["widgets"] if w["properties"].get("title", "").startswith("Queue")]
    depth = [m for m in queues["properties"]["metrics"] if m[0] == "AWS/SQS"]
    assert len(depth) == len(of_type(resources, "AWS::SQS::Queue"))
    # and every alarm's state
    [status] = [w for w in body["widgets"] if w["properties"].get("title") == "Alarms"]
    assert len(status["properties"]["alarms"]) == len(EXPECTED_ALARMS)


def test_the_dashboard_shows_validations_by_outcome(resources: dict[str, dict]) -> None:
    # Given the dashboard's Validations widget
    [widget] = [
        w
        for w in dashboard_body(resources)["widgets"]
        if w["properties"].get("title") == "Validations"
    ]
    lines = widget["properties"]["metrics"]
    plain = [
        (line[1], dict(zip(line[2:-1:2], line[3:-1:2], strict=True)))
        for line in lines
        if line[0] == NAMESPACE
    ]
    queries = [line[0]["expression"] for line in lines if isinstance(line[0], dict)]

    # Then it shows the requests, the validated (decided by the token function's write), the
    # refused by reason (the token function's, when answered) and the refused when asked (the
    # validations function's: the device is not ACTIVE); no expired count, computed on read
    token, validations = constants.TOKEN_SERVICE_NAME, constants.VALIDATIONS_SERVICE_NAME
    assert ("ValidationsRequested", {"service": validations}) in plain
    assert ("ValidationsValidated", {"service": token}) in plain
    assert (
        "ValidationsRefused",
        {"service": validations, "reason": "device_not_active"},
    ) in plain
    refused_by_reason = (
        'SELECT SUM("ValidationsRefused") FROM SCHEMA("fleetkey", "reason", "service") '
        'WHERE "service" = \'%s\' GROUP BY "reason"'
    )
    assert refused_by_reason % token in queries
    assert not any("Expired" in str(line) for line in lines)


# -- the metrics are the code's ------------------------------------------------------------------

EMITTED = [
    re.compile(r'add_metric\(\s*name="(\w+)"'),
    re.compile(r'refused_metric="(\w+)"'),
    re.compile(r'_notify\("([A-Z]\w+)"\)'),
    re.compile(r'count_alone\(\s*"(\w+)"'),
]


def emitted_metric_names() -> set[str]:
    """The metric names the functions and the core layer emit: Powertools `add_metric` names,
    the device endpoints' refusal metrics, rotation events, lifecycle changes, validation
    outcomes, KMS throttles."""
    names = set(LIFECYCLE_METRICS.values()) | set(VALIDATION_METRICS.values())
    names |= {KMS_THROTTLE_METRIC}
    for root in (REPO / "functions", REPO / "layers" / "core" / "python" / "fleetkey"):
        for source in root.rglob("*.py"):
            text = source.read_text()
            for pattern in EMITTED:
                names.update(pattern.findall(text))
    return names


def custom_metrics(
    resources: dict[str, dict], stack: str = STACK
) -> list[tuple[str, dict[str, str]]]:
    """(metric name, dimensions) of every metric of the `fleetkey` namespace the alarms and the
    dashboard read, Metrics Insights queries included (their WHERE as the dimensions)."""
    found: list[tuple[str, dict[str, str]]] = []

    def query(text: str) -> None:
        match = re.match(r'SELECT SUM\("(\w+)"\) FROM SCHEMA\("([^"]+)"', text)
        if match and match[2] == NAMESPACE:
            where = dict(re.findall(r"\"(\w+)\" = '([^']+)'", text))
            found.append((match[1], where))

    for _, props in alarms(resources, stack).values():
        if props.get("Namespace") == NAMESPACE:
            found.append((props["MetricName"], dimensions(props)))
        for metric in props.get("Metrics", []):
            if "MetricStat" in metric and metric["MetricStat"]["Metric"]["Namespace"] == NAMESPACE:
                stat = metric["MetricStat"]["Metric"]
                found.append((stat["MetricName"], dimensions(stat)))
            elif "Expression" in metric:
                query(render(metric["Expression"]))
    for widget in dashboard_body(resources)["widgets"]:
        for line in widget["properties"].get("metrics", []):
            if line[0] == NAMESPACE:
                found.append((line[1], dict(zip(line[2:-1:2], line[3:-1:2], strict=True))))
            elif isinstance(line[0], dict) and "expression" in line[0]:
                query(line[0]["expression"])
    return found


def test_every_custom_metric_is_one_the_code_emits(resources: dict[str, dict]) -> None:
    # Given the fleetkey metrics the alarms and the dashboard read, and what the code emits
    read = custom_metrics(resources)
    emitted = emitted_metric_names()

    # Then each is emitted by name, and its `service` is that of a function of this stack
    services = {
        f["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
        for f in of_type(resources, "AWS::Lambda::Function").values()
    }
    assert len(read) > 30
    for name, dims in read:
        assert name in emitted, name
        assert dims["service"] in services, (name, dims)
    # the overdue metrics are the new ones the sweep and converge emit
    assert {"RotationsOverdue", "TeardownsOverdue", "KmsThrottles"} <= emitted


def test_the_refusal_reason_dimension_is_the_registration_functions() -> None:
    # Given the registration handler's source
    source = (REPO / "functions" / "registration" / "handler.py").read_text()

    # Then refusals carry the `reason` dimension the spike's SCHEMA and the clone alarm use
    assert 'add_dimension(name="reason"' in source


def test_insights_queries_refuse_quotes() -> None:
    # Given a value with a quote (never one of the stack's names)
    # Then no query is made of it
    with pytest.raises(ValueError, match="quote"):
        insights_query("RegistrationsRefused", NAMESPACE, {"service": "x' OR '1"})
    with pytest.raises(ValueError, match="quote"):
        insights_query(
            "RegistrationsRefused", NAMESPACE, {"service": "s"}, excluding=[("reason", "x' OR '1")]
        )


def test_insights_queries_exclude_values() -> None:
    # Given a query that leaves out two values of a dimension
    query = insights_query(
        "RegistrationsRefused",
        NAMESPACE,
        {"service": "s"},
        excluding=[("reason", "unknown_ca"), ("reason", "expired")],
        schema=("service", "reason"),
    )

    # Then each is a `!=` condition, after the equalities
    assert query == (
        'SELECT SUM("RegistrationsRefused") FROM SCHEMA("fleetkey", "reason", "service") '
        "WHERE \"service\" = 's' AND \"reason\" != 'unknown_ca' AND \"reason\" != 'expired'"
    )


# -- a stage watches its own --------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_resources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The stack of stage `dev` (`Fleetkey-dev`), synthesized as the CLI does (cdk-nag on)."""
    from fleetkey_infra.application import create_app

    app = create_app(
        outdir=str(tmp_path_factory.mktemp("cdk.out.monitoring-dev")),
        context={"aws:cdk:disable-asset-staging": True, "stage": "dev"},
    )
    app.synth()
    stack = app.node.find_child(f"{STACK}-dev")
    return Template.from_stack(stack).to_json()["Resources"]


def test_a_stages_alarms_read_its_own_functions_and_api(
    staged_resources: dict[str, dict],
) -> None:
    # Given the `dev` stage's alarms and the metrics they read
    resources = staged_resources
    names = [
        a["Properties"]["AlarmName"] for a in of_type(resources, "AWS::CloudWatch::Alarm").values()
    ]
    services = {
        f["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
        for f in of_type(resources, "AWS::Lambda::Function").values()
    }
    _, web_acl = only(resources, "AWS::WAFv2::WebACL")
    _, metric_filter = only(resources, "AWS::Logs::MetricFilter")

    # Then the alarms are the stage's (named after its stack), every `service` they and the
    # dashboard read is one of the stage's functions (`fleetkey-dev-...`), the WAF metric is its
    # web ACL's, and the access-log metric is in its stack's namespace
    assert {name.removeprefix(f"{STACK}-dev-") for name in names} == EXPECTED_ALARMS
    assert all(service.startswith("fleetkey-dev-") for service in services)
    read = custom_metrics(resources, f"{STACK}-dev")
    assert read and {dims["service"] for _, dims in read} <= services
    blocked = [
        a["Properties"]
        for a in of_type(resources, "AWS::CloudWatch::Alarm").values()
        if a["Properties"].get("MetricName") == "BlockedRequests"
    ]
    assert [dimensions(b)["WebACL"] for b in blocked] == [
        web_acl["Properties"]["VisibilityConfig"]["MetricName"]
    ]
    assert web_acl["Properties"]["VisibilityConfig"]["MetricName"] != "fleetkey-api"
    [transformation] = metric_filter["Properties"]["MetricTransformations"]
    assert transformation["MetricNamespace"] == f"{NAMESPACE}/{STACK}-dev"


def test_registration_backlog_alarm(resources: dict[str, dict]) -> None:
    # Given the registration function, which reserves concurrency (Lambda throttles it by design
    # while devices onboard faster than AWS IoT's quotas let it register them)
    [function_id] = [
        lid
        for lid in of_type(resources, "AWS::Lambda::Function")
        if re.fullmatch(r"FunctionsRegistration[0-9A-F]{8}", lid)
    ]
    # When reading its alarms
    backlog = alarm(resources, "RegistrationBacklog")
    # Then its throttles alarm nobody; an event waiting half an hour in Lambda's asynchronous
    # queue does
    assert "RegistrationThrottles" not in alarms(resources)
    assert (backlog["Namespace"], backlog["MetricName"]) == ("AWS/Lambda", "AsyncEventAge")
    assert dimensions(backlog) == {"FunctionName": {"Ref": function_id}}
    assert backlog["Statistic"] == "Maximum"
    assert (backlog["Threshold"], backlog["Period"], backlog["EvaluationPeriods"]) == (
        1_800_000,
        FIVE_MINUTES,
        1,
    )
    assert "registration-backlog" in backlog["AlarmDescription"]


def test_registration_retries_alarm_when_they_need_a_person(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    # Given the registration retry queue and the registration function's service
    retries_id = output_ref(template_outputs, "RegistrationRetryQueueUrl")
    # When reading the retry alarms
    failing = alarm(resources, "RegistrationRetriesFailing")
    stalled = alarm(resources, "RegistrationRetriesStalled")
    # Then a retry failing for a reason retrying cannot fix alarms at once, and so does a retry
    # queue holding visible messages that nothing received for 15 minutes (nothing consumes it)
    [metric] = stat_metrics(failing)
    stat = metric["MetricStat"]
    assert (stat["Metric"]["Namespace"], stat["Metric"]["MetricName"]) == (
        NAMESPACE,
        "RegistrationRetriesFailed",
    )
    assert dimensions(stat["Metric"]) == {"service": "fleetkey-registration", "kind": "persistent"}
    assert (stat["Stat"], failing["Threshold"]) == ("Sum", 1)
    [expression_] = [m for m in stalled["Metrics"] if "Expression" in m]
    assert expression_["Expression"] == "IF(visible >= 1 AND FILL(received, 0) == 0, 1, 0)"
    inputs = {m["Id"]: m["MetricStat"] for m in stalled["Metrics"] if "MetricStat" in m}
    assert {k: (v["Metric"]["MetricName"], v["Stat"]) for k, v in inputs.items()} == {
        "visible": ("ApproximateNumberOfMessagesVisible", "Minimum"),
        "received": ("NumberOfMessagesReceived", "Sum"),
    }
    for stat in inputs.values():
        assert stat["Metric"]["Namespace"] == "AWS/SQS"
        assert dimensions(stat["Metric"]) == {
            "QueueName": {"Fn::GetAtt": [retries_id, "QueueName"]}
        }
    assert (stalled["Threshold"], stalled["EvaluationPeriods"], stalled["DatapointsToAlarm"]) == (
        1,
        3,
        3,
    )


@pytest.mark.parametrize("function", ["Registration", "DeviceEvents", "RotationEvents"])
def test_a_lost_on_failure_record_alarms(resources: dict[str, dict], function: str) -> None:
    [function_id] = [
        lid
        for lid in of_type(resources, "AWS::Lambda::Function")
        if re.fullmatch(rf"Functions{function}[0-9A-F]{{8}}", lid)
    ]
    lost = alarm(resources, f"{function}DestinationFailures")
    assert (lost["Namespace"], lost["MetricName"]) == ("AWS/Lambda", "DestinationDeliveryFailures")
    assert dimensions(lost) == {"FunctionName": {"Ref": function_id}}
    assert (lost["Statistic"], lost["Threshold"]) == ("Sum", 1)
