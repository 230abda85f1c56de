"""The operators' redrive policy (`constructs/operations.py`: `<name prefix>-redrive`) grants what
`fleetkey redrive` calls, on what it calls it, and nothing else.

Derived from the code two ways: every boto3 call written in tooling/fleetkey_cli/redrive.py (read
with `ast`, matched against botocore's models of the services it makes clients for), and the
requests of a redrive of every failure queue of a deployed stack (moto's CloudFormation and SQS;
Lambda's Invoke answered 202 without Lambda), each evaluated against the synthesized policy
(tests/support/aws_calls.py). The policy is built in a stack of its own, with the queues and
functions of `fleetkey_cli.redrive.QUEUES` by their deployed names; the last test holds the
fleetkey stack to the same queues and functions.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from aws_cdk import App, Environment, Stack, Validations
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from aws_cdk.assertions import Template
from botocore import xform_name
from cdk_nag import AwsSolutionsChecks
from cfnlint.api import lint
from cfnlint.config import ManualArgs

from fleetkey_cli import redrive
from fleetkey_cli.main import main
from fleetkey_cli.redrive import (
    DEAD_LETTERS,
    LAMBDA_DESTINATION,
    QUEUES,
    RULE_ERRORS,
    SCHEDULE_DEAD_LETTERS,
    FailureQueue,
)
from fleetkey_infra import constants
from fleetkey_infra.constructs.operations import RedrivePolicy
from fleetkey_infra.stage import StageConfig
from fleetkey_local.failure_queues import (
    destination_record,
    rule_error_message,
    schedule_dead_letter,
)
from fleetkey_local.rules import RULES
from fleetkey_local.serve import scheduled_event
from infra_template import as_list, of_type, only, output_ref, render
from tests.support.aws_calls import ACCOUNT, PARTITION, REGION, Decision, Request, decide

REDRIVE = Path(redrive.__file__)
STACK = "Fleetkey"

# What redrive takes from, sends to and invokes, by the stack outputs that name them: every
# failure queue; the queue dead letters go back to; the function of every queue whose messages
# are re-delivered by invocation (`Redriver._redeliver`).
FAILURE_QUEUE_OUTPUTS = [q.queue_output for q in QUEUES]
[LIFECYCLE_OUTPUT] = {q.target_output for q in QUEUES if q.target_output}
INVOKED_FUNCTION_OUTPUTS = list(
    dict.fromkeys(q.function_output for q in QUEUES if not q.target_output)
)

# Where IAM's action is not the operation's name (Service Authorization Reference): SQS's batch
# operations are authorized as their single-message action, Lambda's Invoke as InvokeFunction.
IAM_ACTIONS = {
    ("sqs", "ChangeMessageVisibilityBatch"): "sqs:ChangeMessageVisibility",
    ("sqs", "DeleteMessageBatch"): "sqs:DeleteMessage",
    ("sqs", "SendMessageBatch"): "sqs:SendMessage",
    ("lambda", "Invoke"): "lambda:InvokeFunction",
}


def iam_action(service: str, operation: str) -> str:
    return IAM_ACTIONS.get((service, operation), f"{service}:{operation}")


# ---- the policy, in a stack of its own -----------------------------------------------------------


def queue_name(output: str) -> str:
    """The deployed name of the queue an output names (`Fleetkey-LifecycleDeadLetterQueue`)."""
    return f"{STACK}-{output.removesuffix('Url')}"


def function_name(output: str) -> str:
    return f"{STACK}-{output.removesuffix('Name')}"


def queue_arn(output: str) -> str:
    return f"arn:{PARTITION}:sqs:{REGION}:{ACCOUNT}:{queue_name(output)}"


def function_arn(output: str) -> str:
    return f"arn:{PARTITION}:lambda:{REGION}:{ACCOUNT}:function:{function_name(output)}"


def redrive_stack(
    app: App, *, name_prefix: str = constants.NAME_PREFIX, keys: Mapping[str, str] | None = None
) -> Stack:
    """A stack with the policy over the queues and functions of `QUEUES`, by their deployed ARNs;
    `keys`: the customer managed key (ARN) of the queue an output names."""
    keys = keys or {}
    stack = Stack(app, STACK, env=Environment(account=ACCOUNT, region=REGION))

    def queue(output: str) -> sqs.IQueue:
        return sqs.Queue.from_queue_attributes(
            stack, output, queue_arn=queue_arn(output), key_arn=keys.get(output)
        )

    RedrivePolicy(
        stack,
        "RedrivePolicy",
        name_prefix=name_prefix,
        failure_queues=[queue(output) for output in FAILURE_QUEUE_OUTPUTS],
        lifecycle_queue=queue(LIFECYCLE_OUTPUT),
        functions=[
            lambda_.Function.from_function_arn(stack, output, function_arn(output))
            for output in INVOKED_FUNCTION_OUTPUTS
        ],
    )
    return stack


def managed_policy(template: dict[str, Any]) -> dict[str, Any]:
    _, policy = only(template["Resources"], "AWS::IAM::ManagedPolicy")
    properties: dict[str, Any] = policy["Properties"]
    return properties


def statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    return list(managed_policy(template)["PolicyDocument"]["Statement"])


def synthesized(**options: Any) -> dict[str, Any]:
    return dict(Template.from_stack(redrive_stack(App(), **options)).to_json())


def with_stack_arn(value: Any, stack_arn: str) -> Any:
    """The policy as IAM reads it for the stack `stack_arn`: `Ref AWS::StackId` is its ARN (any
    other intrinsic function fails: the test stack gives every other ARN as it is)."""
    if isinstance(value, list):
        return [with_stack_arn(v, stack_arn) for v in value]
    if isinstance(value, dict):
        if value == {"Ref": "AWS::StackId"}:
            return stack_arn
        assert not any(k == "Ref" or k.startswith("Fn::") for k in value), value
        return {k: with_stack_arn(v, stack_arn) for k, v in value.items()}
    return value


def granted(policy_statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Every (action, resource) the statements allow: no wildcard, so each is one request."""
    return {
        (action, resource)
        for s in policy_statements
        if s["Effect"] == "Allow"
        for action in as_list(s["Action"])
        for resource in as_list(s["Resource"])
    }


