"""Just-in-time registration: decide on a certificate AWS IoT auto-registered, and make it so.

JITR acts only on what AWS IoT itself says. The certificate, its status and its CA are the ones
DescribeCertificate reports (`caCertificateId`), never the ones the event names, and only a
`PENDING_ACTIVATION` certificate is acted on. An event that does not match (a certificate AWS IoT
does not have, of another CA than the event names, or not pending and never decided by fleetkey)
changes nothing: no decision, nothing in AWS IoT; it is audited in the `registration-events`
stream as `mismatched_event`. No decision is recorded for it, so it cannot block or pre-empt the
genuine event for that certificate, whenever that arrives.

AWS call budget (warm trust-anchor cache):
    accepted: describe certificate, device lookup, registration transaction, create thing,
              attach policy, attach thing, activate certificate, device read
              (a suspension that landed meanwhile is followed)             = 8
    refused on the certificate's own merits (malformed too): describe,
              record, revoke                                               = 3
    refused, no such device: describe, lookup-and-record, revoke           = 3
    refused, known device (clone, decommissioned, ...): describe, lookup,
              record in the device's chain, revoke                         = 4
    mismatched event: describe, [decision lookup,] stream head, append     = 3-4
    a certificate already decided and no longer pending: describe, decision lookup = 2
    an event of a CA the snapshot lacks: + 1 GetItem of its CAID# item (+ 1 Query if it exists)
    a thing of the device's name exists: fleetkey's (its type is a profile's thing type) is
              taken over (+ DescribeThing, ListThingPrincipals, a detach per other certificate,
              UpdateThing); anyone else's is left untouched, `thing_conflict` is audited (+ 2)
              and ThingConflict raised (a permanent Conflict: the failure queue keeps the
              event for a redrive once the name clash is resolved)

Every write is conditional and every AWS IoT call is idempotent, so a duplicate event, concurrent
copies, or a retry after a failure at any call all end in the state of one clean run. The
certificate record (CERT#<id>) is the decision: it is written once, in the same transaction as the
device change, and a retry that finds it finishes what the decision implies. Exactly one
invocation writes it; that invocation's outcome has `decided=True` and it alone calls
`on_decision`, at the moment the decision commits (so a decision is counted once, even when
applying it fails and a later delivery finishes it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509 import verification
from pydantic import TypeAdapter, ValidationError

from fleetkey.adapters.iot import IotCertificate, IotRegistry, ThingConflict
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.converge import Step, converge
from fleetkey.crypto.certificates import (
    DeviceCertificate,
    certificate_id,
    claimed_common_name,
    load_certificate,
    validate_device_certificate,
)
from fleetkey.domain.allowlist import DeviceId
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.lifecycle import DeviceState, Transition
from fleetkey.domain.models import (
    CaStatus,
    CertificateOrigin,
    CertificateOutcome,
    CertificateRecord,
    CertificateRole,
    Device,
    HeldCertificate,
)
from fleetkey.domain.profiles import get_profile, thing_type_names
from fleetkey.domain.registration import BASELINE_KEY_POLICY, refusal_for
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import ConcurrentModification, InvalidCertificate
from fleetkey.events import CertificateRegisteredEvent
from fleetkey.ports import (
    AlreadyDecided,
    AuditLog,
    CaChanged,
    CertificateDecisions,
    DeviceChange,
    DeviceChanged,
    DeviceExists,
    DeviceRepository,
)
from fleetkey.services.trust import TrustAnchor, TrustAnchors
from fleetkey.settings import Settings
from fleetkey.store import schema

ACTOR = "aws-iot:jitr"
logger = logging.getLogger(__name__)
# Events that led to no decision (malformed, mismatched) are audited in this stream.
REGISTRATION_EVENTS_STREAM = "registration-events"
MAX_DECISION_ROUNDS = 4
PENDING_ACTIVATION = "PENDING_ACTIVATION"
# What reading a hostile certificate's fields can raise (cryptography parses names, extensions
# and keys lazily, on first access). Caught only around pure certificate code, so a bug elsewhere
# still fails loudly (and is retried) instead of revoking certificates as "malformed".
CERTIFICATE_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    UnsupportedAlgorithm,
    InvalidSignature,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.ExtensionNotFound,
    verification.VerificationError,
)
_device_id = TypeAdapter(DeviceId)


@dataclass(frozen=True, slots=True)
class RegistrationOutcome:
    """What became of a certificate-registered event.

    `decided` is True only for the one invocation whose conditional write recorded fleetkey's
    decision on the certificate; a retry, a duplicate or a concurrent copy that finds the decision
    already made reports it with `decided=False`, and so does a mismatched event (reason
    MISMATCHED_EVENT), which is never a decision.
    """

    certificate_id: str
    accepted: bool
    device_id: str | None = None
    reason: RejectionReason | None = None
    decided: bool = False


DecisionObserver = Callable[[RegistrationOutcome], None]


class RegistrationService:
    """`on_decision` is called once per certificate, by the invocation that records the decision,
    right after it commits (before AWS IoT is brought in line with it)."""

    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        certificates: CertificateDecisions,
        audit: AuditLog,
        registry: IotRegistry,
        anchors: TrustAnchors,
        clock: Clock = utc_now,
        on_decision: DecisionObserver | None = None,
    ) -> None:
        self._settings = settings
        self._devices = devices
        self._certificates = certificates
        self._audit = audit
        self._registry = registry
        self._anchors = anchors
        self._clock = clock
        self._on_decision = on_decision

    # ---- entry points -----------------------------------------------------------------------

    def register(self, event: CertificateRegisteredEvent) -> RegistrationOutcome:
        """Decide on the certificate of a certificate-registered event and apply the decision.

        Whatever the certificate's bytes, a certificate that cannot be read is refused as
        `malformed_certificate` (recorded, audited, revoked once); it never makes this fail.

        AWS calls: see the module's budget (at most 8 on a warm trust-anchor cache, plus one
        Query when the cache is cold or the CA is not in it).

        Raises:
            TransientAwsError, botocore errors: an AWS call failed; retrying the same event
                converges.
            ConcurrentModification: the device kept changing under this registration; retrying
                converges.
            ThingConflict: accepted, but a thing of the device's name exists in AWS IoT that is
                not fleetkey's; nothing in AWS IoT was changed (audited `thing_conflict`). It
                stays so until an operator resolves the clash; then the same event finishes the
                registration.
        """
        cert_id = event.certificateId
        iot_cert = self._registry.describe_certificate(cert_id)
        if iot_cert is None:
            return self._already_decided_or_mismatched(event, None, "unknown_certificate")
        if iot_cert.ca_certificate_id != event.caCertificateId:
            # The event names another CA than AWS IoT reports (or AWS IoT reports none: the
            # certificate was registered without a CA, so no JITR event is genuine for it).
            problem = "ca_mismatch" if iot_cert.ca_certificate_id else "no_ca"
            return self._mismatched(event, iot_cert, problem)
        if iot_cert.status != PENDING_ACTIVATION:
            return self._already_decided_or_mismatched(event, iot_cert, "not_pending")
        return self._register_pending(iot_cert, iot_cert.ca_certificate_id)

    def record_malformed_event(self, event: object, problem: str) -> None:
        """Audit an event that does not have the documented shape (it is not retried).

        AWS calls: 2 (stream head, append), more if concurrent writers move the head.
        """
        self._audit.append_to_stream(
            REGISTRATION_EVENTS_STREAM,
            action="malformed_event",
            actor=ACTOR,
            details={"problem": problem[:1000], "event": repr(event)[:2000]},
            at=timestamp(self._clock()),
        )

    # ---- events that do not match AWS IoT ---------------------------------------------------

    def _already_decided_or_mismatched(
        self, event: CertificateRegisteredEvent, iot_cert: IotCertificate | None, problem: str
    ) -> RegistrationOutcome:
        """A certificate fleetkey cannot act on (AWS IoT has none, or it is not pending): a later
        delivery of an event fleetkey already decided on reports that decision; anything else is
        a mismatched event. Nothing in AWS IoT changes either way."""
        previous = self._certificates.get(event.certificateId)
        if previous is None:
            return self._mismatched(event, iot_cert, problem)
        accepted = previous.outcome is CertificateOutcome.ACCEPTED
        reason = None if accepted else _reason(previous.reason)
        return RegistrationOutcome(event.certificateId, accepted, previous.device_id, reason)

    def _mismatched(
        self, event: CertificateRegisteredEvent, iot_cert: IotCertificate | None, problem: str
    ) -> RegistrationOutcome:
        """Audit an event that does not match what AWS IoT says, and do nothing else: no
        decision is recorded, so the genuine event for this certificate is unaffected."""
        logger.warning(
            "registration event does not match AWS IoT; ignored",
            extra={"certificate_id": event.certificateId, "problem": problem},
        )
        self._audit.append_to_stream(
            REGISTRATION_EVENTS_STREAM,
            action="mismatched_event",
            actor=ACTOR,
            details={
                "problem": problem,
                "certificate_id": event.certificateId,
                "event_ca_certificate_id": event.caCertificateId,
                "iot_ca_certificate_id": iot_cert.ca_certificate_id if iot_cert else None,
                "iot_status": iot_cert.status if iot_cert else None,
            },
            at=timestamp(self._clock()),
        )
        return RegistrationOutcome(
            event.certificateId, False, None, RejectionReason.MISMATCHED_EVENT
        )

    # ---- a pending certificate --------------------------------------------------------------

    def _register_pending(self, iot_cert: IotCertificate, ca_id: str) -> RegistrationOutcome:
        cert_id = iot_cert.certificate_id
        leaf, problem = _read_leaf(iot_cert)
        claimed = _claimed(leaf)
        try:
            anchor = self._anchors.get(ca_id)
            if anchor is not None and anchor.ca.status is CaStatus.DISABLED:
                # A refusal revokes for good: make sure the CA was not re-enabled since the
                # snapshot.
                self._anchors.refresh()
                anchor = self._anchors.get(ca_id)
        except InvalidCertificate as exc:
            # The stored CA certificate no longer loads (a stricter decoder than the one that
            # admitted it): it cannot vouch for any device. Refused, not retried forever.
            return self._refuse_alone(
                cert_id,
                claimed,
                RejectionReason.INVALID_CHAIN,
                iot_cert,
                {"error": "the CA certificate does not decode", **exc.details},
            )
        if anchor is None:
            # Not a CA fleetkey manages: its certificates belong to someone else in the account.
            # Record the refusal, leave the certificate as it is (malformed or not).
            return self._refuse_alone(cert_id, claimed, RejectionReason.UNKNOWN_CA, iot_cert)
        if anchor.ca.status is CaStatus.DISABLED:
            return self._refuse_alone(cert_id, claimed, RejectionReason.CA_DISABLED, iot_cert)
        if leaf is None:
            return self._refuse_alone(
                cert_id, None, RejectionReason.MALFORMED_CERTIFICATE, iot_cert, problem
            )
        try:
            certificate = validate_device_certificate(
                leaf, anchor.certificate, self._clock(), BASELINE_KEY_POLICY
            )
        except InvalidCertificate as exc:
            return self._refuse_alone(cert_id, claimed, _reason(exc.reason), iot_cert, exc.details)
        except CERTIFICATE_PARSE_ERRORS as exc:
            # A field that fails to decode (the crypto module maps what it knows of to
            # InvalidCertificate; this is the registration edge's own guarantee).
            return self._refuse_alone(
                cert_id,
                claimed,
                RejectionReason.MALFORMED_CERTIFICATE,
                iot_cert,
                {"error": type(exc).__name__},
            )
        if not _is_device_id(certificate.device_id):
            # No device can have this id (nor could it be a table key): nothing to look up.
            return self._refuse_alone(cert_id, claimed, RejectionReason.NOT_ALLOWLISTED, iot_cert)
        return self._decide(certificate, anchor, iot_cert)

    # ---- decision ---------------------------------------------------------------------------

    def _decided(self, outcome: RegistrationOutcome) -> RegistrationOutcome:
        """The decision `outcome` describes has just been recorded, by this invocation."""
        outcome = replace(outcome, decided=True)
        if self._on_decision is not None:
            self._on_decision(outcome)
        return outcome

    def _decide(
        self, certificate: DeviceCertificate, anchor: TrustAnchor, iot_cert: IotCertificate
    ) -> RegistrationOutcome:
        at = timestamp(self._clock())
        subject = schema.certificate_subject(certificate.certificate_id)
        details = {
            **_details(certificate, anchor, RejectionReason.NOT_ALLOWLISTED),
            "device_id": certificate.device_id,
        }
        record = ChainHead().next_record(
            subject=subject, at=at, action="registration_refused", actor=ACTOR, details=details
        )
        try:
            # One write that is also the lookup: succeeds only if the device does not exist.
            self._certificates.refuse(
                certificate.certificate_id,
                certificate.device_id,
                record,
                at,
                unless_device_exists=True,
            )
        except AlreadyDecided as earlier:
            if earlier.device is not None and _superseded(earlier.decision, earlier.device):
                # Accepted in an earlier life of this (recommissioned) device: decide again.
                return self._decide_for_device(earlier.device, certificate, anchor, iot_cert)
            return self._follow(earlier.decision, earlier.device, iot_cert)
        except DeviceExists as exists:
            return self._decide_for_device(exists.device, certificate, anchor, iot_cert)
        decided = self._decided(
            RegistrationOutcome(
                iot_cert.certificate_id,
                False,
                certificate.device_id,
                RejectionReason.NOT_ALLOWLISTED,
            )
        )
        return self._revoke(iot_cert, decided)

    def _decide_for_device(
        self,
        device: Device,
        certificate: DeviceCertificate,
        anchor: TrustAnchor,
        iot_cert: IotCertificate,
    ) -> RegistrationOutcome:
        forced: RejectionReason | None = None
        for _ in range(MAX_DECISION_ROUNDS):
            reason = forced or refusal_for(device, certificate, anchor.ca)
            if reason is None and device.state is not DeviceState.ALLOWLISTED:
                # The device's own current certificate (its decision record is missing only if
                # written by something other than fleetkey): nothing to register.
                return RegistrationOutcome(certificate.certificate_id, True, device.device_id)
            if reason is RejectionReason.DECOMMISSIONED:
                return self._set_aside(device, iot_cert)
            at = timestamp(self._clock())
            accepted = reason is None
            decision = self._certificates.decision(
                certificate.certificate_id,
                CertificateOutcome.ACCEPTED if accepted else CertificateOutcome.REFUSED,
                device_id=device.device_id,
                reason=None if reason is None else reason.value,
                at=at,
                epoch=device.epoch,
            )
            details = _details(certificate, anchor, reason)
            try:
                if accepted:
                    held = HeldCertificate(
                        certificate_id=certificate.certificate_id,
                        role=CertificateRole.CURRENT,
                        origin=CertificateOrigin.FACTORY,
                        public_key_pem=certificate.public_key_pem,
                        key=certificate.key_description,
                        not_after=timestamp(certificate.not_after),
                        arn=iot_cert.arn,
                        not_before=timestamp(certificate.not_before),
                    )
                    self._devices.apply(
                        device,
                        DeviceChange(
                            action="registered",
                            actor=ACTOR,
                            at=at,
                            details=details,
                            transition=Transition.REGISTER,
                            certificates=(held,),
                            registered_at=at,
                            factory_certificate_id=certificate.certificate_id,
                        ),
                        with_writes=[decision, self._anchors.active_check(anchor.ca)],
                    )
                else:
                    self._devices.apply(
                        device,
                        DeviceChange(
                            action="registration_refused", actor=ACTOR, at=at, details=details
                        ),
                        with_writes=[decision],
                    )
            except AlreadyDecided as earlier:
                return self._follow(earlier.decision, earlier.device, iot_cert)
            except DeviceChanged as changed:
                if changed.current is None:
                    raise ConcurrentModification(f"device {device.device_id} vanished") from None
                device = changed.current
                continue
            except CaChanged:
                # Disabled since the snapshot (the device passed its check, so it is as read):
                # refuse, recorded in the device's chain.
                forced = RejectionReason.CA_DISABLED
                continue
            outcome = self._decided(
                RegistrationOutcome(iot_cert.certificate_id, accepted, device.device_id, reason)
            )
            if accepted:
                return self._provision(device, iot_cert, outcome)
            return self._revoke(iot_cert, outcome)
        raise ConcurrentModification(f"device {device.device_id} kept changing; retry")

    # ---- applying a decision ----------------------------------------------------------------

    def _follow(
        self, previous: CertificateRecord, device: Device | None, iot_cert: IotCertificate
    ) -> RegistrationOutcome:
        """A decision on this (pending) certificate exists (a retry or a concurrent copy):
        finish it. Not this invocation's decision, so the outcome has `decided=False`."""
        if previous.outcome is CertificateOutcome.REFUSED:
            outcome = RegistrationOutcome(
                iot_cert.certificate_id, False, previous.device_id, _reason(previous.reason)
            )
            return self._revoke(iot_cert, outcome)
        accepted = RegistrationOutcome(iot_cert.certificate_id, True, previous.device_id)
        if device is None and previous.device_id is not None:
            device = self._devices.get(previous.device_id)
        if device is not None and device.state is DeviceState.DECOMMISSIONED:
            return self._set_aside(device, iot_cert)
        if (
            device is not None
            and device.state is DeviceState.ACTIVE
            and device.epoch == (previous.epoch or 1)
            and device.holds(previous.certificate_id) is None
            and iot_cert.status == "PENDING_ACTIVATION"
        ):
            return self._retired_presented(device, iot_cert)
        if (
            device is None
            or device.state is not DeviceState.ACTIVE
            or device.holds(previous.certificate_id) is None
        ):
            # The device has moved on (suspended, recommissioned): leave AWS IoT as that left it.
            return accepted
        return self._provision(device, iot_cert, accepted)

    def _provision(
        self, device: Device, iot_cert: IotCertificate, outcome: RegistrationOutcome
    ) -> RegistrationOutcome:
        """Bring AWS IoT in line with an accepted registration (`fleetkey.converge`: idempotent
        steps a retry runs again). Activation is last, so a certificate is never usable before
        its thing and policy are in place; then the device is read again: if a suspension or
        decommission landed while this ran (it saw the certificate before it was active), the
        certificate is taken out of ACTIVE again, so AWS IoT follows the device's state.

        Raises:
            ThingConflict (audited), AWS errors (a retry converges).
        """
        if iot_cert.status == "ACTIVE":
            return outcome
        profile = get_profile(device.profile)
        prefix = self._settings.name_prefix
        cert_id, arn = iot_cert.certificate_id, iot_cert.arn

        def thing() -> None:
            try:
                stale = self._registry.ensure_thing(
                    device.device_id,
                    profile.thing_type_name(prefix),
                    {**device.thing_attributes(), "certificate_id": cert_id},
                    arn,
                    owned_thing_types=thing_type_names(prefix),
                )
            except ThingConflict as conflict:
                self._thing_conflict(device, iot_cert, conflict)
                raise
            if stale:
                logger.warning(
                    "took over an existing thing and detached its other certificates",
                    extra={"device_id": device.device_id, "detached": stale},
                )

        def follow_device() -> None:
            now = self._devices.get(device.device_id)
            if now is None or now.state is not DeviceState.ACTIVE:
                self._registry.set_certificate_status(cert_id, "INACTIVE")

        converge(
            [
                Step("thing", thing),
                Step(
                    "policy",
                    lambda: self._registry.attach_policy(profile.iot_policy_name(prefix), arn),
                ),
                Step("attach", lambda: self._registry.attach_exclusively(device.device_id, arn)),
                Step("activate", lambda: self._registry.activate_certificate(cert_id)),
                Step("follow the device", follow_device),
            ]
        )
        return outcome

    def _thing_conflict(
        self, device: Device, iot_cert: IotCertificate, conflict: ThingConflict
    ) -> None:
        """A thing named like the device exists and is not fleetkey's: AWS IoT is left as it is
        (the certificate stays pending, so the device cannot connect), and the clash is logged
        and audited (`thing_conflict` in `stream:registration-events`) on every attempt. The
        caller re-raises, so Lambda retries and the failure queue keeps the event for an
        operator to redrive once the name clash is resolved; the decision stays recorded, so
        the redrive finishes it.

        AWS calls: 2 (stream head, append), more if concurrent writers move the head.
        """
        logger.error(
            "a thing named like the device exists in AWS IoT and is not fleetkey's; "
            "registration not provisioned",
            extra={
                "device_id": device.device_id,
                "certificate_id": iot_cert.certificate_id,
                "thing_type": conflict.thing_type,
            },
        )
        self._audit.append_to_stream(
            REGISTRATION_EVENTS_STREAM,
            action="thing_conflict",
            actor=ACTOR,
            details={
                "device_id": device.device_id,
                "certificate_id": iot_cert.certificate_id,
                "thing_type": conflict.thing_type,
            },
            at=timestamp(self._clock()),
        )

    def _retired_presented(self, device: Device, iot_cert: IotCertificate) -> RegistrationOutcome:
        """A certificate this life of the device accepted and a rotation has since replaced and
        deleted, presented again (AWS IoT registered it anew): the device moved to another key,
        so whoever connects with the old one is not to be trusted. Revoked in AWS IoT (the
        factory certificate is released again by a recommission), audited in
        `stream:registration-events` as `retired_certificate_presented`.

        AWS calls: 2 (stream head, append) + UpdateCertificate.
        """
        logger.warning(
            "a certificate a rotation retired was presented again; revoked",
            extra={"device_id": device.device_id, "certificate_id": iot_cert.certificate_id},
        )
        self._audit.append_to_stream(
            REGISTRATION_EVENTS_STREAM,
            action="retired_certificate_presented",
            actor=ACTOR,
            details={"device_id": device.device_id, "certificate_id": iot_cert.certificate_id},
            at=timestamp(self._clock()),
        )
        return self._revoke(
            iot_cert,
            RegistrationOutcome(
                iot_cert.certificate_id, False, device.device_id, RejectionReason.RETIRED
            ),
        )

    def _set_aside(self, device: Device, iot_cert: IotCertificate) -> RegistrationOutcome:
        """A certificate that would be acceptable, presented for a DECOMMISSIONED device (a
        pump powered up in storage): refused without burning it. No decision is recorded and
        the certificate is not revoked (REVOKED is final in AWS IoT): it is deleted from AWS IoT,
        so that after a recommission the device's next connection registers it afresh. Audited
        in `stream:registration-events` as `decommissioned_device_connected`.

        AWS calls: 2 (stream head, append) + the certificate's removal (`teardown_certificate`).
        """
        logger.warning(
            "a decommissioned device connected; its certificate is set aside",
            extra={"device_id": device.device_id, "certificate_id": iot_cert.certificate_id},
        )
        self._audit.append_to_stream(
            REGISTRATION_EVENTS_STREAM,
            action="decommissioned_device_connected",
            actor=ACTOR,
            details={"device_id": device.device_id, "certificate_id": iot_cert.certificate_id},
            at=timestamp(self._clock()),
        )
        if iot_cert.status != "ACTIVE":
            self._registry.teardown_certificate(iot_cert.certificate_id)
        return RegistrationOutcome(
            iot_cert.certificate_id, False, device.device_id, RejectionReason.DECOMMISSIONED
        )

    def _revoke(
        self, iot_cert: IotCertificate, outcome: RegistrationOutcome
    ) -> RegistrationOutcome:
        # A certificate of a CA fleetkey does not manage belongs to someone else in the account:
        # the refusal is recorded, the certificate left as it is.
        if outcome.reason is not RejectionReason.UNKNOWN_CA and iot_cert.status != "REVOKED":
            self._registry.revoke_certificate(iot_cert.certificate_id)
        return outcome

    def _refuse_alone(
        self,
        cert_id: str,
        claimed_device_id: str | None,
        reason: RejectionReason,
        iot_cert: IotCertificate,
        extra: dict[str, Any] | None = None,
    ) -> RegistrationOutcome:
        """Refuse a certificate on its own merits: its subject is not trusted, so the record goes
        to the certificate's own chain, not to the device it names."""
        at = timestamp(self._clock())
        # The reason last: it is what the decision record stores, never a detail's namesake.
        details = {**(extra or {}), "reason": reason.value, "claimed_device_id": claimed_device_id}
        record = ChainHead().next_record(
            subject=schema.certificate_subject(cert_id),
            at=at,
            action="registration_refused",
            actor=ACTOR,
            details=details,
        )
        try:
            self._certificates.refuse(cert_id, claimed_device_id, record, at)
        except AlreadyDecided as earlier:
            # Decided earlier (a retry, a copy, or accepted under a CA since disabled): keep and
            # finish that decision.
            return self._follow(earlier.decision, None, iot_cert)
        decided = self._decided(RegistrationOutcome(cert_id, False, claimed_device_id, reason))
        return self._revoke(iot_cert, decided)


