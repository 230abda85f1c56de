"""Delegated validation end to end through the local stack: a relying party asks over HTTP
(SigV4), fleetkey's validate command reaches the pump over MQTT/TLS (the local AWS IoT Core), the
pump answers at the token endpoint over HTTP, and the result verifies with pyjwt against the
JWKS. A replayed nonce, another device's answer, an answer after the deadline and a read by
another principal are refused; a pump on withdrawn firmware and a suspended pump are refused."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import pytest

from fleetkey_local.api_gateway import (
    LocalApiGateway,
    local_operator,
    local_operator_role,
    local_relying_party,
)
from fleetkey_local.device import validation_answer
from fleetkey_local.fleet import PUMP_FIRMWARE, post_form
from fleetkey_local.iot import certificate_id
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import CertificateAuthority, PrivateKey, key_pem, pem
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory
from fleetkey_local.validation_phase import (
    THERAPY,
    AnsweringDevice,
    Application,
    MqttCommands,
    firmware_release,
    signed_transport,
)
from tests.support.pki_cache import ca as cached_ca

# One worker holds the module's stack (a moto server, the gateway and the MQTT broker).
pytestmark = pytest.mark.xdist_group("validations")

# Requests for this machine never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
RUNNING = {"firmware_version": PUMP_FIRMWARE[0], "firmware_sha256": PUMP_FIRMWARE[1]}
COMMAND_FIELDS = {"validation_id", "nonce", "purpose", "audience", "expires_at"}


@dataclass
class Pump:
    device_id: str
    key: PrivateKey
    certificate_id: str
    certfile: Path
    keyfile: Path


@dataclass
class Local:
    stack: EmbeddedStack
    api: LocalApiGateway
    emulator: IotCoreEmulator
    acme: CertificateAuthority
    tmp: Path
    devices: list[AnsweringDevice] = field(default_factory=list)
    connections: list[MqttDevice] = field(default_factory=list)

    @property
    def app(self) -> Application:
        """The local relying party, with its own IAM identity."""
        return Application(signed_transport(self.api.url, local_relying_party()), self.api.url)

    @property
    def operator(self) -> Application:
        """The local operator: admitted to the validation routes too, another principal."""
        return Application(signed_transport(self.api.url, local_operator()), self.api.url)

    def pump(self, device_id: str) -> Pump:
        """An infusion pump of acme's factory, registered (ACTIVE), with its MQTT files."""
        key, certificate, event = self.stack.manufacture(
            self.acme, device_id, profile="infusion-pump"
        )
        assert self.stack.register(event).accepted
        certfile, keyfile = self.tmp / f"{device_id}.crt", self.tmp / f"{device_id}.key"
        certfile.write_text(pem(certificate))
        keyfile.write_text(key_pem(key))
        return Pump(device_id, key, certificate_id(pem(certificate)), certfile, keyfile)

    def connection(self, pump: Pump, client_id: str | None = None) -> MqttDevice:
        connection = MqttDevice(
            client_id or pump.device_id,
            pump.certfile,
            pump.keyfile,
            self.emulator.endpoint_ca_path,
            self.emulator.address,
        )
        self.connections.append(connection)
        return connection

    def listening(self, pump: Pump) -> AnsweringDevice:
        """The pump connected over MQTT/TLS, subscribed to its validate commands, answering
        each in a thread of its own (stopped when the module's stack stops)."""
        listener = MqttCommands(self.connection(pump), pump.device_id).open()
        device = AnsweringDevice(pump, self.api.url, listener, RUNNING).start()
        self.devices.append(device)
        return device

    def admin(self, principal, method: str, path: str, body: dict | None = None):
        transport = signed_transport(self.api.url, principal)
        headers = {"content-type": "application/json"} if body is not None else {}
        return transport(method, path, None if body is None else json.dumps(body), headers)


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Iterator[Local]:
    """moto on 127.0.0.1 with fleetkey's resources, the local API gateway (the issuer) and the
    local AWS IoT Core, each on a free port; stopped, with every device, when the module ends."""
    tmp = tmp_path_factory.mktemp("validations")
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        # The functions read the provisioned resources from their environment (local_aws()
        # restores it on the way out).
        os.environ.update(stack.environment())
        acme = cached_ca("acme")
        stack.register_ca(acme)
        with LocalApiGateway(0) as api:
            # The issuer is the API's address; functions read it when they first run.
            os.environ["FLEETKEY_ISSUER"] = api.url
            emulator = IotCoreEmulator(tmp / "state", port=0, endpoint_url=endpoint)
            emulator.start()
            world = Local(stack, api, emulator, acme, tmp)
            try:
                yield world
            finally:
                for device in world.devices:
                    device.stop()
                for connection in world.connections:
                    connection.close()
                emulator.stop()


