"""The operator roles and the relying parties' validations through the local API gateway, over
HTTP with SigV4, scoped as the deployed API's resource policy scopes them (`fleetkey_infra.edge`):
the fleet admin may call every admin route, the release role the firmware routes only, the auditor
only reads; only relying parties may ask for a validation and read it, and no operator may."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fleetkey_local.api_gateway import (
    LOCAL_RELYING_PARTY_KEY,
    LocalApiGateway,
    local_operator_role,
)
from fleetkey_local.server import FAKE_CREDENTIALS, local_aws
from fleetkey_local.stack import REGION, EmbeddedStack, client_factory
from tests.support.pki_cache import ca as cached_ca

# Requests for this machine never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DEVICE = "rp-pump-1"
# The device's profile (telemetry-sensor) allows this audience.
AUDIENCE = "urn:fleetkey:telemetry"


def role(name: str) -> Credentials:
    """The local session of an operator role: access key = secret = fleetkey-local-<name>."""
    session = local_operator_role(name)
    return Credentials(session.access_key, session.secret_key)


FLEET_ADMIN = role("fleet-admin")
RELEASE = role("release")
AUDITOR = role("auditor")
RELYING_PARTY = Credentials(LOCAL_RELYING_PARTY_KEY, LOCAL_RELYING_PARTY_KEY)
# The local stack's credentials: the local operator (every admin route), also a relying party.
LOCAL_OPERATOR = Credentials(
    FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def denied(self) -> bool:
        """API Gateway's answer when the resource policy denies the caller explicitly."""
        return (
            self.status == 403
            and self.headers.get("x-amzn-ErrorType") == "AccessDeniedException"
            and self.json["message"].endswith("with an explicit deny")
        )


@dataclass
class Local:
    api: LocalApiGateway
    stack: EmbeddedStack

    def call(
        self, credentials: Credentials, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Answer:
        """A request signed with SigV4 for execute-api, as the CLI and botocore sign it."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"content-type": "application/json"} if body is not None else {}
        request = AWSRequest(method=method, url=self.api.url + path, data=data, headers=headers)
        SigV4Auth(credentials, "execute-api", REGION).add_auth(request)
        signed = urllib.request.Request(
            self.api.url + path, data=data or None, method=method, headers=dict(request.headers)
        )
        try:
            with OPENER.open(signed, timeout=30) as response:
                return Answer(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as exc:
            return Answer(exc.code, dict(exc.headers), exc.read())

    def device_state(self) -> str:
        device = self.stack.devices.get(DEVICE)
        assert device is not None
        return str(device.state.value)


@pytest.fixture(scope="module")
def local() -> Iterator[Local]:
    """moto on 127.0.0.1 with fleetkey's resources and one ACTIVE device; the gateway on a free
    port, with every local principal (the operator roles' sessions among them)."""
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        # The functions read the provisioned queue and data-key key from their environment
        # (local_aws() restores the environment on the way out).
        os.environ.update(stack.environment())
        acme = cached_ca("acme")
        stack.register_ca(acme)
        _, _, event = stack.manufacture(acme, DEVICE)
        assert stack.register(event).accepted
        with LocalApiGateway(0) as api:
            served = Local(api, stack)
            # Warm the admin function (its AWS clients take the environment's credentials now).
            assert served.call(LOCAL_OPERATOR, "GET", "/v1/admin/cas").status == 200
            yield served


def a_release(version: str) -> dict[str, str]:
    image = f"fleetkey-e2e-firmware-{version}".encode()
    return {
        "profile": "infusion-pump",
        "version": version,
        "sha256": hashlib.sha256(image).hexdigest(),
    }


# ---- the auditor reads, and nothing else ---------------------------------------------------------


def test_the_auditor_reads_every_admin_route(local: Local) -> None:
    # Given the auditor's session
    # When it reads devices, their audit trails, CAs, signing keys, firmware releases, the PKI
    for path in (
        f"/v1/admin/devices/{DEVICE}",
        f"/v1/admin/devices/{DEVICE}/audit",
        "/v1/admin/cas",
        "/v1/admin/cas/acme/audit",
        "/v1/admin/signing-keys",
        "/v1/admin/audit-streams/signing-keys",
        "/v1/admin/firmware",
        "/v1/admin/pki",
    ):
        answer = local.call(AUDITOR, "GET", path)
        # Then each answers (the function ran)
        assert answer.status == 200, (path, answer.body)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", f"/v1/admin/devices/{DEVICE}/suspend", {"reason": "audit"}),
        ("POST", f"/v1/admin/devices/{DEVICE}/decommission", {}),
        ("POST", "/v1/admin/signing-keys/rotate", None),
        ("POST", "/v1/admin/firmware", a_release("7.0.0")),
        ("POST", "/v1/admin/cas/acme/disable", None),
        ("POST", "/v1/admin/pki/crl", None),
        ("DELETE", f"/v1/admin/devices/{DEVICE}", None),
        ("PUT", "/v1/admin/allowlist", {}),
    ],
)
def test_the_auditor_cannot_write(
    local: Local, method: str, path: str, body: dict[str, Any] | None
) -> None:
    # Given the auditor's session
    # When it calls a route that changes something
    answer = local.call(AUDITOR, method, path, body)

    # Then the resource policy denies it before any function runs, naming its session
    assert answer.denied, answer.body
    session = local_operator_role("auditor").arn
    assert answer.json["message"].startswith(f"User: {session} is not authorized")
    # and nothing changed
    assert local.device_state() == "ACTIVE"
    releases = local.call(AUDITOR, "GET", "/v1/admin/firmware").json["releases"]
    assert "7.0.0" not in {r["version"] for r in releases}


