"""A test double for a rule's function: records the events it is invoked with."""

from __future__ import annotations

import threading
import time

TIMEOUT = 10.0


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict, context) -> dict:
        with self._lock:
            self.events.append(event)
        return {"status": "recorded"}

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.events if predicate(e)]
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no such event among {self.events}")
