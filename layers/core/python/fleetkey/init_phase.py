"""When Lambda runs a function's init phase: on the first request's path (on demand), or ahead of
any request (SnapStart, which snapshots the initialized environment when a version is published;
provisioned concurrency).

Handlers defer to their first request what their requests use but their import need not (the
services, the admin API's routers and models, pydantic), as the composition root defers building
the services, so that an on-demand init stays within what every function imports anyway
(docs/cold-start.md). When init runs ahead of requests, deferring only moves that work onto a
request, so the handlers load it at init instead (`load_ahead`, `ahead_of_requests`).
"""

from __future__ import annotations

import os
from importlib import import_module

# Lambda's AWS_LAMBDA_INITIALIZATION_TYPE: on-demand, provisioned-concurrency or snap-start.
AHEAD_OF_REQUESTS = frozenset({"provisioned-concurrency", "snap-start"})


def ahead_of_requests() -> bool:
    """True when this environment is initialized before any request reaches it."""
    return os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") in AHEAD_OF_REQUESTS


def load_ahead(*modules: str) -> None:
    """Import `modules` (what the handler defers to its first request) now, when this
    environment is initialized ahead of requests; on demand, leave them to the first request."""
    if ahead_of_requests():
        for module in modules:
            import_module(module)
