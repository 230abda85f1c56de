"""The embedded stack: fleetkey's services wired to an AWS endpoint (moto in-process or a moto
server), with AWS IoT's just-in-time registration emulated in front of the registration service.
Used by `make demo`, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from cryptography import x509

from fleetkey.adapters.aws import CLIENT_CONFIG
from fleetkey.adapters.iot import IotRegistry
from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.events import CertificateRegisteredEvent
from fleetkey.services.allowlist import AllowlistService
from fleetkey.services.devices import DeviceService
from fleetkey.services.introspection import IntrospectionService
from fleetkey.services.registration import RegistrationOutcome, RegistrationService
from fleetkey.services.signing_keys import KeyTrust, SigningKeys
from fleetkey.services.tokens import TokenService
from fleetkey.services.trust import ManufacturerCaService, TrustAnchors
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import Store
from fleetkey_local import iot as iot_emulation
from fleetkey_local import moto_patches
from fleetkey_local.pki import CertificateAuthority, PrivateKey, pem
from fleetkey_local.provision import create_iot_profiles, create_table, create_token_key

REGION = "eu-west-1"
ACCOUNT = "123456789012"
TABLE = "fleetkey-local"


def client_factory(endpoint_url: str | None = None, region: str = REGION) -> Callable:
    # A session of its own, so hooks on boto3's default session (which the functions use) do
    # not see the harness's calls.
    session = boto3.session.Session(region_name=region)

    def make(service: str):
        return session.client(service, endpoint_url=endpoint_url, config=CLIENT_CONFIG)

    return make


@dataclass
class EmbeddedStack:
    """`make_client(service)` gives a new boto3 client; the services get their own clients (so
    their calls can be counted or failed on purpose), the emulation and the harness others."""

    make_client: Callable
    settings: Settings = field(default_factory=lambda: Settings(table_name=TABLE, region=REGION))
    account: str = ACCOUNT

    def __post_init__(self) -> None:
        moto_patches.apply()
        self.dynamodb = self.make_client("dynamodb")
        self.iot = self.make_client("iot")
        self.harness_iot = self.make_client("iot")
        self.store = Store(self.settings.table_name, client=self.dynamodb)
        self.registry = IotRegistry(client=self.iot)
        self.anchors = TrustAnchors(self.store, self.settings.trust_anchor_cache_seconds)
        self.registration = RegistrationService(
            self.settings, self.store, self.registry, self.anchors
        )
        self.cas = ManufacturerCaService(self.store, self.registry)
        self.allowlist = AllowlistService(self.settings, self.store)
        self.devices = DeviceService(self.store)
        self.kms = self.make_client("kms")
        self.key_trust = KeyTrust.from_settings(self.settings)
        self.signing_keys = SigningKeys(self.store, KmsKeys(client=self.kms), trust=self.key_trust)
        self.tokens = TokenService(self.settings, self.store, self.signing_keys)
        self.introspection = IntrospectionService(self.settings, self.store, self.signing_keys)

    def provision(self) -> EmbeddedStack:
        create_table(self.make_client("dynamodb"), self.settings.table_name)
        create_iot_profiles(self.harness_iot, self.settings.region, self.account)
        # The stack's first token signing key, as the CDK stack creates it (same tags, same key
        # policy). Unlike a deployed stack, whose registry stays empty until the first rotation
        # (the functions read the first key from FLEETKEY_TOKEN_KEY_ID), the local stack writes
        # it into the registry here, so the locally loaded functions need no key id setting.
        self.token_key_id = create_token_key(self.make_client("kms"), self.key_trust)
        self.signing_keys.initialize(self.token_key_id, actor="provisioning")
        return self

    def service_clients(self) -> tuple:
        return (self.dynamodb, self.iot, self.kms)

    # ---- the operator's side ----------------------------------------------------------------

    def register_ca(
        self, ca: CertificateAuthority, name: str | None = None, actor: str = "operator"
    ):
        code = self.harness_iot.get_registration_code()["registrationCode"]
        proof = pem(ca.verification_certificate(code))
        return self.cas.register(name or ca.name, ca.pem, proof, actor=actor)

    # ---- AWS IoT's side ---------------------------------------------------------------------

    def first_connect(self, device_pem: str, ca_pem: str) -> dict | None:
        """A device connects for the first time: the certificate-registered event, if any."""
        return iot_emulation.auto_register(self.harness_iot, device_pem, ca_pem, self.account)

    def register(self, event: dict) -> RegistrationOutcome:
        return self.registration.register(CertificateRegisteredEvent.model_validate(event))

    def manufacture(
        self,
        ca: CertificateAuthority,
        device_id: str,
        *,
        serial_number: str | None = None,
        profile: str = "telemetry-sensor",
        actor: str = "operator",
        **issue: Any,
    ) -> tuple[PrivateKey, x509.Certificate, dict]:
        """A device of `ca`'s factory: allow-listed, given its factory certificate (`issue` goes
        to `CertificateAuthority.issue_device`), connected for the first time. Returns its key,
        its certificate and the certificate-registered event AWS IoT emits (not yet handled)."""
        serial = serial_number or f"SN-{device_id}"
        self.allowlist.add(
            AllowlistEntry(
                device_id=device_id, serial_number=serial, manufacturer_ca=ca.name, profile=profile
            ),
            actor=actor,
        )
        key, cert = ca.issue_device(device_id, serial_number=serial, **issue)
        event = self.first_connect(pem(cert), ca.pem)
        if event is None:
            raise RuntimeError(f"AWS IoT did not register {device_id}'s certificate")
        return key, cert, event

    def certificate_status(self, certificate_id: str) -> str:
        return self.harness_iot.describe_certificate(certificateId=certificate_id)[
            "certificateDescription"
        ]["status"]
