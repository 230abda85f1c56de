"""The fleet simulator: a fleet lives through the device lifecycle, phase by phase, against the
local stack. Each capability adds its phase; a phase drives devices and operators through the
stack's real interfaces and states what it expects. The run ends with a table per phase (counts,
p50/p95 latency, AWS calls per operation), the wall time and the process's peak memory, and
fails if any expectation failed."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tqdm import tqdm

from fleetkey_local.instrument import AwsCallCounter

T = TypeVar("T")


@dataclass
class OperationStats:
    name: str
    durations_ms: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.durations_ms)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def calls_text(self) -> str:
        if not self.calls:
            return "-"
        low, high = min(self.calls), max(self.calls)
        return str(low) if low == high else f"{low}-{high}"


@dataclass
class PhaseReport:
    name: str
    operations: dict[str, OperationStats] = field(default_factory=dict)
    expectations: list[tuple[bool, str]] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0  # the process's peak resident memory when the phase ended

    @property
    def failed(self) -> list[str]:
        return [text for ok, text in self.expectations if not ok]


class Phase(Protocol):
    name: str

    def run(self, simulation: Simulation) -> None: ...


class Simulation:
    """What phases share: the fleet, the stack's interfaces, measurement and expectations."""

    def __init__(self, *, progress: bool = True, counter: AwsCallCounter | None = None) -> None:
        self.progress = progress
        self.counter = counter or AwsCallCounter().watch_default_session()
        self.reports: list[PhaseReport] = []
        self.state: dict[str, object] = {}
        self._current: PhaseReport | None = None

    # ---- used by phases ---------------------------------------------------------------------

    def measure(self, operation: str, call: Callable[[], T]) -> T:
        """Run `call` as one `operation`: its latency, and the AWS calls the functions made."""
        stats = self._current.operations.setdefault(operation, OperationStats(operation))
        self.counter.reset()
        start = time.perf_counter()
        try:
            return call()
        finally:
            stats.durations_ms.append((time.perf_counter() - start) * 1000)
            stats.calls.append(self.counter.count())

    def expect(self, ok: bool, text: str) -> bool:
        self._current.expectations.append((bool(ok), text))
        return bool(ok)

    def each(self, items: Iterable[T], description: str) -> Iterable[T]:
        items = list(items)
        return tqdm(
            items, desc=f"  {description}", unit="dev", leave=False, disable=not self.progress
        )

    # ---- running ----------------------------------------------------------------------------

    def run(self, phases: list[Phase]) -> int:
        started = time.perf_counter()
        for phase in phases:
            self._current = PhaseReport(phase.name)
            self.reports.append(self._current)
            print(f"[{len(self.reports)}] {phase.name}", flush=True)
            phase_start = time.perf_counter()
            try:
                phase.run(self)
            except Exception as exc:  # noqa: BLE001 - a crashed phase is a failed expectation
                self.expect(False, f"phase crashed: {type(exc).__name__}: {exc}")
            self._current.seconds = time.perf_counter() - phase_start
            self._current.peak_rss_mib = peak_rss_mib()
            for ok, text in self._current.expectations:
                print(f"      {'ok  ' if ok else 'FAIL'} {text}")
            if self._current.failed:
                break
        self.print_tables(time.perf_counter() - started)
        return 1 if any(r.failed for r in self.reports) else 0

    def print_tables(self, elapsed: float) -> None:
        width = max([len(o) for r in self.reports for o in r.operations] + [30])
        print()
        for report in self.reports:
            if not report.operations:
                continue
            print(f"{report.name} ({report.seconds:.1f} s, peak RSS {report.peak_rss_mib:.0f} MiB)")
            print(f"| {'operation':<{width}} | count | AWS calls |  p50 ms |  p95 ms |")
            print(f"|{'-' * (width + 2)}|-------|-----------|---------|---------|")
            for stats in report.operations.values():
                print(
                    f"| {stats.name:<{width}} | {len(stats.durations_ms):>5} | "
                    f"{stats.calls_text():>9} | {statistics.median(stats.durations_ms):>7.1f} | "
                    f"{stats.percentile(0.95):>7.1f} |"
                )
            print()
        print(
            f"wall time of the phases {elapsed:.1f} s, "
            f"peak memory (max RSS) {peak_rss_mib():.0f} MiB"
        )
        failed = [text for r in self.reports for text in r.failed]
        if failed:
            print(f"FAILED: {len(failed)} expectation(s) in {elapsed:.1f} s")
            for text in failed:
                print(f"  - {text}")
        else:
            checks = sum(len(r.expectations) for r in self.reports)
            phases = len(self.reports)
            print(f"passed: {checks} expectations across {phases} phases in {elapsed:.1f} s")


def peak_rss_mib() -> float:
    """This process's peak resident set size (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
