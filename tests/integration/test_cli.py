"""The operator CLI against the admin function (in-process transport, same API Gateway events)."""

import json

import pytest

from fleetkey_cli.client import AdminClient, InProcessTransport
from fleetkey_cli.main import main
from fleetkey_local.pki import key_pem
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca


@pytest.fixture
def client(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    admin = load_handler("admin")
    yield AdminClient(
        InProcessTransport(admin.handler, "arn:aws:iam::123456789012:user/ops", LambdaContext())
    )
    admin.services.cache_clear()


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