def _superseded(decision: CertificateRecord, device: Device) -> bool:
    """Whether `decision` accepted the certificate for an earlier life of `device` (it has been
    recommissioned since): its factory certificate is then decided again."""
    return (
        decision.outcome is CertificateOutcome.ACCEPTED
        and decision.device_id == device.device_id
        and (decision.epoch or 1) < device.epoch
    )


def _read_leaf(iot_cert: IotCertificate) -> tuple[x509.Certificate | None, dict[str, Any]]:
    """The certificate AWS IoT holds, parsed, or None and why not (audit details). Never raises
    for any content of the PEM."""
    try:
        leaf = load_certificate(iot_cert.pem)
        if certificate_id(leaf) != iot_cert.certificate_id:
            return None, {"error": "the certificate id is not the SHA-256 of its DER"}
    except InvalidCertificate as exc:
        return None, {**exc.details, "problem": exc.message[:300]}
    except CERTIFICATE_PARSE_ERRORS as exc:
        return None, {"error": type(exc).__name__}
    return leaf, {}


def _claimed(leaf: x509.Certificate | None) -> str | None:
    """The subject CN, unverified and truncated: recorded for operators, never trusted."""
    return claimed_common_name(leaf) if leaf is not None else None


def _is_device_id(value: str) -> bool:
    try:
        _device_id.validate_python(value)
    except ValidationError:
        return False
    return True


def _reason(value: str | None) -> RejectionReason:
    """A recorded reason; one this version does not know (or none) reads as
    malformed_certificate."""
    if value is None:
        return RejectionReason.MALFORMED_CERTIFICATE
    try:
        return RejectionReason(value)
    except ValueError:
        return RejectionReason.MALFORMED_CERTIFICATE


def _details(
    certificate: DeviceCertificate, anchor: TrustAnchor, reason: RejectionReason | None
) -> dict[str, Any]:
    details: dict[str, Any] = {
        "certificate_id": certificate.certificate_id,
        "manufacturer_ca": anchor.ca.name,
        "key": certificate.key_description,
        "not_after": timestamp(certificate.not_after),
        "public_key_fingerprint": certificate.public_key_fingerprint,
    }
    if reason is not None:
        details["reason"] = reason.value
    return details
