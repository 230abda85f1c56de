"""The maintenance schedule: an hourly EventBridge rule -> the maintenance function, with retries
and a dead-letter queue, and an invoke permission bound to the rule. (The rotation sweep's rule:
tests/infra/test_infra_rotation.py.)"""

from fleetkey_infra import constants
from infra_template import function_by_service, of_type, render


def maintenance_rule(resources: dict[str, dict]) -> tuple[str, dict]:
    """The EventBridge rule whose target is the maintenance function."""
    function_id, _ = function_by_service(resources, constants.MAINTENANCE_SERVICE_NAME)
    [found] = [
        (lid, r)
        for lid, r in of_type(resources, "AWS::Events::Rule").items()
        if any(t["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]} for t in r["Properties"]["Targets"])
    ]
    return found


def test_the_stack_has_the_maintenance_and_rotation_sweep_rules_only(
    resources: dict[str, dict],
) -> None:
    # Given the stack's EventBridge rules
    # When reading their schedules
    schedules = sorted(
        r["Properties"]["ScheduleExpression"]
        for r in of_type(resources, "AWS::Events::Rule").values()
    )

    # Then there are two: hourly maintenance and the one-minute rotation sweep
    assert schedules == ["rate(1 hour)", "rate(1 minute)"]


def test_maintenance_runs_every_hour(resources: dict[str, dict]) -> None:
    # Given the maintenance function's EventBridge rule
    _, rule = maintenance_rule(resources)
    props = rule["Properties"]

    # When reading its trigger
    # Then it is an enabled hourly schedule on the default bus (no event pattern)
    assert props["ScheduleExpression"] == "rate(1 hour)"
    assert props["State"] == "ENABLED"
    assert "EventPattern" not in props
    assert "EventBusName" not in props


def test_schedule_targets_the_maintenance_function_with_retries_and_a_dead_letter_queue(
    resources: dict[str, dict],
) -> None:
    # Given the rule and the maintenance function
    _, rule = maintenance_rule(resources)
    function_id, _ = function_by_service(resources, constants.MAINTENANCE_SERVICE_NAME)

    # When reading its one target
    [target] = rule["Properties"]["Targets"]

    # Then it invokes the maintenance function with the scheduled event itself (no input
    # override: the function checks source and detail-type), retried twice within the hour,
    # then dead-lettered to an encrypted SQS queue
    assert target["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    assert not {"Input", "InputPath", "InputTransformer"} & set(target)
    assert target["RetryPolicy"] == {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 3600}
    queue_id = target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
    queue = resources[queue_id]
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["SqsManagedSseEnabled"] is True
    assert queue["Properties"]["MessageRetentionPeriod"] == 14 * 24 * 3600


def test_only_the_rule_may_send_to_the_dead_letter_queue(resources: dict[str, dict]) -> None:
    # Given the rule and its dead-letter queue
    rule_id, rule = maintenance_rule(resources)
    queue_id = rule["Properties"]["Targets"][0]["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]

    # When reading the queue's policy
    [policy] = [
        p
        for p in of_type(resources, "AWS::SQS::QueuePolicy").values()
        if {"Ref": queue_id} in p["Properties"]["Queues"]
    ]
    statements = policy["Properties"]["PolicyDocument"]["Statement"]
    allows = [s for s in statements if s["Effect"] == "Allow"]

    # Then EventBridge may send to it on behalf of this rule only (the TLS deny is checked with
    # every queue in test_infra_functions)
    assert [render(s) for s in allows] == [
        {
            "Sid": allows[0]["Sid"],
            "Action": "sqs:SendMessage",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Resource": f"<{queue_id}.Arn>",
            "Condition": {"ArnEquals": {"aws:SourceArn": f"<{rule_id}.Arn>"}},
        }
    ]


def test_only_the_rule_may_invoke_the_maintenance_function(resources: dict[str, dict]) -> None:
    # Given the rule and the maintenance function
    rule_id, _ = maintenance_rule(resources)
    function_id, _ = function_by_service(resources, constants.MAINTENANCE_SERVICE_NAME)

    # When collecting the invoke permissions on the function
    permissions = [
        p["Properties"]
        for p in of_type(resources, "AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == {"Fn::GetAtt": [function_id, "Arn"]}
    ]

    # Then there is one: EventBridge, for this rule
    assert permissions == [
        {
            "Action": "lambda:InvokeFunction",
            "FunctionName": {"Fn::GetAtt": [function_id, "Arn"]},
            "Principal": "events.amazonaws.com",
            "SourceArn": {"Fn::GetAtt": [rule_id, "Arn"]},
        }
    ]
