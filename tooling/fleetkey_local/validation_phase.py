"""Delegated validation on the local stack: an application (a relying party about to change a
pump's dose) asks fleetkey to have the pump prove itself now; the pump, subscribed to its validate
commands, answers at the token endpoint; the application reads the result (long-polled) and
verifies the token offline against the JWKS.

The demo's phase is `DelegatedValidation`; its pieces serve the e2e tests and the benchmark too:
a device's side of its command topic (`MqttCommands` over MQTT/TLS, `MotoCommands` when AWS IoT's
side is emulated in-process), `AnsweringDevice` (a device answering its validate commands in a
thread of its own) and `Application` (the relying party over HTTP with SigV4, and its offline
verification with pyjwt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import jwt
from botocore.credentials import Credentials

from fleetkey_cli.client import ApiResponse, SigV4Transport, Transport
from fleetkey_local.device import validation_answer
from fleetkey_local.fleet import (
    PUMP_FIRMWARE,
    Fleet,
    IotTransport,
    Operator,
    SimulatedDevice,
    attestation,
    get_bytes,
    post_form,
    wait_for_tokens,
)
from fleetkey_local.stack import ACCOUNT, REGION

if TYPE_CHECKING:
    from fleetkey_local.api_gateway import LocalPrincipal
    from fleetkey_local.mqtt_device import MqttDevice
    from fleetkey_local.simulator import Simulation

T = TypeVar("T")

# What the demo's application validates a pump for, and for whom the result is.
DOSE_CHANGE = "dose-change"
THERAPY = "urn:fleetkey:therapy"  # an audience the infusion-pump profile allows
# How a relying party verifies a validation token (RFC 9068): only these algorithms, this type.
TOKEN_ALGORITHMS = ["ES256"]
ACCESS_TOKEN_TYPE = "at+jwt"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti"]
# The longest a relying party may hold one read (GET ?wait=N).
MAX_WAIT = 20
# The release the demo publishes, has a pump run, then withdraws.
WITHDRAWN_VERSION = "2.5.0"
# Validations the phase measures end to end (at least 20, for a p95 worth the name).
LATENCY_VALIDATIONS = 24
# A validation nobody answers: its deadline (the API's shortest).
SHORT_EXPIRY = 5
# A device whose connection was closed tries again after this long.
RECONNECT_SECONDS = 0.5


def _command(payload: bytes) -> dict[str, Any]:
    command = json.loads(payload)
    return command if isinstance(command, dict) else {}


def validate_topic(device_id: str) -> str:
    return f"fleetkey/{device_id}/commands/validate"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (as the simulator's tables report)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def firmware_release(version: str, profile: str = "infusion-pump") -> dict[str, str]:
    """A release of `profile` as the release role publishes it: the SHA-256 of a demo image."""
    image = f"fleetkey-demo-pump-firmware-{version}".encode()
    return {"profile": profile, "version": version, "sha256": hashlib.sha256(image).hexdigest()}


def signed_transport(api_url: str, principal: LocalPrincipal) -> SigV4Transport:
    """SigV4 requests to the local API as one of the local gateway's principals."""
    credentials = Credentials(principal.access_key, principal.secret_key, principal.session_token)
    return SigV4Transport(api_url, REGION, credentials=credentials)


# ---- the device's side --------------------------------------------------------------------------


class CommandListener(Protocol):
    """Where a device hears its validate commands."""

    @property
    def listening(self) -> bool:
        """Whether a command published now reaches the device."""
        ...

    def next_command(self, timeout: float) -> dict[str, Any] | None:
        """The next validate command's payload, or None if none came within `timeout`."""
        ...

    def close(self) -> None: ...


