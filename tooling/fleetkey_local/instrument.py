"""Counting the AWS calls an operation makes, from botocore's own events."""

from __future__ import annotations

import threading
from collections import Counter


class AwsCallCounter:
    """Attach to boto3 clients; counts every API call they make (retries by the SDK count once,
    as one logical call; what matters for the budget is requests we chose to make)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[str] = []

    def watch(self, *clients) -> AwsCallCounter:
        for client in clients:
            client.meta.events.register("before-call.*.*", self._on_call)
        return self

    def watch_default_session(self) -> AwsCallCounter:
        """Count the calls of every client later made from boto3's default session (the one the
        Lambda functions use)."""
        import boto3

        if boto3.DEFAULT_SESSION is None:
            boto3.setup_default_session()
        boto3.DEFAULT_SESSION.events.register("before-call.*.*", self._on_call)
        return self

    def _on_call(self, model, **_: object) -> None:
        with self._lock:
            self.calls.append(f"{model.service_model.service_name}.{model.name}")

    def reset(self) -> list[str]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    def count(self) -> int:
        return len(self.calls)

    def by_operation(self) -> Counter:
        return Counter(self.calls)
