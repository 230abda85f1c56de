"""Queues that keep the events fleetkey could not process, until an operator re-delivers them
(`fleetkey redrive <queue>`: docs/runbook-redrive.md)."""

from __future__ import annotations

from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.nag import acknowledge


def dead_letter_queue(scope: Construct, construct_id: str, *, holds: str) -> sqs.Queue:
    """An SQS-encrypted (so AWS services can send without a grant on a customer key), TLS-only
    queue. `holds` says whose undeliverable events it keeps and how they are re-delivered (the
    `fleetkey redrive` queue name): the reason it needs no dead-letter queue of its own (cdk-nag
    SQS3, in cdk.out/policy-validation-report.json)."""
    queue = sqs.Queue(
        scope,
        construct_id,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        retention_period=constants.FAILED_EVENT_RETENTION,
    )
    acknowledge(
        queue, "AwsSolutions-SQS3", f"This queue is itself the dead-letter destination: {holds}"
    )
    return queue
