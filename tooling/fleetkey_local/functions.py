"""Loading the Lambda functions (functions/<name>/handler.py) as Lambda would, and a context."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"


def load_function(name: str):
    """Import functions/<name>/handler.py under a unique module name (every handler is
    'handler.py', as Lambda expects, so they cannot share one import name)."""
    path = FUNCTIONS_DIR / name / "handler.py"
    spec = importlib.util.spec_from_file_location(f"fleetkey_function_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.handler = _clearing_metrics(module.handler)
    return module


def _clearing_metrics(handler):
    """Powertools (3.37) never clears its metric set while POWERTOOLS_METRICS_DISABLED is set, and
    prints it anyway once 100 values pile up; the local stack runs with metrics disabled, so each
    invocation starts from an empty set, as a fresh Lambda environment's flush would leave it."""
    from fleetkey.observability import metrics

    def invoke(event, context):
        try:
            return handler(event, context)
        finally:
            metrics.clear_metrics()

    invoke.__wrapped__ = handler
    return invoke


@dataclass
class LambdaContext:
    function_name: str = "fleetkey-local"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-local"
    aws_request_id: str = "00000000-0000-4000-8000-000000000000"
