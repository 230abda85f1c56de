"""The simulated fleet: devices with their own keys and factory certificates, and the phases of
their life against the local stack."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from fleetkey_cli.client import AdminClient
from fleetkey_local.iot import certificate_id
from fleetkey_local.pki import CertificateAuthority, PrivateKey, pem
from fleetkey_local.simulator import Simulation

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

    @property
    def serial_number(self) -> str:
        return f"SN-{self.device_id}"

    @property
    def certificate_pem(self) -> str:
        return pem(self.certificate)

    @property
    def certificate_id(self) -> str:
        return certificate_id(self.certificate_pem)


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


class IotTransport:
    """How devices reach AWS IoT Core: `first_connect` returns the registration outcome (or None
    when AWS IoT refused the connection outright), `connect` a refusal reason or None."""

    def first_connect(self, device: SimulatedDevice) -> dict | None: ...

    def connect(self, device: SimulatedDevice, client_id: str | None = None) -> str | None: ...


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
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    # `url` is one the fleet built from the local gateway's http(s) base URL
    request = urllib.request.Request(  # noqa: S310
        url,
        data=urllib.parse.urlencode(form).encode(),
        method="POST",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class TokenVending:
    """Every device proves its identity with its own key and gets an access token; an IoT
    application verifies each one offline through the JWKS; forged and replayed assertions and
    assertions for another device are refused."""

    api_url: str
    fleet: Fleet
    name: str = "devices get access tokens; a relying party verifies them through the JWKS"

    def _assertion(self, device: SimulatedDevice, **options) -> str:
        from fleetkey_local.device import client_assertion

        if device.profile == "infusion-pump":
            options.setdefault("firmware_version", PUMP_FIRMWARE[0])
            options.setdefault("firmware_sha256", PUMP_FIRMWARE[1])
        return client_assertion(
            device.key, device.certificate_id, device.device_id, self.api_url, **options
        )

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
        tampered = (
            f"{head}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{signature}"
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


def lifecycle_phases(
    admin: AdminClient, transport: IotTransport, fleet: Fleet, api_url: str
) -> list:
    """Every phase of a device's life that fleetkey covers so far, in order."""
    return [
        RegisterManufacturerCas(admin, fleet),
        ImportManifest(admin, fleet),
        FirstConnection(transport, fleet),
        Reconnection(transport, fleet),
        RogueDevices(transport, admin, fleet),
        TokenVending(api_url, fleet),
        VerifyAuditTrails(admin, fleet),
    ]
