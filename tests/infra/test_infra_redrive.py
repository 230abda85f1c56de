"""`fleetkey redrive` knows every failure queue the stack creates: each dead-letter queue,
on-failure destination, IoT rule error action and schedule target DLQ of the synthesized template
is one of its queues (by the CloudFormation output that names it), of its kind, re-delivered to
the function that failed (`fleetkey_cli.redrive.QUEUES`); the local stack has the same ones.
(The redrive itself: tests/integration/test_redrive.py.)"""

from __future__ import annotations

from typing import Any

from fleetkey_cli.redrive import (
    DEAD_LETTERS,
    LAMBDA_DESTINATION,
    QUEUES,
    RULE_ERRORS,
    SCHEDULE_DEAD_LETTERS,
)
from fleetkey_local.failure_queues import FAILURE_QUEUES, ON_FAILURE_DESTINATIONS
from fleetkey_local.rules import RULES


def _ref(value: Any) -> str | None:
    """The logical id a Ref or Fn::GetAtt names."""
    if isinstance(value, dict) and "Ref" in value:
        return value["Ref"]
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return value["Fn::GetAtt"][0]
    return None


def function_dir_of(template: dict[str, Any], logical_id: str | None) -> str:
    variables = template["Resources"][logical_id]["Properties"]["Environment"]["Variables"]
    return str(variables["POWERTOOLS_SERVICE_NAME"]).removeprefix("fleetkey-")


def failure_queues_of(template: dict[str, Any]) -> dict[str, tuple[str, str, str | None]]:
    """Every queue the template makes a failure destination: logical id -> (kind, the failing
    function's directory, the IoT rule's SQL or the queue its dead letters come from)."""
    resources = template["Resources"]

    def function_dir(logical_id: str | None) -> str:
        return function_dir_of(template, logical_id)

    # A retry queue: an on-failure destination that an event source mapping gives back to the
    # function. It is not a failure queue; its dead-letter queue holds Lambda's invocation
    # records, redriven as an on-failure destination's.
    retry_queues = {
        _ref(r["Properties"]["DestinationConfig"]["OnFailure"]["Destination"])
        for r in resources.values()
        if r["Type"] == "AWS::Lambda::EventInvokeConfig"
    } & {
        _ref(r["Properties"]["EventSourceArn"])
        for r in resources.values()
        if r["Type"] == "AWS::Lambda::EventSourceMapping"
    }
    found: dict[str, tuple[str, str, str | None]] = {}
    for logical_id, resource in resources.items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::SQS::Queue" and "RedrivePolicy" in properties:
            dead_letters = _ref(properties["RedrivePolicy"]["deadLetterTargetArn"])
            mappings = [
                r
                for r in resources.values()
                if r["Type"] == "AWS::Lambda::EventSourceMapping"
                and _ref(r["Properties"]["EventSourceArn"]) == logical_id
            ]
            [mapping] = mappings
            function = function_dir(_ref(mapping["Properties"]["FunctionName"]))
            if logical_id in retry_queues:
                found[dead_letters] = (LAMBDA_DESTINATION, function, None)
            else:
                found[dead_letters] = (DEAD_LETTERS, function, logical_id)
        elif resource["Type"] == "AWS::Lambda::EventInvokeConfig":
            destination = properties["DestinationConfig"]["OnFailure"]["Destination"]
            if _ref(destination) in retry_queues:
                continue
            found[_ref(destination)] = (
                LAMBDA_DESTINATION,
                function_dir(_ref(properties["FunctionName"])),
                None,
            )
        elif resource["Type"] == "AWS::IoT::TopicRule":
            payload = properties["TopicRulePayload"]
            [action] = payload["Actions"]
            found[_ref(payload["ErrorAction"]["Sqs"]["QueueUrl"])] = (
                RULE_ERRORS,
                function_dir(_ref(action["Lambda"]["FunctionArn"])),
                payload["Sql"],
            )
        elif resource["Type"] == "AWS::Events::Rule":
            [target] = properties["Targets"]
            found[_ref(target["DeadLetterConfig"]["Arn"])] = (
                SCHEDULE_DEAD_LETTERS,
                function_dir(_ref(target["Arn"])),
                None,
            )
    return found


def test_every_failure_queue_of_the_stack_is_redriven_to_the_function_that_failed(
    resources: dict[str, dict], template_outputs: dict[str, dict]
) -> None:
    template = {"Resources": resources, "Outputs": template_outputs}
    # Given every queue the synthesized stack makes a failure destination (a dead-letter queue,
    # an on-failure destination, an IoT rule's error action, a schedule target's DLQ)
    found = failure_queues_of(template)
    queues = [lid for lid, r in template["Resources"].items() if r["Type"] == "AWS::SQS::Queue"]
    outputs = template["Outputs"]
    # Then every queue of the stack is the lifecycle queue, the registration retry queue or one
    # of them, and redrive knows each one: by the output that names it, of its kind, to the
    # function that failed
    assert len(queues) == len(found) + 2 == len(QUEUES) + 2
    covered = {}
    for queue in QUEUES:
        logical_id = _ref(outputs[queue.queue_output]["Value"])
        kind, function, detail = found[logical_id]
        assert (kind, function) == (queue.kind, queue.function), queue.name
        # the function output names the function that failed
        function_id = _ref(outputs[queue.function_output]["Value"])
        variables = template["Resources"][function_id]["Properties"]["Environment"]["Variables"]
        assert variables["POWERTOOLS_SERVICE_NAME"] == f"fleetkey-{function}"
        if kind == RULE_ERRORS:  # the rule's SQL is the one redrive applies
            assert next(r for r in RULES if r.name == queue.rule).sql == detail
        if kind == DEAD_LETTERS:  # back to the queue the dead letters came from
            assert _ref(outputs[queue.target_output]["Value"]) == detail
        covered[logical_id] = queue.name
    assert set(covered) == set(found)
    # And the local stack has the same failure queues and on-failure destinations
    assert set(FAILURE_QUEUES) == {q.queue_output for q in QUEUES if q.kind != DEAD_LETTERS}
    by_queue = {_ref(output["Value"]): name for name, output in outputs.items()}
    destinations = {
        function_dir_of(template, _ref(r["Properties"]["FunctionName"])): by_queue[
            _ref(r["Properties"]["DestinationConfig"]["OnFailure"]["Destination"])
        ]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Lambda::EventInvokeConfig"
    }
    assert destinations == ON_FAILURE_DESTINATIONS