# ---- what redrive.py calls ---------------------------------------------------------------------


def written_operations(path: Path = REDRIVE) -> set[tuple[str, str]]:
    """(service, operation) of every boto3 client method called in the module: the services of
    its `.client("<service>")` calls, and every attribute call named as one of their operations
    (botocore's snake_case names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # (method name, first argument if a string) of every `<something>.<method>(...)`
    calls: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            first = node.args[0] if node.args else None
            literal = first.value if isinstance(first, ast.Constant) else None
            calls.append((node.func.attr, literal if isinstance(literal, str) else None))
    services = {argument for method, argument in calls if method == "client" and argument}
    session = botocore.session.get_session()
    by_method: dict[str, set[tuple[str, str]]] = {}
    for service in services:
        for operation in session.get_service_model(service).operation_names:
            by_method.setdefault(xform_name(operation), set()).add((service, operation))
    found: set[tuple[str, str]] = set()
    for method, _ in calls:
        matches = by_method.get(method, set())
        assert len(matches) <= 1, f"{method} is an operation of several services: {matches}"
        found |= matches
    return found


def test_the_policy_allows_every_aws_call_written_in_the_redrive_and_nothing_else() -> None:
    # Given every boto3 call written in tooling/fleetkey_cli/redrive.py
    operations = written_operations()
    assert {service for service, _ in operations} == {"cloudformation", "sqs", "lambda"}

    # When synthesizing the policy over queues with SQS-managed encryption (as the stack's are)
    policy_statements = statements(synthesized())

    # Then its actions are the IAM actions of those calls, each allowed, none denied
    assert all(s["Effect"] == "Allow" for s in policy_statements)
    actions = {a for s in policy_statements for a in as_list(s["Action"])}
    assert actions == {iam_action(service, operation) for service, operation in operations}


# ---- a redrive of every queue, recorded --------------------------------------------------------


def failure_message(queue: FailureQueue) -> tuple[str, dict[str, Any] | None]:
    """A message of the queue's kind that redrive re-delivers (body, message attributes)."""
    target = function_arn(queue.function_output)
    if queue.kind == DEAD_LETTERS:
        return json.dumps({"device_id": "pump-1", "epoch": 1}), None
    if queue.kind == LAMBDA_DESTINATION:
        record = destination_record(
            function_arn=target,
            event={"queue": queue.name},
            error_type="ClientError",
            error_message="Rate exceeded",
        )
        return json.dumps(record), None
    if queue.kind == RULE_ERRORS:
        rule = next(r for r in RULES if r.name == queue.rule)
        message = rule_error_message(
            rule_name=queue.name,
            topic=rule.topic_filter.replace("+", "pump-1"),
            payload={"clientId": "pump-1"},
            function_arn=target,
        )
        return json.dumps(message), None
    assert queue.kind == SCHEDULE_DEAD_LETTERS, queue.kind
    rule_arn = f"arn:{PARTITION}:events:{REGION}:{ACCOUNT}:rule/{STACK}-{queue.name}"
    body, attributes = schedule_dead_letter(scheduled_event(rule_arn), target_arn=target)
    return body, dict(attributes)


