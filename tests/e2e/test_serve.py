"""`make serve` as a user runs it: a process that prints its addresses and serves until stopped."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_prints_its_addresses_serves_and_stops(tmp_path):
    # Given the local stack started on free ports
    api, mqtt = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetkey_local.serve", "--api-port", str(api), "--mqtt-port", str(mqtt),
         "--state-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        assert (tmp_path / "demo-factory.pem").exists() and (tmp_path / "iot-endpoint-ca.pem").exists()
        # And the API answers with the issuer being its own address
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{api}/.well-known/oauth-authorization-server", timeout=10) as r:
            assert json.loads(r.read())["issuer"] == f"http://127.0.0.1:{api}"
        with opener.open(f"http://127.0.0.1:{api}/.well-known/jwks.json", timeout=10) as r:
            assert json.loads(r.read())["keys"][0]["kty"] == "EC"
    finally:
        # When it is stopped, it ends cleanly
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
