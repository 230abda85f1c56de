"""`make serve` as a user runs it: a process that prints its addresses and serves until stopped."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_prints_its_addresses_serves_and_stops(tmp_path):
    # Given the local stack started on free ports, with a small per-client token limit
    api, mqtt = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetkey_local.serve",
            "--api-port",
            str(api),
            "--mqtt-port",
            str(mqtt),
            "--state-dir",
            str(tmp_path),
            "--token-rate-limit",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if "Ctrl-C to stop" in line or not line:
                break
        output = "".join(lines)
        # Then it says where everything is, and the demo CA files exist
        assert f"http://127.0.0.1:{api}" in output and f"127.0.0.1:{mqtt}" in output, output
        assert (tmp_path / "demo-factory.pem").exists() and (
            tmp_path / "iot-endpoint-ca.pem"
        ).exists()
        # And the API answers with the issuer being its own address
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(
            f"http://127.0.0.1:{api}/.well-known/oauth-authorization-server", timeout=10
        ) as r:
            assert json.loads(r.read())["issuer"] == f"http://127.0.0.1:{api}"
        with opener.open(f"http://127.0.0.1:{api}/.well-known/jwks.json", timeout=10) as r:
            assert json.loads(r.read())["keys"][0]["kty"] == "EC"
        # And it shows the per-client limits and the local principals, and applies the limits
        assert (
            "rate limits    per client address: /v1/token + /v1/challenge + /v1/devices/ 2/60s"
            in output
        ), output
        assert "/.well-known/ 300/60s" in output, output
        assert (
            "user/fleetkey-local-operator" in output
            and "user/fleetkey-local-relying-party" in output
        )
        statuses = []
        for _ in range(3):
            request = urllib.request.Request(
                f"http://127.0.0.1:{api}/v1/challenge", data=b"", method="POST"
            )
            try:
                with opener.open(request, timeout=10) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as refused:
                statuses.append(refused.code)
                retry_after = refused.headers["Retry-After"]
        assert statuses == [200, 200, 429], statuses
        assert int(retry_after) >= 1
    finally:
        # When it is stopped, it ends cleanly
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
