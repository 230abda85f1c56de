"""What a handler imports at init, as Lambda imports it (docs/cold-start.md): nothing a request
can do without is left out, what only some requests use is deferred to them, and tracing in AWS
still patches botocore at init so that every AWS call is a subsegment.

Each case runs `import handler` in a fresh interpreter with the function's directory as working
directory and the function's environment, as benchmarks/importtime.py does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TRACE_HEADER = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"


def load_importtime():
    spec = importlib.util.spec_from_file_location(
        "importtime", ROOT / "benchmarks" / "importtime.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


IMPORTTIME = load_importtime()


def run_in_function(function: str, script: str, tmp_path, *, tracing=True, **env) -> dict:
    """Run `script` (which prints one JSON line last) in the function's Lambda-like process."""
    environment = IMPORTTIME.environment(function, tmp_path / "pycache", False, tracing)
    environment.update({"AWS_ACCESS_KEY_ID": "testing", **env})
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "functions" / function,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


IMPORTED = """
import json, sys
import handler
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {
    "pydantic", "aws_xray_sdk", "fleetkey", "requests", "sqlite3"})))
"""


@pytest.mark.parametrize("function", IMPORTTIME.FUNCTIONS)
def test_no_handler_imports_a_service_pydantic_or_the_admin_routers_at_init(function, tmp_path):
    # Given the function imported as Lambda imports it on demand (tracing on, as deployed)
    imported = set(run_in_function(function, IMPORTED, tmp_path))
    # Then the services (as the composition root builds them), pydantic and the admin API's
    # models and routers wait for the first request
    assert not {m for m in imported if m.split(".")[0] == "pydantic"}
    assert not {m for m in imported if m.startswith(("fleetkey.api.admin.", "fleetkey.api.models"))}
    assert not {m for m in imported if m.startswith(("fleetkey.services.", "fleetkey.store."))}
    # and the X-Ray SDK is there, having patched botocore alone (not requests, not sqlite3)
    assert "aws_xray_sdk.ext.botocore.patch" in imported
    assert not {m for m in imported if m.split(".")[0] in {"requests", "sqlite3"}}


@pytest.mark.parametrize(
    ("function", "deferred"),
    [
        ("admin", {"fleetkey.api.admin.allowlist", "pydantic"}),
        ("validations", {"fleetkey.api.validations", "pydantic"}),
        ("registration", {"fleetkey.services.registration", "fleetkey.events", "pydantic"}),
        ("rotation", {"fleetkey.services.rotation", "fleetkey.api.admin.pki", "pydantic"}),
        ("token", {"fleetkey.services.tokens"}),
        ("discovery", {"fleetkey.services.signing_keys", "fleetkey.services.tokens"}),
        ("introspect", {"fleetkey.services.introspection"}),
        ("maintenance", {"fleetkey.services.signing_keys"}),
    ],
)
def test_what_a_handler_defers_is_loaded_at_init_when_init_is_ahead_of_requests(
    function, deferred, tmp_path
):
    # Given the function initialized for SnapStart's snapshot (or provisioned concurrency)
    for initialization in ("snap-start", "provisioned-concurrency"):
        imported = set(
            run_in_function(
                function, IMPORTED, tmp_path, AWS_LAMBDA_INITIALIZATION_TYPE=initialization
            )
        )
        # Then what it defers on demand is imported at init, off the request path
        assert deferred <= imported, (initialization, deferred - imported)


TRACED = """
import json
import boto3
import handler
from botocore.stub import Stubber
from aws_xray_sdk.core import xray_recorder

sent = []
xray_recorder.emitter.send_entity = lambda entity: sent.append(entity.to_dict())
client = boto3.client("dynamodb")

class Context:
    function_name = "fleetkey-maintenance"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-maintenance"
    aws_request_id = "00000000-0000-4000-8000-000000000000"

def work(event, context):
    with Stubber(client) as stub:
        stub.add_response("describe_table", {"Table": {"TableName": "table"}})
        client.describe_table(TableName="table")
    return handler.handler(event, context)

answer = handler.tracer.capture_lambda_handler(work)({"source": "not-a-schedule"}, Context())
print(json.dumps({"answer": answer, "sent": sent}))
"""


def test_in_lambda_with_tracing_every_aws_call_is_a_subsegment(tmp_path):
    # Given a function as Lambda runs it with active tracing (an invocation's trace header set),
    # its X-Ray segments captured instead of sent to the daemon
    out = run_in_function("maintenance", TRACED, tmp_path, _X_AMZN_TRACE_ID=TRACE_HEADER)
    # When its handler runs and an AWS call is made with a client built after the import
    sent = {(e["namespace"], e["name"]) for e in out["sent"] if "namespace" in e}
    # Then the call is a subsegment of AWS's (botocore patched at init), as is the handler's own
    assert out["answer"] == {"status": "ignored"}
    assert ("aws", "dynamodb") in sent
    aws_call = next(e for e in out["sent"] if e.get("namespace") == "aws")
    assert aws_call["aws"]["operation"] == "DescribeTable"
    assert any(e["name"] == "## work" for e in out["sent"])


def test_with_tracing_off_the_xray_sdk_is_not_imported_and_the_handler_works(tmp_path):
    # Given a function where tracing is off (the tests, the local stack)
    script = """
import json, sys
import handler

class Context:
    function_name = "fleetkey-maintenance"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:fleetkey-maintenance"
    aws_request_id = "00000000-0000-4000-8000-000000000000"

answer = handler.handler({"source": "not-a-schedule"}, Context())
print(json.dumps({"answer": answer, "xray": sorted(m for m in sys.modules if "xray" in m)}))
"""
    out = run_in_function("maintenance", script, tmp_path, tracing=False)
    # Then the handler answers, traced by nothing: the X-Ray SDK's recorder (which outside
    # Lambda builds botocore clients at import) was never imported
    assert out["answer"] == {"status": "ignored"}
    assert "aws_xray_sdk.core" not in out["xray"]
