"""The lifecycle queue: the work a lifecycle change leaves for later, done by the converge
function.

Decommission answers 202 once the device is DECOMMISSIONED and queues `{"device_id", "epoch"}`
here (the admin function; the device_events function may too); the converge function makes AWS
IoT match the device's recorded state (reset command, connection closed, certificates out of
ACTIVE, policies and thing principals detached, certificates and thing deleted, data key
destroyed). AWS IoT's detaches settle asynchronously, so a device whose teardown cannot finish yet
is reported failed in the batch response (ReportBatchItemFailures) and SQS delivers it again
after the visibility timeout; after `LIFECYCLE_MAX_RECEIVE_COUNT` deliveries it moves to the
dead-letter queue, from which `fleetkey redrive lifecycle-dlq` sends it back once the cause is
fixed (docs/runbook-redrive.md).
"""

from __future__ import annotations

from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.dead_letters import dead_letter_queue
from fleetkey_infra.work_queues import consume as consume_queue
from fleetkey_infra.work_queues import work_queue


class LifecycleQueue(Construct):
    """An SQS-encrypted (the senders need no KMS grant), TLS-only standard queue with a
    dead-letter queue, consumed by the converge function (`consume`).

    Attributes: `queue` (sqs.Queue), `dead_letters` (sqs.Queue), and after `consume`,
    `event_source` (lambda_event_sources.SqsEventSource).
    """

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.dead_letters = dead_letter_queue(
            self,
            "DeadLetters",
            holds="the lifecycle queue moves here the messages the converge function could not "
            f"finish after {constants.LIFECYCLE_MAX_RECEIVE_COUNT} deliveries (a teardown AWS IoT "
            "kept refusing). Once the cause is fixed, `fleetkey redrive lifecycle-dlq` sends them "
            "back to the lifecycle queue (docs/runbook-redrive.md).",
        )
        self.queue = work_queue(
            self,
            "Queue",
            visibility_timeout=constants.LIFECYCLE_VISIBILITY_TIMEOUT,
            retention=constants.LIFECYCLE_RETENTION,
            dead_letters=self.dead_letters,
            max_receive_count=constants.LIFECYCLE_MAX_RECEIVE_COUNT,
        )
        self.event_source: event_sources.SqsEventSource | None = None

    def consume(self, function: lambda_.Function) -> event_sources.SqsEventSource:
        """`function` receives the queue's messages in small batches and answers with the ones
        that failed (partial batch responses), at most `CONVERGE_MAX_CONCURRENCY` at once. The
        event source grants the function's role what Lambda's poller does with it (receive,
        delete, change visibility, read the queue's attributes)."""
        self.event_source = consume_queue(
            self.queue,
            function,
            visibility_timeout=constants.LIFECYCLE_VISIBILITY_TIMEOUT,
            batch_size=constants.CONVERGE_BATCH_SIZE,
            max_concurrency=constants.CONVERGE_MAX_CONCURRENCY,
            what="the lifecycle queue (converge)",
        )
        return self.event_source
