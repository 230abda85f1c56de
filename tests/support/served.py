"""`python -m fleetkey_local.serve` (what `make serve` runs) as a subprocess on free ports, for
tests that talk to the local stack over the network as a device or a relying party would."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey_local.pki import CertificateAuthority
from fleetkey_local.serve import DEMO_CA
from fleetkey_local.server import FAKE_CREDENTIALS
from fleetkey_local.stack import REGION
from tests.conftest import ROOT

TIMEOUT = 30.0
# The local operator's credentials (SigV4 for the admin routes).
LOCAL = Credentials(
    FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
)
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_EST = re.compile(r"EST \(mTLS\)\s+(https://127\.0\.0\.1:(\d+))/\.well-known/est/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Served:
    process: subprocess.Popen
    state: Path
    api: str
    est: str
    mqtt: tuple[str, int]
    output: list[str] = field(default_factory=list)

    @property
    def endpoint_ca(self) -> Path:
        return self.state / "iot-endpoint-ca.pem"

    def factory(self) -> CertificateAuthority:
        """The demo manufacturer CA `make serve` registered, from the files it wrote."""
        key = serialization.load_pem_private_key(
            (self.state / f"{DEMO_CA}.key").read_bytes(), password=None
        )
        certificate = x509.load_pem_x509_certificate((self.state / f"{DEMO_CA}.pem").read_bytes())
        return CertificateAuthority(DEMO_CA, key, certificate)  # type: ignore[arg-type]


@contextlib.contextmanager
def serve(
    state: Path, options: Sequence[str] = (), *, start_timeout: float = 90
) -> Iterator[Served]:
    """The local stack on free ports, without per-client rate limits, with `options` added; its
    banner read until "Ctrl-C to stop" (the EST address must be the port asked for); stopped with
    SIGTERM on the way out, which must end it with status 0."""
    api, mqtt, est = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetkey_local.serve",
            *("--api-port", str(api), "--mqtt-port", str(mqtt), "--est-port", str(est)),
            *("--state-dir", str(state), "--no-rate-limits", *options),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    stdout = process.stdout
    output: list[str] = []
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            line = stdout.readline()
            output.append(line)
            if "Ctrl-C to stop" in line or not line:
                break
        banner = "".join(output)
        assert "Ctrl-C to stop" in banner, banner
        found = _EST.search(banner)
        assert found and int(found[2]) == est, banner
        # Keep reading what it prints (a full pipe would stall it); shown when a test fails.
        threading.Thread(
            target=lambda: output.extend(iter(stdout.readline, "")), daemon=True
        ).start()
        yield Served(
            process, state, f"http://127.0.0.1:{api}", found[1], ("127.0.0.1", mqtt), output
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        assert code == 0, "".join(output)


def signed(method: str, url: str, body: bytes = b"", headers: dict | None = None):
    """A request signed with the local operator's credentials (SigV4, execute-api)."""
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    SigV4Auth(LOCAL, "execute-api", REGION).add_auth(request)
    return urllib.request.Request(
        url, data=body or None, method=method, headers=dict(request.headers)
    )


def send(request: urllib.request.Request, timeout: float = TIMEOUT) -> tuple[int, bytes]:
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
