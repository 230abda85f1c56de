"""The lifecycle queue (SQS): work that outlasts a request, run by the converge function. SQS
redelivers what the function reports failed, and keeps in its dead-letter queue what never
finishes, so a teardown that waits out AWS IoT's eventual consistency runs on AWS's own retries."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient


class SqsLifecycleQueue:
    """`client` is a boto3 SQS client; None builds a real one at the first message."""

    def __init__(self, queue_url: str, client: SQSClient | None = None, region: str | None = None):
        self.queue_url = queue_url
        self._client = client
        self._region = region

    def _sqs(self) -> SQSClient:
        if self._client is None:
            from fleetkey.adapters.aws import client as aws_client

            self._client = aws_client("sqs", self._region)
        return self._client

    def enqueue(self, device_id: str, epoch: int) -> None:
        """AWS calls: 1 (SendMessage)."""
        body: dict[str, Any] = {"device_id": device_id, "epoch": epoch}
        self._sqs().send_message(QueueUrl=self.queue_url, MessageBody=json.dumps(body))
