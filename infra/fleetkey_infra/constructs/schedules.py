"""Scheduled work: the EventBridge rules that run the maintenance function (signing-key
retirement) every hour, and the rotation sweep (rotation_events) every minute."""

from __future__ import annotations

from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.dead_letters import dead_letter_queue


class Schedules(Construct):
    """An hourly EventBridge rule -> the maintenance function, and a one-minute rule -> the
    rotation sweep (`rotation_sweep`, the rotation_events function), each with the full scheduled
    event as its input (the functions check `source` and `detail-type`).

    EventBridge invokes the functions asynchronously. When it cannot (throttled, function
    missing) it retries, then keeps the event in the rule's dead-letter queue (`fleetkey redrive
    maintenance-dlq` or `rotation-sweep-dlq` re-delivers it: docs/runbook-redrive.md); the invoke
    permission it needs is bound to the rule's ARN. Failures inside a function are Lambda's
    asynchronous retries; every run repeats whatever the previous one left undone.

    Attributes: `maintenance_rule`, `rotation_sweep_rule` (events.Rule), `dead_letters` (the
    maintenance rule's), `rotation_sweep_dead_letters` (sqs.Queue).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        maintenance: lambda_.IFunction,
        rotation_sweep: lambda_.IFunction,
    ) -> None:
        super().__init__(scope, construct_id)
        self.dead_letters = self._build_dead_letter_queue()
        self.maintenance_rule = events.Rule(
            self,
            "SigningKeyMaintenance",
            description="fleetkey: retire token signing keys whose tokens have all expired",
            schedule=events.Schedule.rate(constants.MAINTENANCE_SCHEDULE_RATE),
            enabled=True,
            targets=[
                targets.LambdaFunction(
                    maintenance,
                    retry_attempts=constants.MAINTENANCE_TARGET_RETRY_ATTEMPTS,
                    max_event_age=constants.MAINTENANCE_TARGET_MAX_EVENT_AGE,
                    dead_letter_queue=self.dead_letters,
                )
            ],
        )
        self.rotation_sweep_dead_letters = dead_letter_queue(
            self,
            "RotationSweepDeadLetters",
            holds="the rotation sweep's target keeps here the events EventBridge could not "
            "deliver to the rotation_events function after its retries. Replaying them is "
            "optional (the next run, a minute later, does the same work); `fleetkey redrive "
            "rotation-sweep-dlq` re-delivers them as one run (docs/runbook-redrive.md).",
        )
        self.rotation_sweep_rule = events.Rule(
            self,
            "RotationSweep",
            description="fleetkey: rotation sweep (rollbacks past their deadline, retired "
            "certificates, renewal commands, CRL refresh)",
            schedule=events.Schedule.rate(constants.ROTATION_SWEEP_RATE),
            enabled=True,
            targets=[
                targets.LambdaFunction(
                    rotation_sweep,
                    retry_attempts=constants.ROTATION_SWEEP_TARGET_RETRY_ATTEMPTS,
                    max_event_age=constants.ROTATION_SWEEP_TARGET_MAX_EVENT_AGE,
                    dead_letter_queue=self.rotation_sweep_dead_letters,
                )
            ],
        )

    def _build_dead_letter_queue(self) -> sqs.Queue:
        return dead_letter_queue(
            self,
            "MaintenanceDeadLetters",
            holds="the maintenance schedule's target keeps here the events EventBridge could not "
            "deliver to the function after its retries. Replaying them is optional (the next "
            "hourly run does the same work); `fleetkey redrive maintenance-dlq` re-delivers them "
            "as one run (docs/runbook-redrive.md).",
        )