def get_json(url: str) -> dict:
    with OPENER.open(url, timeout=30) as response:
        return json.loads(response.read())


def verify_with_pyjwt(local: Local, token: str) -> dict:
    """What a relying party does offline: the issuer's metadata and JWKS, then pyjwt with the
    algorithm, audience and issuer spelled out."""
    issuer = get_json(f"{local.api.url}/.well-known/oauth-authorization-server")["issuer"]
    keys = jwt.PyJWKSet.from_dict(get_json(f"{local.api.url}/.well-known/jwks.json"))
    key = keys[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=THERAPY,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )


def requested(local: Local, pump, **options) -> str:
    created = local.app.request(pump.device_id, **options)
    assert created.status == 201, created.body
    return created.body["validation_id"]


# ---- the flow ------------------------------------------------------------------------------------


def test_the_command_reaches_the_pump_over_mqtt_and_the_result_verifies_with_pyjwt(local):
    # Given a pump connected to AWS IoT Core, subscribed to its validate commands
    pump = local.listening(local.pump("pump-e2e-0001"))

    # When the relying party asks fleetkey to validate it before a dose change
    created = local.app.request(pump.device_id)
    assert created.status == 201, created.body
    validation_id = created.body["validation_id"]

    # Then the command reaches the pump over MQTT, with the validation's nonce and deadline
    command = pump.wait_heard(validation_id)
    assert command is not None and set(command) == COMMAND_FIELDS
    assert (command["purpose"], command["audience"]) == ("dose-change", THERAPY)
    assert command["expires_at"] == created.body["expires_at"]
    # and the pump's answer at the token endpoint is granted
    answer = pump.wait_answered(validation_id)
    assert answer is not None and answer.status == 200, answer
    assert answer.body["expires_in"] <= 60 and "scope" not in answer.body

    # When the relying party reads the result (long-polled)
    result = local.app.result(validation_id, wait=10)

    # Then it is validated, with the token the pump was given
    assert result.status == 200, result.body
    assert result.body["status"] == "validated"
    assert result.body["token"] == answer.body["access_token"]
    # and the token verifies with pyjwt against the JWKS, for this validation
    token = result.body["token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = verify_with_pyjwt(local, token)
    assert claims["sub"] == pump.device_id
    assert claims["validation"] == {"id": validation_id, "purpose": "dose-change"}
    assert (claims["firmware_version"], claims["firmware_sha256"]) == PUMP_FIRMWARE
    assert claims["cnf"]["x5t#S256"]
    assert claims["exp"] - claims["iat"] <= 60 and "scope" not in claims
    # as the demo's application verifies it too
    assert local.app.verify(
        token,
        validation_id=validation_id,
        device_id=pump.device_id,
        purpose="dose-change",
        audience=THERAPY,
    )


def test_a_replayed_nonce_is_refused(local):
    pump = local.listening(local.pump("pump-e2e-0002"))
    validation_id = requested(local, pump)
    command = pump.wait_heard(validation_id)
    first = pump.wait_answered(validation_id)
    assert first is not None and first.status == 200

    # When the pump's answer is sent again: a new assertion with the same nonce...
    again = pump.answer(command)
    # ...or the very same request
    form = validation_answer(
        pump.device.key,
        pump.device.certificate_id,
        pump.device_id,
        local.api.url,
        command,
        **RUNNING,
    )
    replayed = [post_form(f"{local.api.url}/v1/token", form) for _ in range(2)]

    # Then each is refused: a nonce answers one validation once
    assert (again.status, again.error) == (400, "invalid_grant")
    assert [(status, body["error"]) for status, body in replayed] == [(400, "invalid_grant")] * 2
    # and the result is the first answer's
    result = local.app.result(validation_id)
    assert result.body["status"] == "validated"
    assert result.body["token"] == first.body["access_token"]


def test_another_devices_answer_is_refused_and_the_command_reaches_only_its_device(local):
    pump = local.listening(local.pump("pump-e2e-0003"))
    other = local.listening(local.pump("pump-e2e-0004"))
    pump.silent = True
    validation_id = requested(local, pump)
    command = pump.wait_heard(validation_id)
    assert command is not None

    # Then the other pump did not hear it, and may not subscribe to the pump's commands
    assert other.wait_heard(validation_id, timeout=0.5) is None
    other.stop()  # its listening connection closed: the next one is the other pump's own
    spy = local.connection(other.device)
    assert spy.connect() == "accepted"
    assert spy.subscribe(f"fleetkey/{pump.device_id}/commands/validate") == [0x80]

    # When the other pump answers with the pump's command (its validation and nonce)
    foreign = other.answer(command)

    # Then it is refused, and the validation stays pending
    assert (foreign.status, foreign.error) == (400, "invalid_grant"), foreign
    assert local.app.result(validation_id).body["status"] == "pending"
    # and the pump's own answer still validates it
    assert pump.answer(command).status == 200
    assert local.app.result(validation_id).body["status"] == "validated"


def test_an_answer_after_the_deadline_is_refused_and_the_validation_reads_expired(local):
    pump = local.listening(local.pump("pump-e2e-0005"))
    pump.silent = True
    validation_id = requested(local, pump, expires_in=5)
    command = pump.wait_heard(validation_id)
    assert command is not None

    # When the relying party waits past the deadline for an answer that does not come
    started = time.monotonic()
    result = local.app.result(validation_id, wait=10)

    # Then the read returns at the deadline: expired
    assert result.status == 200 and result.body["status"] == "expired", result.body
    assert time.monotonic() - started < 9  # not the whole wait
    assert "token" not in result.body or result.body["token"] is None
    # and the pump's late answer is refused and changes nothing
    late = pump.answer(command)
    assert (late.status, late.error) == (400, "invalid_grant"), late
    assert local.app.result(validation_id).body["status"] == "expired"


def test_a_result_read_by_another_principal_is_not_found(local):
    pump = local.listening(local.pump("pump-e2e-0006"))
    validation_id = requested(local, pump)
    assert local.app.result(validation_id, wait=10).body["status"] == "validated"

    # When another principal (the local operator, a relying party too) reads it, waiting or not
    reads = [local.operator.result(validation_id), local.operator.result(validation_id, wait=2)]
    unknown = local.operator.result("0" * 32)

    # Then it gets 404, as for a validation that does not exist: not even its existence leaks
    assert [read.status for read in reads] == [404, 404]
    assert all(read.body == unknown.body for read in reads)
    assert "token" not in json.dumps([read.body for read in reads])
    # and an operator role is not a relying party at all (the resource policy)
    for role in ("fleet-admin", "auditor"):
        denied = local.admin(local_operator_role(role), "GET", f"/v1/validations/{validation_id}")
        assert denied.status == 403, (role, denied.body)


# ---- refusals ------------------------------------------------------------------------------------


def test_a_pump_on_withdrawn_firmware_is_refused(local):
    # Given a second release, published by the release role, that a pump runs
    release = firmware_release("9.1.0")
    role = local_operator_role("release")
    published = local.admin(role, "POST", "/v1/admin/firmware", release)
    assert published.status == 201, published.body
    pump = local.listening(local.pump("pump-e2e-0007"))
    pump.firmware = {"firmware_version": release["version"], "firmware_sha256": release["sha256"]}
    validated = local.app.validate(pump.device_id, within=10)
    assert validated.status == "validated", validated.result.body
    claims = verify_with_pyjwt(local, validated.result.body["token"])
    assert claims["firmware_sha256"] == release["sha256"]

    # When the release role revokes it
    where = f"/v1/admin/firmware/{release['profile']}/{release['sha256']}/revoke"
    revoked = local.admin(role, "POST", where, {"reason": "e2e: withdrawn"})
    assert revoked.status == 200 and revoked.body["status"] == "revoked", revoked.body

    # Then the pump, still running it, is refused: firmware_not_released
    refused = local.app.validate(pump.device_id, within=10)
    assert refused.status == "refused", refused.result.body
    assert refused.result.body["reason"] == "firmware_not_released"
    assert refused.result.body.get("token") is None
    # (decided before the token endpoint's answer reaches the pump)
    answer = pump.wait_answered(refused.validation_id)
    assert answer is not None and (answer.status, answer.error) == (400, "invalid_grant")


def test_a_suspended_pump_is_refused_without_a_command(local):
    pump = local.listening(local.pump("pump-e2e-0008"))
    suspended = local.admin(
        local_operator(), "POST", f"/v1/admin/devices/{pump.device_id}/suspend", {"reason": "e2e"}
    )
    assert suspended.status == 200, suspended.body

    # When the relying party asks to validate it
    created = local.app.request(pump.device_id)

    # Then the validation is refused at once, and no command goes out
    assert created.status == 201 and created.body["status"] == "refused", created.body
    result = local.app.result(created.body["validation_id"], wait=5)
    assert (result.body["status"], result.body["reason"]) == ("refused", "device_not_active")
    assert pump.wait_heard(created.body["validation_id"], timeout=1.0) is None
