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
from fleetkey.ports import CaTaken, StaleRecord, TrustAnchorStore, Write
from fleetkey.store import schema

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

    An id the snapshot does not know is confirmed with one strongly consistent GetItem of its
    `CAID#` item before it is answered None, and the snapshot is reloaded only when that item
    exists (a CA registered since the snapshot). So events naming CAs fleetkey does not manage
    (another team's, in the same account) cost one GetItem each, never a Query of every CA, and
    a None is never stale: `unknown_ca` is recorded as a final decision (the certificate is left
    alone, not revoked), which is safe only because AWS IoT auto-registers a fleetkey CA's
    certificates only after the CA's record exists (`ManufacturerCaService.register`).
    """

    def __init__(
        self,
        store: TrustAnchorStore,
        ttl_seconds: int = 60,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._monotonic = monotonic
        self._by_id: dict[str, ManufacturerCa] = {}
        self._loaded_at: float | None = None
        self._parsed: dict[str, x509.Certificate] = {}

    def active_check(self, ca: ManufacturerCa) -> Write:
        """A check, for a registration's transaction, that `ca` is still ACTIVE as read."""
        return self._store.active_check(ca)

    def refresh(self) -> None:
        """Forget the snapshot; the next lookup reads the CAs again."""
        self._loaded_at = None

    def _refresh(self) -> None:
        self._by_id = {ca.iot_ca_id: ca for ca in self._store.list()}
        self._loaded_at = self._monotonic()

    def get(self, iot_ca_id: str) -> TrustAnchor | None:
        """The manufacturer CA AWS IoT knows as `iot_ca_id`, None if fleetkey has none.

        AWS calls: 0 for an id in a warm snapshot; 1 (Query) when the snapshot is cold or older
        than `ttl_seconds`; for an id a warm snapshot lacks, 1 (GetItem of its `CAID#` item),
        plus 1 (Query) when that item exists.

        Raises:
            InvalidCertificate: the stored CA certificate does not load (a decoder stricter than
                the one that admitted it).
        """
        stale = self._loaded_at is None or self._monotonic() - self._loaded_at > self._ttl
        if not stale and iot_ca_id not in self._by_id:
            # Possibly registered since the snapshot. A point read decides, so the Query of
            # every CA runs only when there is something new to load (not once per event of
            # someone else's CA), and a None is as fresh as DynamoDB.
            stale = self._store.claim_for(iot_ca_id) is not None
        if stale:
            self._refresh()
        ca = self._by_id.get(iot_ca_id)
        if ca is None:
            return None
        parsed = self._parsed.get(ca.iot_ca_id)
        if parsed is None:
            parsed = self._parsed[ca.iot_ca_id] = load_certificate(ca.certificate_pem)
        return TrustAnchor(ca=ca, certificate=parsed)


class ManufacturerCaService:
    def __init__(
        self, store: TrustAnchorStore, registry: IotRegistry, clock: Clock = utc_now
    ) -> None:
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
        ca = self._store.get(name)
        if ca is None:
            raise NotFound(f"no manufacturer CA named {name!r}")
        return ca

    def list(self) -> list[ManufacturerCa]:
        return self._store.list()

    def register(
        self, name: str, ca_pem: str, verification_pem: str, *, actor: str
    ) -> ManufacturerCa:
        """Register a manufacturer CA with AWS IoT and record it as a trust anchor.

        Order: everything that can refuse the request is checked before AWS IoT is written (the
        name, the certificate, the name's CA and the CA id's owner in DynamoDB, whether AWS IoT
        already has the CA, the proof of possession), so a refused request changes nothing
        anywhere. Then the CA id is claimed for this name (`CAID#<id>`, "registering"); then AWS
        IoT, inactive and without auto-registration (harmless if nothing follows); then the
        record, which turns the claim into the CA id's final item and claims the name; then AWS
        IoT is activated with auto-registration on, and the record read again so a concurrent
        disable wins (`_apply_status`). A retry after a failure at any step converges;
        registering the same CA under the same name again returns the existing record.

        A CA that AWS IoT already has while fleetkey has neither record nor claim for it was
        registered outside fleetkey (another team's): it is refused, never adopted, since its
        devices would be fleetkey's to revoke. The proof of possession cannot tell: its CN is the
        account-wide registration code, so another team's old proof verifies too. Only a
        registration that holds the claim adopts the CA it finds in AWS IoT (its own earlier
        attempt, when RegisterCACertificate reached AWS but its answer was lost).

        AWS calls: a new CA 9 (CA by name, CA id's owner, DescribeCACertificate, registration
        code, the claim's TransactWriteItems, RegisterCACertificate, the record's
        TransactWriteItems, UpdateCACertificate, CA by name again); a retry holding the claim
        skips DescribeCACertificate; the same CA again 3 (CA by name, UpdateCACertificate, CA by
        name again), more if the status keeps changing; a refusal at most 3 (CA by name, CA id's
        owner, DescribeCACertificate, or the claim holder's record), none of them a write. A
        claim left by a registration refused after AWS IoT heard of the CA (its name went to
        another CA) is taken over by the next registration of that CA, which adopts the inactive
        CA in AWS IoT instead of leaving it blocked.

        Raises:
            InvalidRequest: bad or reserved name; InvalidCertificate: not a valid CA (including
            one whose fields do not decode), or a bad proof of possession; Conflict: the name
            belongs to another CA, this CA is registered (or being registered) under another
            name, AWS IoT already has this CA from outside fleetkey, or its status kept changing.
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
        existing = self._store.get(name)
        if existing is not None and existing.iot_ca_id != ca_id:
            raise Conflict(f"manufacturer CA name {name!r} is taken by another CA")
        if existing is None:
            # Checked before AWS IoT is touched: registering this CA again there would change
            # the CA another name holds (moto replaced it, deactivated, stopping its JITR).
            claim = self._store.claim_for(ca_id)
            stale_claim_of: str | None = None
            if claim is not None and claim[0] != name:
                owner, registering = claim
                if not registering or self._claim_may_finish(owner, ca_id):
                    raise Conflict(f"this CA is already registered as {owner!r}")
                # A claim whose name went to another CA (its registration was refused after
                # AWS IoT heard of this CA): the CA in AWS IoT is fleetkey's own, inactive, and
                # this registration may take the claim over rather than leave the CA blocked.
                stale_claim_of = owner
            if claim is None and self._registry.describe_ca(ca_id):
                raise Conflict(
                    "this CA is already registered with AWS IoT outside fleetkey; "
                    "fleetkey does not adopt it"
                )
            code = self._registry.registration_code()
            with decoding("verification certificate"):
                verify_proof_of_possession(ca_cert, verification_pem, code, now)
            existing = self._create(
                name, ca_cert, subject, verification_pem, ca_id, now, actor, stale_claim_of
            )
        # Always (re)applied, so a retry after a failure here converges.
        return self._apply_status(name, existing)

    def _claim_may_finish(self, owner: str, ca_id: str) -> bool:
        """Whether the registration holding the claim on `ca_id` under `owner` may still finish:
        its name is free, or holds this very CA. When the name holds another CA the claim can
        never become a record."""
        holder = self._store.get(owner)
        return holder is None or holder.iot_ca_id == ca_id

    def _create(
        self,
        name: str,
        ca_cert: x509.Certificate,
        subject: str,
        verification_pem: str,
        ca_id: str,
        now: datetime,
        actor: str,
        stale_claim_of: str | None = None,
    ) -> ManufacturerCa:
        """Claim the CA id, register it with AWS IoT (inactive), then record it. A concurrent
        registration of the same CA under another name loses at the claim, before AWS IoT.

        AWS calls: 3 (the claim, RegisterCACertificate, the record).

        Raises:
            Conflict: the name or the CA was claimed concurrently.
        """
        try:
            self._store.claim_id(ca_id, name, stale_claim_of=stale_claim_of)
        except CaTaken as taken:
            other = taken.id_holder
            if other != name:
                raise Conflict(f"this CA is already registered as {other!r}") from None
            # Recorded under this name meanwhile (a concurrent copy of this request): the
            # record's transaction below finds it and returns it.
        pem = ca_cert.public_bytes(Encoding.PEM).decode()
        # ResourceAlreadyExists is adopted here only because this name holds the claim: the CA
        # in AWS IoT is this registration's own earlier attempt.
        self._registry.register_ca(pem, verification_pem, ca_id)
        at = timestamp(now)
        record = ChainHead().next_record(
            subject=schema.ca_subject(name),
            at=at,
            action="ca_registered",
            actor=actor,
            details={"iot_ca_id": ca_id, "subject": subject},
        )
        ca = ManufacturerCa(
            name=name,
            iot_ca_id=ca_id,
            certificate_pem=pem,
            status=CaStatus.ACTIVE,
            audit_head=ChainHead(record.seq, record.hash),
            registered_at=at,
        )
        try:
            self._store.create(ca, record)
        except CaTaken as taken:
            if taken.existing is not None and taken.existing.iot_ca_id == ca_id:
                return taken.existing  # a retry: already recorded
            if taken.id_holder is not None:
                other = taken.id_holder
                raise Conflict(f"this CA is already registered as {other!r}") from None
            raise Conflict(f"manufacturer CA name {name!r} is taken by another CA") from None
        return ca

    def _apply_status(self, name: str, ca: ManufacturerCa) -> ManufacturerCa:
        """Bring AWS IoT to the status of `ca` (ACTIVE: active with auto-registration; DISABLED:
        inactive without), then read the record again: if a concurrent call changed it
        meanwhile, bring AWS IoT to the newer status, so the two agree whatever the order in
        which concurrent calls reach AWS IoT (the last UpdateCACertificate always follows the
        last status read).

        AWS calls: 2 per round (UpdateCACertificate, GetItem), at most 4 rounds.

        Raises:
            NotFound: the CA's record vanished; Conflict: it kept changing.
        """
        for _ in range(4):
            self._registry.set_ca_active(ca.iot_ca_id, ca.status is CaStatus.ACTIVE)
            latest = self.get(name)
            if latest.status is ca.status:
                return latest
            ca = latest
        raise Conflict(f"manufacturer CA {name!r} kept changing; try again")

    def set_enabled(self, name: str, enabled: bool, *, actor: str) -> ManufacturerCa:
        """Disable (or re-enable) a manufacturer CA: fleetkey refuses its devices from the moment
        the record changes, and AWS IoT stops auto-registering its certificates.

        AWS IoT is brought to the recorded status, then the record is read again: if a concurrent
        call changed it meanwhile, AWS IoT is brought to the newer status, so the two agree
        (`_apply_status`).

        AWS calls: 4 for a change (GetItem, the status transaction, UpdateCACertificate, GetItem),
        3 when the CA already has that status; more if it keeps changing.

        Raises:
            NotFound: no such CA; Conflict: it kept changing.
        """
        wanted = CaStatus.ACTIVE if enabled else CaStatus.DISABLED
        for _ in range(4):
            ca = self.get(name)
            if ca.status is not wanted:
                record = ca.audit_head.next_record(
                    subject=schema.ca_subject(name),
                    at=timestamp(self._clock()),
                    action="ca_enabled" if enabled else "ca_disabled",
                    actor=actor,
                    details={"iot_ca_id": ca.iot_ca_id},
                )
                try:
                    ca = self._store.set_status(ca, wanted, record)
                except StaleRecord:
                    continue
            return self._apply_status(name, ca)
        raise Conflict(f"manufacturer CA {name!r} kept changing; try again")
