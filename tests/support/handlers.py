"""Loading function handlers (each lives in functions/<name>/handler.py) and a Lambda context."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_handler(function: str):
    path = ROOT / "functions" / function / "handler.py"
    spec = importlib.util.spec_from_file_location(f"fleetkey_function_{function}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class LambdaContext:
    function_name: str = "fleetkey-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-test"
    aws_request_id: str = "52fdfc07-2182-154f-163f-5f0f9a621d72"