class MqttCommands:
    """The device's MQTT connection to AWS IoT Core, subscribed to its validate commands (QoS 1).
    Driven from one thread (paho's loop runs in `next_command`); a connection AWS IoT closed (a
    suspension cuts the device off) is opened again, as firmware would, every RECONNECT_SECONDS
    until it is let in."""

    def __init__(self, connection: MqttDevice, device_id: str) -> None:
        self._connection = connection
        self.device_id = device_id
        self.topic = validate_topic(device_id)
        self._seen = 0
        self._retry_at = 0.0
        self._subscribed = False

    def open(self) -> MqttCommands:
        """Connect and subscribe.

        Raises:
            ConnectionError: AWS IoT refused the connection or the subscription.
        """
        connection = self._connection
        self._subscribed = False
        outcome = connection.connect()
        if outcome != "accepted":
            raise ConnectionError(f"{self.device_id}: {outcome}")
        codes = connection.subscribe(self.topic)
        if codes != [1]:
            raise ConnectionError(f"{self.device_id}: subscription refused ({codes})")
        self._seen = len(connection.messages)
        self._subscribed = True
        return self

    @property
    def listening(self) -> bool:
        """Connected and subscribed (a command published now reaches the device)."""
        connection = self._connection
        return (
            self._subscribed and connection.client is not None and connection.outcome == "accepted"
        )

    def next_command(self, timeout: float) -> dict[str, Any] | None:
        connection = self._connection
        if not self.listening:
            if time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RECONNECT_SECONDS
                # refused while suspended: try again later
                with contextlib.suppress(ConnectionError, TimeoutError):
                    self.open()
            if not self.listening:
                time.sleep(min(timeout, 0.05))
                return None
        connection.pump(
            lambda: len(connection.messages) > self._seen or connection.outcome != "accepted",
            timeout,
        )
        while len(connection.messages) > self._seen:
            message = connection.messages[self._seen]
            self._seen += 1
            if message.topic == self.topic:
                return _command(message.payload)
        return None

    def close(self) -> None:
        self._connection.close()


