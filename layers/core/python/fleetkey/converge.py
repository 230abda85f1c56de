"""Decide, then converge: the shape of every operation that changes AWS to match a decision.

1. Decide: one conditional write records the decision (a device transition with its audit
   record, a certificate decision) in one transaction. From that instant the decision holds: what
   it forbids is refused, whatever AWS still says.
2. Converge: idempotent AWS steps bring AWS in line with what is recorded *now*. Any retry (the
   same request again, Lambda's async retry, the queue's redelivery) runs the steps again from
   the start and finishes what a failure left; a step that finds its work done does nothing.

`converge` runs the steps. A step that raises `NotSettled` (AWS has not caught up with an earlier
step: a detach not yet visible to a delete) stops the run with False, so the caller retries later;
any other error propagates, for the caller's retry machinery to take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetkey.errors import NotSettled


@dataclass(frozen=True, slots=True)
class Step:
    """One idempotent step: `run` may be called any number of times with the same result."""

    name: str
    run: Callable[[], object]


def converge(steps: Iterable[Step]) -> bool:
    """Run `steps` in order. True when all ran; False when one reported NotSettled (the rest are
    left to the retry).

    Raises:
        whatever a step raises, but NotSettled.
    """
    for step in steps:
        try:
            step.run()
        except NotSettled:
            return False
    return True
