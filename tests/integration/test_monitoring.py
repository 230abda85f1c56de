"""What the alarms read, emitted by the code: `KmsThrottles` for every throttled KMS response,
`RotationsOverdue` from the sweep (off the `due` index, whatever the sweep then manages),
`TeardownsOverdue` from converge; and every operator command docs/runbook.md shows, run against
the local stack."""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec

from fleetkey.adapters.aws import client as aws_client
from fleetkey.composition import Components
from fleetkey.crypto.certificates import certificate_id
from fleetkey.services.lifecycle import TEARDOWN_DEADLINE
from fleetkey.services.rotation import OVERDUE_AFTER
from fleetkey_cli.client import AdminClient, InProcessTransport
from fleetkey_cli.main import main
from fleetkey_local.device import rotation_assertion, rotation_csr, rotation_request
from fleetkey_local.stack import TABLE
from tests.conftest import ROOT
from tests.integration.test_redrive import COMMANDS as REDRIVE_COMMANDS
from tests.support.emf import emitted
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

RUNBOOK = ROOT / "docs" / "runbook.md"
DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
DEVICE = "pump-0042"


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


@pytest.fixture
def metrics_on(monkeypatch):
    """Powertools metrics printed (EMF on stdout), as in Lambda: the suite turns them off."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")


# ---- KmsThrottles ------------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any):
        yield self._data


def kms_answering(code: str, attempts: list | None = None):
    """A `before-send.kms` handler: KMS answers every attempt with error `code` (400), each
    attempt recorded in `attempts`."""

    def answer(request, **_: Any) -> AWSResponse:
        if attempts is not None:
            attempts.append(request.url)
        body = json.dumps({"__type": code, "message": "Rate exceeded"}).encode()
        headers = {"x-amzn-RequestId": "r", "Content-Type": "application/x-amz-json-1.1"}
        return AWSResponse(request.url, 400, headers, _Body(body))

    return answer


def test_every_throttled_kms_response_is_counted(metrics_on, monkeypatch, capsys):
    # Given a KMS client as the functions build it, in the token function, KMS throttling
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "fleetkey-token")
    kms = aws_client("kms", "eu-west-1")
    attempts: list[str] = []
    kms.meta.events.register("before-send.kms", kms_answering("ThrottlingException", attempts))

    # When a Sign is throttled at every attempt (the first and the SDK's retries)
    with pytest.raises(ClientError, match="ThrottlingException"):
        kms.sign(KeyId="k", Message=b"m", MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")

    # Then each throttled response is one KmsThrottles datapoint, in the fleetkey namespace,
    # with the function's service as its only dimension
    found = emitted(capsys.readouterr().out, "KmsThrottles")
    assert len(attempts) > 1
    assert len(found) == len(attempts)
    for each in found:
        assert each["directive"]["Namespace"] == "fleetkey"
        assert each["directive"]["Dimensions"] == [["service"]]
        assert (each["document"]["service"], each["value"]) == ("fleetkey-token", 1)


def test_other_kms_errors_and_other_services_are_not_counted(metrics_on, capsys):
    # Given KMS refusing for a reason other than throttling, and a throttled DynamoDB client
    kms = aws_client("kms", "eu-west-1")
    kms.meta.events.register("before-send.kms", kms_answering("AccessDeniedException"))
    dynamodb = aws_client("dynamodb", "eu-west-1")
    dynamodb.meta.events.register(
        "before-send.dynamodb", kms_answering("ProvisionedThroughputExceededException")
    )

    # When both calls fail
    with pytest.raises(ClientError):
        kms.describe_key(KeyId="k")
    with pytest.raises(ClientError):
        dynamodb.get_item(TableName="t", Key={"pk": {"S": "x"}})

    # Then no KmsThrottles is emitted
    assert emitted(capsys.readouterr().out, "KmsThrottles") == []


def test_kms_throttles_follow_the_metrics_switch(capsys):
    # Given metrics turned off (POWERTOOLS_METRICS_DISABLED, as the suite sets it)
    kms = aws_client("kms", "eu-west-1")
    kms.meta.events.register("before-send.kms", kms_answering("ThrottlingException"))

    # When KMS throttles
    with pytest.raises(ClientError):
        kms.get_public_key(KeyId="k")

    # Then nothing is printed
    assert emitted(capsys.readouterr().out, "KmsThrottles") == []


# ---- RotationsOverdue --------------------------------------------------------------------------


def pending_rotation(stack, acme, device_id: str) -> datetime:
    """A registered device with a rotation pending: its commit deadline."""
    key, certificate, event = stack.manufacture(acme, device_id)
    assert stack.register(event).accepted
    csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), device_id)
    assertion = rotation_assertion(
        key, certificate_id(certificate), device_id, stack.settings.issuer, csr
    )
    status, answer = stack.rotation.request(device_id, rotation_request(csr, assertion))
    assert status == 201
    return datetime.fromisoformat(answer["commit_deadline"])


def failing_transactions(client) -> Any:
    """Every TransactWriteItems of `client` throttled (the sweep's rollbacks fail), until the
    returned handler is unregistered."""

    def throttled(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
            "TransactWriteItems",
        )

    client.meta.events.register("before-call.dynamodb.TransactWriteItems", throttled)
    return throttled


def test_the_sweep_counts_rotations_stuck_past_their_deadline(stack, acme):
    # Given a rotation pending, and its rollback failing (DynamoDB throttled)
    deadline = pending_rotation(stack, acme, "rot-overdue-1")
    handler = failing_transactions(stack.dynamodb)
    try:
        # When the sweep runs a minute after the deadline
        first = stack.sweep_rotations(deadline + timedelta(minutes=1))
        # Then the rollback failed, but it is not overdue yet
        assert (first["failed"], first["rolled_back"], first["overdue"]) == (1, 0, 0)

        # When it still fails more than OVERDUE_AFTER after the deadline
        late = stack.sweep_rotations(deadline + OVERDUE_AFTER + timedelta(seconds=1))
        # Then the device is counted overdue, read off the due index
        assert (late["failed"], late["overdue"]) == (1, 1)
    finally:
        stack.dynamodb.meta.events.unregister("before-call.dynamodb.TransactWriteItems", handler)

    # When the sweep manages it at last, it still counts it late this once
    done = stack.sweep_rotations(deadline + OVERDUE_AFTER + timedelta(minutes=1))
    assert (done["rolled_back"], done["deleted"], done["overdue"]) == (1, 1, 1)
    # and then nothing is due any more
    after = stack.sweep_rotations(deadline + OVERDUE_AFTER + timedelta(minutes=2))
    assert (after["due"], after["overdue"]) == (0, 0)


def test_the_rotation_events_function_emits_rotations_overdue(metrics_on, monkeypatch, capsys):
    # Given the rotation_events function whose sweep finds two devices overdue
    function = load_handler("rotation_events")
    counts = {
        "due": 2,
        "rolled_back": 0,
        "deleted": 0,
        "renewals_requested": 0,
        "failed": 2,
        "crl_published": 0,
        "overdue": 2,
    }

    class Rotation:
        def sweep(self) -> dict[str, int]:
            return dict(counts)

    class Built:
        rotation = Rotation()

    monkeypatch.setattr(function, "components", lambda: Built())
    schedule = {"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}

    # When the schedule runs it
    assert function.handler(schedule, LambdaContext()) == counts

    # Then RotationsOverdue is 2, with the function's service as its only dimension
    [found] = emitted(capsys.readouterr().out, "RotationsOverdue")
    assert found["directive"]["Dimensions"] == [["service"]]
    assert found["value"] == 2
    assert emitted(json.dumps(found["document"]), "RotationSweepFailures")[0]["value"] == 2


# ---- TeardownsOverdue --------------------------------------------------------------------------


def components_at(stack, moment: datetime, changes: list | None = None) -> Components:
    """The stack's services with the clock at `moment`, recording lifecycle observations."""
    return Components(
        stack.settings,
        dynamodb=stack.dynamodb,
        iot=stack.iot,
        kms=stack.kms,
        iot_data=stack.iot_data,
        sqs=stack.sqs,
        clock=lambda: moment,
        on_lifecycle_change=(lambda action, device: changes.append(action))
        if changes is not None
        else None,
    )


def decommissioned_at(stack, acme, device_id: str, moment: datetime) -> None:
    _, _, event = stack.manufacture(acme, device_id)
    assert stack.register(event).accepted
    components_at(stack, moment).lifecycle.decommission(
        device_id, reason="end of life", actor="ops"
    )


def test_converge_reports_a_teardown_pending_past_its_deadline(stack, acme):
    # Given two decommissioned devices, one just now and one TEARDOWN_DEADLINE ago
    now = datetime.now(UTC)
    decommissioned_at(stack, acme, "pump-recent", now)
    decommissioned_at(stack, acme, "pump-stuck", now - TEARDOWN_DEADLINE)

    # When converge runs on each (and finishes both teardowns)
    recent: list[str] = []
    stuck: list[str] = []
    assert components_at(stack, now, recent).lifecycle.converge("pump-recent")
    assert components_at(stack, now, stuck).lifecycle.converge("pump-stuck")

    # Then only the late one is reported overdue, before its teardown completed
    assert recent == ["teardown_completed"]
    assert stuck == ["teardown_overdue", "teardown_completed"]
    # and a device whose teardown is done is not overdue any more
    again: list[str] = []
    assert components_at(stack, now, again).lifecycle.converge("pump-stuck")
    assert again == []


def test_the_converge_function_emits_teardowns_overdue(
    stack, acme, metrics_on, monkeypatch, capsys
):
    # Given the converge function, and a device decommissioned over half an hour ago whose
    # teardown is still queued
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    converge = load_handler("converge")
    converge.components.cache_clear()
    decommissioned_at(stack, acme, "pump-late", datetime.now(UTC) - TEARDOWN_DEADLINE)
    capsys.readouterr()

    # When the lifecycle queue delivers it
    try:
        assert stack.lifecycle_worker(function=converge.handler).drain(30)
    finally:
        converge.components.cache_clear()

    # Then TeardownsOverdue is emitted once, with the function's service as its only dimension
    [found] = emitted(capsys.readouterr().out, "TeardownsOverdue")
    assert found["directive"]["Dimensions"] == [["service"]]
    assert found["value"] == 1


# ---- the runbook's commands --------------------------------------------------------------------

# The command lines docs/runbook.md shows (after `fleetkey`), each run below against the local
# stack, in this order; `redrive` ones are run by tests/integration/test_redrive.py.
RUNBOOK_COMMANDS = [
    f"device show {DEVICE}",
    f"audit {DEVICE}",
    f"rotation status {DEVICE}",
    f'device suspend {DEVICE} --reason "rate limited retry loop"',
    f'device suspend {DEVICE} --reason "suspected clone"',
    f'device decommission {DEVICE} --reason "end of life" --wait 30',
]


def runbook_commands() -> set[str]:
    """Every `fleetkey ...` command line the runbook shows: code blocks' lines and inline code
    with arguments (`fleetkey redrive`, a command's name alone, is not a command line)."""
    text = RUNBOOK.read_text()
    shown = re.findall(r"^\s*fleetkey (.+)$", text, flags=re.MULTILINE)
    shown += [m for m in re.findall(r"`fleetkey ([^`]+)`", text) if " " in m]
    return {line.strip() for line in shown}


def test_the_runbook_shows_only_commands_the_tests_run():
    shown = runbook_commands()
    assert shown, "the runbook shows no command"
    missing = shown - set(RUNBOOK_COMMANDS) - set(REDRIVE_COMMANDS.values())
    assert not missing, f"commands in {RUNBOOK.name} no test runs: {sorted(missing)}"


@pytest.fixture
def admin_client(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    admin = load_handler("admin")
    admin.services.cache_clear()
    yield AdminClient(
        InProcessTransport(admin.handler, "arn:aws:iam::123456789012:user/ops", LambdaContext())
    )
    admin.services.cache_clear()


def test_the_runbooks_commands_run(stack, acme, admin_client, capsys):
    # Given a registered device, and the converge function on the lifecycle queue
    _, certificate, event = stack.manufacture(acme, DEVICE)
    assert stack.register(event).accepted
    converge = load_handler("converge")
    worker = stack.lifecycle_worker(function=converge.handler).start()
    try:
        # When an operator runs each command of the runbook, in its order
        answers = []
        for line in RUNBOOK_COMMANDS:
            code = main(shlex.split(line), client=admin_client)
            answers.append((code, capsys.readouterr()))
    finally:
        worker.stop()
        converge.components.cache_clear()

    # Then each succeeds, and does what the runbook says
    assert [code for code, _ in answers] == [0] * len(RUNBOOK_COMMANDS), answers
    outputs = [captured.out for _, captured in answers]
    assert json.loads(outputs[0])["state"] == "ACTIVE"
    assert "registered" in outputs[1]
    assert json.loads(outputs[2])["current"]["certificate_id"] == certificate_id(certificate)
    assert json.loads(outputs[4])["state"] == "SUSPENDED"
    decommissioned = json.loads(outputs[5])
    assert (decommissioned["state"], decommissioned["teardown"]["status"]) == (
        "DECOMMISSIONED",
        "completed",
    )
