"""Fault injection: fail the k-th AWS call an operation makes, before it reaches AWS (the call
has no effect) or after AWS applied it (the effect happened; the caller sees a timeout)."""

from __future__ import annotations

from botocore.exceptions import ClientError, ReadTimeoutError


class InjectedFault(Exception):
    pass


class FaultInjector:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.after: bool = False
        self.fired: str | None = None

    def watch(self, *clients) -> FaultInjector:
        for client in clients:
            client.meta.events.register("before-call.*.*", self._before)
            client.meta.events.register("after-call.*.*", self._after)
        return self

    def arm(self, k: int | None, *, after: bool = False) -> None:
        self.calls, self.fail_at, self.after, self.fired = [], k, after, None

    def _before(self, model, **_: object) -> None:
        self.calls.append(model.name)
        if not self.after and len(self.calls) == self.fail_at:
            self.fired = model.name
            raise ClientError(
                {"Error": {"Code": "InternalServerError", "Message": "injected"}}, model.name
            )

    def _after(self, model, **_: object) -> None:
        if self.after and len(self.calls) == self.fail_at:
            self.fired = model.name
            raise ReadTimeoutError(endpoint_url=f"injected-after-{model.name}")