class MotoCommands:
    """AWS IoT's side emulated in-process (no MQTT): the validate commands fleetkey published
    through iot-data (moto records them), from those published after this listener was made."""

    def __init__(self, device_id: str, account: str = ACCOUNT, region: str = REGION) -> None:
        self.topic = validate_topic(device_id)
        self._account, self._region = account, region
        self._seen = len(self._published())

    def _published(self) -> list[tuple[str, bytes]]:
        from moto.iotdata.models import iotdata_backends

        return iotdata_backends[self._account][self._region].published_payloads

    def next_command(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            published = self._published()
            while self._seen < len(published):
                topic, payload = published[self._seen]
                self._seen += 1
                if topic == self.topic:
                    return _command(payload)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    @property
    def listening(self) -> bool:
        return True

    def close(self) -> None:
        pass


class DeviceIdentity(Protocol):
    """What a device answers with: its id, its key and its current certificate's AWS IoT id."""

    device_id: str
    key: Any
    certificate_id: str


@dataclass(frozen=True)
class Answer:
    """A device's answer to a validate command: the token endpoint's status and body."""

    status: int
    body: dict[str, Any]

    @property
    def error(self) -> str | None:
        return self.body.get("error")


class AnsweringDevice:
    """A device answering its validate commands in a thread of its own: each command it hears is
    answered at once at the token endpoint (`fleetkey_local.device.validation_answer`) with the
    firmware it runs (`firmware`: the `firmware_version` and `firmware_sha256` claims). A
    `silent` device hears but does not answer. `heard` and `answers` hold, by validation id, the
    commands heard and the answers given."""

    def __init__(
        self,
        device: DeviceIdentity,
        api_url: str,
        listener: CommandListener,
        firmware: dict[str, str] | None = None,
    ) -> None:
        self.device = device
        self.api_url = api_url
        self.firmware = dict(firmware or {})
        self.silent = False
        self.heard: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, Answer] = {}
        self._listener = listener
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"device-{device.device_id}", daemon=True
        )

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def start(self) -> AnsweringDevice:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._listener.close()

    def answer(self, command: dict[str, Any], **options: Any) -> Answer:
        """Answer `command` now (from any thread): a token request whose assertion carries the
        command's nonce and validation. `options` go to `validation_answer` (another firmware,
        overrides for tests)."""
        firmware = {**self.firmware, **options.pop("firmware", {})}
        form = validation_answer(
            self.device.key,
            self.device.certificate_id,
            self.device.device_id,
            self.api_url,
            command,
            **firmware,
            **options,
        )
        try:
            status, body = post_form(f"{self.api_url}/v1/token", form)
        except OSError as exc:  # the API unreachable: the device answered nothing
            return Answer(0, {"error": "unreachable", "error_description": str(exc)})
        return Answer(status, body)

    def wait_listening(self, timeout: float = 10.0) -> bool:
        """Whether the device listens to its commands (again) within `timeout`: a device cut
        off by a suspension reconnects once resumed."""
        deadline = time.monotonic() + timeout
        while not self._listener.listening:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_heard(self, validation_id: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """The command of `validation_id` once the device heard it (None if not within
        `timeout`)."""
        return self._wait(lambda: self.heard.get(validation_id), timeout)

    def wait_answered(self, validation_id: str, timeout: float = 10.0) -> Answer | None:
        return self._wait(lambda: self.answers.get(validation_id), timeout)

    def _wait(self, found: Callable[[], T | None], timeout: float) -> T | None:
        with self._changed:
            self._changed.wait_for(lambda: found() is not None, timeout)
            return found()

    def _run(self) -> None:
        while not self._stopping.is_set():
            command = self._listener.next_command(0.1)
            if command is None:
                continue
            validation_id = str(command.get("validation_id"))
            with self._changed:
                self.heard[validation_id] = command
                self._changed.notify_all()
            if self.silent:
                continue
            answer = self.answer(command)
            with self._changed:
                self.answers[validation_id] = answer
                self._changed.notify_all()


# ---- the relying party --------------------------------------------------------------------------


class NotVerified(Exception):
    """A validation token that must not be acted on (why, in the message)."""


@dataclass
class Validated:
    """One validation as the application saw it: what the request answered, the last read, and
    how long from the request to that read's answer."""

    created: ApiResponse
    result: ApiResponse
    seconds: float

    @property
    def validation_id(self) -> str:
        return str(self.created.body.get("validation_id", ""))

    @property
    def status(self) -> str | None:
        status = self.result.body.get("status")
        return str(status) if status is not None else None


@dataclass
class Application:
    """A relying party over HTTP with its own IAM identity (SigV4): it asks for validations
    (`POST /v1/validations`), reads their results (`GET /v1/validations/{id}?wait=N`) and
    verifies a validated token offline, with pyjwt against the JWKS (fetched once, and again for
    a `kid` it does not know)."""

    transport: Transport
    api_url: str
    issuer: str | None = None  # default: the API's URL, fleetkey's issuer on the local stack
    _keys: dict[str, Any] = field(default_factory=dict, repr=False)

    def request(
        self,
        device_id: str,
        purpose: str = DOSE_CHANGE,
        audience: str = THERAPY,
        *,
        require_attestation: bool = False,
        expires_in: int | None = None,
    ) -> ApiResponse:
        body: dict[str, Any] = {
            "device_id": device_id,
            "purpose": purpose,
            "audience": audience,
            "require_attestation": require_attestation,
        }
        if expires_in is not None:
            body["expires_in"] = expires_in
        return self.transport(
            "POST", "/v1/validations", json.dumps(body), {"content-type": "application/json"}
        )

    def result(self, validation_id: str, wait: int = 0) -> ApiResponse:
        query = f"?wait={wait}" if wait else ""
        path = f"/v1/validations/{urllib.parse.quote(validation_id, safe='')}{query}"
        return self.transport("GET", path, None, {})

    def validate(
        self,
        device_id: str,
        purpose: str = DOSE_CHANGE,
        audience: str = THERAPY,
        *,
        expires_in: int | None = None,
        require_attestation: bool = False,
        within: float | None = None,
    ) -> Validated:
        """Ask for a validation, then read it (long polls of at most MAX_WAIT s) until it is
        no longer pending or `within` seconds passed (default: its deadline and a second)."""
        started = time.perf_counter()
        created = self.request(
            device_id,
            purpose,
            audience,
            require_attestation=require_attestation,
            expires_in=expires_in,
        )
        if created.status != 201:
            return Validated(created, created, time.perf_counter() - started)
        budget = within if within is not None else (expires_in or 30) + 1
        deadline = time.monotonic() + budget
        while True:
            wait = int(min(MAX_WAIT, max(0.0, deadline - time.monotonic())))
            result = self.result(created.body["validation_id"], wait)
            if result.status != 200 or result.body.get("status") != "pending":
                break
            if time.monotonic() >= deadline:
                break
        return Validated(created, result, time.perf_counter() - started)

    def verify(
        self, token: str, *, validation_id: str, device_id: str, purpose: str, audience: str
    ) -> dict[str, Any]:
        """The claims of a validation token, verified as a relying party must before acting:
        an RFC 9068 access token (`typ` at+jwt) signed ES256 by a key of the JWKS, for
        `audience`, from the issuer, unexpired, its subject the device and its `validation`
        claim this validation and purpose.

        Raises:
            NotVerified: any check failed.
        """
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != ACCESS_TOKEN_TYPE:
                raise NotVerified(f"typ is {header.get('typ')!r}")
            key = self._key(str(header.get("kid")))
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=TOKEN_ALGORITHMS,
                audience=audience,
                issuer=self.issuer or self.api_url,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as exc:
            raise NotVerified(str(exc) or type(exc).__name__) from None
        if claims.get("sub") != device_id:
            raise NotVerified(f"the subject is {claims.get('sub')!r}, not {device_id}")
        if claims.get("validation") != {"id": validation_id, "purpose": purpose}:
            raise NotVerified("the validation claim is not this validation's")
        return claims

    def _key(self, kid: str) -> Any:
        if kid not in self._keys:
            status, body = get_bytes(f"{self.api_url}/.well-known/jwks.json", "application/json")
            if status != 200:
                raise NotVerified(f"the JWKS answered {status}")
            keyset = jwt.PyJWKSet.from_dict(json.loads(body))
            self._keys = {key.key_id: key.key for key in keyset.keys if key.key_id}
        if kid not in self._keys:
            raise NotVerified("signed by no key of the JWKS")
        return self._keys[kid]


# ---- the demo's phase ---------------------------------------------------------------------------


def listener_for(transport: IotTransport, device: SimulatedDevice) -> CommandListener:
    """The device's command listener on the demo's transport: an MQTT connection where devices
    connect over MQTT (the transport makes `connection(device)`), else moto's record of iot-data
    publishes (AWS IoT's side emulated in-process)."""
    connection = getattr(transport, "connection", None)
    if connection is None:
        return MotoCommands(device.device_id)
    return MqttCommands(connection(device), device.device_id).open()


@dataclass
class DelegatedValidation:
    """An application validates pumps before a dose change: fleetkey commands each pump over
    MQTT, the pump answers at the token endpoint, the application verifies the result offline;
    a replayed answer, another pump's answer and another principal's read are refused; a pump on
    withdrawn firmware (published, then revoked by the release role) and a suspended pump are
    refused; a validation nobody answers expires. End-to-end latency over LATENCY_VALIDATIONS
    validations."""

    api_url: str
    transport: IotTransport
    operator: Operator
    fleet: Fleet
    validations: int = LATENCY_VALIDATIONS
    name: str = (
        "an application validates pumps before a dose change; withdrawn firmware, a suspended "
        "pump and silence are refused"
    )

    def run(self, sim: Simulation) -> None:
        from fleetkey_local.api_gateway import (
            local_operator,
            local_operator_role,
            local_relying_party,
        )

        pumps = [d for d in self.fleet.devices if d.profile == "infusion-pump"][:3]
        if not pumps:
            sim.expect(True, "no pump in this fleet: nothing to validate")
            return
        app = Application(signed_transport(self.api_url, local_relying_party()), self.api_url)
        other = Application(signed_transport(self.api_url, local_operator()), self.api_url)
        release = signed_transport(self.api_url, local_operator_role("release"))
        over = " over MQTT/TLS" if getattr(self.transport, "connection", None) else ""
        devices: list[AnsweringDevice] = []
        try:
            for pump in pumps:
                listener = listener_for(self.transport, pump)
                devices.append(
                    AnsweringDevice(pump, self.api_url, listener, attestation(pump)).start()
                )
            first = devices[0]
            self._dose_change(sim, app, other, first, over)
            self._latency(sim, app, devices)
            if len(devices) > 1:
                self._another_pump(sim, app, first, devices[1])
            self._withdrawn_firmware(sim, app, release, devices[1 % len(devices)])
            self._suspended(sim, app, devices[2 % len(devices)])
            self._unanswered(sim, app, first)
        finally:
            for device in devices:
                device.stop()

    def _dose_change(
        self,
        sim: Simulation,
        app: Application,
        other: Application,
        pump: AnsweringDevice,
        over: str,
    ) -> None:
        done = sim.measure(
            "relying party: validate a pump end to end (POST, command, answer, GET ?wait)",
            lambda: app.validate(pump.device_id),
        )
        validation_id = done.validation_id
        command = pump.wait_heard(validation_id, 1.0)
        # the result is decided before the token endpoint's answer reaches the pump
        answer = pump.wait_answered(validation_id)
        sim.expect(
            done.created.status == 201
            and command is not None
            and command.get("purpose") == DOSE_CHANGE
            and answer is not None
            and answer.status == 200,
            f"an application asks to validate {pump.device_id} before a dose change: the pump "
            f"hears the validate command{over} and answers at the token endpoint",
        )
        token = done.result.body.get("token") or ""
        try:
            claims = sim.measure(
                "relying party: verify a validation token offline (pyjwt, JWKS)",
                lambda: app.verify(
                    token,
                    validation_id=validation_id,
                    device_id=pump.device_id,
                    purpose=DOSE_CHANGE,
                    audience=THERAPY,
                ),
            )
        except NotVerified:
            claims = {}
        sim.expect(
            done.status == "validated"
            and claims.get("firmware_sha256") == PUMP_FIRMWARE[1]
            and claims.get("exp", 0) - claims.get("iat", 0) <= 60
            and "scope" not in claims,
            f"the result is validated; its token verifies offline with pyjwt against the JWKS "
            f"(ES256, audience {THERAPY}, issuer, validation id and purpose), lives "
            f"{claims.get('exp', 0) - claims.get('iat', 0)} s and attests firmware "
            f"{claims.get('firmware_version')}",
        )
        replayed = pump.answer(command) if command is not None else Answer(0, {})
        again = app.result(validation_id)
        sim.expect(
            replayed.status == 400
            and replayed.error == "invalid_grant"
            and again.body.get("token") == token,
            "the pump's answer sent again (same nonce, a new assertion) is refused "
            "(invalid_grant); the result is unchanged",
        )
        read = sim.measure(
            "another principal reads the result (404)", lambda: other.result(validation_id)
        )
        unknown = other.result("0" * 32)
        sim.expect(
            read.status == 404 and read.body == unknown.body,
            "another principal (the local operator) reading the result gets 404, as for an "
            "unknown validation",
        )

    def _latency(self, sim: Simulation, app: Application, devices: list[AnsweringDevice]) -> None:
        seconds: list[float] = []
        verified = 0
        for number in sim.each(range(self.validations), "validations"):
            pump = devices[number % len(devices)]
            done = sim.measure(
                "relying party: validate a pump end to end (POST, command, answer, GET ?wait)",
                lambda p=pump: app.validate(p.device_id),
            )
            if done.status != "validated":
                continue
            seconds.append(done.seconds)
            try:
                app.verify(
                    done.result.body.get("token") or "",
                    validation_id=done.validation_id,
                    device_id=pump.device_id,
                    purpose=DOSE_CHANGE,
                    audience=THERAPY,
                )
                verified += 1
            except NotVerified:
                pass
        milliseconds = [s * 1000 for s in seconds]
        sim.state["validation_latency_ms"] = milliseconds
        sim.expect(
            verified == self.validations,
            f"{verified}/{self.validations} validations of {len(devices)} pumps validated and "
            f"verified offline; end to end (request to validated result): p50 "
            f"{percentile(milliseconds, 0.5):.0f} ms, p95 {percentile(milliseconds, 0.95):.0f} ms",
        )

    def _another_pump(
        self, sim: Simulation, app: Application, pump: AnsweringDevice, other: AnsweringDevice
    ) -> None:
        pump.silent = True
        try:
            created = app.request(pump.device_id)
            validation_id = str(created.body.get("validation_id"))
            command = pump.wait_heard(validation_id)
            foreign = other.answer(command) if command is not None else Answer(0, {})
            pending = app.result(validation_id).body.get("status")
            own = pump.answer(command) if command is not None else Answer(0, {})
            result = app.result(validation_id).body.get("status")
        finally:
            pump.silent = False
        sim.expect(
            foreign.status in (400, 401)
            and pending == "pending"
            and own.status == 200
            and result == "validated",
            f"{other.device_id} answering {pump.device_id}'s command with its nonce is refused "
            f"({foreign.error}); the validation stays pending, and {pump.device_id}'s own answer "
            "validates it",
        )

    def _withdrawn_firmware(
        self, sim: Simulation, app: Application, release: Transport, pump: AnsweringDevice
    ) -> None:
        new = firmware_release(WITHDRAWN_VERSION)
        headers = {"content-type": "application/json"}
        published = sim.measure(
            "release role: publish a firmware release",
            lambda: release("POST", "/v1/admin/firmware", json.dumps(new), headers),
        )
        running = {"firmware_version": new["version"], "firmware_sha256": new["sha256"]}
        original, pump.firmware = pump.firmware, running
        try:
            on_new = app.validate(pump.device_id)
            claims = self._claims(app, on_new, pump)
            sim.expect(
                published.status in (200, 201)
                and published.body.get("status") == "published"
                and on_new.status == "validated"
                and claims.get("firmware_sha256") == new["sha256"],
                f"the release role publishes firmware {WITHDRAWN_VERSION} for infusion-pump; "
                f"{pump.device_id}, running it, is validated (its token attests it)",
            )
            revoke = f"/v1/admin/firmware/{new['profile']}/{new['sha256']}/revoke"
            revoked = sim.measure(
                "release role: revoke a firmware release",
                lambda: release(
                    "POST", revoke, json.dumps({"reason": "dose rounding defect"}), headers
                ),
            )
            withdrawn = sim.measure(
                "relying party: validate a pump on withdrawn firmware (refused)",
                lambda: app.validate(pump.device_id),
            )
            answer = pump.wait_answered(withdrawn.validation_id)
            sim.expect(
                revoked.status == 200
                and revoked.body.get("status") == "revoked"
                and withdrawn.status == "refused"
                and withdrawn.result.body.get("reason") == "firmware_not_released"
                and answer is not None
                and answer.error == "invalid_grant",
                f"the release role revokes {WITHDRAWN_VERSION}; {pump.device_id}, still running "
                "it, is refused: firmware_not_released (its token request: invalid_grant)",
            )
        finally:
            pump.firmware = original
        reflashed = app.validate(pump.device_id)
        sim.expect(
            reflashed.status == "validated",
            f"reflashed with {PUMP_FIRMWARE[0]}, {pump.device_id} is validated again",
        )

    def _suspended(self, sim: Simulation, app: Application, pump: AnsweringDevice) -> None:
        suspended = self.operator.suspend(pump.device_id, "validation demo")
        try:
            refused = sim.measure(
                "relying party: validate a suspended pump (refused at once)",
                lambda: app.validate(pump.device_id),
            )
            heard = pump.wait_heard(refused.validation_id, 1.0)
        finally:
            resumed = self.operator.resume(pump.device_id)
        sim.expect(
            suspended.status == 200
            and refused.created.status == 201
            and refused.created.body.get("status") == "refused"
            and refused.status == "refused"
            and refused.result.body.get("reason") == "device_not_active"
            and heard is None,
            f"a suspended pump ({pump.device_id}) is refused at once: device_not_active, and "
            "no command is sent",
        )
        wait_for_tokens([suspended.body.get("tokens_not_before")])
        reconnected = pump.wait_listening()
        again = app.validate(pump.device_id)
        sim.expect(
            resumed.status == 200 and reconnected and again.status == "validated",
            f"resumed, {pump.device_id} reconnects and is validated again"
            + ("" if again.status == "validated" else f" ({again.status})"),
        )

    def _unanswered(self, sim: Simulation, app: Application, pump: AnsweringDevice) -> None:
        pump.silent = True
        try:
            silent = sim.measure(
                f"relying party: a validation nobody answers (expires_in {SHORT_EXPIRY} s)",
                lambda: app.validate(pump.device_id, expires_in=SHORT_EXPIRY),
            )
            command = pump.wait_heard(silent.validation_id, 1.0)
            late = pump.answer(command) if command is not None else Answer(0, {})
            after = app.result(silent.validation_id).body.get("status")
        finally:
            pump.silent = False
        sim.expect(
            command is not None
            and silent.status == "expired"
            and late.status == 400
            and late.error == "invalid_grant"
            and after == "expired",
            f"a validation {pump.device_id} hears but never answers reads expired at its "
            f"deadline (expires_in {SHORT_EXPIRY}: {silent.seconds:.1f} s); an answer after that "
            "is refused (invalid_grant)",
        )

    @staticmethod
    def _claims(app: Application, done: Validated, pump: AnsweringDevice) -> dict[str, Any]:
        try:
            return app.verify(
                done.result.body.get("token") or "",
                validation_id=done.validation_id,
                device_id=pump.device_id,
                purpose=DOSE_CHANGE,
                audience=THERAPY,
            )
        except NotVerified:
            return {}
