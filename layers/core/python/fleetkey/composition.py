"""The composition root: the one place that builds fleetkey's services from settings and AWS
clients. Every Lambda handler (`components()`) and the local stack (`Components(...)` with its own
clients) build services here, so they are wired the same way.

Services are built on first use (a function builds only what it calls: the token function never
imports the data-key or lifecycle code), and live as long as the process (Lambda's execution
environment), with their caches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

from fleetkey.clock import Clock, utc_now
from fleetkey.settings import Settings

if TYPE_CHECKING:
    from fleetkey.adapters.iot import IotRegistry
    from fleetkey.adapters.iot_data import DeviceChannel
    from fleetkey.domain.models import Device
    from fleetkey.ports import LifecycleQueue
    from fleetkey.services.allowlist import AllowlistService
    from fleetkey.services.data_keys import DataKeyService
    from fleetkey.services.devices import DeviceService
    from fleetkey.services.firmware import FirmwareService
    from fleetkey.services.introspection import IntrospectionService
    from fleetkey.services.lifecycle import LifecycleService
    from fleetkey.services.pki import PkiService
    from fleetkey.services.registration import DecisionObserver, RegistrationService
    from fleetkey.services.rotation import RotationService
    from fleetkey.services.signing_keys import SigningKeys
    from fleetkey.services.tokens import TokenService
    from fleetkey.services.trust import ManufacturerCaService, TrustAnchors
    from fleetkey.services.validations import OutcomeObserver, ValidationService
    from fleetkey.store.dynamodb import DynamoStore

LifecycleObserver = Callable[[str, "Device"], None]


class Components:
    """fleetkey's services over one table, AWS IoT, KMS, iot-data and the lifecycle queue.
    Clients left None are real boto3 clients, built when first needed."""

    def __init__(
        self,
        settings: Settings,
        *,
        dynamodb: Any = None,
        iot: Any = None,
        kms: Any = None,
        iot_data: Any = None,
        sqs: Any = None,
        clock: Clock = utc_now,
        on_decision: DecisionObserver | None = None,
        on_lifecycle_change: LifecycleObserver | None = None,
        on_rotation_event: Callable[[str], None] | None = None,
        on_validation_outcome: OutcomeObserver | None = None,
    ) -> None:
        self.settings = settings
        self._clients = {"dynamodb": dynamodb, "iot": iot, "kms": kms, "iot-data": iot_data}
        self._sqs = sqs
        self._clock = clock
        self._on_decision = on_decision
        self._on_lifecycle_change = on_lifecycle_change
        self._on_rotation_event = on_rotation_event
        self._on_validation_outcome = on_validation_outcome

    # ---- adapters ------------------------------------------------------------------------------

    @cached_property
    def store(self) -> DynamoStore:
        from fleetkey.store.dynamodb import DynamoStore

        return DynamoStore(
            self.settings.table_name, client=self._clients["dynamodb"], region=self.settings.region
        )

    @cached_property
    def registry(self) -> IotRegistry:
        from fleetkey.adapters.iot import IotRegistry

        return IotRegistry(client=self._clients["iot"], region=self.settings.region)

    @cached_property
    def channel(self) -> DeviceChannel:
        from fleetkey.adapters.iot_data import DeviceChannel

        return DeviceChannel(
            client=self._clients["iot-data"],
            iot_client=self._clients["iot"],
            endpoint_url=self.settings.iot_data_endpoint,
            region=self.settings.region,
        )

    @cached_property
    def anchors(self) -> TrustAnchors:
        from fleetkey.services.trust import TrustAnchors

        return TrustAnchors(self.store.anchors, self.settings.trust_anchor_cache_seconds)

    # ---- services ------------------------------------------------------------------------------

    @cached_property
    def signing_keys(self) -> SigningKeys:
        from fleetkey.adapters.kms import KmsKeys
        from fleetkey.services.signing_keys import KeyTrust, SigningKeys

        return SigningKeys(
            self.store.signing_keys,
            KmsKeys(client=self._clients["kms"], region=self.settings.region),
            trust=KeyTrust.from_settings(self.settings),
            clock=self._clock,
        )

    @cached_property
    def allowlist(self) -> AllowlistService:
        from fleetkey.services.allowlist import AllowlistService

        return AllowlistService(self.settings, self.store.devices, clock=self._clock)

    @cached_property
    def devices(self) -> DeviceService:
        from fleetkey.services.devices import DeviceService

        store = self.store
        return DeviceService(store.devices, store.audit, store.anchors, store.certificates)

    @cached_property
    def cas(self) -> ManufacturerCaService:
        from fleetkey.services.trust import ManufacturerCaService

        return ManufacturerCaService(self.store.anchors, self.registry, clock=self._clock)

    @cached_property
    def firmware(self) -> FirmwareService:
        from fleetkey.services.firmware import FirmwareService

        return FirmwareService(self.store.firmware, clock=self._clock)

    @cached_property
    def tokens(self) -> TokenService:
        from fleetkey.services.tokens import TokenService

        store = self.store
        return TokenService(
            self.settings,
            store.devices,
            store.token_records,
            self.signing_keys,
            self._clock,
            firmware=store.firmware,
            validations=store.validations,
            on_validation_outcome=self._on_validation_outcome,
        )

    @cached_property
    def validations(self) -> ValidationService:
        from fleetkey.services.validations import ValidationService

        return ValidationService(
            self.store.devices,
            self.store.validations,
            self.channel,
            clock=self._clock,
            on_outcome=self._on_validation_outcome,
        )

    @cached_property
    def introspection(self) -> IntrospectionService:
        from fleetkey.services.introspection import IntrospectionService

        store = self.store
        return IntrospectionService(
            self.settings,
            store.devices,
            store.token_records,
            store.audit,
            self.signing_keys,
            self._clock,
        )

    @cached_property
    def registration(self) -> RegistrationService:
        from fleetkey.services.registration import RegistrationService

        store = self.store
        return RegistrationService(
            self.settings,
            store.devices,
            store.certificates,
            store.audit,
            self.registry,
            self.anchors,
            clock=self._clock,
            on_decision=self._on_decision,
        )

    @cached_property
    def lifecycle_queue(self) -> LifecycleQueue | None:
        from fleetkey.adapters.queue import SqsLifecycleQueue

        url = self.settings.lifecycle_queue_url
        return (
            SqsLifecycleQueue(url, client=self._sqs, region=self.settings.region) if url else None
        )

    @cached_property
    def lifecycle(self) -> LifecycleService:
        from fleetkey.services.lifecycle import LifecycleService

        queue = self.lifecycle_queue
        return LifecycleService(
            self.settings,
            self.store.devices,
            self.registry,
            self.channel,
            queue,
            self.store.data_keys,
            self.store.certificates,
            clock=self._clock,
            on_change=self._on_lifecycle_change,
            revocations=self.store.pki,
        )

    @cached_property
    def data_keys(self) -> DataKeyService:
        from fleetkey.adapters.data_keys import KmsDataKeys
        from fleetkey.services.data_keys import DataKeyService

        return DataKeyService(
            self.settings,
            self.store.devices,
            self.store.data_keys,
            KmsDataKeys(client=self._clients["kms"], region=self.settings.region),
            self.tokens,
            clock=self._clock,
        )

    @cached_property
    def pki(self) -> PkiService:
        from fleetkey.adapters.kms import KmsDigestSigner, KmsKeys
        from fleetkey.services.pki import PkiService

        keys = KmsKeys(client=self._clients["kms"], region=self.settings.region)
        return PkiService(
            self.settings,
            self.store.pki,
            keys,
            self.registry,
            lambda key_id: KmsDigestSigner(key_id, client=keys.client),
            self.store.audit,
            clock=self._clock,
        )

    @cached_property
    def rotation(self) -> RotationService:
        from fleetkey.services.rotation import RotationService

        return RotationService(
            self.settings,
            self.store.devices,
            self.pki,
            self.store.pki,
            self.tokens,
            self.registry,
            self.channel,
            self.lifecycle_queue,
            clock=self._clock,
            on_event=self._on_rotation_event,
            anchors=self.store.anchors,
        )


def count_rotation_event(name: str) -> None:
    """The rotation metrics (RotationsRequested, RotationsCommitted, ...), one per event."""
    from aws_lambda_powertools.metrics import MetricUnit

    from fleetkey.observability import metrics

    metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)


def count_lifecycle_change(action: str, device: Device) -> None:
    """The lifecycle metrics, one per committed change (Powertools, flushed by the handler)."""
    from aws_lambda_powertools.metrics import MetricUnit

    from fleetkey.observability import metrics

    name = LIFECYCLE_METRICS.get(action)
    if name is not None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)


LIFECYCLE_METRICS = {
    "suspended": "DevicesSuspended",
    "resumed": "DevicesResumed",
    "decommissioned": "DevicesDecommissioned",
    "recommissioned": "DevicesRecommissioned",
    "ownership_transferred": "OwnershipTransfers",
    "teardown_completed": "TeardownsCompleted",
    # Not a change: a convergence found the teardown pending past its deadline (the
    # TeardownsOverdue alarm).
    "teardown_overdue": "TeardownsOverdue",
}


def count_validation_outcome(status: str, reason: str | None) -> None:
    """The validation outcome metrics, one per validation, counted by the invocation whose write
    decided it (the token function for an answer, the validations function for a device refused
    when asked): `ValidationsValidated`, and `ValidationsRefused` by `reason`. Each is a metric
    document of its own, printed as soon as the write committed (an invocation that then times
    out still counted it), and its `reason` lands on no other metric of the invocation
    (`TokensRefused` by `error`, `ValidationsRequested`). `expired` is not counted: it is computed
    on read, never decided."""
    from fleetkey.observability import count_alone

    name = VALIDATION_METRICS.get(status)
    if name is None:
        return
    if reason is None:
        count_alone(name)
    else:
        count_alone(name, reason=reason)


VALIDATION_METRICS = {
    "validated": "ValidationsValidated",
    "refused": "ValidationsRefused",  # + dimension `reason`
}


def from_environ(**options: Any) -> Components:
    """Components from the function's environment, counting lifecycle changes, rotation events
    and validation outcomes as metrics."""
    options.setdefault("on_lifecycle_change", count_lifecycle_change)
    options.setdefault("on_rotation_event", count_rotation_event)
    options.setdefault("on_validation_outcome", count_validation_outcome)
    return Components(Settings.from_environ(), **options)


@lru_cache(maxsize=1)
def components() -> Components:
    """The process's components (built at the first call). A function builds its own through
    `from_environ` in its handler module (cached there), so that functions loaded side by side
    in one process, as the local stack and the tests do, never share clients or caches."""
    return from_environ()
