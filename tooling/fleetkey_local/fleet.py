"""The simulated fleet: devices with their own keys and factory certificates, and the phases of
their life against the local stack."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from fleetkey_cli.client import AdminClient, ApiResponse, Transport
from fleetkey_local.iot import certificate_id
from fleetkey_local.pki import CertificateAuthority, PrivateKey, generate_key, pem
from fleetkey_local.simulator import Simulation

if TYPE_CHECKING:
    from fleetkey_local.queues import QueueWorker
    from fleetkey_local.stack import EmbeddedStack

MANIFEST_HEADER = (
    "device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile,attribute.site"
)


@dataclass
class SimulatedDevice:
    device_id: str
    profile: str
    authority: CertificateAuthority
    key: PrivateKey
    certificate: x509.Certificate
    # What the device should meet: None = accepted, else the refusal reason it should be given.
    expected_refusal: str | None = None
    label: str = ""
    allowlisted: bool = True
    # The manufacturer CA its allow-list entry names, when not the one that issued it.
    allowlisted_ca: str | None = None
    # Whether TLS may already refuse it (AWS IoT checks validity; OpenSSL refuses tiny keys).
    may_fail_tls: bool = False
    # A rotation in progress: the key the device generated for it and, once issued, its
    # certificate. The device keeps connecting and signing with `key` until the commit is
    # confirmed; a rollback leaves it there.
    pending_key: PrivateKey | None = None
    pending_certificate: x509.Certificate | None = None
    # The factory identity (it survives decommission: a recommissioned device re-onboards with
    # it), and every certificate id the device was given, factory first.
    factory: tuple[PrivateKey, x509.Certificate] | None = field(default=None, repr=False)
    certificate_ids: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.factory is None:
            self.factory = (self.key, self.certificate)
        if not self.certificate_ids:
            self.certificate_ids.append(self.certificate_id)

    @property
    def serial_number(self) -> str:
        return f"SN-{self.device_id}"

    @property
    def certificate_pem(self) -> str:
        return pem(self.certificate)

    @property
    def certificate_id(self) -> str:
        return certificate_id(self.certificate_pem)

    # ---- rotation: what the device keeps --------------------------------------------------------

    def new_csr(self, key_kind: str = "ec:secp256r1") -> x509.CertificateSigningRequest:
        """A new key of the device's own (P-256 by default, which every profile allows), kept
        as pending, and the CSR for it."""
        from fleetkey_local.device import rotation_csr

        self.pending_key, self.pending_certificate = generate_key(key_kind), None
        return rotation_csr(self.pending_key, self.device_id)

    def issued(self, certificate_pem: str) -> None:
        """Keeps the certificate a rotation request returned, beside the current one."""
        self.pending_certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
        self.certificate_ids.append(certificate_id(certificate_pem))

    def pending_identity(self) -> SimulatedDevice:
        """The device as it presents itself with the new key and certificate (to connect with
        them, or to prove the new key), its own state untouched."""
        if self.pending_key is None or self.pending_certificate is None:
            raise RuntimeError(f"{self.device_id} has no issued pending certificate")
        return replace(
            self.snapshot(),
            key=self.pending_key,
            certificate=self.pending_certificate,
            pending_key=None,
            pending_certificate=None,
        )

    def snapshot(self) -> SimulatedDevice:
        """A copy of the device as it is now (to present an identity it gives up later)."""
        return replace(self, certificate_ids=list(self.certificate_ids))

    def commit_confirmed(self) -> SimulatedDevice:
        """The rotation is committed: the new key and certificate become the device's own. The
        old identity is returned (to show it is refused from now on); the device forgets it."""
        old = self.snapshot()
        new = self.pending_identity()
        self.key, self.certificate = new.key, new.certificate
        self.pending_key = self.pending_certificate = None
        return old

    def rotation_abandoned(self) -> None:
        """The rotation was rolled back: the device forgets the new key and stays as it is."""
        self.pending_key = self.pending_certificate = None

    def factory_reset(self) -> None:
        """What a device does on the reset command: back to its factory identity only."""
        self.key, self.certificate = self.factory
        self.pending_key = self.pending_certificate = None


@dataclass
class Fleet:
    authorities: dict[str, CertificateAuthority]
    devices: list[SimulatedDevice]
    rogues: list[SimulatedDevice]

    def manifest(self) -> str:
        rows = [MANIFEST_HEADER]
        for device in self.devices + self.rogues:
            if device.allowlisted:
                ca = device.allowlisted_ca or device.authority.name
                rows.append(
                    f"{device.device_id},{device.serial_number},{ca},,"
                    f"{device.profile},site-{device.device_id[-2:]}"
                )
        return "\n".join(rows) + "\n"


def build_fleet(size: int) -> Fleet:
    """Manufacturing: CAs, and devices generating their own keys with factory certificates."""
    acme = CertificateAuthority.create("acme-2026")
    globex = CertificateAuthority.create("globex-2026")
    unknown = CertificateAuthority.create("unknown-fab")
    devices = []
    for i in range(size):
        device_id = f"pump-{i:04d}" if i % 2 else f"well-{i:04d}"
        profile = "infusion-pump" if device_id.startswith("pump") else "telemetry-sensor"
        key, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
        devices.append(SimulatedDevice(device_id, profile, acme, key, cert))
    now = datetime.now(UTC)
    clone_of = devices[0]
    rogues = []

    def rogue(
        label,
        device_id,
        authority,
        reason,
        allowlisted=True,
        allowlisted_ca=None,
        may_fail_tls=False,
        **options,
    ):
        key, cert = authority.issue_device(device_id, serial_number=f"SN-{device_id}", **options)
        rogues.append(
            SimulatedDevice(
                device_id,
                "telemetry-sensor",
                authority,
                key,
                cert,
                reason,
                label,
                allowlisted,
                allowlisted_ca,
                may_fail_tls,
            )
        )

    rogue("not allow-listed", "rogue-0001", acme, "not_allowlisted", allowlisted=False)
    key, cert = acme.issue_device(clone_of.device_id, serial_number=clone_of.serial_number)
    rogues.append(
        SimulatedDevice(
            clone_of.device_id,
            clone_of.profile,
            acme,
            key,
            cert,
            "clone_suspected",
            "cloned identity",
            allowlisted=False,
        )
    )
    rogue(
        "expired certificate",
        "expired-0001",
        acme,
        "expired",
        may_fail_tls=True,
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )
    rogue(
        "weak key (RSA-1024)",
        "weakkey-0001",
        acme,
        "weak_key",
        may_fail_tls=True,
        key_kind="rsa:1024",
    )
    rogue("wrong manufacturer CA", "wrongca-0001", globex, "wrong_issuer", allowlisted_ca=acme.name)
    rogue("unregistered CA", "rogue-0002", unknown, "connection_refused", allowlisted=False)
    return Fleet({a.name: a for a in (acme, globex, unknown)}, devices, rogues)


@dataclass
class TamperReport:
    """What came of a device's tamper report: the rule's function result (None: no invocation),
    and whether the reporting device's connection was closed (None: no connection to watch)."""

    result: dict | None
    cut_off: bool | None = None


class HeldConnection(Protocol):
    """A device's open connection, subscribed to its commands, watched while its state changes."""

    def cut_off(self, timeout: float = 5.0) -> bool:
        """Whether AWS IoT closed the connection (within `timeout`)."""
        ...

    def commands(self) -> list[str]:
        """The command topics received so far."""
        ...

    def close(self) -> None: ...


