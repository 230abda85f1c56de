"""`make demo` end to end: the real functions on the embedded local stack (moto server on
127.0.0.1), as a separate process: a small fleet through its whole lifecycle (certificate rotation
included), over the local AWS IoT Core (MQTT) and with AWS IoT's side emulated in-process."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_demo(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetkey_local.demo", "--devices", "6", "--no-progress", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def passed(result: subprocess.CompletedProcess, *checks: str) -> None:
    """Each check is printed as a passed expectation of the demo."""
    lines = result.stdout.splitlines()
    for check in checks:
        assert any(line.lstrip().startswith("ok") and check in line for line in lines), (
            f"no passed expectation {check!r} in:\n{result.stdout}"
        )


@pytest.fixture(scope="module")
def demo():
    # When the demo runs with a small fleet, its devices connecting over MQTT
    return run_demo()


def test_demo_registers_the_fleet_and_refuses_rogues(demo):
    # Then every expectation held
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "FAIL" not in demo.stdout
    passed(demo, "6/6 registered and ACTIVE", "refused: clone_suspected, cannot connect")
    assert "passed:" in demo.stdout


def test_demo_suspends_and_resumes_devices(demo):
    passed(
        demo,
        "3/3 hold a token that introspects active",
        "3/3 SUSPENDED",
        "3/3 earlier tokens inactive in introspection (all within their lifetime)",
        "3/3 token requests refused",
        "3/3 data-key requests refused",
        "3/3 refused by AWS IoT at connection",
        "3/3 resumed: ACTIVE",
        "3/3 connect again",
        "3/3 new tokens active in introspection",
        "3/3 tokens from before the suspension still inactive (all within their lifetime)",
        "a connected device is cut off at once (iot-data DeleteConnection)",
    )


def test_demo_suspends_devices_that_report_tampering(demo):
    passed(
        demo,
        "1/1 tamper reports suspended their device",
        "1/1 reporting devices' connections closed at once",
        "1/1 SUSPENDED, reason tamper, by the tamper rule (audit trail)",
        "1/1 resumed: ACTIVE",
        "1/1 get tokens again",
    )


def test_demo_round_trips_every_devices_data_key(demo):
    passed(
        demo,
        "6/6 devices allowed data keys opened theirs",
        "6/6 telemetry envelopes read by the backend",
        "6/6 got the same key on asking again",
        "a device asking for another device's key is refused (invalid_client)",
        "a sealed key does not open with another device's private key",
        "a device's telemetry does not decrypt under another device's key",
    )


def test_demo_rotates_a_device_to_fleetkeys_ca_and_rolls_back_an_unused_rotation(demo):
    passed(
        demo,
        # A device replaces its factory certificate: its connection with the new one commits it
        "pump-0001 sends a CSR for a new key of its own: 201, a certificate for that key from "
        "fleetkey's issuing CA",
        "it reconnects with the new certificate (the connected event: committed) and gets a "
        "token with it",
        "the operator's rotation status shows the new certificate current",
        "the factory certificate is refused: token (invalid_client) and MQTT",
        "a token bound to the factory certificate is inactive in introspection",
        # It rotates again and commits by call: the certificate fleetkey issued is revoked
        "it commits its next rotation itself, with the new key",
        "it connects and gets tokens with its newest certificate",
        "the certificate it replaced is refused: token (invalid_client) and MQTT",
        "the CRL, signed by the issuing CA, lists the replaced certificate's serial",
        # Another device never uses its new certificate: rolled back at the deadline
        "well-0000 sends a CSR for a new key of its own: 201",
        "another device never uses its new certificate: the sweep past the deadline rolls the "
        "rotation back",
        "its rolled-back certificate is refused: token (invalid_client) and MQTT",
        "its old certificate still connects and gets tokens",
    )
    for operation in (
        "device: rotation request (CSR, assertion by the current key)",
        "device: reconnect with the new certificate (the connected event commits)",
        "device: commit (assertion by the new key)",
        "schedule: sweep past the commit deadline (rollback)",
    ):
        assert f"| {operation} " in demo.stdout, operation


def test_demo_validates_pumps_before_a_dose_change(demo):
    passed(
        demo,
        "an application asks to validate pump-0001 before a dose change: the pump hears the "
        "validate command over MQTT/TLS and answers at the token endpoint",
        "its token verifies offline with pyjwt against the JWKS",
        "the pump's answer sent again (same nonce, a new assertion) is refused (invalid_grant)",
        "another principal (the local operator) reading the result gets 404",
        "24/24 validations of 3 pumps validated and verified offline; end to end (request to "
        "validated result): p50",
        "pump-0003 answering pump-0001's command with its nonce is refused",
        "the release role publishes firmware 2.5.0 for infusion-pump; pump-0003, running it, is "
        "validated",
        "is refused: firmware_not_released",
        "a suspended pump (pump-0005) is refused at once: device_not_active, and no command is "
        "sent",
        "resumed, pump-0005 reconnects and is validated again",
        "never answers reads expired at its deadline",
    )
    assert (
        "| relying party: validate a pump end to end (POST, command, answer, GET ?wait) |    25 |"
        in demo.stdout
    )


def test_demo_decommissions_the_fleet_and_leaves_nothing_in_aws_iot(demo):
    passed(
        demo,
        "6/6 answered 202: DECOMMISSIONED, teardown pending",
        "6/6 refused tokens at once, their earlier token inactive",
        "6/6 teardowns completed (their certificate gone)",
        "6/6 token requests refused after the teardown",
        "6/6 data-key requests refused",
        "6/6 backend data-key reads refused (409)",
        "6/6 wrapped data keys deleted from the table",
        "6/6 earlier tokens inactive (all within their lifetime)",
        "lifecycle queue drained after every wave",
        "a connected device hears the reset command, then is cut off",
        "AWS IoT lists no thing and no certificate of the fleet",
        "6/6 sampled devices: DescribeThing and DescribeCertificate find nothing",
    )


def test_demo_recommissions_the_fleet_to_a_new_owner(demo):
    passed(
        demo,
        "6/6 ALLOWLISTED for northwind-utilities, epoch 2",
        "6/6 re-registered through JITR",
        "6/6 ACTIVE in epoch 2 for northwind-utilities, with their factory certificate",
        "6/6 connect",
        "6/6 get tokens that introspect active",
        "6/6 have a new data key (epoch 2, another key_ref)",
        "6/6 telemetry envelopes read by the backend",
        "telemetry of the previous life does not decrypt with the new life's key",
        "6/6 device chains verified",
        "the recommission is recorded as an ownership transfer",
    )
    assert "well-0000's trail tells its life: allowlisted > registered >" in demo.stdout


def test_demo_summary_reports_latency_calls_wall_time_and_memory(demo):
    for operation in (
        "admin: suspend",
        "admin: resume",
        "device: tamper report (IoT rule -> suspend)",
        "device: get data key (first: KMS GenerateDataKey)",
        "backend: decrypt telemetry (KMS Decrypt)",
        "admin: decommission (202)",
        "converge: tear down a device",
        "admin: recommission (ownership transfer)",
        "device: re-onboard (JITR)",
    ):
        assert f"| {operation} " in demo.stdout, operation
    assert "| count | AWS calls |  p50 ms |  p95 ms |" in demo.stdout
    assert "wall time of the phases" in demo.stdout
    assert "peak memory (max RSS)" in demo.stdout


def test_demo_with_aws_iot_emulated_in_process():
    # When AWS IoT's side is emulated in-process (no MQTT): the tamper rule's event goes
    # straight to the device_events function
    result = run_demo("--in-process-iot")
    # Then the same lifecycle holds
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    passed(
        result,
        "1/1 tamper reports suspended their device",
        "it reconnects with the new certificate (the connected event: committed)",
        "another device never uses its new certificate: the sweep past the deadline rolls the "
        "rotation back",
        "6/6 teardowns completed (their certificate gone)",
        "6/6 ACTIVE in epoch 2 for northwind-utilities",
    )
