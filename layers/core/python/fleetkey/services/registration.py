"""Just-in-time registration: decide on a certificate AWS IoT auto-registered, and make it so.

AWS call budget (warm trust-anchor cache):
    accepted: describe certificate, device lookup, registration transaction, create thing,
              attach policy, attach thing, activate certificate            = 7
    refused on the certificate's own merits: describe, record, revoke      = 3
    refused, no such device: describe, lookup-and-record, revoke           = 3
    refused, known device (clone, decommissioned, ...): describe, lookup,
              record in the device's chain, revoke                         = 4

Every write is conditional and every AWS IoT call is idempotent, so a duplicate event, concurrent
copies, or a retry after a failure at any call all end in the state of one clean run. The
certificate record (CERT#<id>) is the decision: it is written once, in the same transaction as the
device change, and a retry that finds it finishes what the decision implies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from fleetkey.adapters.iot import IotCertificate, IotRegistry
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.certificates import (
    DeviceCertificate,
    certificate_id,
    load_certificate,
    validate_device_certificate,
)
from fleetkey.domain.audit import ChainHead
from fleetkey.domain.lifecycle import DeviceState, Transition, target_state
from fleetkey.domain.models import CaStatus, CertificateOutcome, CertificateRecord, Device
from fleetkey.domain.profiles import get_profile
from fleetkey.domain.registration import BASELINE_KEY_POLICY, refusal_for
from fleetkey.domain.rejection import RejectionReason
from fleetkey.errors import ConcurrentModification, InvalidCertificate
from fleetkey.events import CertificateRegisteredEvent
from fleetkey.services.trust import TrustAnchor, TrustAnchors
from fleetkey.settings import Settings
from fleetkey.store import schema
from fleetkey.store.dynamodb import ConditionFailed, Store

ACTOR = "aws-iot:jitr"
logger = logging.getLogger(__name__)
MALFORMED_EVENTS_STREAM = "registration-events"
MAX_DECISION_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class RegistrationOutcome:
    certificate_id: str
    accepted: bool
    device_id: str | None = None
    reason: RejectionReason | None = None


class RegistrationService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: IotRegistry,
        anchors: TrustAnchors,
        clock: Clock = utc_now,
    ) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry
        self._anchors = anchors
        self._clock = clock

    # ---- entry points -----------------------------------------------------------------------

    def register(self, event: CertificateRegisteredEvent) -> RegistrationOutcome:
        """Decide on the certificate of a certificate-registered event and apply the decision.

        Raises:
            TransientAwsError, botocore errors: an AWS call failed; retrying the same event
                converges.
        """
        cert_id = event.certificateId
        iot_cert = self._registry.describe_certificate(cert_id)
        if iot_cert is None:
            return self._refuse_alone(cert_id, None, RejectionReason.UNKNOWN_CERTIFICATE, None)
        try:
            leaf = load_certificate(iot_cert.pem)
        except InvalidCertificate:
            leaf = None
        if leaf is None or certificate_id(leaf) != cert_id:
            return self._refuse_alone(
                cert_id, None, RejectionReason.MALFORMED_CERTIFICATE, iot_cert
            )
        claimed = _claimed_device_id(leaf)
        anchor = self._anchors.get(event.caCertificateId)
        if anchor is not None and anchor.ca.status is CaStatus.DISABLED:
            # A refusal revokes for good: make sure the CA was not re-enabled since the snapshot.
            self._anchors.refresh()
            anchor = self._anchors.get(event.caCertificateId)
        if anchor is None:
            # Not a CA fleetkey manages: its certificates belong to someone else in the account.
            # Record the refusal, leave the certificate as it is.
            return self._refuse_alone(cert_id, claimed, RejectionReason.UNKNOWN_CA, iot_cert)
        if anchor.ca.status is CaStatus.DISABLED:
            return self._refuse_alone(cert_id, claimed, RejectionReason.CA_DISABLED, iot_cert)
        try:
            certificate = validate_device_certificate(
                leaf, anchor.certificate, self._clock(), BASELINE_KEY_POLICY
            )
        except InvalidCertificate as exc:
            return self._refuse_alone(
                cert_id, claimed, RejectionReason(exc.reason), iot_cert, exc.details
            )
        return self._decide(certificate, anchor, iot_cert)

    def record_malformed_event(self, event: object, problem: str) -> None:
        """Audit an event that does not have the documented shape (it is not retried)."""
        self._store.append_to_stream(
            MALFORMED_EVENTS_STREAM,
            action="malformed_event",
            actor=ACTOR,
            details={"problem": problem[:1000], "event": repr(event)[:2000]},
            at=timestamp(self._clock()),
        )

    # ---- decision ---------------------------------------------------------------------------

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
            self._store.refuse_certificate(
                certificate.certificate_id,
                certificate.device_id,
                record,
                at,
                unless_device_exists=True,
            )
        except ConditionFailed as failure:
            device_item = failure.items.get("device")
            device = self._store.device_from_item(device_item) if device_item else None
            previous = failure.items.get("certificate")
            if previous is not None:
                return self._follow(self._store.certificate_from_item(previous), device, iot_cert)
            assert device is not None
            return self._decide_for_device(device, certificate, anchor, iot_cert)
        return self._revoke(iot_cert, certificate.device_id, RejectionReason.NOT_ALLOWLISTED)

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
            if reason is None and iot_cert.status != "PENDING_ACTIVATION":
                reason = RejectionReason.CERTIFICATE_NOT_PENDING
            at = timestamp(self._clock())
            accepted = reason is None
            record = device.audit_head.next_record(
                subject=schema.device_subject(device.device_id),
                at=at,
                action="registered" if accepted else "registration_refused",
                actor=ACTOR,
                details=_details(certificate, anchor, reason),
            )
            decision = self._store.certificate_put(
                certificate.certificate_id,
                CertificateOutcome.ACCEPTED if accepted else CertificateOutcome.REFUSED,
                device_id=device.device_id,
                reason=None if accepted else reason.value,
                at=at,
            )
            try:
                if accepted:
                    self._store.update_device(
                        device,
                        record,
                        new_state=target_state(device.state, Transition.REGISTER),
                        set_attributes={
                            "certificate_id": certificate.certificate_id,
                            "certificate_public_key": certificate.public_key_pem,
                            "certificate_key": certificate.key_description,
                            "certificate_not_after": timestamp(certificate.not_after),
                            "registered_at": at,
                        },
                        extra=[decision, self._store.ca_active_check(anchor.ca)],
                    )
                else:
                    self._store.update_device(device, record, extra=[decision])
            except ConditionFailed as failure:
                if "certificate" in failure.failed:
                    previous = self._store.certificate_from_item(failure.items["certificate"])
                    current = failure.items.get("device")
                    return self._follow(
                        previous,
                        self._store.device_from_item(current) if current else None,
                        iot_cert,
                    )
                if "device" in failure.failed:
                    device = self._store.device_from_item(failure.items["device"])
                    continue
                if "ca" in failure.failed:
                    # Disabled since the snapshot (the device passed its check, so it is as
                    # read): refuse, recorded in the device's chain.
                    forced = RejectionReason.CA_DISABLED
                    continue
                raise
            if accepted:
                return self._provision(device, iot_cert)
            return self._revoke(iot_cert, device.device_id, reason)
        raise ConcurrentModification(f"device {device.device_id} kept changing; retry")

    # ---- applying a decision ----------------------------------------------------------------

    def _follow(
        self, previous: CertificateRecord, device: Device | None, iot_cert: IotCertificate
    ) -> RegistrationOutcome:
        """A decision on this certificate exists (a retry or a concurrent copy): finish it."""
        if previous.outcome is CertificateOutcome.REFUSED:
            return self._revoke(iot_cert, previous.device_id, RejectionReason(previous.reason))
        if device is None:
            device = self._store.get_device(previous.device_id)
        still_current = (
            device is not None
            and device.state is DeviceState.ACTIVE
            and device.certificate_id == previous.certificate_id
        )
        if not still_current:
            # The device has moved on (suspended, decommissioned): leave AWS IoT as that left it.
            return RegistrationOutcome(iot_cert.certificate_id, True, previous.device_id)
        return self._provision(device, iot_cert)

    def _provision(self, device: Device, iot_cert: IotCertificate) -> RegistrationOutcome:
        """Bring AWS IoT in line with an accepted registration. Activation is last, so a
        certificate is never usable before its thing and policy are in place."""
        if iot_cert.status != "ACTIVE":
            profile = get_profile(device.profile)
            prefix = self._settings.name_prefix
            stale = self._registry.ensure_thing(
                device.device_id,
                profile.thing_type_name(prefix),
                {**device.thing_attributes(), "certificate_id": iot_cert.certificate_id},
                iot_cert.arn,
            )
            if stale:
                logger.warning(
                    "took over an existing thing and detached its other certificates",
                    extra={"device_id": device.device_id, "detached": stale},
                )
            self._registry.attach_policy(profile.iot_policy_name(prefix), iot_cert.arn)
            self._registry.attach_exclusively(device.device_id, iot_cert.arn)
            self._registry.activate_certificate(iot_cert.certificate_id)
        return RegistrationOutcome(iot_cert.certificate_id, True, device.device_id)

    def _revoke(
        self, iot_cert: IotCertificate, device_id: str | None, reason: RejectionReason
    ) -> RegistrationOutcome:
        # A certificate of a CA fleetkey does not manage belongs to someone else in the account:
        # the refusal is recorded, the certificate left as it is.
        if reason is not RejectionReason.UNKNOWN_CA and iot_cert.status != "REVOKED":
            self._registry.revoke_certificate(iot_cert.certificate_id)
        return RegistrationOutcome(iot_cert.certificate_id, False, device_id, reason)

    def _refuse_alone(
        self,
        cert_id: str,
        claimed_device_id: str | None,
        reason: RejectionReason,
        iot_cert: IotCertificate | None,
        extra: dict | None = None,
    ) -> RegistrationOutcome:
        """Refuse a certificate on its own merits: its subject is not trusted, so the record goes
        to the certificate's own chain, not to the device it names."""
        at = timestamp(self._clock())
        details = {"reason": reason.value, "claimed_device_id": claimed_device_id, **(extra or {})}
        record = ChainHead().next_record(
            subject=schema.certificate_subject(cert_id),
            at=at,
            action="registration_refused",
            actor=ACTOR,
            details=details,
        )
        try:
            self._store.refuse_certificate(cert_id, claimed_device_id, record, at)
        except ConditionFailed as failure:
            previous = self._store.certificate_from_item(failure.items["certificate"])
            if previous.outcome is CertificateOutcome.ACCEPTED:
                # Decided earlier (e.g. accepted under a CA since disabled, or a late duplicate of
                # an event whose certificate was since deleted): keep that decision.
                if iot_cert is None:
                    return RegistrationOutcome(cert_id, True, previous.device_id)
                return self._follow(previous, None, iot_cert)
            reason = RejectionReason(previous.reason)
        if iot_cert is None:
            return RegistrationOutcome(cert_id, False, claimed_device_id, reason)
        return self._revoke(iot_cert, claimed_device_id, reason)


def _claimed_device_id(leaf: x509.Certificate) -> str | None:
    """The subject CN, unverified: recorded for operators, never trusted."""
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value[:128] if isinstance(value, str) else None


def _details(
    certificate: DeviceCertificate, anchor: TrustAnchor, reason: RejectionReason | None
) -> dict:
    details = {
        "certificate_id": certificate.certificate_id,
        "manufacturer_ca": anchor.ca.name,
        "key": certificate.key_description,
        "not_after": timestamp(certificate.not_after),
        "public_key_fingerprint": certificate.public_key_fingerprint,
    }
    if reason is not None:
        details["reason"] = reason.value
    return details
