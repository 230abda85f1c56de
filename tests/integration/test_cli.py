"""The operator CLI against the admin function (in-process transport, same API Gateway events),
and the lifecycle's teardown run by the converge function on the stack's lifecycle queue."""

import base64
import json

import pytest

from fleetkey.crypto.certificates import certificate_id
from fleetkey_cli.client import AdminApiError, AdminClient, ApiResponse, InProcessTransport
from fleetkey_cli.main import main, wait_for_teardown
from fleetkey_local.device import client_assertion
from fleetkey_local.pki import key_pem
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"


@pytest.fixture
def client(stack, monkeypatch):
    # The admin function's environment, as the stack provisioned it (lifecycle queue, data-key
    # key); an iot-data endpoint, so that closing a connection needs no DescribeEndpoint.
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


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


@pytest.fixture
def converge(client):
    """Lambda's SQS event source for the converge function on the lifecycle queue (after `client`:
    the function reads the same environment)."""
    function = load_handler("converge")
    yield function
    function.components.cache_clear()


def registered(stack, acme, device_id: str):
    """A device that registered through JITR: its key and certificate id."""
    key, certificate, event = stack.manufacture(acme, device_id)
    assert stack.register(event).accepted
    return key, certificate_id(certificate)


def cli(capsys, *argv: str, client: AdminClient) -> tuple[int, dict | None, str]:
    """Run the CLI: its exit status, its output read as JSON (None if empty), its stderr."""
    code = main(list(argv), client=client)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def test_ca_register_with_local_key_then_import_show_and_audit(client, tmp_path, capsys):
    acme = cached_ca("acme")
    (tmp_path / "ca.pem").write_text(acme.pem)
    (tmp_path / "ca.key").write_text(key_pem(acme.key))
    # Given a CA registered with a proof made locally from the CA key
    assert (
        main(
            [
                "ca",
                "register",
                "--name",
                "acme",
                "--certificate",
                str(tmp_path / "ca.pem"),
                "--ca-key",
                str(tmp_path / "ca.key"),
            ],
            client=client,
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["status"] == "ACTIVE"
    # When a manifest with one bad row is imported
    manifest = tmp_path / "factory.csv"
    manifest.write_text(
        "device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile\n"
        "pump-1,SN-1,acme,,infusion-pump\nbad id,SN-2,acme,,infusion-pump\n"
    )
    code = main(["allowlist", "import", str(manifest)], client=client)
    report = json.loads(capsys.readouterr().out)
    # Then the good row is in, the bad one reported, and the exit code says so
    assert code == 3 and report["imported"] == 1 and report["rejected"][0]["row"] == 2
    assert main(["device", "show", "pump-1"], client=client) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ALLOWLISTED"
    assert main(["audit", "pump-1"], client=client) == 0
    assert "chain verified: 1 records" in capsys.readouterr().out


def test_errors_are_reported_with_exit_code_1(client, capsys):
    # When a device that does not exist is shown
    code = main(["device", "show", "nope"], client=client)
    # Then the API's error is printed
    assert code == 1 and "404 not_found" in capsys.readouterr().err


def test_an_unreachable_endpoint_is_reported_with_exit_code_2(monkeypatch, capsys):
    import socket

    # Given an endpoint on a loopback port nothing listens on
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("FLEETKEY_ENDPOINT", f"http://127.0.0.1:{port}")
    # When / Then the CLI says so
    assert main(["ca", "list"]) == 2
    assert "unreachable" in capsys.readouterr().err


# ---- the lifecycle ------------------------------------------------------------------------------


def test_suspend_and_resume(stack, acme, client, capsys):
    # Given a registered device
    _, cert_id = registered(stack, acme, "pump-cli-susp")
    # When an operator suspends it
    code, device, _ = cli(
        capsys, "device", "suspend", "pump-cli-susp", "--reason", "stolen", client=client
    )
    # Then it is SUSPENDED, its certificate INACTIVE, and its tokens so far inactive
    assert (code, device["state"]) == (0, "SUSPENDED")
    assert device["tokens_not_before"] is not None
    assert stack.certificate_status(cert_id) == "INACTIVE"
    # When it is resumed, Then it is ACTIVE again, and so is its certificate
    code, device, _ = cli(capsys, "device", "resume", "pump-cli-susp", client=client)
    assert (code, device["state"]) == (0, "ACTIVE")
    assert stack.certificate_status(cert_id) == "ACTIVE"
    # And the audit trail says who did what and why
    assert main(["audit", "pump-cli-susp"], client=client) == 0
    trail = capsys.readouterr().out
    assert "suspended" in trail and '"reason": "stolen"' in trail and "resumed" in trail


def test_decommission_waits_for_the_teardown_then_recommission_transfers(
    stack, acme, client, converge, capsys
):
    # Given a registered device, and the converge function polling the lifecycle queue
    _, cert_id = registered(stack, acme, "pump-cli-decom")
    worker = stack.lifecycle_worker(function=converge.handler).start()
    try:
        # When an operator decommissions it and waits
        code, device, err = cli(
            capsys,
            "device",
            "decommission",
            "pump-cli-decom",
            "--reason",
            "end of life",
            "--wait",
            "30",
            client=client,
        )
    finally:
        worker.stop()
    # Then the CLI returns once the teardown is complete, and AWS IoT holds nothing of it
    assert code == 0, err
    assert (device["state"], device["teardown"]["status"]) == ("DECOMMISSIONED", "completed")
    assert worker.statistics()["deleted"] >= 1
    things = [t["thingName"] for t in stack.harness_iot.list_things()["things"]]
    certificates = [
        c["certificateId"] for c in stack.harness_iot.list_certificates()["certificates"]
    ]
    assert "pump-cli-decom" not in things and cert_id not in certificates

    # When it is recommissioned for another owner
    code, device, _ = cli(
        capsys, "device", "recommission", "pump-cli-decom", "--owner", "clinic-2", client=client
    )
    # Then it is ALLOWLISTED in its next life, owned by the new owner: an ownership transfer
    assert (code, device["state"], device["owner"], device["epoch"]) == (
        0,
        "ALLOWLISTED",
        "clinic-2",
        2,
    )
    assert device["teardown"] is None
    assert main(["audit", "pump-cli-decom"], client=client) == 0
    recommissioned = [
        line for line in capsys.readouterr().out.splitlines() if " recommissioned " in line
    ]
    assert len(recommissioned) == 1
    assert '"owner": "clinic-2"' in recommissioned[0]
    assert '"previous_owner": null' in recommissioned[0]
    assert '"transfer": true' in recommissioned[0]


def test_decommission_without_wait_prints_the_202_answer_and_recommission_is_refused_meanwhile(
    stack, acme, client, capsys
):
    registered(stack, acme, "pump-cli-202")
    # When it is decommissioned without --wait
    code, device, _ = cli(
        capsys, "device", "decommission", "pump-cli-202", "--reason", "retired", client=client
    )
    # Then the answer says DECOMMISSIONED, teardown pending
    assert (code, device["state"], device["teardown"]["status"]) == (
        0,
        "DECOMMISSIONED",
        "pending",
    )
    # And recommissioning it before the teardown ran is refused, with the API's error
    code, out, err = cli(capsys, "device", "recommission", "pump-cli-202", client=client)
    assert (code, out) == (1, None)
    assert "409 conflict" in err and "torn down" in err
    # Once the teardown ran, it is accepted (no field: owner and profile unchanged)
    assert stack.drain_lifecycle(30)
    code, device, _ = cli(capsys, "device", "recommission", "pump-cli-202", client=client)
    assert (code, device["state"], device["owner"], device["epoch"]) == (0, "ALLOWLISTED", None, 2)


def test_decommission_wait_times_out_with_exit_code_2(stack, acme, client, capsys):
    # Given a device whose teardown nothing runs (no worker on the queue)
    registered(stack, acme, "pump-cli-slow")
    # When the operator waits a short while
    code, device, err = cli(
        capsys,
        "device",
        "decommission",
        "pump-cli-slow",
        "--reason",
        "retired",
        "--wait=0.3",
        client=client,
    )
    # Then the CLI gives up with exit status 2, says so, and prints what it last read
    assert code == 2
    assert "timed out after 0.3 s" in err and "still pending" in err
    assert (device["state"], device["teardown"]["status"]) == ("DECOMMISSIONED", "pending")
    # And the teardown still goes on when something runs the queue
    assert stack.drain_lifecycle(30)
    code, device, _ = cli(capsys, "device", "show", "pump-cli-slow", client=client)
    assert device["teardown"]["status"] == "completed"


def test_data_key_prints_the_kms_wrapped_key(stack, acme, client, capsys):
    # Given a device that has asked for its data key
    key, cert_id = registered(stack, acme, "sensor-cli-dk")
    assertion = client_assertion(key, cert_id, "sensor-cli-dk", stack.settings.issuer)
    sealed = stack.data_keys.for_device("sensor-cli-dk", {"client_assertion": assertion})
    # When a backend's operator reads it
    code, grant, _ = cli(capsys, "device", "data-key", "sensor-cli-dk", client=client)
    # Then it is the KMS-wrapped key with its encryption context, which KMS decrypts
    assert code == 0
    assert set(grant) >= {
        "device_id",
        "owner",
        "epoch",
        "key_id",
        "key_ref",
        "ciphertext_blob",
        "encryption_context",
    }
    assert (grant["device_id"], grant["epoch"], grant["key_ref"]) == (
        "sensor-cli-dk",
        1,
        sealed["key_ref"],
    )
    plaintext = stack.kms.decrypt(
        CiphertextBlob=base64.b64decode(grant["ciphertext_blob"]),
        EncryptionContext=grant["encryption_context"],
        KeyId=grant["key_id"],
    )["Plaintext"]
    assert len(plaintext) == 32


def test_data_key_of_a_device_that_has_none_is_refused(stack, acme, client, capsys):
    registered(stack, acme, "sensor-cli-nokey")
    code, out, err = cli(capsys, "device", "data-key", "sensor-cli-nokey", client=client)
    assert (code, out) == (1, None) and "404 not_found" in err


def test_the_help_says_how_to_decrypt_a_data_key_and_what_a_transfer_is(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["device", "data-key", "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0
    assert "kms:Decrypt" in text and "encryption context" in text
    assert "aws kms decrypt --key-id" in text and "--encryption-context" in text
    with pytest.raises(SystemExit):
        main(["device", "recommission", "--help"])
    assert "ownership transfer" in capsys.readouterr().out


UNKNOWN_DEVICE = [
    ["device", "suspend", "nope", "--reason", "stolen"],
    ["device", "resume", "nope"],
    ["device", "decommission", "nope", "--reason", "retired"],
    ["device", "decommission", "nope", "--reason", "retired", "--wait", "5"],
    ["device", "recommission", "nope"],
    ["device", "data-key", "nope"],
]


def test_an_unknown_device_is_refused(client, capsys):
    for argv in UNKNOWN_DEVICE:
        code = main(argv, client=client)
        captured = capsys.readouterr()
        assert (code, captured.out) == (1, ""), argv
        assert "404 not_found" in captured.err, argv


REFUSED = [
    (["--reason", ""], "suspend", "400 invalid_request: reason"),
    (["--reason", "two\nlines"], "suspend", "printable"),
    (["--reason", "x" * 257], "decommission", "400 invalid_request: reason"),
    ([], "recommission", "409 illegal_transition"),
    (["--owner", "no spaces"], "recommission", "400 invalid_request: owner"),
    (["--owner", ""], "recommission", "400 invalid_request: owner"),
    (["--profile", "no-such-profile"], "recommission", "profile"),
]


def test_refused_requests_change_nothing(stack, acme, client, capsys):
    # Given an ACTIVE device
    _, cert_id = registered(stack, acme, "pump-cli-bad")
    for options, action, refusal in REFUSED:
        # When a request the API refuses is made
        code = main(["device", action, "pump-cli-bad", *options], client=client)
        captured = capsys.readouterr()
        # Then the error is on stderr, and the exit status non-zero
        assert (code, captured.out) == (1, ""), (action, options)
        assert refusal in captured.err, (action, options, captured.err)
    # And the device is as it was
    code, device, _ = cli(capsys, "device", "show", "pump-cli-bad", client=client)
    assert (device["state"], device["epoch"], device["owner"]) == ("ACTIVE", 1, None)
    assert stack.certificate_status(cert_id) == "ACTIVE"
    assert main(["audit", "pump-cli-bad"], client=client) == 0
    assert "chain verified: 2 records" in capsys.readouterr().out


@pytest.mark.parametrize("seconds", ["-1", "soon", "nan", "inf"])
def test_a_bad_wait_is_a_usage_error(seconds, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["device", "decommission", "pump-1", "--reason", "x", f"--wait={seconds}"])
    assert exited.value.code == 2
    assert "--wait" in capsys.readouterr().err


class ScriptedClient:
    """`device` answers from a script: a dict is the device, an int an error of that status."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)

    def device(self, device_id: str) -> dict:
        answer = self.answers.pop(0)
        if isinstance(answer, int):
            raise AdminApiError(ApiResponse(answer, {"error": "e", "message": "m"}))
        return answer


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def decommissioned_device(status: str) -> dict:
    return {"device_id": "d", "state": "DECOMMISSIONED", "teardown": {"status": status}}


def test_waiting_retries_transient_errors_and_backs_off(capsys):
    clock = FakeTime()
    client = ScriptedClient(
        503, 0, *[decommissioned_device("pending")] * 4, decommissioned_device("completed")
    )
    code = wait_for_teardown(client, "d", 60, clock=lambda: clock.now, sleep=clock.sleep)
    assert code == 0 and not client.answers
    assert json.loads(capsys.readouterr().out)["teardown"]["status"] == "completed"
    assert clock.sleeps == [0.5, 1, 2, 4, 5, 5]


def test_waiting_stops_at_an_error_that_is_not_transient():
    clock = FakeTime()
    client = ScriptedClient(decommissioned_device("pending"), 403)
    with pytest.raises(AdminApiError):
        wait_for_teardown(client, "d", 60, clock=lambda: clock.now, sleep=clock.sleep)


def test_waiting_times_out_on_the_deadline_and_says_what_failed_last(capsys):
    clock = FakeTime()
    client = ScriptedClient(decommissioned_device("pending"), *[503] * 10)
    code = wait_for_teardown(client, "d", 4, clock=lambda: clock.now, sleep=clock.sleep)
    captured = capsys.readouterr()
    assert code == 2 and sum(clock.sleeps) == 4
    assert json.loads(captured.out)["teardown"]["status"] == "pending"
    assert "timed out after 4 s" in captured.err and "503 e: m" in captured.err


def test_a_device_recommissioned_while_waiting_had_its_teardown_completed(capsys):
    clock = FakeTime()
    client = ScriptedClient({"device_id": "d", "state": "ALLOWLISTED", "teardown": None})
    assert wait_for_teardown(client, "d", 60, clock=lambda: clock.now, sleep=clock.sleep) == 0
    assert "recommissioned" in capsys.readouterr().err
