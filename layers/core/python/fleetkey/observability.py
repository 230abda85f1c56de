"""Logger, metrics and tracer, created once and shared by every function.

The service name comes from POWERTOOLS_SERVICE_NAME; every function publishes its metrics in the
`fleetkey` namespace. `metrics` flushes once per invocation, and a dimension added to it
(`add_dimension`) applies to every metric of that flush; `count_alone` is for a metric with a
dimension of its own.

Tracing. In Lambda with active tracing the tracer is Powertools' X-Ray tracer, created here at
import, so it patches botocore before any client exists and every AWS call is a subsegment of the
handler's. It patches botocore only: Powertools' default patches each library the X-Ray SDK knows
that happens to be installed (in the layer, botocore and sqlite3), and fleetkey calls out through
botocore alone. With tracing off (POWERTOOLS_TRACE_DISABLED, or outside Lambda: the tests, the
local stack) the X-Ray SDK is not imported: outside Lambda its recorder builds two botocore clients
at import to poll sampling rules (docs/cold-start.md); `_Untraced` does what the disabled SDK does,
nothing.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.tracing.base import BaseProvider, BaseSegment

if TYPE_CHECKING:
    import numbers
    import traceback
    from collections.abc import AsyncIterator, Iterator, Sequence

# The libraries whose calls become subsegments: fleetkey's only outbound calls are AWS's.
TRACED_LIBRARIES = ("botocore",)


class _Untraced(BaseProvider, BaseSegment):
    """The tracer's provider, and its segments, when tracing is off: records nothing."""

    @contextmanager
    def in_subsegment(self, name: str | None = None, **kwargs: Any) -> Iterator[BaseSegment]:
        yield self

    @asynccontextmanager
    async def in_subsegment_async(
        self, name: str | None = None, **kwargs: Any
    ) -> AsyncIterator[BaseSegment]:
        yield self

    def put_annotation(self, key: str, value: str | numbers.Number | bool) -> None:
        pass

    def put_metadata(self, key: str, value: Any, namespace: str = "default") -> None:
        pass

    def patch(self, modules: Sequence[str]) -> None:
        pass

    def patch_all(self) -> None:
        pass

    def close(self, end_time: int | None = None) -> None:
        pass

    def add_subsegment(self, subsegment: Any) -> None:
        pass

    def remove_subsegment(self, subsegment: Any) -> None:
        pass

    def add_exception(
        self,
        exception: BaseException,
        stack: list[traceback.StackSummary],
        remote: bool = False,
    ) -> None:
        pass


def _tracer() -> Tracer:
    # Powertools' own test (3.37, pinned): POWERTOOLS_TRACE_DISABLED, not in Lambda, SAM, Chalice.
    if Tracer._is_tracer_disabled():
        return Tracer(disabled=True, provider=_Untraced())
    return Tracer(patch_modules=TRACED_LIBRARIES)


logger = Logger()
metrics = Metrics(namespace="fleetkey")
tracer = _tracer()


def count_alone(name: str, **dimensions: str) -> None:
    """Count 1 of `name`, in the `fleetkey` namespace, in a metric document of its own
    (Powertools `single_metric`, printed at once) with the function's `service` and
    `dimensions`: they land on no other metric of the invocation, nor the invocation's on it.
    Nothing is printed while metrics are off (POWERTOOLS_METRICS_DISABLED), as for `metrics`."""
    from aws_lambda_powertools.metrics import MetricUnit, single_metric
    from aws_lambda_powertools.metrics.functions import is_metrics_disabled

    if is_metrics_disabled():
        return
    with single_metric(
        name=name,
        unit=MetricUnit.Count,
        value=1,
        namespace=metrics.namespace,
        default_dimensions=dimensions,
    ):
        pass
