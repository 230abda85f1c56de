"""Loading the Lambda functions (functions/<name>/handler.py) as Lambda would, and a context."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
# The function (functions/<name>) whose handler is running in this thread or task, if any: the
# test suite attributes AWS calls to functions by it (tests/support/aws_calls.py).
RUNNING_FUNCTION: ContextVar[str | None] = ContextVar("fleetkey_running_function", default=None)


def load_function(name: str) -> ModuleType:
    """Import functions/<name>/handler.py under a unique module name (every handler is
    'handler.py', as Lambda expects, so they cannot share one import name).

    Raises:
        FileNotFoundError: there is no such function.
    """
    path = FUNCTIONS_DIR / name / "handler.py"
    spec = importlib.util.spec_from_file_location(f"fleetkey_function_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler: Callable[[Any, Any], Any] = getattr(module, "handler")  # noqa: B009 (dynamic module)
    module.handler = _clearing_metrics(handler, name)  # type: ignore[attr-defined]
    return module


def _clearing_metrics(handler: Callable[[Any, Any], Any], name: str) -> Callable[[Any, Any], Any]:
    """Powertools (3.37) never clears its metric set while POWERTOOLS_METRICS_DISABLED is set, and
    prints it anyway once 100 values pile up; the local stack runs with metrics disabled, so each
    invocation starts from an empty set, as a fresh Lambda environment's flush would leave it.
    The invocation also runs with RUNNING_FUNCTION set to the function's name."""
    from fleetkey.observability import metrics

    def invoke(event: Any, context: Any) -> Any:
        running = RUNNING_FUNCTION.set(name)
        try:
            return handler(event, context)
        finally:
            RUNNING_FUNCTION.reset(running)
            metrics.clear_metrics()

    invoke.__wrapped__ = handler  # type: ignore[attr-defined]
    return invoke


@dataclass
class LambdaContext:
    function_name: str = "fleetkey-local"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-local"
    aws_request_id: str = "00000000-0000-4000-8000-000000000000"
