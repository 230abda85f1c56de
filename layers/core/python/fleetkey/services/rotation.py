"""Certificate rotation: a device replaces its certificate with one fleetkey's issuing CA signs
for a key the device made itself.

1. Request (`request`, JSON with a client assertion; `reenroll`, EST over mutual TLS): the CSR is
   checked fully (it decodes, its self-signature holds, its subject is the device id and it asks
   for nothing fleetkey does not issue) before any AWS call; then the device proves itself with
   its current key (the assertion names the CSR by `csr_sha256`), its profile's key policy
   applies, and the key must be new (none the device has held, none fleetkey has certified).
   The certificate is signed (KMS), recorded as the device's pending certificate in one
   conditional write with the claim on its key, then registered with AWS IoT beside the current
   one (INACTIVE, the profile's policy, the device's thing, then ACTIVE). One pending rotation
   per device; a repeated request for the same CSR answers the same certificate.
2. Commit (`on_connected`: the presence event of a connection with the new certificate;
   `commit`: an assertion signed by the new key): the new certificate becomes current; the old
   one retired: INACTIVE in AWS IoT at once, revoked in the CRL if fleetkey issued it, deleted
   after the profile's grace period. Tokens bound to it stop being active.
3. Rollback (`sweep`, on a schedule): a rotation not committed by its deadline is rolled back:
   the new certificate is retired at once (revoked, detached, deleted); the old stays current.
4. Renewal (`sweep`): a device whose certificate passed two thirds of its lifetime (with jitter;
   a factory certificate at once, if its profile says so) is told to rotate on
   `fleetkey/{device_id}/commands/rotate`, at most `renewal_rate_per_minute` a minute.

Every decision is one conditional write of the device (fleetkey.store.devices: `apply`), then AWS
is brought in line by idempotent steps; a failure at any AWS call is finished by the retry (the
device's repeated request, Lambda's retry of the event, the next sweep, the lifecycle queue).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey.adapters.aws import is_transient
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto import issuing
from fleetkey.crypto.certificates import certificate_id, load_certificate
from fleetkey.crypto.x509_policy import describe_public_key
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import (
    CaStatus,
    CertificateOrigin,
    CertificateRole,
    Device,
    HeldCertificate,
)
from fleetkey.domain.oauth import InvalidClient, InvalidGrant, OAuthError, OAuthInvalidRequest
from fleetkey.domain.pki import Revocation
from fleetkey.domain.profiles import get_profile
from fleetkey.domain.rotation import epoch_of, key_fingerprint, renewal_due_at
from fleetkey.errors import EstRefused, FleetkeyError, InvalidCertificate, NotFound
from fleetkey.ports import (
    CaChanged,
    DeviceChange,
    DeviceChanged,
    DeviceRepository,
    TrustAnchorStore,
)
from fleetkey.services.pki import PkiService
from fleetkey.services.tokens import MAX_ASSERTION_BYTES, TokenService
from fleetkey.settings import Settings
from fleetkey.store.pki import DynamoPkiStore, KeyCertified

logger = logging.getLogger(__name__)

_CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")
MAX_CSR_CHARACTERS = 8 * 1024
MAX_ROUNDS = 4
# An issued certificate is valid from a minute before it was signed: devices' clocks drift.
BACKDATE = timedelta(minutes=1)
# The most devices one sweep reads from the `due` index (renewals are also bounded by the rate).
SWEEP_LIMIT = 400
# After a rollback, the device's next rotation waits at least this long (each rollback lists a
# certificate in the CRL until it expires).
ROLLBACK_HOLD = timedelta(days=1)
# A sweep stops starting new work after this long (the function's timeout is a minute).
SWEEP_SECONDS = 40.0
# A deadline the sweep (every minute) has not kept this long after it passed: five sweeps have
# failed on the device, or the sweep is behind (more due than SWEEP_LIMIT). Counted by `sweep`
# as `overdue` (the rotation_events function's `RotationsOverdue`).
OVERDUE_AFTER = timedelta(minutes=5)

Observer = Callable[[str], None]


class RotationPending(OAuthError):
    """Another rotation of this device is pending (commit it or wait for its deadline)."""

    code = "rotation_pending"
    status = 409


@dataclass(frozen=True, slots=True)
class CheckedCsr:
    """A CSR that passed every check that needs no AWS call."""

    csr: x509.CertificateSigningRequest
    sha256: str  # of its DER
    key_fingerprint: str  # SHA-256 of its SubjectPublicKeyInfo
    key_description: str
    public_key_pem: str


class RotationService:
    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        pki: PkiService,
        pki_records: DynamoPkiStore,
        tokens: TokenService,
        registry: Any,
        channel: Any,
        queue: Any = None,
        clock: Clock = utc_now,
        on_event: Observer | None = None,
        anchors: TrustAnchorStore | None = None,
    ) -> None:
        self._settings = settings
        self._anchors = anchors
        self._devices = devices
        self._pki = pki
        self._records = pki_records
        self._tokens = tokens
        self._registry = registry
        self._channel = channel
        self._queue = queue
        self._clock = clock
        self._on_event = on_event

    # ---- request -------------------------------------------------------------------------------

    def request(self, device_id: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """A rotation request: 201 and the new certificate; 200 and the same certificate for a
        repeated request of the pending rotation (same CSR key).

        AWS calls: 1 (the device's credential) + 1 (the assertion's single-use write) + 1 (the
        device) + 1 (Sign) + 1 (the pending rotation's transaction) + 6 (RegisterCertificate,
        AttachPolicy, AttachThingPrincipal, DescribeCertificate + UpdateCertificate ACTIVE, a
        device read) = 11; + 1 (the manufacturer CA) from a factory certificate; + the issuing
        CA's read and GetPublicKey the first time in a process.

        Raises:
            OAuthInvalidRequest: the body or the CSR is refused (before any AWS call).
            InvalidClient: the assertion does not authenticate this device by its current key.
            InvalidGrant: a replayed assertion, `csr_sha256` names another CSR, the key was held
                or certified before.
            RotationPending: another rotation is pending.
            NoIssuingCa: the issuing CA is not set up (503).
        """
        if set(body) != {"csr", "client_assertion"}:
            raise OAuthInvalidRequest('the body must be {"csr": "<PEM>", "client_assertion": ...}')
        csr_pem, assertion = body["csr"], body["client_assertion"]
        if not isinstance(csr_pem, str) or not isinstance(assertion, str):
            raise OAuthInvalidRequest("csr and client_assertion must be strings")
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthInvalidRequest("client_assertion is required (at most 8 KiB)")
        if not DEVICE_ID.fullmatch(device_id):
            raise InvalidClient("device id")
        checked = self._check_csr(csr_pem, device_id)
        self._pki.active()  # no CA: 503 before the assertion is used
        auth = self._tokens.authenticate(assertion, None)
        if auth.device.device_id != device_id:
            raise InvalidClient("the assertion is another device's")
        if auth.claims.get("csr_sha256") != checked.sha256:
            raise InvalidGrant("the assertion's csr_sha256 does not name this CSR")
        self._check_key_policy(auth.device.profile, checked)
        return self._rotate(
            device_id,
            checked,
            actor=f"device:{device_id}",
            via="api",
            presented=auth.certificate.certificate_id,
            consume=lambda: self._tokens.record_assertion(auth),
        )

    def reenroll(self, client_certificate_pem: object, csr_der: bytes) -> bytes:
        """EST simplereenroll (RFC 7030 §4.2.2): the device is authenticated by its current
        certificate in mutual TLS; the answer is the new certificate as DER PKCS#7 certs-only.
        The same checks and the same pending rotation as `request`.

        AWS calls: as `request`, without the assertion's write.

        Raises:
            EstRefused: 401 without a client certificate or when it is not the device's
                current one; 400 for the CSR (its subject names the device); 409 pending.
            NoIssuingCa: 503.
        """
        if not isinstance(client_certificate_pem, str) or not client_certificate_pem:
            raise EstRefused("a client certificate is required", 401)
        try:
            client = load_certificate(client_certificate_pem)
        except InvalidCertificate:
            raise EstRefused("the client certificate does not parse", 401) from None
        try:
            csr = issuing.load_rotation_csr(csr_der)
        except (InvalidCertificate, issuing.CsrNotIssuable) as exc:
            raise EstRefused(f"csr: {exc.message}") from None
        names = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        device_id = str(names[0].value) if len(names) == 1 else ""
        if not DEVICE_ID.fullmatch(device_id):
            raise EstRefused("the CSR's subject must be CN=<device id>")
        try:
            checked = self._check_csr(csr, device_id)
        except OAuthInvalidRequest as exc:
            raise EstRefused(exc.message) from None
        self._pki.active()
        device = self._devices.get(device_id)
        current = device.current_certificate if device else None
        if (
            device is None
            or device.state is not DeviceState.ACTIVE
            or current is None
            or current.certificate_id != certificate_id(client)
        ):
            raise EstRefused("the client certificate is not the device's current one", 401)
        try:
            self._check_key_policy(device.profile, checked)
            _, answer = self._rotate(
                device_id,
                checked,
                actor=f"device:{device_id}",
                via="est",
                presented=current.certificate_id,
            )
        except RotationPending as exc:
            raise EstRefused(exc.message, 409) from None
        except InvalidClient as exc:  # the device or its certificate moved on meanwhile
            raise EstRefused(exc.message, 401) from None
        except (InvalidGrant, OAuthInvalidRequest) as exc:
            raise EstRefused(exc.message) from None
        issued = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
        return issuing.certs_only([issued])

    def _check_csr(self, csr: str | x509.CertificateSigningRequest, device_id: str) -> CheckedCsr:
        """Everything about the CSR that needs no AWS call. CPU only.

        Raises:
            OAuthInvalidRequest: it does not parse, its self-signature does not hold, its key is
                weak, or it asks for something fleetkey does not issue.
        """
        if isinstance(csr, str):
            if len(csr) > MAX_CSR_CHARACTERS:
                raise OAuthInvalidRequest("csr: at most 8 KiB")
            try:
                csr = issuing.load_rotation_csr(csr)
            except (InvalidCertificate, issuing.CsrNotIssuable) as exc:
                raise OAuthInvalidRequest(f"csr: {exc.message}") from None
        try:
            issuing.check_requested(csr, device_id)
        except (InvalidCertificate, issuing.CsrNotIssuable) as exc:
            raise OAuthInvalidRequest(f"csr: {exc.message}") from None
        key = csr.public_key()
        return CheckedCsr(
            csr=csr,
            sha256=hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest(),
            key_fingerprint=issuing.spki_sha256(key),
            key_description=describe_public_key(key),
            public_key_pem=key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
        )

    @staticmethod
    def _check_key_policy(profile: str, checked: CheckedCsr) -> None:
        if not get_profile(profile).key_policy.allows(checked.key_description):
            raise OAuthInvalidRequest(
                f"csr: key {checked.key_description} is not allowed by the device's profile"
            )

    def _rotate(
        self,
        device_id: str,
        checked: CheckedCsr,
        *,
        actor: str,
        via: str,
        presented: str,
        consume: Callable[[], None] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Decide the rotation (or find the pending one for this key), then register it.
        `presented` is the certificate the request was proven with (the assertion's kid, the
        mutual TLS certificate): it must stay the device's current one until the decision."""
        device = self._device(device_id)
        if (
            device.current_certificate is None
            or device.current_certificate.certificate_id != presented
        ):
            raise InvalidClient("the device's current certificate changed")
        pending = device.pending_certificate
        if pending is not None and key_fingerprint(pending.public_key_pem) == (
            checked.key_fingerprint
        ):
            # The same request again (its answer was lost): the same certificate, and AWS
            # IoT's part finished if a failure interrupted it; not once its deadline passed (the
            # sweep rolls it back).
            if pending.commit_deadline and self._clock() > datetime.fromisoformat(
                pending.commit_deadline
            ):
                raise InvalidGrant("the rotation's deadline has passed")
            if consume is not None:
                consume()
            self._register(device, pending)
            return 200, self._answer(pending)
        if pending is not None:
            raise RotationPending("another rotation of this device is pending")
        if device.rotation_held_until and self._clock() < datetime.fromisoformat(
            device.rotation_held_until
        ):
            raise RotationPending(
                f"the last rotation was rolled back; the next may start at "
                f"{device.rotation_held_until}"
            )
        if checked.key_fingerprint in device.held_keys:
            raise InvalidGrant("the device has held this key before: make a new one")
        ca_checks = self._manufacturer_ca_checks(device)
        if consume is not None:
            consume()
        now = self._clock().replace(microsecond=0)
        profile = get_profile(device.profile)
        issued = self._pki.issue(
            public_key=checked.csr.public_key(),
            device_id=device_id,
            serial=issuing.random_serial(),
            not_before=now - BACKDATE,
            validity_days=profile.certificate_validity_days,
        )
        held = HeldCertificate(
            certificate_id=certificate_id(issued),
            role=CertificateRole.PENDING,
            origin=CertificateOrigin.ISSUED,
            public_key_pem=checked.public_key_pem,
            key=checked.key_description,
            not_after=timestamp(issued.not_valid_after_utc),
            not_before=timestamp(issued.not_valid_before_utc),
            serial=format(issued.serial_number, "x"),
            certificate_pem=issued.public_bytes(serialization.Encoding.PEM).decode(),
            commit_deadline=timestamp(
                now + timedelta(seconds=self._settings.rotation_commit_seconds)
            ),
        )
        for _ in range(MAX_ROUNDS):
            if device.state is not DeviceState.ACTIVE or device.current_certificate is None:
                raise InvalidClient("device not active")
            if device.current_certificate.certificate_id != presented:
                # Replaced while this request was on its way: the key that proved it is not
                # the device's any more.
                raise InvalidClient("the device's current certificate changed")
            pending = device.pending_certificate
            if pending is not None and (
                key_fingerprint(pending.public_key_pem) == checked.key_fingerprint
            ):
                # A copy of this request won the race: its certificate is the answer.
                self._register(device, pending)
                return 200, self._answer(pending)
            if pending is not None:
                raise RotationPending("another rotation of this device is pending")
            change = DeviceChange(
                action="rotation_requested",
                actor=actor,
                at=timestamp(self._clock()),
                details={
                    "certificate_id": held.certificate_id,
                    "serial": held.serial,
                    "not_after": held.not_after,
                    "commit_deadline": held.commit_deadline,
                    "csr_sha256": checked.sha256,
                    "via": via,
                },
                certificates=(*device.certificates, held),
            )
            try:
                device = self._devices.apply(
                    device,
                    change,
                    with_writes=[
                        self._records.key_claim(
                            checked.key_fingerprint, device_id, held.certificate_id
                        ),
                        *ca_checks,
                    ],
                )
            except DeviceChanged as changed:
                if changed.current is None:
                    raise InvalidClient("device not active") from None
                device = changed.current
                continue
            except CaChanged:
                raise InvalidClient("the device's manufacturer CA is disabled") from None
            except KeyCertified:
                # Certified before: for this device's pending rotation (a copy of this request
                # that won, then moved on) or for anything else, never again.
                raise InvalidGrant("this key was certified before: make a new one") from None
            self._notify("RotationsRequested")
            self._register(device, held)
            return 201, self._answer(held)
        raise FleetkeyError(f"device {device_id} kept changing; retry")

    def _manufacturer_ca_checks(self, device: Device) -> list[Any]:
        """A device still on its factory certificate rotates only while its manufacturer CA is
        trusted: a CA an operator disabled does not get its devices turned into fleetkey
        identities. The check rides in the rotation's transaction (refusal: CaChanged).

        AWS calls: 1 (GetItem of the CA) for a factory certificate; none otherwise.

        Raises:
            InvalidClient: the CA is disabled or gone.
        """
        current = device.current_certificate
        if (
            self._anchors is None
            or current is None
            or current.origin is not CertificateOrigin.FACTORY
        ):
            return []
        ca = self._anchors.get(device.manufacturer_ca)
        if ca is None or ca.status is not CaStatus.ACTIVE:
            raise InvalidClient("the device's manufacturer CA is disabled")
        return [self._anchors.active_check(ca)]

    def _answer(self, held: HeldCertificate) -> dict[str, Any]:
        return {
            "certificate_id": held.certificate_id,
            "certificate_pem": held.certificate_pem,
            "ca_chain_pem": self._pki.chain_pem(),
            "serial_number": held.serial,
            "not_before": held.not_before,
            "not_after": held.not_after,
            "commit_deadline": held.commit_deadline,
        }

    def _register(self, device: Device, held: HeldCertificate) -> None:
        """Bring the pending certificate into AWS IoT beside the current one: registered
        INACTIVE, the profile's policy and the device's thing attached, ACTIVE last; then the
        device is read again and AWS IoT follows what it says now: a device suspended meanwhile
        (its convergence may have run before the activation) gets the certificate INACTIVE
        again, and one whose rotation was rolled back and removed meanwhile gets it taken out
        again. Idempotent (a repeated request or a retry)."""
        if held.certificate_pem is None:
            return
        arn = self._registry.register_issued_certificate(
            held.certificate_id, held.certificate_pem, self._pki.ca_pem()
        )
        profile = get_profile(device.profile)
        self._registry.attach_policy(profile.iot_policy_name(self._settings.name_prefix), arn)
        self._registry.attach_exclusively(device.device_id, arn)
        self._registry.set_certificate_status(held.certificate_id, "ACTIVE")
        latest = self._devices.get(device.device_id)
        still = latest.holds(held.certificate_id) if latest else None
        if still is None:
            self._registry.teardown_certificate(held.certificate_id)
        elif (
            latest is None
            or latest.state is not DeviceState.ACTIVE
            or (still.role is CertificateRole.RETIRED)
        ):
            self._registry.set_certificate_status(held.certificate_id, "INACTIVE")

    # ---- commit --------------------------------------------------------------------------------

    def commit(
        self, device_id: str, certificate_id_: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Commit a pending rotation, proven with an assertion signed by the NEW key (kid = the
        new certificate id). Committing a certificate that is already current answers the same
        (a repeated call), proven with that key.

        AWS calls: 1 (credential) + 1 (credential) + 1 (the assertion's write) + 1 (device) +
        1 (the commit's transaction) + the old certificate's deactivation (2).

        Raises:
            OAuthInvalidRequest: the body; InvalidClient: the assertion does not authenticate
            the device by that certificate; InvalidGrant: a replayed assertion.
        """
        if set(body) != {"client_assertion"}:
            raise OAuthInvalidRequest('the body must be {"client_assertion": "<JWT>"}')
        assertion = body["client_assertion"]
        if not isinstance(assertion, str) or not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthInvalidRequest("client_assertion is required (at most 8 KiB)")
        if not DEVICE_ID.fullmatch(device_id) or not _CERTIFICATE_ID.fullmatch(certificate_id_):
            raise InvalidClient("device or certificate id")
        # The projected read the token path makes (a miss costs what a hit does).
        device = self._devices.credential(device_id)
        held = device.holds(certificate_id_) if device else None
        role = (
            CertificateRole.CURRENT
            if held is not None and held.role is CertificateRole.CURRENT
            else CertificateRole.PENDING
        )
        auth = self._tokens.authenticate(assertion, None, role=role)
        if auth.device.device_id != device_id or auth.certificate.certificate_id != certificate_id_:
            raise InvalidClient("the assertion is not by this certificate")
        self._tokens.record_assertion(auth)
        committed = self._commit(
            device_id, certificate_id_, actor=f"device:{device_id}", via="api", at=self._clock()
        )
        return {
            "device_id": device_id,
            "certificate_id": certificate_id_,
            "committed": True,
            "committed_at": committed.updated_at,
        }

    def on_connected(self, event: object) -> str:
        """A presence `connected` event (`$aws/events/presence/connected/<clientId>`): when the
        device connected with its pending certificate before the deadline, commit. Events come
        late, twice and out of order: one for a certificate already current, retired or unknown
        changes nothing (a retired one is set INACTIVE). Returns what happened: committed,
        current, late, retired, ignored.

        AWS calls: 1 (the device); a commit as `commit`'s transaction and convergence.
        """
        if not isinstance(event, Mapping) or event.get("eventType") != "connected":
            return "ignored"
        client_id = event.get("clientId")
        principal = event.get("principalIdentifier")
        at_ms = event.get("timestamp")
        if (
            not isinstance(client_id, str)
            or not DEVICE_ID.fullmatch(client_id)
            or not isinstance(principal, str)
            or not _CERTIFICATE_ID.fullmatch(principal)
            or type(at_ms) is not int
        ):
            return "ignored"
        device = self._devices.get(client_id)
        held = device.holds(principal) if device else None
        if device is None or held is None:
            return "ignored"
        if held.role is CertificateRole.CURRENT:
            # A copy of the event that committed (Lambda retries an invocation whose commit
            # landed and then failed): finish what the commit left, while it is recent.
            if self._recently_retired(device):
                self._converge(device)
            return "current"
        if held.role is CertificateRole.RETIRED:
            # Whoever holds a replaced key connected with it: it must not stay usable (its
            # deactivation after the commit may have failed).
            logger.warning(
                "a retired certificate connected; set INACTIVE",
                extra={"device_id": client_id, "certificate_id": principal},
            )
            self._registry.set_certificate_status(principal, "INACTIVE")
            return "retired"
        if device.state is not DeviceState.ACTIVE:  # a pending certificate, not to commit now
            return "ignored"
        if held.commit_deadline and at_ms // 1000 > epoch_of(held.commit_deadline):
            return "late"
        try:
            self._commit(
                client_id,
                principal,
                actor="aws-iot:presence",
                via="connected",
                at=datetime.fromtimestamp(at_ms / 1000, tz=UTC),
                device=device,
            )
        except (InvalidClient, InvalidGrant):
            # The device moved on between the read and the commit (suspended, rolled back): an
            # event about what no longer is; a retry would decide the same.
            return "ignored"
        return "committed"

    def _commit(
        self,
        device_id: str,
        certificate_id_: str,
        *,
        actor: str,
        via: str,
        at: datetime,
        device: Device | None = None,
    ) -> Device:
        """Make `certificate_id_` current (idempotent), then converge AWS IoT. A
        commit proven `at` a moment past the rotation's deadline is refused: the rotation is the
        sweep's to roll back (as a connection after the deadline does not commit)."""
        device = device or self._device(device_id)
        for _ in range(MAX_ROUNDS):
            held = device.holds(certificate_id_)
            if held is not None and held.role is CertificateRole.CURRENT:
                break  # committed already (a retry, a duplicate event)
            if held is None or held.role is not CertificateRole.PENDING:
                raise InvalidClient("no such pending rotation")
            if device.state is not DeviceState.ACTIVE:
                raise InvalidClient("device not active")
            if held.commit_deadline and at > datetime.fromisoformat(held.commit_deadline):
                raise InvalidGrant("the rotation's deadline has passed")
            now = self._clock()
            grace = timedelta(days=get_profile(device.profile).retired_certificate_grace_days)
            old = device.current_certificate
            certificates = [c for c in device.certificates if c.role is CertificateRole.RETIRED]
            certificates.append(
                replace(
                    held,
                    role=CertificateRole.CURRENT,
                    commit_deadline=None,
                    renewal_requested_at=None,
                )
            )
            revoked: list[Revocation] = []
            if old is not None:
                certificates.append(
                    replace(
                        old,
                        role=CertificateRole.RETIRED,
                        retired_at=timestamp(now),
                        delete_after=timestamp(now + grace),
                        renewal_requested_at=None,
                    )
                )
                revoked = self._revocations(device_id, [old], now, "superseded")
            change = DeviceChange(
                action="rotation_committed",
                actor=actor,
                at=timestamp(now),
                details={
                    "certificate_id": certificate_id_,
                    "previous_certificate_id": old.certificate_id if old else None,
                    "via": via,
                },
                certificates=tuple(certificates),
            )
            try:
                device = self._devices.apply(
                    device, change, with_writes=self._records.revocations(revoked)
                )
            except DeviceChanged as changed:
                if changed.current is None:
                    raise InvalidClient("device not active") from None
                device = changed.current
                continue
            self._notify("RotationsCommitted")
            break
        else:
            raise FleetkeyError(f"device {device_id} kept changing; retry")
        self._converge(device)
        return device

    def _rollback_hold(self) -> timedelta:
        """How long after a rollback no rotation of the device starts: a day, or twice the
        commit window if longer."""
        return max(ROLLBACK_HOLD, 2 * timedelta(seconds=self._settings.rotation_commit_seconds))

    def _recently_retired(self, device: Device) -> bool:
        """Whether a certificate of `device` was retired within the commit window (when a late
        copy of the committing event may still arrive)."""
        window = timedelta(seconds=self._settings.rotation_commit_seconds)
        now = self._clock()
        return any(
            c.retired_at and now - datetime.fromisoformat(c.retired_at) <= window
            for c in device.retired_certificates
        )

    def _revocations(
        self, device_id: str, certificates: list[HeldCertificate], now: datetime, reason: str
    ) -> list[Revocation]:
        """Revocations of the certificates fleetkey issued (a factory certificate is the
        manufacturer's to revoke: it is retired in AWS IoT, and never accepted again)."""
        return [
            Revocation(
                serial=c.serial,
                certificate_id=c.certificate_id,
                device_id=device_id,
                not_after=c.not_after,
                revoked_at=timestamp(now),
                reason=reason,
            )
            for c in certificates
            if c.origin is CertificateOrigin.ISSUED and c.serial
        ]

    def _converge(self, device: Device) -> None:
        """Retired certificates INACTIVE now; a failure is left to the lifecycle queue (which
        deactivates retired certificates). The revocation reaches the CRL with the sweep's next
        publication (within a minute): signing the whole CRL in every commit would make each
        commit's cost grow with the number of revocations."""
        try:
            for certificate in device.retired_certificates:
                self._registry.set_certificate_status(certificate.certificate_id, "INACTIVE")
        except RETRYABLE as exc:
            if not _later(exc) or self._queue is None:
                raise
            self._queue.enqueue(device.device_id, device.epoch)

    # ---- the sweep -----------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> dict[str, int]:
        """What the schedule runs each minute: for each device with something due (the `due`
        index: never a Scan), roll back rotations past their deadline, delete retired
        certificates past their grace, and ask for renewals (at most `renewal_rate_per_minute`);
        then publish the CRL if a revocation is missing from it or it is half-way to its
        nextUpdate. A device that fails is counted and left due: the next sweep retries it.
        `overdue` counts the devices the `due` index lists with a deadline passed more than
        OVERDUE_AFTER ago (read off the index's own `due_at`: no further read), whatever this
        sweep then manages: a rotation stuck past its deadline.

        AWS calls: DUE_SHARDS Queries (+ pages); per due device 1 read, and per action its
        transaction and AWS calls; the CRL check 1 GetItem.
        """
        now = (now or self._clock()).replace(microsecond=0)
        started = time.monotonic()
        counts = {
            "due": 0,
            "rolled_back": 0,
            "deleted": 0,
            "renewals_requested": 0,
            "failed": 0,
            "crl_published": 0,
            "overdue": 0,
        }
        moment = int(now.timestamp())
        due = self._devices.due(moment, SWEEP_LIMIT)
        late = moment - int(OVERDUE_AFTER.total_seconds())
        counts["overdue"] = sum(1 for _, deadline in due if deadline <= late)
        # Deadlines first (rollbacks, deletions), then renewals at the configured rate: each has
        # its own index, so a backlog of renewals never delays a rollback.
        work = [(device_id, self._settle) for device_id, _ in due] + [
            (device_id, self._renew)
            for device_id in self._devices.renewals_due(
                moment, self._settings.renewal_rate_per_minute
            )
        ]
        for device_id, settle in work:
            if time.monotonic() - started > SWEEP_SECONDS:
                break
            counts["due"] += 1
            try:
                done = settle(device_id, now)
            except RETRYABLE as exc:
                if not _later(exc):
                    raise
                counts["failed"] += 1
                continue
            for name, value in done.items():
                counts[name] += value
        try:
            _, published = self._pki.refresh_crl()
            if published:
                counts["crl_published"] = 1
                self._notify("CrlsPublished")
        except RETRYABLE as exc:
            if not _later(exc):
                raise
            counts["failed"] += 1
        return counts

    def _settle(self, device_id: str, now: datetime) -> dict[str, int]:
        """A device's deadlines: roll back a rotation past its deadline, delete retired
        certificates past their grace. AWS calls: 1 read + each action's."""
        done = {"rolled_back": 0, "deleted": 0}
        device = self._devices.get(device_id)
        if device is None or device.state not in (DeviceState.ACTIVE, DeviceState.SUSPENDED):
            return done
        moment = int(now.timestamp())
        pending = device.pending_certificate
        if pending and pending.commit_deadline and epoch_of(pending.commit_deadline) <= moment:
            device = self._roll_back(device, pending, now)
            done["rolled_back"] = 1
        for retired in device.retired_certificates:
            if retired.delete_after and epoch_of(retired.delete_after) <= moment:
                device = self._delete_retired(device, retired, now)
                done["deleted"] += 1
        return done

    def _renew(self, device_id: str, now: datetime) -> dict[str, int]:
        """Ask a device due for renewal to rotate. AWS calls: 1 read, Publish, 1 transaction."""
        device = self._devices.get(device_id)
        due = renewal_due_at(device) if device is not None else None
        if device is None or device.state is not DeviceState.ACTIVE or due is None:
            return {}
        if due > int(now.timestamp()):
            return {}
        self._request_renewal(device, now)
        return {"renewals_requested": 1}

    def _roll_back(self, device: Device, pending: HeldCertificate, now: datetime) -> Device:
        """The pending certificate is retired at once: revoked, and deleted by the step that
        follows (a failure there leaves it due for the next sweep)."""
        for _ in range(MAX_ROUNDS):
            held = device.holds(pending.certificate_id)
            if held is None or held.role is not CertificateRole.PENDING:
                return device
            certificates = tuple(
                replace(
                    c,
                    role=CertificateRole.RETIRED,
                    commit_deadline=None,
                    retired_at=timestamp(now),
                    delete_after=timestamp(now),
                )
                if c.certificate_id == pending.certificate_id
                else c
                for c in device.certificates
            )
            hold = timestamp(now + self._rollback_hold())
            change = DeviceChange(
                action="rotation_rolled_back",
                actor="fleetkey:rotation-sweep",
                at=timestamp(self._clock()),
                details={
                    "certificate_id": pending.certificate_id,
                    "commit_deadline": pending.commit_deadline,
                    "rotation_held_until": hold,
                },
                certificates=certificates,
                rotation_held_until=hold,
            )
            revoked = self._revocations(device.device_id, [pending], now, "cessationOfOperation")
            try:
                device = self._devices.apply(
                    device, change, with_writes=self._records.revocations(revoked)
                )
            except DeviceChanged as changed:
                if changed.current is None:
                    raise NotFound(f"device {device.device_id} vanished") from None
                device = changed.current
                continue
            self._notify("RotationsRolledBack")
            return device
        raise FleetkeyError(f"device {device.device_id} kept changing; retry")

    def _delete_retired(self, device: Device, retired: HeldCertificate, now: datetime) -> Device:
        """Take a retired certificate out of AWS IoT (detached, deleted), then out of the
        device's set. AWS calls: teardown_certificate's + 1 transaction."""
        self._registry.teardown_certificate(retired.certificate_id)
        for _ in range(MAX_ROUNDS):
            held = device.holds(retired.certificate_id)
            if held is None or held.role is not CertificateRole.RETIRED:
                return device
            change = DeviceChange(
                action="retired_certificate_deleted",
                actor="fleetkey:rotation-sweep",
                at=timestamp(self._clock()),
                details={"certificate_id": retired.certificate_id},
                certificates=tuple(
                    c for c in device.certificates if c.certificate_id != retired.certificate_id
                ),
            )
            try:
                device = self._devices.apply(device, change)
            except DeviceChanged as changed:
                if changed.current is None:
                    raise NotFound(f"device {device.device_id} vanished") from None
                device = changed.current
                continue
            self._notify("RetiredCertificatesDeleted")
            return device
        raise FleetkeyError(f"device {device.device_id} kept changing; retry")

    def _request_renewal(self, device: Device, now: datetime) -> None:
        """Tell the device to rotate, then record that it was told (a failure between the two
        tells it again at the next sweep: harmless)."""
        current = device.current_certificate
        if current is None:
            return
        self._channel.send_command(
            device.device_id,
            "rotate",
            {
                "reason": "renewal",
                "certificate_id": current.certificate_id,
                "not_after": current.not_after,
            },
        )
        for _ in range(MAX_ROUNDS):
            current = device.current_certificate
            if current is None or device.pending_certificate is not None:
                return
            change = DeviceChange(
                action="renewal_requested",
                actor="fleetkey:rotation-sweep",
                at=timestamp(self._clock()),
                details={"certificate_id": current.certificate_id},
                certificates=tuple(
                    replace(c, renewal_requested_at=timestamp(now)) if c is current else c
                    for c in device.certificates
                ),
            )
            try:
                self._devices.apply(device, change)
            except DeviceChanged as changed:
                if changed.current is None:
                    return
                device = changed.current
                continue
            self._notify("RenewalsRequested")
            return

    # ---- status --------------------------------------------------------------------------------

    def status(self, device_id: str) -> dict[str, Any]:
        """A device's certificates as rotation sees them. AWS calls: 1 (GetItem)."""
        device = self._device(device_id)
        pending = device.pending_certificate
        current = device.current_certificate
        due = renewal_due_at(device)
        return {
            "device_id": device_id,
            "state": device.state.value,
            "current": current.to_public() if current else None,
            "pending": pending.to_public() if pending else None,
            "retired": [c.to_public() for c in device.retired_certificates],
            "renewal_due_at": timestamp(datetime.fromtimestamp(due, tz=self._clock().tzinfo))
            if due is not None
            else None,
        }

    # ---- helpers -------------------------------------------------------------------------------

    def _device(self, device_id: str) -> Device:
        if not DEVICE_ID.fullmatch(device_id):
            raise NotFound(f"no device {device_id[:128]!r}")
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def _notify(self, metric: str) -> None:
        if self._on_event is not None:
            self._on_event(metric)


# What a convergence or a sweep leaves for later (the queue, the next sweep): fleetkey's own
# typed failures and AWS being busy. Any other AWS error (a missing grant, a bug) propagates.
RETRYABLE = (ClientError, BotoCoreError, FleetkeyError)


def _later(exc: BaseException) -> bool:
    return isinstance(exc, FleetkeyError) or is_transient(exc)
