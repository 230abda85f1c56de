"""Queues a function consumes through an SQS event source: the lifecycle queue (converge) and the
registration retry queue (registration). Each redrives to a dead-letter queue after a number of
deliveries, and is consumed with partial batch responses."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_sqs as sqs
from constructs import Construct


def work_queue(
    scope: Construct,
    construct_id: str,
    *,
    visibility_timeout: Duration,
    retention: Duration,
    dead_letters: sqs.IQueue,
    max_receive_count: int,
) -> sqs.Queue:
    """An SQS-encrypted (senders need no KMS grant), TLS-only standard queue that moves a message
    delivered `max_receive_count` times to `dead_letters`."""
    return sqs.Queue(
        scope,
        construct_id,
        encryption=sqs.QueueEncryption.SQS_MANAGED,
        enforce_ssl=True,
        visibility_timeout=visibility_timeout,
        retention_period=retention,
        dead_letter_queue=sqs.DeadLetterQueue(
            max_receive_count=max_receive_count, queue=dead_letters
        ),
    )


def consume(
    queue: sqs.IQueue,
    function: lambda_.Function,
    *,
    visibility_timeout: Duration,
    batch_size: int,
    max_concurrency: int,
    what: str,
) -> event_sources.SqsEventSource:
    """`function` receives the queue's messages in batches of `batch_size`, at most
    `max_concurrency` at once, and answers with the ones that failed (partial batch responses).
    The event source grants the function's role what Lambda's poller does with it (receive,
    delete, change visibility, read the queue's attributes).

    Raises:
        ValueError: a visibility timeout under six times the function's timeout (AWS's guidance:
            else a message still being processed, or retried by Lambda's poller, is delivered
            again). `what` names the queue and its consumer in the message.
    """
    consumer = (function.timeout or Duration.seconds(3)).to_seconds()
    if visibility_timeout.to_seconds() < 6 * consumer:
        raise ValueError(
            f"{what}: the visibility timeout must be at least 6x the function's timeout "
            f"({consumer} s)"
        )
    source = event_sources.SqsEventSource(
        queue,
        batch_size=batch_size,
        report_batch_item_failures=True,
        max_concurrency=max_concurrency,
    )
    function.add_event_source(source)
    return source
