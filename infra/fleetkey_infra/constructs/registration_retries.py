"""The registration retry queue: what brings a registration that failed back without a person.

AWS IoT's rate limits bind a large onboarding (docs/load.md): a registration that AWS IoT kept
throttling through the SDK's retries and Lambda's two asynchronous retries is not lost. Lambda's
on-failure destination sends its invocation record here; an event source mapping gives it back to
the registration function, one record at a time and at most `REGISTRATION_RETRY_MAX_CONCURRENCY`
at once, so that retries add little to the load that throttled them. A retry that fails again
comes back after the visibility timeout; after `REGISTRATION_RETRY_MAX_RECEIVE_COUNT` deliveries
(six hours: as long as Lambda keeps an asynchronous event; a delivery Lambda throttles counts too)
it moves to the registration failure queue and its alarm. A retry that fails for a reason retrying
cannot fix (a thing name that clashes, a missing permission) alarms at once
(`RegistrationRetriesFailing`, in constructs/monitoring.py), and so does a queue nobody consumes
(`RegistrationRetriesStalled`: its oldest message an hour old).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.work_queues import consume as consume_queue
from fleetkey_infra.work_queues import work_queue


class RegistrationConfigError(ValueError):
    """The registration settings (CDK context) cannot be deployed as given."""


@dataclass(frozen=True)
class RegistrationConfig:
    """`reserved_concurrency`: the registration function's reserved concurrency (None: none,
    for an account whose concurrency quota leaves nothing to reserve)."""

    reserved_concurrency: int | None = constants.DEFAULT_REGISTRATION_CONCURRENCY

    @classmethod
    def from_context(cls, get: Callable[[str], object]) -> RegistrationConfig:
        """`registrationConcurrency`: a whole number in `REGISTRATION_CONCURRENCY_RANGE`, or
        `none`; absent: the default.

        Raises:
            RegistrationConfigError: anything else.
        """
        key = constants.REGISTRATION_CONCURRENCY_CONTEXT_KEY
        value = get(key)
        if value is None:
            return cls()
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "none":
                return cls(reserved_concurrency=None)
            if text.isascii() and text.isdigit():
                value = int(text)  # `cdk deploy -c key=N` passes a string
        low, high = constants.REGISTRATION_CONCURRENCY_RANGE
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RegistrationConfigError(
                f"{key} must be a whole number from {low} to {high}, or none, not {value!r}"
            )
        return cls(reserved_concurrency=value)


class RegistrationRetries(Construct):
    """An SQS-encrypted (Lambda's destination sends with the function's role, no key grant),
    TLS-only queue whose dead-letter queue is `dead_letters` (the registration failure queue).

    Attributes: `queue` (sqs.Queue), `dead_letters`, and after `consume`, `event_source`
    (lambda_event_sources.SqsEventSource).
    """

    def __init__(self, scope: Construct, construct_id: str, *, dead_letters: sqs.IQueue) -> None:
        super().__init__(scope, construct_id)
        self.dead_letters = dead_letters
        self.queue = work_queue(
            self,
            "Queue",
            visibility_timeout=constants.REGISTRATION_RETRY_VISIBILITY_TIMEOUT,
            retention=constants.REGISTRATION_RETRY_RETENTION,
            dead_letters=dead_letters,
            max_receive_count=constants.REGISTRATION_RETRY_MAX_RECEIVE_COUNT,
        )
        self.event_source: event_sources.SqsEventSource | None = None

    def consume(self, function: lambda_.Function) -> event_sources.SqsEventSource:
        """`function` (registration) receives one record per invocation (so each invocation
        records at most one decision, as from the rule) and reports it failed in a partial batch
        response. The event source grants the function's role what Lambda's poller does with it."""
        self.event_source = consume_queue(
            self.queue,
            function,
            visibility_timeout=constants.REGISTRATION_RETRY_VISIBILITY_TIMEOUT,
            batch_size=constants.REGISTRATION_RETRY_BATCH_SIZE,
            max_concurrency=constants.REGISTRATION_RETRY_MAX_CONCURRENCY,
            what="the registration retry queue (registration)",
        )
        return self.event_source
