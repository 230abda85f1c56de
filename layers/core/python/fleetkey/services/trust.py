"""Manufacturer CAs: registration with AWS IoT, disabling, and the trust-anchor cache JITR reads."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import TypeAdapter, ValidationError

from fleetkey.adapters.iot import IotRegistry
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.certificates import (
    certificate_id,
    load_certificate,
    validate_manufacturer_ca,
    verify_proof_of_possession,
)
from fleetkey.crypto.x509_policy import decoding
from fleetkey.domain.allowlist import CaName
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.models import CaStatus, ManufacturerCa
from fleetkey.errors import Conflict, InvalidRequest, NotFound
from fleetkey.store import schema
from fleetkey.store.dynamodb import ConditionFailed, Store

_ca_name = TypeAdapter(CaName)
# Names the admin API uses as path segments under /cas/.
RESERVED_CA_NAMES = frozenset({"registration-code"})


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    ca: ManufacturerCa
    certificate: x509.Certificate


class TrustAnchors:
    """Manufacturer CAs by AWS IoT CA id, for JITR.

    The snapshot is one Query, reused for `ttl_seconds`. A CA certificate never changes, so its
    parsed form is kept for the life of the process. A CA's status can change; the snapshot
    gives a fast refusal, and the registration transaction re-checks the status in DynamoDB, so
    a CA disabled a moment ago never admits a device.
    """

    def __init__(
        self,
        store: Store,
        ttl_seconds: int = 60,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._monotonic = monotonic
        self._by_id: dict[str, ManufacturerCa] = {}
        self._loaded_at: float | None = None
        self._parsed: dict[str, x509.Certificate] = {}

    def refresh(self) -> None:
        """Forget the snapshot; the next lookup reads the CAs again."""
        self._loaded_at = None

    def _refresh(self) -> None:
        self._by_id = {ca.iot_ca_id: ca for ca in self._store.list_cas()}
        self._loaded_at = self._monotonic()

    def get(self, iot_ca_id: str) -> TrustAnchor | None:
        """The manufacturer CA AWS IoT knows as `iot_ca_id`, None if fleetkey has none.

        AWS calls: 0 on a warm snapshot, else 1 (Query).

        Raises:
            InvalidCertificate: the stored CA certificate does not load (a decoder stricter than
                the one that admitted it).
        """
        stale = self._loaded_at is None or self._monotonic() - self._loaded_at > self._ttl
        # An unknown id may be a CA registered since the snapshot: look again before refusing,
        # since a refusal revokes the certificate for good. AWS IoT only auto-registers
        # certificates of CAs registered with it, so such misses are rare.
        if stale or iot_ca_id not in self._by_id:
            self._refresh()
        ca = self._by_id.get(iot_ca_id)
        if ca is None:
            return None
        parsed = self._parsed.get(ca.iot_ca_id)
        if parsed is None:
            parsed = self._parsed[ca.iot_ca_id] = load_certificate(ca.certificate_pem)
        return TrustAnchor(ca=ca, certificate=parsed)


class ManufacturerCaService:
    def __init__(self, store: Store, registry: IotRegistry, clock: Clock = utc_now) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock

    def registration_code(self) -> str:
        """The account's AWS IoT registration code: the CN of a CA's verification certificate."""
        return self._registry.registration_code()

    def get(self, name: str) -> ManufacturerCa:
        """Raises NotFound (also for names that could not name a CA)."""
        if len(name) > 63:
            raise NotFound("no manufacturer CA by that name")
        ca = self._store.get_ca(name)
        if ca is None:
            raise NotFound(f"no manufacturer CA named {name!r}")
        return ca

    def list(self) -> list[ManufacturerCa]:
        return self._store.list_cas()

    def register(
        self, name: str, ca_pem: str, verification_pem: str, *, actor: str
    ) -> ManufacturerCa:
        """Register a manufacturer CA with AWS IoT and record it as a trust anchor.

        Order: everything that can refuse the request is checked before AWS IoT is touched (the
        name, the certificate, the name's CA and the CA's name in DynamoDB, the proof of
        possession), so a refused request changes nothing anywhere. Then AWS IoT, inactive and
        without auto-registration (harmless if nothing follows); then the record, which claims
        the name and the CA id together; then AWS IoT is activated with auto-registration on. A
        retry after a failure at any step converges; registering the same CA under the same name
        again returns the existing record (and re-applies its status to AWS IoT).

        AWS calls: a new CA 6 (CA by name, name by CA id, registration code, RegisterCACertificate,
        the record's transaction, UpdateCACertificate); the same CA again 2; a refusal at most 2,
        none of them a write.

        Raises:
            InvalidRequest: bad or reserved name; InvalidCertificate: not a valid CA (including
            one whose fields do not decode), or a bad proof of possession; Conflict: the name
            belongs to another CA, or this CA is registered under another name.
        """
        try:
            name = _ca_name.validate_python(name)
        except ValidationError:
            raise InvalidRequest(
                "CA name must be 1-63 lowercase letters, digits or dashes"
            ) from None
        if name in RESERVED_CA_NAMES:
            raise InvalidRequest(f"{name!r} is a reserved name")
        now = self._clock()
        with decoding("CA certificate"):
            ca_cert = validate_manufacturer_ca(ca_pem, now)
            ca_id = certificate_id(ca_cert)
            subject = ca_cert.subject.rfc4514_string()
        existing = self._store.get_ca(name)
        if existing is not None and existing.iot_ca_id != ca_id:
            raise Conflict(f"manufacturer CA name {name!r} is taken by another CA")
        if existing is None:
            # Checked before AWS IoT is touched: registering this CA again there would change
            # the CA another name holds (moto replaced it, deactivated, stopping its JITR).
            other = self._store.ca_name_for(ca_id)
            if other is not None and other != name:
                raise Conflict(f"this CA is already registered as {other!r}")
            code = self._registry.registration_code()
            with decoding("verification certificate"):
                verify_proof_of_possession(ca_cert, verification_pem, code, now)
            existing = self._create(name, ca_cert, subject, verification_pem, ca_id, now, actor)
        # Always (re)applied, so a retry after a failure here converges.
        self._registry.set_ca_active(existing.iot_ca_id, existing.status is CaStatus.ACTIVE)
        return existing

    def _create(
        self,
        name: str,
        ca_cert: x509.Certificate,
        subject: str,
        verification_pem: str,
        ca_id: str,
        now: datetime,
        actor: str,
    ) -> ManufacturerCa:
        """AWS IoT (inactive), then the record. A concurrent registration of the same CA under
        another name loses at the record; its RegisterCACertificate was answered
        ResourceAlreadyExists and changed nothing.

        Raises:
            Conflict: the name or the CA was claimed concurrently.
        """
        pem = ca_cert.public_bytes(Encoding.PEM).decode()
        iot_ca_id = self._registry.register_ca(pem, verification_pem, ca_id)
        at = timestamp(now)
        record = ChainHead().next_record(
            subject=schema.ca_subject(name),
            at=at,
            action="ca_registered",
            actor=actor,
            details={"iot_ca_id": iot_ca_id, "subject": subject},
        )
        ca = ManufacturerCa(
            name=name,
            iot_ca_id=iot_ca_id,
            certificate_pem=pem,
            status=CaStatus.ACTIVE,
            audit_head=ChainHead(record.seq, record.hash),
            registered_at=at,
        )
        try:
            self._store.create_ca(ca, record)
        except ConditionFailed as failure:
            current = failure.items.get("ca")
            if current is not None and current["iot_ca_id"] == iot_ca_id:
                return self._store.ca_from_item(current)  # a retry: already recorded
            if "ca_id" in failure.failed:
                other = failure.items.get("ca_id", {}).get("name")
                raise Conflict(f"this CA is already registered as {other!r}") from None
            raise Conflict(f"manufacturer CA name {name!r} is taken by another CA") from None
        return ca

    def set_enabled(self, name: str, enabled: bool, *, actor: str) -> ManufacturerCa:
        """Disable (or re-enable) a manufacturer CA: fleetkey refuses its devices from the moment
        the record changes, and AWS IoT stops auto-registering its certificates.

        AWS IoT is brought to the recorded status, then the record is read again: if a concurrent
        call changed it meanwhile, AWS IoT is brought to the newer status, so the two agree.

        Raises:
            NotFound: no such CA; Conflict: it kept changing.
        """
        wanted = CaStatus.ACTIVE if enabled else CaStatus.DISABLED
        changed = False
        for _ in range(4):
            ca = self.get(name)
            if ca.status is not wanted and not changed:
                record = ca.audit_head.next_record(
                    subject=schema.ca_subject(name),
                    at=timestamp(self._clock()),
                    action="ca_enabled" if enabled else "ca_disabled",
                    actor=actor,
                    details={"iot_ca_id": ca.iot_ca_id},
                )
                try:
                    ca = self._store.set_ca_status(ca, wanted, record)
                    changed = True
                except ConditionFailed:
                    continue
            self._registry.set_ca_active(ca.iot_ca_id, ca.status is CaStatus.ACTIVE)
            latest = self.get(name)
            if latest.status is ca.status:
                return latest
        raise Conflict(f"manufacturer CA {name!r} kept changing; try again")
