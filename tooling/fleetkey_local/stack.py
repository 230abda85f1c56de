"""The embedded stack: fleetkey's services wired to an AWS endpoint (moto in-process or a moto
server), with AWS IoT's just-in-time registration emulated in front of the registration service.
Used by `make demo`, the benchmarks and the tests."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from cryptography import x509

from fleetkey.adapters.aws import CLIENT_CONFIG
from fleetkey.composition import Components
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.events import CertificateRegisteredEvent
from fleetkey.services.data_keys import DataKeyService
from fleetkey.services.lifecycle import LifecycleService
from fleetkey.services.registration import RegistrationOutcome
from fleetkey.services.signing_keys import KeyTrust
from fleetkey.settings import Settings
from fleetkey_local import iot as iot_emulation
from fleetkey_local import moto_patches
from fleetkey_local.pki import CertificateAuthority, PrivateKey, pem
from fleetkey_local.provision import (
    create_data_key_key,
    create_iot_profiles,
    create_table,
    create_token_key,
    provisioned_environment,
    publish_demo_firmware,
)
from fleetkey_local.queues import QueueWorker, provision_lifecycle_queues

if TYPE_CHECKING:
    from fleetkey.services.pki import PkiService
    from fleetkey.services.rotation import RotationService
    from fleetkey.services.validations import ValidationService
    from fleetkey_local.iot_limits import IotRateLimits

REGION = "eu-west-1"
ACCOUNT = "123456789012"
TABLE = "fleetkey-local"
# The issuing CA the local stack starts with (`fleetkey pki init` with these arguments).
LOCAL_ISSUING_CA_SUBJECT = "CN=fleetkey local issuing CA,O=fleetkey"
LOCAL_ISSUING_CA_KEY_SPEC = "ECC_NIST_P256"
LOCAL_ISSUING_CA_VALIDITY_DAYS = 3650


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
    # A recommission need not wait out the converge function's timeout here: the local stack
    # runs one lifecycle worker, so no two copies of a teardown ever run at once.
    settings: Settings = field(
        default_factory=lambda: Settings(
            table_name=TABLE, region=REGION, recommission_quiet_seconds=0
        )
    )
    account: str = ACCOUNT
    # AWS IoT's per-API rate limits (`fleetkey_local.iot_limits.IotRateLimits`) on the services'
    # IoT client; None (the default): unlimited. The harness's IoT client is never limited.
    iot_limits: IotRateLimits | None = None

    def __post_init__(self) -> None:
        moto_patches.apply()
        self.dynamodb = self.make_client("dynamodb")
        self.iot = self.make_client("iot")
        if self.iot_limits is not None:
            self.iot_limits.install(self.iot)
        self.harness_iot = self.make_client("iot")
        self.kms = self.make_client("kms")
        self.iot_data = self.make_client("iot-data")
        self.sqs = self.make_client("sqs")
        self.key_trust = KeyTrust.from_settings(self.settings)
        self._build()

    def _build(self) -> None:
        """The services, from the composition root every function uses (with this stack's
        clients)."""
        self.components = Components(
            self.settings,
            dynamodb=self.dynamodb,
            iot=self.iot,
            kms=self.kms,
            iot_data=self.iot_data,
            sqs=self.sqs,
        )
        built = self.components
        self.store = built.store
        self.registry = built.registry
        self.anchors = built.anchors
        self.registration = built.registration
        self.cas = built.cas
        self.allowlist = built.allowlist
        self.devices = built.devices
        self.signing_keys = built.signing_keys
        self.tokens = built.tokens
        self.introspection = built.introspection

    @property
    def lifecycle(self) -> LifecycleService:
        return self.components.lifecycle

    @property
    def data_keys(self) -> DataKeyService:
        return self.components.data_keys

    @property
    def pki(self) -> PkiService:
        return self.components.pki

    @property
    def rotation(self) -> RotationService:
        return self.components.rotation

    @property
    def validations(self) -> ValidationService:
        return self.components.validations

    def provision(self) -> EmbeddedStack:
        create_table(self.make_client("dynamodb"), self.settings.table_name)
        create_iot_profiles(self.harness_iot, self.settings.region, self.account)
        # The lifecycle queue (with its dead-letter queue) and the data-key KMS key, as the CDK
        # stack creates them; the services are rebuilt to see their settings.
        queue_url, self.lifecycle_dead_letter_queue_url = provision_lifecycle_queues(
            self.make_client("sqs")
        )
        self.settings = dataclasses.replace(
            self.settings,
            lifecycle_queue_url=queue_url,
            data_key_kms_key_id=create_data_key_key(self.make_client("kms")),
        )
        self._build()
        # The stack's first token signing key, as the CDK stack creates it (same tags, same key
        # policy). Unlike a deployed stack, whose registry stays empty until the first rotation
        # (the functions read the first key from FLEETKEY_TOKEN_KEY_ID), the local stack writes
        # it into the registry here, so the locally loaded functions need no key id setting.
        self.token_key_id = create_token_key(self.make_client("kms"), self.key_trust)
        self.signing_keys.initialize(self.token_key_id, actor="provisioning")
        # The issuing CA, as an operator's first `fleetkey pki init` makes it (a deployed stack
        # has none until then): devices of the local stack can rotate from the start.
        self.issuing_ca = self.pki.init(
            key_spec=LOCAL_ISSUING_CA_KEY_SPEC,
            subject=LOCAL_ISSUING_CA_SUBJECT,
            validity_days=LOCAL_ISSUING_CA_VALIDITY_DAYS,
            actor="provisioning",
        )
        # The demo fleet's firmware release, as the release role publishes one on a deployed
        # stack: the pumps' attested tokens need it.
        self.demo_firmware = publish_demo_firmware(self.components)
        return self

    def service_clients(self) -> tuple:
        return (self.dynamodb, self.iot, self.kms, self.iot_data, self.sqs)

    def environment(self) -> dict[str, str]:
        """What the locally loaded functions need in their environment beyond
        `server.function_environment`: the provisioned queue and data-key key."""
        return {
            **provisioned_environment(
                lifecycle_queue_url=self.settings.lifecycle_queue_url or "",
                data_key_kms_key_id=self.settings.data_key_kms_key_id or "",
            ),
            "FLEETKEY_RECOMMISSION_QUIET_SECONDS": str(self.settings.recommission_quiet_seconds),
        }

    def lifecycle_worker(self, function: Any = "converge", **options: Any) -> QueueWorker:
        """Lambda's SQS event source for the converge function, on this stack's queue."""
        return QueueWorker(
            self.make_client("sqs"),
            self.settings.lifecycle_queue_url,
            function,
            region=self.settings.region,
            account=self.account,
            **options,
        )

    def drain_lifecycle(self, timeout: float = 60.0) -> bool:
        """Run the converge service on everything queued, in this process, until the queue is
        empty (a test's and the demo's stand-in for the event source): True when it is."""
        return self.lifecycle_worker(function=self._converge_in_process).drain(timeout)

    def sweep_rotations(self, now: datetime | None = None) -> dict:
        """One run of the rotation sweep (what the scheduled rotation_events function does every
        minute), in this process, as of `now` (default: the clock's now): rollbacks past their
        deadline, retired certificates' deletion, renewal commands, the CRL's refresh. Its
        counts."""
        return self.components.rotation.sweep(now)

    def _converge_in_process(self, event: dict, context: Any) -> dict:
        failures = []
        for record in event["Records"]:
            device_id = json.loads(record["body"])["device_id"]
            if not self.lifecycle.converge(device_id):
                failures.append({"itemIdentifier": record["messageId"]})
        return {"batchItemFailures": failures}

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