# ---- the release role: firmware, and nothing else ------------------------------------------------


def test_the_release_role_publishes_lists_and_revokes_firmware(local: Local) -> None:
    # Given the release role's session and a new release
    release = a_release("3.1.0")
    where = f"/v1/admin/firmware/{release['profile']}/{release['sha256']}"

    # When it publishes, reads, lists and revokes it
    published = local.call(RELEASE, "POST", "/v1/admin/firmware", release)
    shown = local.call(RELEASE, "GET", where)
    listed = local.call(RELEASE, "GET", "/v1/admin/firmware?profile=infusion-pump")
    revoked = local.call(RELEASE, "POST", f"{where}/revoke", {"reason": "e2e"})

    # Then each is the admin function's answer
    assert published.status == 201, published.body
    assert shown.status == 200 and shown.json["version"] == "3.1.0"
    assert listed.status == 200
    assert release["sha256"] in {r["sha256"] for r in listed.json["releases"]}
    assert revoked.status == 200 and revoked.json["status"] == "revoked"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/v1/admin/devices/{DEVICE}", None),
        ("POST", f"/v1/admin/devices/{DEVICE}/suspend", {"reason": "release"}),
        ("POST", f"/v1/admin/devices/{DEVICE}/decommission", {}),
        ("GET", "/v1/admin/cas", None),
        ("POST", "/v1/admin/signing-keys/rotate", None),
        ("GET", "/v1/admin/pki", None),
        ("GET", "/v1/admin/audit-streams/firmware-releases", None),
        # paths that only look like the firmware routes
        ("GET", "/v1/admin/firmwares", None),
        ("POST", f"/v1/admin/firmware/../devices/{DEVICE}/suspend", {"reason": "release"}),
        ("POST", f"/v1/admin/firmware/%2E%2E/devices/{DEVICE}/suspend", {"reason": "release"}),
        # nor is it a relying party
        ("POST", "/v1/introspect", None),
        ("GET", "/v1/validations/v-1", None),
    ],
)
def test_the_release_role_cannot_touch_devices_or_anything_else(
    local: Local, method: str, path: str, body: dict[str, Any] | None
) -> None:
    # Given the release role's session
    # When it calls a route outside the firmware releases
    answer = local.call(RELEASE, method, path, body)

    # Then the resource policy denies it, and the device is as it was
    assert answer.denied, (path, answer.status, answer.body)
    assert local.device_state() == "ACTIVE"


# ---- the fleet admin: every admin route ----------------------------------------------------------


def test_the_fleet_admin_may_call_every_admin_route(local: Local) -> None:
    # Given the fleet admin's session
    # When it allow-lists a device, publishes a release, reads the PKI and a device's audit trail,
    # and reads the firmware stream's audit trail
    entry = {
        "device_id": "rp-pump-2",
        "serial_number": "SN-RP-2",
        "manufacturer_ca": "acme",
        "profile": "telemetry-sensor",
    }
    answers = {
        "allowlist": local.call(FLEET_ADMIN, "POST", "/v1/admin/allowlist", entry),
        "firmware": local.call(FLEET_ADMIN, "POST", "/v1/admin/firmware", a_release("5.0.0")),
        "pki": local.call(FLEET_ADMIN, "GET", "/v1/admin/pki"),
        "device": local.call(FLEET_ADMIN, "GET", f"/v1/admin/devices/{DEVICE}/audit"),
        "stream": local.call(FLEET_ADMIN, "GET", "/v1/admin/audit-streams/firmware-releases"),
    }

    # Then each reached its function and succeeded
    assert {name: a.status for name, a in answers.items()} == {
        "allowlist": 201,
        "firmware": 201,
        "pki": 200,
        "device": 200,
        "stream": 200,
    }, {name: a.body for name, a in answers.items()}


# ---- validations: relying parties only -----------------------------------------------------------


def test_a_relying_party_asks_for_a_validation_and_reads_it(local: Local) -> None:
    # Given the local relying party and an ACTIVE device
    request = {"device_id": DEVICE, "purpose": "dose-change", "audience": AUDIENCE}

    # When it asks for a validation and reads it back
    created = local.call(RELYING_PARTY, "POST", "/v1/validations", request)
    assert created.status == 201, created.body
    validation_id = created.json["validation_id"]
    read = local.call(RELYING_PARTY, "GET", f"/v1/validations/{validation_id}")

    # Then the validations function answered: the device has not answered yet
    assert read.status == 200, read.body
    assert read.json["status"] == "pending" and read.json["device_id"] == DEVICE
    # and another principal (the local operator, a relying party too) does not see it
    other = local.call(LOCAL_OPERATOR, "GET", f"/v1/validations/{validation_id}")
    assert other.status == 404


@pytest.mark.parametrize("credentials", [FLEET_ADMIN, RELEASE, AUDITOR], ids=lambda c: c.access_key)
def test_an_operator_only_principal_cannot_call_the_validations(
    local: Local, credentials: Credentials
) -> None:
    # Given a validation a relying party asked for, and an operator role's session
    request = {"device_id": DEVICE, "purpose": "dose-change", "audience": AUDIENCE}
    created = local.call(RELYING_PARTY, "POST", "/v1/validations", request)
    assert created.status == 201, created.body
    where = f"/v1/validations/{created.json['validation_id']}"

    # When the operator asks for a validation, or reads one
    asked = local.call(credentials, "POST", "/v1/validations", request)
    read = local.call(credentials, "GET", where)

    # Then the resource policy denies both: operators are not relying parties
    assert asked.denied, asked.body
    assert read.denied, read.body