class IotTransport:
    """How devices reach AWS IoT Core: `first_connect` returns the registration outcome (or None
    when AWS IoT refused the connection outright), `connect` a refusal reason or None,
    `report_tamper` publishes on the device's tamper topic, `hold` keeps a connection open (None
    when the transport has no connections to hold)."""

    def first_connect(self, device: SimulatedDevice) -> dict | None: ...

    def connect(self, device: SimulatedDevice, client_id: str | None = None) -> str | None: ...

    def report_tamper(self, device: SimulatedDevice) -> TamperReport: ...

    def hold(self, device: SimulatedDevice) -> HeldConnection | None:
        return None

    def connect_and_settle(self, device: SimulatedDevice) -> tuple[str | None, Any]:
        """Connect as `connect` does and wait until AWS IoT's presence rule delivered the
        connected event to its function (rotation_events, which commits a pending certificate
        the device connects with): the refusal (or None) and the function's result (None when
        no event was delivered)."""
        return self.connect(device), None


# ---- phases ---------------------------------------------------------------------------------


@dataclass
class RegisterManufacturerCas:
    admin: AdminClient
    fleet: Fleet
    name: str = "operator registers manufacturer CAs through the admin API"

    def run(self, sim: Simulation) -> None:
        for authority in (
            self.fleet.authorities["acme-2026"],
            self.fleet.authorities["globex-2026"],
        ):
            code = self.admin.registration_code()
            proof = pem(authority.verification_certificate(code))
            ca = sim.measure(
                "admin: register CA",
                lambda a=authority, p=proof: self.admin.register_ca(a.name, a.pem, p),
            )
            sim.expect(
                ca["status"] == "ACTIVE",
                f"{authority.name} registered with AWS IoT, auto-registration on",
            )


@dataclass
class ImportManifest:
    admin: AdminClient
    fleet: Fleet
    name: str = "operator imports the factory manifest"

    def run(self, sim: Simulation) -> None:
        manifest = self.fleet.manifest()
        expected = manifest.count("\n") - 1
        report = sim.measure(
            "admin: import manifest", lambda: self.admin.import_manifest(manifest, "csv")
        )
        sim.expect(
            report["imported"] == expected and not report["rejected"],
            f"{report['imported']} of {expected} imported, {len(report['rejected'])} rejected",
        )


@dataclass
class FirstConnection:
    transport: IotTransport
    fleet: Fleet
    name: str = "devices connect for the first time: just-in-time registration"

    def run(self, sim: Simulation) -> None:
        accepted = 0
        for device in sim.each(self.fleet.devices, "first connection"):
            outcome = sim.measure(
                "device: first connection (JITR)", lambda d=device: self.transport.first_connect(d)
            )
            accepted += bool(outcome and outcome.get("status") == "accepted")
        total = len(self.fleet.devices)
        sim.expect(accepted == total, f"{accepted}/{total} registered and ACTIVE")


@dataclass
class Reconnection:
    transport: IotTransport
    fleet: Fleet
    name: str = "devices reconnect with their certificates"

    def run(self, sim: Simulation) -> None:
        connected = 0
        for device in sim.each(self.fleet.devices, "reconnection"):
            refusal = sim.measure("device: connect", lambda d=device: self.transport.connect(d))
            connected += refusal is None
        total = len(self.fleet.devices)
        sim.expect(connected == total, f"{connected}/{total} connected")
        first, second = self.fleet.devices[0], self.fleet.devices[1]
        sim.expect(
            self.transport.connect(first, client_id=second.device_id) is not None,
            "a device using another device's client id is refused",
        )


@dataclass
class RogueDevices:
    transport: IotTransport
    admin: AdminClient
    fleet: Fleet
    name: str = "rogue devices are refused"

    def run(self, sim: Simulation) -> None:
        for device in self.fleet.rogues:
            outcome = sim.measure(
                f"device: rogue ({device.label})", lambda d=device: self.transport.first_connect(d)
            )
            if device.expected_refusal == "connection_refused" or (
                outcome is None and device.may_fail_tls
            ):
                sim.expect(outcome is None, f"{device.label:<24} refused by AWS IoT at connection")
                continue
            reason = outcome.get("reason") if outcome else "no registration event"
            sim.expect(
                outcome is not None
                and outcome["status"] == "refused"
                and reason == device.expected_refusal
                and self.transport.connect(device) is not None,
                f"{device.label:<24} refused: {reason}, cannot connect",
            )
        clone_target = self.fleet.devices[0]
        record = self.admin.device(clone_target.device_id)
        sim.expect(
            record["state"] == "ACTIVE"
            and record["certificate_id"] == clone_target.certificate_id
            and self.transport.connect(clone_target) is None,
            "the cloned device keeps its certificate and still connects",
        )
        self.admin.set_ca_enabled("globex-2026", False)
        globex = self.fleet.authorities["globex-2026"]
        key, cert = globex.issue_device("globex-0002", serial_number="SN-globex-0002")
        late = SimulatedDevice(
            "globex-0002",
            "telemetry-sensor",
            globex,
            key,
            cert,
            "connection_refused",
            "disabled CA",
        )
        sim.expect(
            self.transport.first_connect(late) is None,
            f"{'disabled CA':<24} refused by AWS IoT at connection (auto-registration off)",
        )


@dataclass
class VerifyAuditTrails:
    admin: AdminClient
    fleet: Fleet
    name: str = "operator reads every device's audit trail and verifies its hash chain"

    def run(self, sim: Simulation) -> None:
        verified = 0
        for device in sim.each(self.fleet.devices, "audit"):
            trail = sim.measure(
                "admin: read and verify audit", lambda d=device: self.admin.audit(d.device_id)
            )
            verified += trail["verified"]
        sim.expect(verified == len(self.fleet.devices), f"{verified} device chains verified")
        clone_trail = self.admin.audit(self.fleet.devices[0].device_id)
        sim.expect(
            [r["action"] for r in clone_trail["records"]]
            == ["allowlisted", "registered", "registration_refused"],
            "the clone attempt is in the device's own trail",
        )


# ---- tokens ---------------------------------------------------------------------------------

TELEMETRY = "urn:fleetkey:telemetry"  # an audience every profile's tokens carry
PUMP_FIRMWARE = ("2.4.1", "7981a0c2a8f3203495d07847ee27eb5eb31d68545fd04cd4a76842099d64054f")