def deployed_stack() -> str:
    """The queues, each holding one message, and the stack whose outputs name them and the
    functions (moto); its ARN."""
    sqs_client = boto3.client("sqs", region_name=REGION)
    urls = {
        output: sqs_client.create_queue(QueueName=queue_name(output))["QueueUrl"]
        for output in [*FAILURE_QUEUE_OUTPUTS, LIFECYCLE_OUTPUT]
    }
    for queue in QUEUES:
        body, attributes = failure_message(queue)
        request: dict[str, Any] = {"QueueUrl": urls[queue.queue_output], "MessageBody": body}
        if attributes:
            request["MessageAttributes"] = attributes
        sqs_client.send_message(**request)
    time.sleep(0.01)  # a redrive takes what was sent before it started (SentTimestamp)
    outputs = urls | {q.function_output: function_name(q.function_output) for q in QUEUES}
    template = {
        "Resources": {"Nothing": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    stack_arn: str = cloudformation.create_stack(
        StackName=STACK, TemplateBody=json.dumps(template)
    )["StackId"]
    return stack_arn


def record_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, Any], str]]:
    """From now on, every AWS call: (service, operation, parameters, region). Lambda's Invoke is
    answered as Lambda accepts an asynchronous invocation (202); the rest goes to moto."""
    from botocore.client import BaseClient

    original = BaseClient._make_api_call  # type: ignore[attr-defined]
    calls: list[tuple[str, str, dict[str, Any], str]] = []

    def _make_api_call(client: Any, operation: str, params: dict[str, Any]) -> Any:
        service = client.meta.service_model.service_name
        calls.append((service, operation, dict(params), client.meta.region_name))
        if (service, operation) == ("lambda", "Invoke"):
            return {"StatusCode": 202}
        return original(client, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", _make_api_call)
    return calls


def iam_request(
    service: str,
    operation: str,
    params: Mapping[str, Any],
    region: str,
    stacks: Mapping[str, str],
) -> Request:
    """The IAM request a call makes: its action, on the resource IAM authorizes it on
    (`stacks`: the ARN of each stack by name)."""
    action = iam_action(service, operation)
    if service == "sqs":  # the queue, named by its URL's last path segment
        name = params["QueueUrl"].rstrip("/").rsplit("/", 1)[-1]
        return Request(action, f"arn:{PARTITION}:sqs:{region}:{ACCOUNT}:{name}")
    if service == "lambda":  # the function, unqualified as called
        name = params["FunctionName"]
        if not name.startswith("arn:"):
            name = f"arn:{PARTITION}:lambda:{region}:{ACCOUNT}:function:{name}"
        return Request(action, name)
    if service == "cloudformation":  # the stack, by its ARN (with its id)
        return Request(action, stacks[params["StackName"]])
    raise AssertionError(f"redrive called {service}.{operation}: on which resource?")


@pytest.mark.usefixtures("moto")
def test_the_policy_allows_exactly_the_requests_of_a_redrive_of_every_queue(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a deployed stack (moto) whose nine failure queues each hold a message to re-deliver
    stack_arn = deployed_stack()
    deployed = redrive.deployed_environment  # moto's SQS is one server: no long polling
    monkeypatch.setattr(
        redrive, "deployed_environment", lambda *a: replace(deployed(*a), wait_seconds=0)
    )
    calls = record_calls(monkeypatch)

    # When an operator lists every queue, then redrives every queue
    stack = ["--region", REGION, "redrive", "all", "--stack", STACK]
    assert main([*stack, "--dry-run"]) == 0
    assert main(stack) == 0
    output = capsys.readouterr().out
    assert output.count("-> redriven") == len(QUEUES)
    for queue in QUEUES:
        assert f"{queue.name}: 1 redriven," in output
    calls_made = [(service, operation) for service, operation, _, _ in calls]
    requests = {
        iam_request(service, operation, params, region, {STACK: stack_arn})
        for service, operation, params, region in calls
    }

    # Then the calls are those written in redrive.py, each of them made
    assert set(calls_made) == written_operations()
    # And the policy allows each request, and nothing the redrive did not request
    policy_statements = with_stack_arn(statements(synthesized()), stack_arn)
    for request in requests:
        assert decide(policy_statements, request) is Decision.ALLOWED, request
    assert granted(policy_statements) == {(r.action, r.resource) for r in requests}
    # (SendMessage on the lifecycle queue only, InvokeFunction on the functions that failed)
    assert {r.resource for r in requests if r.action == "sqs:SendMessage"} == {
        queue_arn(LIFECYCLE_OUTPUT)
    }
    assert {r.resource for r in requests if r.action == "lambda:InvokeFunction"} == {
        function_arn(output) for output in INVOKED_FUNCTION_OUTPUTS
    }


# ---- encryption, name, cdk-nag -----------------------------------------------------------------


def test_queues_with_a_customer_managed_key_get_their_key_through_sqs_only() -> None:
    # Given the lifecycle queue and two failure queues encrypted with customer managed keys
    send_key = f"arn:{PARTITION}:kms:{REGION}:{ACCOUNT}:key/1111aaaa-0000-0000-0000-000000000001"
    receive_key = f"arn:{PARTITION}:kms:{REGION}:{ACCOUNT}:key/2222bbbb-0000-0000-0000-000000000002"
    keys = {
        LIFECYCLE_OUTPUT: send_key,
        "LifecycleDeadLetterQueueUrl": receive_key,
        "TamperRuleErrorQueueUrl": receive_key,
    }

    # When synthesizing the policy
    by_sid = {s["Sid"]: render(s) for s in statements(synthesized(keys=keys))}

    # Then it may decrypt with the failure queues' key (receive) and make and decrypt data keys
    # with the lifecycle queue's (send), each only in requests SQS makes for the caller
    via_sqs = {"StringEquals": {"kms:ViaService": f"sqs.{REGION}.<AWS::URLSuffix>"}}
    assert by_sid["ReceiveThroughSqs"]["Action"] == "kms:Decrypt"
    assert by_sid["ReceiveThroughSqs"]["Resource"] == receive_key
    assert by_sid["ReceiveThroughSqs"]["Condition"] == via_sqs
    assert sorted(by_sid["SendThroughSqs"]["Action"]) == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert by_sid["SendThroughSqs"]["Resource"] == send_key
    assert by_sid["SendThroughSqs"]["Condition"] == via_sqs
    # And without such a key (the stack's queues: SQS-managed encryption) there is no KMS grant
    plain = statements(synthesized())
    assert not [a for s in plain for a in as_list(s["Action"]) if a.startswith("kms:")]


@pytest.mark.parametrize(
    ("stage", "name"), [(None, "fleetkey-redrive"), ("staging", "fleetkey-staging-redrive")]
)
def test_the_policy_is_named_after_the_stage_and_attached_to_nothing(
    stage: str | None, name: str
) -> None:
    # Given the stage's name prefix (the operator roles' too)
    prefix = StageConfig(stage).name_prefix

    # When synthesizing the policy
    properties = managed_policy(synthesized(name_prefix=prefix))

    # Then it is `<prefix>-redrive`, for the deployer to attach (no role, user or group)
    assert properties["ManagedPolicyName"] == name
    assert not {"Roles", "Users", "Groups"} & set(properties)


def nag_app(outdir: Path) -> tuple[App, Stack]:
    """The policy's stack under cdk-nag's AwsSolutions pack, as the fleetkey app runs it."""
    app = App(outdir=str(outdir))
    stack = redrive_stack(app)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    return app, stack


def test_the_policy_passes_cdk_nag_and_cfn_lint_without_a_wildcard(tmp_path: Path) -> None:
    # Given the policy's stack under cdk-nag
    app, stack = nag_app(tmp_path / "policy")

    # When synthesizing (an open finding fails it)
    app.synth()

    # Then cdk-nag has no finding, open or acknowledged (a pack without any is not reported),
    # and the policy names no wildcard
    report = json.loads((tmp_path / "policy" / "validation-report.json").read_text())
    for nag in report["pluginReports"]:
        assert nag["violations"] == [] and not nag.get("suppressedViolations"), nag
    template_text = (tmp_path / "policy" / stack.template_file).read_text()
    assert "*" not in json.dumps(managed_policy(json.loads(template_text))["PolicyDocument"])
    # And cfn-lint finds nothing in the template
    matches = lint(template_text, config=ManualArgs(regions=[REGION]))
    assert [f"{m.rule.id} {m.message}" for m in matches] == []
    # (cdk-nag did look at the policy: a wildcard grant added to it fails the synthesis)
    app, stack = nag_app(tmp_path / "wildcard")
    redrive_policy = stack.node.find_child("RedrivePolicy")
    assert isinstance(redrive_policy, RedrivePolicy)
    redrive_policy.policy.add_statements(
        iam.PolicyStatement(
            actions=["sqs:ReceiveMessage"], resources=[f"arn:{PARTITION}:sqs:{REGION}:{ACCOUNT}:*"]
        )
    )
    with pytest.raises(RuntimeError, match="AwsSolutions-IAM5"):
        app.synth()


# ---- the fleetkey stack --------------------------------------------------------------------------


def test_the_stack_gives_the_policy_every_failure_queue_and_the_functions_they_redrive_to(
    resources: dict[str, dict[str, Any]], template_outputs: dict[str, dict[str, Any]]
) -> None:
    # Given the fleetkey stack's redrive policy, and the output that names it
    [(policy_id, policy)] = [
        (lid, r)
        for lid, r in of_type(resources, "AWS::IAM::ManagedPolicy").items()
        if r["Properties"].get("ManagedPolicyName") == f"{constants.NAME_PREFIX}-redrive"
    ]
    assert template_outputs["RedrivePolicyArn"]["Value"] == {"Ref": policy_id}

    # When reading what it grants on what
    def arns(outputs: list[str]) -> set[str]:
        return {f"<{output_ref(template_outputs, output)}.Arn>" for output in outputs}

    grants: dict[str, set[str]] = {}
    for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
        for action in as_list(statement["Action"]):
            grants.setdefault(action, set()).update(render(as_list(statement["Resource"])))

    # Then it takes from the queues redrive knows (by their outputs), sends to the queue their
    # dead letters go back to, invokes the functions they are re-delivered to, and reads this
    # stack (SQS-managed encryption: no key)
    assert grants == {
        "cloudformation:DescribeStacks": {"<AWS::StackId>"},
        "sqs:ReceiveMessage": arns(FAILURE_QUEUE_OUTPUTS),
        "sqs:DeleteMessage": arns(FAILURE_QUEUE_OUTPUTS),
        "sqs:ChangeMessageVisibility": arns(FAILURE_QUEUE_OUTPUTS),
        "sqs:SendMessage": arns([LIFECYCLE_OUTPUT]),
        "lambda:InvokeFunction": arns(INVOKED_FUNCTION_OUTPUTS),
    }