def post_form(url: str, form: dict) -> tuple[int, dict]:
    """What a device's HTTP client does: a form POST, JSON back."""
    return _post(url, urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded")


def post_json(url: str, body: dict) -> tuple[int, dict]:
    """A device's JSON POST (the data-key and rotation routes), JSON back."""
    return _post(url, json.dumps(body).encode(), "application/json")


def get_bytes(url: str, accept: str) -> tuple[int, bytes]:
    """A GET of the public CA and CRL routes: the status and the body as sent. `accept` is the
    media type asked for (API Gateway sends a binary one as bytes only when asked first)."""
    # `url` is one the fleet built from the local gateway's http(s) base URL
    request = urllib.request.Request(url, method="GET", headers={"accept": accept})  # noqa: S310
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    # `url` is one the fleet built from the local gateway's http(s) base URL
    request = urllib.request.Request(  # noqa: S310
        url, data=data, method="POST", headers={"content-type": content_type}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def attestation(device: SimulatedDevice) -> dict[str, str]:
    """The firmware claims a device's assertions carry (a pump attests its firmware)."""
    if device.profile == "infusion-pump":
        return {"firmware_version": PUMP_FIRMWARE[0], "firmware_sha256": PUMP_FIRMWARE[1]}
    return {}


def device_assertion(api_url: str, device: SimulatedDevice, **options) -> str:
    """A device's client assertion (as for /v1/token), with a pump's firmware attestation."""
    from fleetkey_local.device import client_assertion

    options = {**attestation(device), **options}
    return client_assertion(device.key, device.certificate_id, device.device_id, api_url, **options)


@dataclass
class TokenVending:
    """Every device proves its identity with its own key and gets an access token; an IoT
    application verifies each one offline through the JWKS; forged and replayed assertions and
    assertions for another device are refused."""

    api_url: str
    fleet: Fleet
    name: str = "devices get access tokens; a relying party verifies them through the JWKS"

    def _assertion(self, device: SimulatedDevice, **options) -> str:
        return device_assertion(self.api_url, device, **options)

    def run(self, sim: Simulation) -> None:
        from fleetkey.verifier import InvalidToken, TokenVerifier
        from fleetkey_local.device import token_request

        verifier = TokenVerifier(self.api_url)
        token_url = f"{self.api_url}/v1/token"
        issued, verified = 0, 0
        for device in sim.each(self.fleet.devices, "tokens"):
            status, body = sim.measure(
                "device: get access token",
                lambda d=device: post_form(token_url, token_request(self._assertion(d))),
            )
            if status != 200:
                continue
            issued += 1
            try:
                sim.measure(
                    "relying party: verify token offline",
                    lambda b=body: verifier.verify(b["access_token"], audience=TELEMETRY),
                )
                verified += 1
            except InvalidToken:
                pass
        total = len(self.fleet.devices)
        sim.expect(issued == total, f"{issued}/{total} devices got an access token")
        sim.expect(verified == total, f"{verified}/{total} tokens verified through the JWKS")

        device, other = self.fleet.devices[0], self.fleet.devices[1]
        status, challenge = post_form(f"{self.api_url}/v1/challenge", {})
        nonce_assertion = self._assertion(device, nonce=challenge.get("nonce"))
        status, _ = post_form(token_url, token_request(nonce_assertion))
        sim.expect(status == 200, "a device without a clock gets a token with a server challenge")
        replayed = post_form(token_url, token_request(nonce_assertion))
        sim.expect(
            replayed[0] == 400 and replayed[1].get("error") == "invalid_grant",
            "a replayed assertion is refused (invalid_grant)",
        )
        assertion = self._assertion(device)
        head, payload, signature = assertion.split(".")
        # The signature altered, the claims intact: refused on the device's key, so with the
        # answer every device-dependent refusal gets (a malformed payload is told why).
        tampered = (
            f"{head}.{payload}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}"
            f"{signature[-1]}"
        )
        answer = post_form(token_url, token_request(tampered))
        sim.expect(
            answer[0] == 401 and answer[1].get("error") == "invalid_client",
            "a tampered assertion is refused (invalid_client)",
        )
        from fleetkey_local.device import client_assertion

        wrong = client_assertion(device.key, device.certificate_id, other.device_id, self.api_url)
        answer_wrong = post_form(token_url, token_request(wrong))
        sim.expect(
            answer_wrong[0] == 401 and answer_wrong[1] == answer[1],
            "an assertion for another device is refused, with the same answer",
        )


# ---- the lifecycle after registration -------------------------------------------------------

SUSPEND_REASON = "scheduled maintenance"
DECOMMISSION_REASON = "end of contract"
NEW_OWNER = "northwind-utilities"  # the owner the fleet is transferred to when recommissioned
# Devices per wave in the phases that check tokens issued before a change: a wave takes well under
# a token's lifetime (5 minutes for a pump), and more than the second a resumed device waits.
WAVE = 100


def tamper_topic(device_id: str) -> str:
    return f"fleetkey/{device_id}/events/tamper"


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe=":")


class Operator:
    """The admin API's lifecycle routes and a backend's data-key route, over the SigV4 transport
    the AdminClient uses; answers keep their HTTP status (a decommission is answered 202)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _call(self, method: str, device_id: str, tail: str = "", body=None) -> ApiResponse:
        headers = {"content-type": "application/json"} if body is not None else {}
        path = f"/v1/admin/devices/{_segment(device_id)}{tail}"
        return self._transport(method, path, None if body is None else json.dumps(body), headers)

    def device(self, device_id: str) -> ApiResponse:
        return self._call("GET", device_id)

    def suspend(self, device_id: str, reason: str) -> ApiResponse:
        return self._call("POST", device_id, "/suspend", {"reason": reason})

    def resume(self, device_id: str) -> ApiResponse:
        return self._call("POST", device_id, "/resume", {})

    def decommission(self, device_id: str, reason: str) -> ApiResponse:
        return self._call("POST", device_id, "/decommission", {"reason": reason})

    def recommission(self, device_id: str, owner: str | None = None) -> ApiResponse:
        return self._call("POST", device_id, "/recommission", {"owner": owner} if owner else {})

    def data_key(self, device_id: str) -> ApiResponse:
        """A backend's read of the device's data key, wrapped by KMS."""
        return self._call("GET", device_id, "/data-key")


class RelyingParty:
    """An IoT application that checks tokens online: RFC 7662 introspection, signed with its own
    IAM identity."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def active(self, token: str) -> bool:
        answer = self._transport(
            "POST",
            "/v1/introspect",
            urllib.parse.urlencode({"token": token}),
            {"content-type": "application/x-www-form-urlencoded"},
        )
        if answer.status != 200:
            raise RuntimeError(f"introspection answered {answer.status}: {answer.body}")
        return answer.body.get("active") is True


@dataclass
class DeviceApi:
    """What a device asks the API for, each request proven with a fresh client assertion."""

    api_url: str

    def token(self, device: SimulatedDevice) -> tuple[int, dict]:
        from fleetkey_local.device import token_request

        return post_form(
            f"{self.api_url}/v1/token", token_request(device_assertion(self.api_url, device))
        )

    def data_key(self, device: SimulatedDevice, device_id: str | None = None) -> tuple[int, dict]:
        """The device's data key (or, with `device_id`, another device's: refused)."""
        return post_json(
            f"{self.api_url}/v1/devices/{_segment(device_id or device.device_id)}/data-key",
            {"client_assertion": device_assertion(self.api_url, device)},
        )

    def rotate(self, device: SimulatedDevice) -> tuple[int, dict]:
        """The device asks for a new certificate: a new key and its CSR, proven by an assertion
        of its current key bound to the CSR (`csr_sha256`). The certificate of a 201 is kept as
        the device's pending one."""
        from fleetkey_local.device import rotation_assertion, rotation_request

        csr = device.new_csr()
        assertion = rotation_assertion(
            device.key,
            device.certificate_id,
            device.device_id,
            self.api_url,
            csr,
            **attestation(device),
        )
        answer = post_json(
            f"{self.api_url}/v1/devices/{_segment(device.device_id)}/certificates",
            rotation_request(csr, assertion),
        )
        if answer[0] == 201:
            device.issued(answer[1]["certificate_pem"])
        return answer

    def commit(self, device: SimulatedDevice) -> tuple[int, dict]:
        """The device commits its pending certificate, proving the new key (an assertion signed
        by it, `kid` = the new certificate's id). A 200 is the confirmation: from then on the
        device uses the new key and certificate only."""
        new = device.pending_identity()
        answer = post_json(
            f"{self.api_url}/v1/devices/{_segment(device.device_id)}/certificates/"
            f"{new.certificate_id}/commit",
            {"client_assertion": device_assertion(self.api_url, new)},
        )
        if answer[0] == 200:
            device.commit_confirmed()
        return answer

    def ca_chain(self) -> list[x509.Certificate]:
        """`GET /v1/pki/ca`: the issuing CA, then its chain up to the root."""
        status, body = get_bytes(f"{self.api_url}/v1/pki/ca", "application/pem-certificate-chain")
        if status != 200:
            raise RuntimeError(f"GET /v1/pki/ca answered {status}")
        return x509.load_pem_x509_certificates(body)

    def crl(self) -> x509.CertificateRevocationList:
        """`GET /v1/pki/crl`: the issuing CA's CRL (DER)."""
        status, body = get_bytes(f"{self.api_url}/v1/pki/crl", "application/pkix-crl")
        if status != 200:
            raise RuntimeError(f"GET /v1/pki/crl answered {status}")
        return x509.load_der_x509_crl(body)


@dataclass
class Issued:
    """A token a device was given, and until when it would be active if nothing changed."""

    token: str
    expires: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires


def refused(answer: tuple[int, dict]) -> bool:
    """The device-facing routes' refusal of a device that may not have what it asks for."""
    status, body = answer
    return status == 401 and body.get("error") == "invalid_client"


def wait_for_tokens(not_before: list[int | None]) -> float:
    """Tokens are granted from a device's `tokens_not_before` (the second after its last
    suspension or decommission): wait until every one has passed. The seconds waited."""
    delay = max((t for t in not_before if t), default=0) - time.time()
    if delay > 0:
        time.sleep(delay)
    return max(delay, 0.0)


def waves(devices: list[SimulatedDevice], size: int | None = None) -> list[list[SimulatedDevice]]:
    """The devices in consecutive waves of `size` (default `WAVE`)."""
    size = size or WAVE
    return [devices[i : i + size] for i in range(0, len(devices), size)]


def _issue(sim: Simulation, api: DeviceApi, device: SimulatedDevice) -> Issued | None:
    status, body = sim.measure("device: get access token", lambda: api.token(device))
    if status != 200:
        return None
    return Issued(body["access_token"], time.time() + body["expires_in"])


def _token_refused(sim: Simulation, api: DeviceApi, device: SimulatedDevice) -> bool:
    return refused(sim.measure("device: get access token (refused)", lambda: api.token(device)))


def _key_refused(sim: Simulation, api: DeviceApi, device: SimulatedDevice) -> bool:
    return refused(sim.measure("device: get data key (refused)", lambda: api.data_key(device)))


def _introspect(sim: Simulation, relying_party: RelyingParty, issued: Issued | None) -> bool:
    """Whether a relying party finds the token active (a token never issued is not)."""
    if issued is None:
        return False
    return sim.measure(
        "relying party: introspect token", lambda: relying_party.active(issued.token)
    )


def _inactive(
    sim: Simulation,
    relying_party: RelyingParty,
    issued: Issued | None,
    tally: Counter[str],
    key: str,
) -> None:
    """Counts under `key` a token a relying party finds inactive, and under `<key>_live` those
    of them still within their lifetime when checked: only these tell a cut-off from the end of
    a lifetime."""
    if not _introspect(sim, relying_party, issued):
        tally[key] += 1
        tally[f"{key}_live"] += issued is not None and not issued.expired


def _live(tally: Counter[str], key: str) -> str:
    live = tally[f"{key}_live"]
    return "all within their lifetime" if live == tally[key] else f"{live} within their lifetime"


@dataclass
class SuspendAndResume:
    """An operator suspends a share of the fleet: tokens issued before become inactive, token and
    data-key requests are refused, AWS IoT refuses connections (a connected device is cut off at
    once). Resumed, the devices connect and get tokens again; the earlier tokens stay inactive.

    In waves of `WAVE` devices, so that every token checked inactive is still within its
    lifetime (a pump's lasts 5 minutes) however large the fleet."""

    operator: Operator
    relying_party: RelyingParty
    transport: IotTransport
    api: DeviceApi
    fleet: Fleet
    share: float = 0.5
    name: str = "operator suspends half the fleet, then resumes it"

    def run(self, sim: Simulation) -> None:
        devices = self.fleet.devices[: max(1, round(len(self.fleet.devices) * self.share))]
        tally: Counter[str] = Counter()
        for number, wave in enumerate(waves(devices), 1):
            self._wave(sim, wave, f"wave {number}", tally, watch=number == 1)
        total = len(devices)
        counts = [
            ("tokens", "hold a token that introspects active"),
            ("suspended", "SUSPENDED"),
            ("inactive", f"earlier tokens inactive in introspection ({_live(tally, 'inactive')})"),
            ("token_refused", "token requests refused"),
            ("key_refused", "data-key requests refused"),
            ("blocked", "refused by AWS IoT at connection"),
            ("resumed", "resumed: ACTIVE"),
            ("connected", "connect again"),
            ("fresh", "new tokens active in introspection"),
            (
                "stale",
                f"tokens from before the suspension still inactive ({_live(tally, 'stale')})",
            ),
        ]
        for key, text in counts:
            sim.expect(tally[key] == total, f"{tally[key]}/{total} {text}")
        if "cut_off" in tally or "not_cut_off" in tally:
            sim.expect(
                tally["cut_off"] == 1,
                "a connected device is cut off at once (iot-data DeleteConnection)",
            )

    def _wave(
        self,
        sim: Simulation,
        devices: list[SimulatedDevice],
        label: str,
        tally: Counter[str],
        *,
        watch: bool,
    ) -> None:
        earlier: dict[str, Issued] = {}
        for device in sim.each(devices, f"tokens before ({label})"):
            issued = _issue(sim, self.api, device)
            if issued is not None and _introspect(sim, self.relying_party, issued):
                earlier[device.device_id] = issued
        tally["tokens"] += len(earlier)

        not_before = []
        for device in sim.each(devices, f"suspend ({label})"):
            # The first device is connected while it is suspended: AWS IoT must close it at once.
            held = self.transport.hold(device) if watch and device is devices[0] else None
            answer = sim.measure(
                "admin: suspend",
                lambda d=device: self.operator.suspend(d.device_id, SUSPEND_REASON),
            )
            tally["suspended"] += answer.status == 200 and answer.body.get("state") == "SUSPENDED"
            not_before.append(answer.body.get("tokens_not_before"))
            if held is not None:
                tally["cut_off" if held.cut_off() else "not_cut_off"] += 1
                held.close()

        for device in sim.each(devices, f"while suspended ({label})"):
            _inactive(sim, self.relying_party, earlier.get(device.device_id), tally, "inactive")
            tally["token_refused"] += _token_refused(sim, self.api, device)
            tally["key_refused"] += _key_refused(sim, self.api, device)
            tally["blocked"] += (
                sim.measure("device: connect (refused)", lambda d=device: self.transport.connect(d))
                is not None
            )

        for device in sim.each(devices, f"resume ({label})"):
            answer = sim.measure(
                "admin: resume", lambda d=device: self.operator.resume(d.device_id)
            )
            tally["resumed"] += answer.status == 200 and answer.body.get("state") == "ACTIVE"
        wait_for_tokens(not_before)

        for device in sim.each(devices, f"after resume ({label})"):
            tally["connected"] += (
                sim.measure("device: connect", lambda d=device: self.transport.connect(d)) is None
            )
            tally["fresh"] += _introspect(sim, self.relying_party, _issue(sim, self.api, device))
            _inactive(sim, self.relying_party, earlier.get(device.device_id), tally, "stale")


@dataclass
class TamperReports:
    """Devices report tampering on their tamper topic: the IoT rule's function suspends each
    (reason tamper, the rule as actor) and closes its connection; the operator resumes them."""

    transport: IotTransport
    operator: Operator
    admin: AdminClient
    api: DeviceApi
    fleet: Fleet
    share: float = 0.1
    name: str = "devices report tampering: the IoT rule suspends them; the operator resumes them"

    def run(self, sim: Simulation) -> None:
        # From the half of the fleet not suspended before.
        devices = self.fleet.devices[-max(1, round(len(self.fleet.devices) * self.share)) :]
        total = len(devices)
        reported, cut_off, watched = 0, 0, 0
        for device in sim.each(devices, "tamper reports"):
            report = sim.measure(
                "device: tamper report (IoT rule -> suspend)",
                lambda d=device: self.transport.report_tamper(d),
            )
            reported += report.result == {"status": "suspended", "device_id": device.device_id}
            if report.cut_off is not None:
                watched += 1
                cut_off += report.cut_off
        sim.expect(reported == total, f"{reported}/{total} tamper reports suspended their device")
        if watched:
            sim.expect(
                cut_off == watched,
                f"{cut_off}/{watched} reporting devices' connections closed at once",
            )

        recorded, token_refused, not_before = 0, 0, []
        for device in sim.each(devices, "suspended for tamper"):
            view = sim.measure(
                "admin: read device", lambda d=device: self.operator.device(d.device_id)
            ).body
            trail = sim.measure(
                "admin: read and verify audit", lambda d=device: self.admin.audit(d.device_id)
            )
            last = trail["records"][-1] if trail["records"] else {}
            recorded += (
                view.get("state") == "SUSPENDED"
                and trail["verified"]
                and last.get("action") == "suspended"
                and last.get("details", {}).get("reason") == "tamper"
                and last.get("actor") == f"aws-iot:tamper-rule:device:{device.device_id}"
            )
            not_before.append(view.get("tokens_not_before"))
            token_refused += _token_refused(sim, self.api, device)
        sim.expect(
            recorded == total,
            f"{recorded}/{total} SUSPENDED, reason tamper, by the tamper rule (audit trail)",
        )
        sim.expect(token_refused == total, f"{token_refused}/{total} token requests refused")

        resumed = 0
        for device in sim.each(devices, "resume"):
            answer = sim.measure(
                "admin: resume", lambda d=device: self.operator.resume(d.device_id)
            )
            resumed += answer.status == 200 and answer.body.get("state") == "ACTIVE"
        sim.expect(resumed == total, f"{resumed}/{total} resumed: ACTIVE")
        wait_for_tokens(not_before)
        served = sum(_issue(sim, self.api, d) is not None for d in devices)
        sim.expect(served == total, f"{served}/{total} get tokens again")


def _telemetry(device: SimulatedDevice, life: int) -> bytes:
    return json.dumps({"device_id": device.device_id, "life": life, "flow_lpm": 12.5}).encode()


@dataclass
class DataKeyRoundTrip:
    """Every device whose profile allows it obtains its data key sealed to its certificate key,
    opens it and encrypts telemetry; a backend reads the KMS-wrapped key through the admin API,
    decrypts it with its own kms:Decrypt and reads the telemetry."""

    api: DeviceApi
    operator: Operator
    kms: Any  # the backend's own KMS client
    fleet: Fleet
    name: str = "devices get their data keys; a backend decrypts their telemetry through KMS"

    def run(self, sim: Simulation) -> None:
        from fleetkey.domain.profiles import get_profile
        from fleetkey.services.data_keys import DATA_KEY_SCOPE
        from fleetkey_local.data_keys import encrypt_telemetry

        devices = [
            d
            for d in self.fleet.devices
            if DATA_KEY_SCOPE in get_profile(d.profile).token_rules.scopes
        ]
        total = len(devices)
        keys: dict[str, DataKeyCopy] = {}
        opened, read, again = 0, 0, 0
        for device in sim.each(devices, "data keys"):
            answer = sim.measure(
                "device: get data key (first: KMS GenerateDataKey)",
                lambda d=device: self.api.data_key(d),
            )
            key = _open(sim, device, answer, epoch=1, owner=None)
            if key is None:
                continue
            opened += 1
            envelope = encrypt_telemetry(
                key, _telemetry(device, 1), device_id=device.device_id, epoch=1
            )
            keys[device.device_id] = DataKeyCopy(answer[1]["key_ref"], key, envelope)
            read += _backend_reads(sim, self.operator, self.kms, device, envelope, life=1)
            second = sim.measure(
                "device: get data key (again: KMS Decrypt)", lambda d=device: self.api.data_key(d)
            )
            again += (
                _open(sim, device, second, epoch=1, owner=None) == key
                and second[1]["key_ref"] == answer[1]["key_ref"]
            )
        sim.state["data_keys"] = keys
        sim.expect(
            opened == total,
            f"{opened}/{total} devices allowed data keys opened theirs (sealed to their "
            f"certificate key; {len(self.fleet.devices) - total} not allowed)",
        )
        sim.expect(read == total, f"{read}/{total} telemetry envelopes read by the backend")
        sim.expect(again == total, f"{again}/{total} got the same key on asking again")
        self._cross_checks(sim, devices, keys)

    def _cross_checks(
        self, sim: Simulation, devices: list[SimulatedDevice], keys: dict[str, DataKeyCopy]
    ) -> None:
        from fleetkey.crypto.sealing import SealedKeyUnreadable
        from fleetkey_local.data_keys import (
            EnvelopeUnreadable,
            decrypt_telemetry,
            device_open,
        )

        if len(devices) < 2:
            return
        device, other = devices[0], devices[1]
        sim.expect(
            refused(self.api.data_key(device, device_id=other.device_id)),
            "a device asking for another device's key is refused (invalid_client)",
        )
        status, sealed = self.api.data_key(device)
        try:
            device_open(other.key, sealed, device_id=device.device_id, epoch=1, owner=None)
            foreign_opens = True
        except SealedKeyUnreadable:
            foreign_opens = False
        sim.expect(
            status == 200 and not foreign_opens,
            "a sealed key does not open with another device's private key",
        )
        mine, theirs = keys.get(device.device_id), keys.get(other.device_id)
        try:
            if mine is None or theirs is None:
                raise RuntimeError("no keys to compare")
            decrypt_telemetry(theirs.key, mine.envelope, device_id=device.device_id, epoch=1)
            crossed = True
        except (EnvelopeUnreadable, RuntimeError):
            crossed = False
        sim.expect(
            mine is not None and not crossed,
            "a device's telemetry does not decrypt under another device's key",
        )


@dataclass
class DataKeyCopy:
    """What a device kept of its data key in one life (to compare with the next)."""

    key_ref: str
    key: bytes
    envelope: dict


def _open(
    sim: Simulation,
    device: SimulatedDevice,
    answer: tuple[int, dict],
    *,
    epoch: int,
    owner: str | None,
) -> bytes | None:
    """The data key in a data-key answer, opened with the device's private key, if the answer
    is for this device in the life it expects."""
    from fleetkey.crypto.sealing import SealedKeyUnreadable
    from fleetkey_local.data_keys import device_open

    status, sealed = answer
    if (
        status != 200
        or sealed.get("device_id") != device.device_id
        or sealed.get("epoch") != epoch
        or sealed.get("owner") != owner
    ):
        return None
    try:
        return sim.measure(
            "device: open sealed data key",
            lambda: device_open(
                device.key,
                sealed,
                device_id=device.device_id,
                epoch=sealed["epoch"],
                owner=sealed["owner"],
            ),
        )
    except SealedKeyUnreadable:
        return None


def _backend_reads(
    sim: Simulation,
    operator: Operator,
    kms: Any,
    device: SimulatedDevice,
    envelope: dict,
    *,
    life: int,
) -> bool:
    """Whether a backend gets the device's wrapped key and reads its telemetry with it."""
    from fleetkey_local.data_keys import backend_decrypt_telemetry

    grant = sim.measure(
        "backend: get wrapped data key", lambda: operator.data_key(device.device_id)
    )
    if grant.status != 200:
        return False
    payload = sim.measure(
        "backend: decrypt telemetry (KMS Decrypt)",
        lambda: backend_decrypt_telemetry(kms, grant.body, envelope),
    )
    return payload == _telemetry(device, life)


# ---- certificate rotation -------------------------------------------------------------------


def _issued_by(certificate: x509.Certificate | None, chain: list[x509.Certificate]) -> bool:
    """Whether `certificate` was signed by the chain's first certificate (the issuing CA)."""
    from cryptography.exceptions import InvalidSignature

    if certificate is None or not chain:
        return False
    try:
        certificate.verify_directly_issued_by(chain[0])
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


@dataclass
class CertificateRotation:
    """A device replaces its factory certificate by one from fleetkey's issuing CA (whose key
    is in KMS), then rotates once more. Each time it makes a new key and a CSR, proves the
    request with its current key, and keeps its old key until the rotation is committed: the
    first by reconnecting with the new certificate (AWS IoT's connected event commits it), the
    second by calling commit with the new key. It gets tokens with the new certificate; the old
    one is refused (token and MQTT) and, once fleetkey issued it, listed in the CRL. Another
    device asks for a certificate and never uses it: the scheduled sweep, run past the commit
    deadline, rolls the rotation back; the new certificate is refused, the old one still works.

    `sweep(now)` runs the scheduled sweep as of `now` and returns its counts."""

    api: DeviceApi
    transport: IotTransport
    admin: AdminClient
    relying_party: RelyingParty
    sweep: Callable[[datetime], dict]
    fleet: Fleet
    name: str = "a device rotates to certificates from fleetkey's CA; an unused one is rolled back"

    def run(self, sim: Simulation) -> None:
        device, laggard = self.fleet.devices[1], self.fleet.devices[0]
        chain = self.api.ca_chain()
        if self._first_rotation(sim, device, chain):
            self._second_rotation(sim, device, chain)
        self._rollback(sim, laggard, chain)

    def _request(self, sim: Simulation, device: SimulatedDevice, chain) -> dict | None:
        """A rotation request; its 201 answer, or None."""
        status, body = sim.measure(
            "device: rotation request (CSR, assertion by the current key)",
            lambda: self.api.rotate(device),
        )
        issued = device.pending_certificate
        ok = sim.expect(
            status == 201
            and issued is not None
            and _issued_by(issued, chain)
            and issued.subject.rfc4514_string() == f"CN={device.device_id}"
            and issued.public_key() == device.pending_key.public_key()
            and body.get("certificate_id") == certificate_id(pem(issued)),
            f"{device.device_id} sends a CSR for a new key of its own: 201, a certificate for "
            f"that key from fleetkey's issuing CA{'' if status == 201 else f' ({status} {body})'}",
        )
        return body if ok else None

    def _refused(self, sim: Simulation, identity: SimulatedDevice, what: str) -> None:
        token = sim.measure(
            "device: access token with a replaced certificate (refused)",
            lambda: self.api.token(identity),
        )
        refusal = sim.measure(
            "device: connect with a replaced certificate (refused)",
            lambda: self.transport.connect(identity),
        )
        sim.expect(
            refused(token) and refusal is not None,
            f"the {what} is refused: token (invalid_client) and MQTT ({refusal})",
        )

    def _works(self, sim: Simulation, identity: SimulatedDevice) -> tuple[str | None, int]:
        refusal = sim.measure("device: connect", lambda: self.transport.connect(identity))
        status, _ = sim.measure("device: get access token", lambda: self.api.token(identity))
        return refusal, status

    def _first_rotation(self, sim: Simulation, device: SimulatedDevice, chain) -> bool:
        earlier = _issue(sim, self.api, device)  # a token bound to the factory certificate
        if self._request(sim, device, chain) is None:
            return False
        refusal, outcome = sim.measure(
            "device: reconnect with the new certificate (the connected event commits)",
            lambda: self.transport.connect_and_settle(device.pending_identity()),
        )
        status, _ = sim.measure(
            "device: get access token", lambda: self.api.token(device.pending_identity())
        )
        if isinstance(outcome, dict):  # the rotation_events function's answer
            outcome = outcome.get("outcome")
        if not sim.expect(
            refusal is None and status == 200,
            f"it reconnects with the new certificate (the connected event: {outcome}) and gets "
            "a token with it",
        ):
            return False
        factory = device.commit_confirmed()
        view = sim.measure(
            "admin: rotation status", lambda: self.admin.rotation_status(device.device_id)
        )
        sim.expect(
            _current_certificate(view) == device.certificate_id,
            "the operator's rotation status shows the new certificate current",
        )
        self._refused(sim, factory, "factory certificate")
        sim.expect(
            earlier is not None and not _introspect(sim, self.relying_party, earlier),
            "a token bound to the factory certificate is inactive in introspection",
        )
        return True

    def _second_rotation(self, sim: Simulation, device: SimulatedDevice, chain) -> None:
        if self._request(sim, device, chain) is None:
            return
        previous = device.snapshot()
        status, _ = sim.measure(
            "device: commit (assertion by the new key)", lambda: self.api.commit(device)
        )
        if not sim.expect(status == 200, "it commits its next rotation itself, with the new key"):
            return
        refusal, token = self._works(sim, device)
        sim.expect(
            refusal is None and token == 200,
            "it connects and gets tokens with its newest certificate",
        )
        self._refused(sim, previous, "certificate it replaced")
        # The schedule's next sweep (within a minute) publishes the CRL with the revocation.
        sim.measure(
            "schedule: sweep (publishes the CRL)",
            lambda: self.sweep(datetime.now(UTC)),
        )
        crl = sim.measure("device: read the CRL (GET /v1/pki/crl)", self.api.crl)
        serial = previous.certificate.serial_number
        sim.expect(
            crl.is_signature_valid(chain[0].public_key())
            and crl.get_revoked_certificate_by_serial_number(serial) is not None,
            "the CRL, signed by the issuing CA, lists the replaced certificate's serial "
            f"({len(crl)} revoked)",
        )

    def _rollback(self, sim: Simulation, device: SimulatedDevice, chain) -> None:
        answer = self._request(sim, device, chain)
        if answer is None:
            return
        abandoned = device.pending_identity()
        moment = datetime.fromisoformat(answer["commit_deadline"]) + timedelta(seconds=1)
        # Deadlines have an index of their own (renewals never delay them): one sweep rolls the
        # rotation back, unless a sweep stopped at its time limit first.
        counts: Counter[str] = Counter()
        for _ in range(MAX_SWEEPS):
            done = sim.measure(
                "schedule: sweep past the commit deadline (rollback)",
                lambda: self.sweep(moment),
            )
            counts.update({k: v for k, v in done.items() if isinstance(v, int)})
            counts["sweeps"] += 1
            if counts["rolled_back"] or not done.get("due"):
                break
        device.rotation_abandoned()
        sim.expect(
            counts["rolled_back"] >= 1,
            "another device never uses its new certificate: the sweep past the deadline rolls "
            f"the rotation back ({_counts(counts)})",
        )
        token = self.api.token(abandoned)
        refusal = self.transport.connect(abandoned)
        sim.expect(
            refused(token) and refusal is not None,
            f"its rolled-back certificate is refused: token (invalid_client) and MQTT ({refusal})",
        )
        refusal, status = self._works(sim, device)
        sim.expect(
            refusal is None and status == 200,
            "its old certificate still connects and gets tokens",
        )


# The most sweeps the rotation phase runs to see its rollback.
MAX_SWEEPS = 20


def scheduled_sweep() -> Callable[[datetime], dict]:
    """The sweep the rotation_events function runs every minute, with that function's own
    services (its AWS calls count as any function's), as of a given moment: its schedule cannot
    be told the time, and the demo does not wait an hour for a commit deadline to pass."""
    from fleetkey_local.functions import load_function

    function = load_function("rotation_events")
    return lambda now: function.components().rotation.sweep(now)


def _current_certificate(view: dict) -> str | None:
    """The current certificate's id in a rotation status (GET /v1/admin/devices/{id}/rotation)."""
    return (view.get("current") or {}).get("certificate_id")


def _counts(counts: dict) -> str:
    done = [f"{name} {n}" for name, n in sorted(counts.items()) if isinstance(n, int) and n]
    return ", ".join(done) or "nothing done"


@dataclass
class Decommission:
    """The operator decommissions the whole fleet: each device is DECOMMISSIONED in the answer
    (202) and nothing is granted to it from then on; the converge function then tears each down
    from the lifecycle queue (reset command, connection closed, certificates and thing deleted,
    data key destroyed). Afterwards tokens and data keys are refused, earlier tokens inactive,
    and AWS IoT holds nothing of the fleet.

    In waves of `WAVE` devices (decommission, drain the queue, check), so that every earlier
    token checked inactive after the teardown is still within its lifetime."""

    operator: Operator
    relying_party: RelyingParty
    transport: IotTransport
    api: DeviceApi
    stack: EmbeddedStack
    fleet: Fleet
    name: str = "operator decommissions the fleet; the converge function tears it down"

    def run(self, sim: Simulation) -> None:
        devices = self.fleet.devices
        total = len(devices)
        worker = self.stack.lifecycle_worker(function=self._measured_converge(sim), batch_size=1)
        tally: Counter[str] = Counter()
        draining = 0.0
        for number, wave in enumerate(waves(devices), 1):
            draining += self._wave(sim, worker, wave, f"wave {number}", tally)
        counts = [
            ("tokens", "hold a token"),
            ("answered", "answered 202: DECOMMISSIONED, teardown pending"),
            ("cut", "refused tokens at once, their earlier token inactive"),
            ("completed", "teardowns completed (their certificate gone)"),
            ("token_refused", "token requests refused after the teardown"),
            ("key_refused", "data-key requests refused"),
            ("backend_refused", "backend data-key reads refused (409)"),
            ("destroyed", "wrapped data keys deleted from the table"),
            ("inactive", f"earlier tokens inactive ({_live(tally, 'inactive')})"),
        ]
        for key, text in counts:
            sim.expect(tally[key] == total, f"{tally[key]}/{total} {text}")
        sim.expect(
            tally["drained"] == len(list(waves(devices))),
            f"lifecycle queue drained after every wave: {total} teardowns in {draining:.1f} s",
        )
        if "heard" in tally or "not_heard" in tally:
            sim.expect(
                tally["heard"] == 1, "a connected device hears the reset command, then is cut off"
            )
        self._nothing_left_in_aws_iot(sim)

    def _wave(
        self,
        sim: Simulation,
        worker: QueueWorker,
        devices: list[SimulatedDevice],
        label: str,
        tally: Counter[str],
    ) -> float:
        """One wave; the seconds its teardowns took."""
        earlier: dict[str, Issued] = {}
        for device in sim.each(devices, f"tokens before ({label})"):
            issued = _issue(sim, self.api, device)
            if issued is not None:
                earlier[device.device_id] = issued
        tally["tokens"] += len(earlier)

        draining = 0.0
        for device in sim.each(devices, f"decommission ({label})"):
            # The fleet's first device is connected and subscribed to its commands while it is
            # decommissioned, and its teardown runs at once: it must hear the reset command and
            # be cut off.
            watch = device is self.fleet.devices[0]
            held = self.transport.hold(device) if watch else None
            answer = sim.measure(
                "admin: decommission (202)",
                lambda d=device: self.operator.decommission(d.device_id, DECOMMISSION_REASON),
            )
            teardown = answer.body.get("teardown") or {}
            tally["answered"] += (
                answer.status == 202
                and answer.body.get("state") == "DECOMMISSIONED"
                and teardown.get("status") == "pending"
            )
            # Nothing is granted from the answer on, before any teardown.
            tally["cut"] += _token_refused(sim, self.api, device) and not _introspect(
                sim, self.relying_party, earlier.get(device.device_id)
            )
            if held is not None:
                started = time.perf_counter()
                worker.drain(timeout=60)
                draining += time.perf_counter() - started
                closed = held.cut_off()
                heard = f"fleetkey/{device.device_id}/commands/reset" in held.commands()
                tally["heard" if heard and closed else "not_heard"] += 1
                held.close()

        started = time.perf_counter()
        tally["drained"] += worker.drain(timeout=60 + 2.0 * len(devices))
        draining += time.perf_counter() - started

        for device in sim.each(devices, f"after teardown ({label})"):
            # The table, as the harness reads it: the life's wrapped data key is gone.
            tally["destroyed"] += self.stack.store.data_keys.get(device.device_id, 1) is None
            view = sim.measure(
                "admin: read device", lambda d=device: self.operator.device(d.device_id)
            ).body
            teardown = view.get("teardown") or {}
            tally["completed"] += (
                view.get("state") == "DECOMMISSIONED"
                and teardown.get("status") == "completed"
                and device.certificate_id in teardown.get("certificates", ())
            )
            tally["token_refused"] += _token_refused(sim, self.api, device)
            tally["key_refused"] += _key_refused(sim, self.api, device)
            tally["backend_refused"] += (
                sim.measure(
                    "backend: get wrapped data key (refused)",
                    lambda d=device: self.operator.data_key(d.device_id),
                ).status
                == 409
            )
            _inactive(sim, self.relying_party, earlier.get(device.device_id), tally, "inactive")
            # It heard the reset command (or hears it at its next connection): a device that
            # rotated goes back to its factory identity, the one it re-onboards with.
            device.factory_reset()
        return draining

    def _measured_converge(self, sim: Simulation):
        """The converge function, one device per invocation (batch size 1), each measured."""
        from fleetkey_local.functions import load_function

        handler = load_function("converge").handler

        def converge(event: dict, context: Any) -> Any:
            return sim.measure("converge: tear down a device", lambda: handler(event, context))

        return converge

    def _nothing_left_in_aws_iot(self, sim: Simulation) -> None:
        iot = self.stack.harness_iot
        ids = {d.device_id for d in self.fleet.devices}
        # Every certificate a device was given: factory, rotated, replaced and rolled back.
        certificates = {c for d in self.fleet.devices for c in d.certificate_ids}
        things = {
            thing["thingName"]
            for page in iot.get_paginator("list_things").paginate()
            for thing in page["things"]
        }
        registered = {
            c["certificateId"]
            for page in iot.get_paginator("list_certificates").paginate()
            for c in page["certificates"]
        }
        rogues = {d.certificate_id for d in self.fleet.rogues}
        others = "all refused rogues'" if registered <= rogues else "not all refused rogues'"
        sim.expect(
            not ids & things and not certificates & registered,
            f"AWS IoT lists no thing and no certificate of the fleet ({len(things)} things and "
            f"{len(registered)} certificates left, {others})",
        )
        step = max(1, len(self.fleet.devices) // 20)
        sample = self.fleet.devices[::step]
        gone = 0
        for device in sample:
            gone += _absent(lambda d=device: iot.describe_thing(thingName=d.device_id)) and _absent(
                lambda d=device: iot.describe_certificate(certificateId=d.certificate_id)
            )
        sim.expect(
            gone == len(sample),
            f"{gone}/{len(sample)} sampled devices: DescribeThing and DescribeCertificate "
            "find nothing",
        )


def _absent(call) -> bool:
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] == "ResourceNotFoundException"
    return False


@dataclass
class RecommissionAndTransfer:
    """The operator recommissions the fleet to a new owner (an ownership transfer); each device
    re-onboards through just-in-time registration with its factory certificate, and its new
    life has a new data key (epoch 2, bound to the new owner)."""

    operator: Operator
    relying_party: RelyingParty
    transport: IotTransport
    api: DeviceApi
    kms: Any  # the backend's own KMS client
    fleet: Fleet
    owner: str = NEW_OWNER
    name: str = f"operator recommissions the fleet to a new owner ({NEW_OWNER}); JITR again"

    def run(self, sim: Simulation) -> None:
        from fleetkey_local.data_keys import encrypt_telemetry

        devices = self.fleet.devices
        total = len(devices)
        allowlisted = 0
        for device in sim.each(devices, "recommission"):
            answer = sim.measure(
                "admin: recommission (ownership transfer)",
                lambda d=device: self.operator.recommission(d.device_id, owner=self.owner),
            )
            allowlisted += (
                answer.status == 200
                and answer.body.get("state") == "ALLOWLISTED"
                and answer.body.get("epoch") == 2
                and answer.body.get("owner") == self.owner
            )
        sim.expect(
            allowlisted == total, f"{allowlisted}/{total} ALLOWLISTED for {self.owner}, epoch 2"
        )

        onboarded, active, not_before = 0, 0, []
        for device in sim.each(devices, "re-onboarding"):
            outcome = sim.measure(
                "device: re-onboard (JITR)", lambda d=device: self.transport.first_connect(d)
            )
            onboarded += bool(outcome and outcome.get("status") == "accepted")
            view = sim.measure(
                "admin: read device", lambda d=device: self.operator.device(d.device_id)
            ).body
            active += (
                view.get("state") == "ACTIVE"
                and view.get("epoch") == 2
                and view.get("owner") == self.owner
                and view.get("certificate_id") == device.certificate_id
            )
            not_before.append(view.get("tokens_not_before"))
        sim.expect(onboarded == total, f"{onboarded}/{total} re-registered through JITR")
        sim.expect(
            active == total,
            f"{active}/{total} ACTIVE in epoch 2 for {self.owner}, with their factory certificate",
        )
        wait_for_tokens(not_before)

        # What each device kept of its first life's key (DataKeyRoundTrip).
        previous: dict = sim.state.get("data_keys") or {}
        connected, tokens, fresh, read = 0, 0, 0, 0
        for device in sim.each(devices, "new life"):
            connected += (
                sim.measure("device: connect", lambda d=device: self.transport.connect(d)) is None
            )
            tokens += _introspect(sim, self.relying_party, _issue(sim, self.api, device))
            answer = sim.measure(
                "device: get data key (first: KMS GenerateDataKey)",
                lambda d=device: self.api.data_key(d),
            )
            key = _open(sim, device, answer, epoch=2, owner=self.owner)
            before = previous.get(device.device_id)
            if key is None or before is None:
                continue
            fresh += answer[1]["key_ref"] != before.key_ref and key != before.key
            envelope = encrypt_telemetry(
                key, _telemetry(device, 2), device_id=device.device_id, epoch=2
            )
            read += _backend_reads(sim, self.operator, self.kms, device, envelope, life=2)
        sim.expect(connected == total, f"{connected}/{total} connect")
        sim.expect(tokens == total, f"{tokens}/{total} get tokens that introspect active")
        sim.expect(
            fresh == total,
            f"{fresh}/{total} have a new data key (epoch 2, another key_ref) sealed for "
            f"{self.owner}",
        )
        sim.expect(read == total, f"{read}/{total} telemetry envelopes read by the backend")
        self._old_life_unreadable(sim, previous)

    def _old_life_unreadable(self, sim: Simulation, previous: dict[str, DataKeyCopy]) -> None:
        from fleetkey_local.data_keys import EnvelopeUnreadable, backend_decrypt_telemetry

        device = self.fleet.devices[0]
        before = previous.get(device.device_id)
        grant = self.operator.data_key(device.device_id)
        try:
            if before is None or grant.status != 200:
                raise RuntimeError("nothing to compare")
            backend_decrypt_telemetry(self.kms, grant.body, before.envelope)
            readable = True
        except (EnvelopeUnreadable, RuntimeError):
            readable = False
        sim.expect(
            before is not None and grant.status == 200 and not readable,
            "telemetry of the previous life does not decrypt with the new life's key",
        )


@dataclass
class LifecycleAuditTrails:
    """Every device's chain still verifies after its whole life, and tells that life."""

    admin: AdminClient
    fleet: Fleet
    name: str = "operator verifies every device's audit trail after its whole lifecycle"

    def run(self, sim: Simulation) -> None:
        verified = 0
        trails: dict[str, list[dict]] = {}
        for device in sim.each(self.fleet.devices, "audit"):
            trail = sim.measure(
                "admin: read and verify audit", lambda d=device: self.admin.audit(d.device_id)
            )
            verified += trail["verified"]
            trails[device.device_id] = trail["records"]
        total = len(self.fleet.devices)
        sim.expect(verified == total, f"{verified}/{total} device chains verified")
        # The first device was suspended by the operator (and cloned), the last by tampering.
        first, last = self.fleet.devices[0], self.fleet.devices[-1]
        for device, prologue in ((first, ["registration_refused"]), (last, [])):
            records = trails[device.device_id]
            actions = [r["action"] for r in records]
            life = [
                "allowlisted",
                "registered",
                *prologue,
                "suspended",
                "resumed",
                "data_key_created",
                "decommissioned",
                "teardown_completed",
                "recommissioned",
                "registered",
                "data_key_created",
            ]
            sim.expect(
                _in_order(life, actions),
                f"{device.device_id}'s trail tells its life: {' > '.join(actions)}",
            )
        transfer = next(
            (r for r in trails[last.device_id] if r["action"] == "recommissioned"), {}
        ).get("details", {})
        sim.expect(
            transfer.get("previous_owner") is None
            and transfer.get("owner") == NEW_OWNER
            and transfer.get("transfer") is True
            and transfer.get("epoch") == 2,
            f"the recommission is recorded as an ownership transfer (to {NEW_OWNER}, epoch 2)",
        )


def _in_order(expected: list[str], actions: list[str]) -> bool:
    """Whether `expected` occurs in `actions` in that order (other actions may come between)."""
    remaining = iter(actions)
    return all(action in remaining for action in expected)


@dataclass
class LocalCloud:
    """What the lifecycle phases use beyond the device-facing API: the operator's and a relying
    party's signed access to the API, the stack (its lifecycle queue, and AWS IoT as the harness
    sees it) and a backend's own KMS client."""

    operator: Operator
    relying_party: RelyingParty
    stack: EmbeddedStack
    kms: Any


def lifecycle_phases(
    admin: AdminClient, transport: IotTransport, fleet: Fleet, api_url: str, cloud: LocalCloud
) -> list:
    """Every phase of a device's life that fleetkey covers, in order."""
    from fleetkey_local.validation_phase import DelegatedValidation  # it builds on this module

    api = DeviceApi(api_url)
    operator, relying_party = cloud.operator, cloud.relying_party
    return [
        RegisterManufacturerCas(admin, fleet),
        ImportManifest(admin, fleet),
        FirstConnection(transport, fleet),
        Reconnection(transport, fleet),
        RogueDevices(transport, admin, fleet),
        TokenVending(api_url, fleet),
        DelegatedValidation(api_url, transport, operator, fleet),
        VerifyAuditTrails(admin, fleet),
        SuspendAndResume(operator, relying_party, transport, api, fleet),
        TamperReports(transport, operator, admin, api, fleet),
        DataKeyRoundTrip(api, operator, cloud.kms, fleet),
        CertificateRotation(api, transport, admin, relying_party, scheduled_sweep(), fleet),
        Decommission(operator, relying_party, transport, api, cloud.stack, fleet),
        RecommissionAndTransfer(operator, relying_party, transport, api, cloud.kms, fleet),
        LifecycleAuditTrails(admin, fleet),
    ]
