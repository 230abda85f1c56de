"""The device lifecycle after registration: suspend, resume, decommission, recommission (and so
ownership transfer), each decided first and then converged.

Decide, then converge (`fleetkey.converge`): the decision is one conditional write through the
device repository (the transition and its audit record in one transaction), so from that instant
nothing is granted that the new state forbids (tokens and data keys check the device in the same
transaction that grants them). AWS IoT is then brought in line with the state the device has *now*
(not the state this call decided: a later change may have landed), and read again; if the device
moved meanwhile, it is brought in line again. Every step is idempotent, so any retry, a
concurrent copy or the queue's redelivery finishes what a failure left.

    ACTIVE          every certificate of the device ACTIVE
    SUSPENDED       every certificate INACTIVE, the MQTT connection closed
    DECOMMISSIONED  until the teardown completes: a reset command, certificates INACTIVE, the
                    connection closed, policies and thing principals detached, certificates and
                    thing deleted, data keys destroyed; then `teardown_completed`
    ALLOWLISTED     nothing in AWS IoT (the factory certificate registers through JITR)

Suspend and resume converge in the request (a suspended pump is cut off at once); when AWS fails
there, the device is queued and the converge function finishes it. Decommission queues its
teardown (it waits out AWS IoT's eventual consistency, which may outlast a request) and answers
at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial

from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.converge import Step, converge
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.lifecycle import DeviceState, Transition, target_state
from fleetkey.domain.models import (
    CertificateOrigin,
    CertificateRole,
    Device,
    Teardown,
    TeardownStatus,
)
from fleetkey.domain.pki import Revocation
from fleetkey.domain.profiles import get_profile, thing_type_names
from fleetkey.errors import (
    ConcurrentModification,
    Conflict,
    FleetkeyError,
    InvalidRequest,
    NotFound,
)
from fleetkey.ports import (
    CertificateControl,
    CertificateDecisions,
    DataKeyRecords,
    DeviceChange,
    DeviceChanged,
    DeviceConnections,
    DeviceRepository,
    LifecycleQueue,
    RevocationRecords,
    Write,
)
from fleetkey.settings import Settings

logger = logging.getLogger(__name__)

# An operator's reason: printable, single line, bounded (it lands in audit records and logs).
_REASON = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
# An owner: an account, tenant or customer id (it is part of data keys' encryption context).
OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@-]{0,127}")
MAX_ROUNDS = 4
TAMPER = "tamper"
# A teardown normally ends in its first delivery (seconds), or a few minutes later once AWS IoT
# settles its detaches. Still pending this long after the decommission, several deliveries have
# failed (the lifecycle queue redelivers every 6 minutes, 8 times, then keeps the message in its
# dead-letter queue): the `teardown_overdue` observation (`TeardownsOverdue`), before that.
TEARDOWN_DEADLINE = timedelta(minutes=30)

Observer = Callable[[str, Device], None]


class Superseded(Exception):
    """The device moved on while its convergence ran: start again from what it is now."""


class LifecycleService:
    """`on_change(action, device)` is called once per committed change (for metrics), and with
    `teardown_overdue` once per convergence that finds the device's teardown still pending
    TEARDOWN_DEADLINE after it started (a stuck teardown; nothing is committed)."""

    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        certificates: CertificateControl,
        connections: DeviceConnections,
        queue: LifecycleQueue | None,
        data_keys: DataKeyRecords,
        decisions: CertificateDecisions,
        clock: Clock = utc_now,
        on_change: Observer | None = None,
        revocations: RevocationRecords | None = None,
    ) -> None:
        self._settings = settings
        self._revocations = revocations
        self._devices = devices
        self._certificates = certificates
        self._connections = connections
        self._queue = queue
        self._data_keys = data_keys
        self._decisions = decisions
        self._clock = clock
        self._on_change = on_change

    # ---- operations ------------------------------------------------------------------------

    def suspend(self, device_id: str, *, reason: str, actor: str) -> Device:
        """ACTIVE -> SUSPENDED: no token, data key or rotation from now; tokens issued before
        stay inactive (also after a resume); certificates INACTIVE and the connection closed.
        Suspending a suspended device changes nothing and converges again (a retry).

        AWS calls: 6 + 2n for n certificates (measured by benchmarks/lifecycle.py): read,
        transition; converge: read, per certificate DescribeCertificate + UpdateCertificate,
        DeleteConnection, a read to confirm; the device read to answer; SendMessage if AWS
        failed.

        Raises:
            NotFound, InvalidRequest (reason), IllegalTransition (not ACTIVE or SUSPENDED).
        """
        _check_reason(reason)
        device = self._transition(
            device_id,
            Transition.SUSPEND,
            action="suspended",
            actor=actor,
            details={"reason": reason},
            done=DeviceState.SUSPENDED,
            tokens_cut=True,
        )
        return self._converge_now(device)

    def resume(self, device_id: str, *, actor: str) -> Device:
        """SUSPENDED -> ACTIVE: certificates ACTIVE again. Tokens issued before the suspension
        stay inactive. Resuming an ACTIVE device changes nothing (a retry).

        AWS calls: 5 + 2n (as `suspend`, without DeleteConnection).

        Raises:
            NotFound, IllegalTransition (not SUSPENDED or ACTIVE).
        """
        device = self._transition(
            device_id,
            Transition.RESUME,
            action="resumed",
            actor=actor,
            details={},
            done=DeviceState.ACTIVE,
        )
        return self._converge_now(device)

    def decommission(self, device_id: str, *, reason: str, actor: str) -> Device:
        """-> DECOMMISSIONED at once (nothing is granted from then on); the teardown is queued
        (the answer is 202: `teardown.status` tells its progress). Decommissioning a
        decommissioned device queues its unfinished teardown again (a retry).

        AWS calls: 2 (read, transition) + 1 (SendMessage).

        Raises:
            NotFound, InvalidRequest (reason), IllegalTransition (already recommissioned...),
            TransientAwsError: the teardown could not be queued (the state is recorded; a retry
                queues it).
        """
        _check_reason(reason)
        if self._queue is None:  # checked before anything is recorded
            raise FleetkeyError("no lifecycle queue is configured: the teardown could not run")
        now = self._clock()
        teardown = Teardown(status=TeardownStatus.PENDING, started_at=timestamp(now))
        device = self._transition(
            device_id,
            Transition.DECOMMISSION,
            action="decommissioned",
            actor=actor,
            details={"reason": reason},
            done=DeviceState.DECOMMISSIONED,
            tokens_cut=True,
            teardown=lambda d: replace(
                teardown, certificates=tuple(c.certificate_id for c in d.certificates)
            ),
            with_writes=self._revoke_issued,
        )
        if device.teardown is not None and device.teardown.status is TeardownStatus.PENDING:
            self._enqueue(device)
        return device

    def recommission(
        self,
        device_id: str,
        *,
        actor: str,
        owner: str | None = None,
        profile: str | None = None,
    ) -> Device:
        """DECOMMISSIONED (teardown completed) -> ALLOWLISTED, in the device's next life (epoch
        + 1), optionally for a new owner (an ownership transfer) and profile. The device
        re-onboards through JITR with its factory certificate, which is first removed from AWS
        IoT whatever AWS IoT recorded for it meanwhile, so that it registers afresh; certificates
        refused for cause stay refused (their decisions are never replaced).

        AWS calls: 4 when AWS IoT no longer has the factory certificate: read, DescribeCertificate
        (its status, for the audit record), transition, DescribeCertificate (its release); its
        removal otherwise (`_release_factory_certificate`).

        Raises:
            NotFound, InvalidRequest (owner, profile), IllegalTransition (not DECOMMISSIONED),
            Conflict: the teardown has not completed yet.
        """
        if owner is not None and not OWNER.fullmatch(owner):
            raise InvalidRequest("owner must be 1-128 characters of A-Z a-z 0-9 : _ . @ -")
        if profile is not None:
            get_profile(profile)  # InvalidRequest for an unknown profile
        device = self._get(device_id)
        for _ in range(MAX_ROUNDS):
            if (
                device.state is DeviceState.ALLOWLISTED
                and device.epoch > 1
                and (owner is None or owner == device.owner)
                and (profile is None or profile == device.profile)
            ):
                # A retry of this recommission: finish what it may have left.
                self._release_factory_certificate(device)
                return device
            # Refused before anything else is asked of AWS.
            target_state(device.state, Transition.RECOMMISSION)
            self._check_recommission(device, profile)
            factory = device.factory_certificate_id
            details = {
                "previous_owner": device.owner,
                "owner": owner if owner is not None else device.owner,
                "previous_profile": device.profile,
                "profile": profile or device.profile,
                "epoch": device.epoch + 1,
                "transfer": owner is not None and owner != device.owner,
                # What AWS IoT held for the factory certificate (REVOKED by someone outside
                # fleetkey included): it is removed, so that the device registers afresh.
                "factory_certificate_in_aws_iot": (
                    self._certificates.certificate_status(factory) if factory else None
                ),
            }
            change = DeviceChange(
                action="recommissioned",
                actor=actor,
                at=timestamp(self._clock()),
                details=details,
                transition=Transition.RECOMMISSION,
                epoch=device.epoch + 1,
                certificates=(),
                owner=owner,
                profile=profile,
                clear_teardown=True,
            )
            try:
                device = self._devices.apply(device, change)
            except DeviceChanged as changed:
                device = self._current(device_id, changed)
                continue
            self._notify("recommissioned", device)
            if details["transfer"]:
                self._notify("ownership_transferred", device)
            self._release_factory_certificate(device)
            return device
        raise ConcurrentModification(f"device {device_id} kept changing; retry")

    def _check_recommission(self, device: Device, profile: str | None) -> None:
        """A recommission may start only once no teardown can still be running, and only into a
        profile the device's factory certificate satisfies (else JITR would refuse it for cause,
        burning the device's only factory identity).

        Raises:
            Conflict: the teardown is pending, or completed less than the quiet period ago.
            InvalidRequest: the profile does not accept the factory certificate's key.
        """
        teardown = device.teardown
        if teardown is None or teardown.status is TeardownStatus.PENDING:
            raise Conflict(
                f"device {device.device_id} is still being torn down; recommission it once "
                "teardown.status is completed"
            )
        quiet = self._settings.recommission_quiet_seconds
        if teardown.completed_at and quiet:
            since = self._clock() - datetime.fromisoformat(teardown.completed_at)
            if since.total_seconds() < quiet:
                raise Conflict(
                    f"device {device.device_id}'s teardown completed "
                    f"{int(since.total_seconds())} s ago; recommission it {quiet} s after "
                    "(no copy of the teardown may still be running)"
                )
        factory = device.holds(device.factory_certificate_id or "")
        if (
            profile is not None
            and factory is not None
            and not get_profile(profile).key_policy.allows(factory.key)
        ):
            raise InvalidRequest(
                f"profile {profile!r} does not accept the device's factory certificate key "
                f"({factory.key}); JITR would refuse the device"
            )

    def _release_factory_certificate(self, device: Device) -> None:
        """After a recommission committed: remove the factory certificate from AWS IoT, so that
        the device's next connection registers it afresh (JITR sees a certificate only when AWS
        IoT registers it). Left alone when AWS IoT no longer has it, when it is ACTIVE (nothing
        in this life activated it yet: someone else did; logged), or when the new life has
        decided on it already (the device connected meanwhile). AWS IoT cannot register it again
        while it is present, so no new registration can race this removal.

        AWS calls: 1 (DescribeCertificate) when AWS IoT no longer has it; else + 1 GetItem +
        the removal (`teardown_certificate`).
        """
        factory = device.factory_certificate_id
        if not factory or device.state is not DeviceState.ALLOWLISTED:
            return
        status = self._certificates.certificate_status(factory)
        if status is None:
            return
        if status == "ACTIVE":
            logger.warning(
                "the factory certificate of a recommissioned device is ACTIVE in AWS IoT; left",
                extra={"device_id": device.device_id, "certificate_id": factory},
            )
            return
        decision = self._decisions.get(factory)
        if decision is not None and decision.epoch == device.epoch:
            return
        self._certificates.teardown_certificate(factory)

    # ---- convergence ------------------------------------------------------------------------

    def converge(self, device_id: str) -> bool:
        """Bring AWS IoT in line with the device's recorded state (the module's table), then
        read the device again and repeat while it moved. True when AWS IoT matches; False when
        a step could not finish yet (AWS IoT's eventual consistency: retry later).

        AWS calls: 1 read per round + the state's steps (see `_steps`) + a confirming read; a
        teardown is 13 + 9n for n certificates (+ 1 DeleteItem per data key): 3 reads, n + 3
        fences, the reset, per certificate its deactivation and removal, DeleteConnection, the
        thing's removal, the data keys' Query, the `teardown_completed` transaction.

        Raises:
            NotFound: no such device; AWS errors (a retry converges).
        """
        for round_ in range(MAX_ROUNDS):
            device = self._get(device_id)
            if round_ == 0 and self._teardown_overdue(device):
                self._notify("teardown_overdue", device)
            try:
                if not converge(self._steps(device)):
                    return False
            except Superseded:
                continue  # the device moved on: converge to what it is now
            if (
                device.state is DeviceState.DECOMMISSIONED
                and device.teardown is not None
                and device.teardown.status is TeardownStatus.PENDING
            ):
                self._complete_teardown(device)
                continue
            latest = self._get(device_id)
            if latest.audit_head == device.audit_head:
                return True
        return False

    def _teardown_overdue(self, device: Device) -> bool:
        """Whether `device`'s teardown is pending TEARDOWN_DEADLINE after it started."""
        teardown = device.teardown
        return (
            device.state is DeviceState.DECOMMISSIONED
            and teardown is not None
            and teardown.status is TeardownStatus.PENDING
            and self._clock() - datetime.fromisoformat(teardown.started_at) >= TEARDOWN_DEADLINE
        )

    def _steps(self, device: Device) -> list[Step]:
        certificates = [c.certificate_id for c in device.certificates]
        if device.state is DeviceState.ACTIVE:
            # A retired certificate (replaced or rolled back by a rotation) stays INACTIVE; a
            # pending one not yet in AWS IoT is left to the rotation that registers it.
            return [
                Step(
                    f"{'deactivate' if c.role is CertificateRole.RETIRED else 'activate'} "
                    f"{c.certificate_id}",
                    partial(
                        self._certificates.set_certificate_status,
                        c.certificate_id,
                        "INACTIVE" if c.role is CertificateRole.RETIRED else "ACTIVE",
                    ),
                )
                for c in device.certificates
            ]
        if device.state is DeviceState.SUSPENDED:
            return [
                *(
                    Step(
                        f"deactivate {c}",
                        partial(self._certificates.set_certificate_status, c, "INACTIVE"),
                    )
                    for c in certificates
                ),
                Step("disconnect", lambda: self._connections.disconnect(device.device_id)),
            ]
        teardown = device.teardown
        if (
            device.state is DeviceState.DECOMMISSIONED
            and teardown is not None
            and teardown.status is TeardownStatus.PENDING
        ):
            owned = thing_type_names(self._settings.name_prefix)
            # Before each deletion: the device is still in this teardown (SQS delivers at least
            # once: a late copy must never delete what a later life registered).
            fence = Step("fence", partial(self._fence, device))
            return [
                fence,
                # First, while the device may still be connected to hear it.
                Step(
                    "reset command",
                    lambda: self._connections.send_command(
                        device.device_id,
                        "reset",
                        {"reason": "decommissioned", "epoch": device.epoch},
                    ),
                ),
                *(
                    Step(
                        f"deactivate {c}",
                        partial(self._certificates.set_certificate_status, c, "INACTIVE"),
                    )
                    for c in teardown.certificates
                ),
                Step("disconnect", lambda: self._connections.disconnect(device.device_id)),
                *(
                    step
                    for c in teardown.certificates
                    for step in (
                        fence,
                        Step(f"delete {c}", partial(self._certificates.teardown_certificate, c)),
                    )
                ),
                fence,
                Step(
                    "delete thing",
                    lambda: self._certificates.delete_thing(
                        device.device_id, owned_thing_types=owned
                    ),
                ),
                fence,
                Step(
                    "destroy data keys",
                    lambda: self._data_keys.destroy(device.device_id, up_to_epoch=device.epoch),
                ),
            ]
        return []

    def _fence(self, device: Device) -> None:
        """Raises Superseded unless the device is still DECOMMISSIONED in the same life, its
        teardown pending. AWS calls: 1 (GetItem)."""
        now = self._devices.get(device.device_id)
        if (
            now is None
            or now.state is not DeviceState.DECOMMISSIONED
            or now.epoch != device.epoch
            or now.teardown is None
            or now.teardown.status is not TeardownStatus.PENDING
        ):
            raise Superseded(f"device {device.device_id} moved on")

    def _complete_teardown(self, device: Device) -> Device:
        """Record that the teardown finished (idempotent: a device already recorded so, or moved
        on, is left as it is)."""
        if device.teardown is None:
            return device
        at = timestamp(self._clock())
        change = DeviceChange(
            action="teardown_completed",
            actor="fleetkey:converge",
            at=at,
            details={"certificates": list(device.teardown.certificates)},
            teardown=replace(device.teardown, status=TeardownStatus.COMPLETED, completed_at=at),
        )
        try:
            device = self._devices.apply(device, change)
        except DeviceChanged:
            return device  # another copy recorded it, or the device moved on: read again
        self._notify("teardown_completed", device)
        return device

    def _converge_now(self, device: Device) -> Device:
        """Converge in the request; if AWS fails or AWS IoT has not settled, leave it to the
        converge function (queued), so nothing stays half-done."""
        try:
            if self.converge(device.device_id):
                return self._get(device.device_id)
        except (ClientError, BotoCoreError) as exc:
            if not is_transient(exc):
                # Not AWS being busy (a missing grant, a bug): the queue will meet it too, and
                # its dead-letter queue keeps the device for an operator.
                logger.error(
                    "converging in the request failed; queued",
                    extra={"device_id": device.device_id, "error": str(exc)},
                )
            else:
                logger.info("AWS busy; convergence queued", extra={"device_id": device.device_id})
        except FleetkeyError as exc:
            logger.info(
                "convergence queued", extra={"device_id": device.device_id, "code": exc.code}
            )
        self._enqueue(device)
        return self._get(device.device_id)

    def _enqueue(self, device: Device) -> None:
        if self._queue is None:
            raise FleetkeyError("no lifecycle queue is configured")
        self._queue.enqueue(device.device_id, device.epoch)

    # ---- helpers -----------------------------------------------------------------------------

    def _get(self, device_id: str) -> Device:
        if not DEVICE_ID.fullmatch(device_id):
            raise NotFound(f"no device {device_id[:128]!r}")
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    def _current(self, device_id: str, changed: DeviceChanged) -> Device:
        if changed.current is None:
            raise NotFound(f"no device {device_id!r}")
        return changed.current

    def _transition(
        self,
        device_id: str,
        transition: Transition,
        *,
        action: str,
        actor: str,
        details: dict[str, object],
        done: DeviceState,
        tokens_cut: bool = False,
        teardown: Callable[[Device], Teardown] | None = None,
        with_writes: Callable[[Device], Sequence[Write]] | None = None,
    ) -> Device:
        """Apply `transition` unless the device is already in `done` (a retry: returned as it
        is), re-reading and deciding again when a concurrent change lands first."""
        device = self._get(device_id)
        for _ in range(MAX_ROUNDS):
            if device.state is done:
                return device
            now = self._clock()
            change = DeviceChange(
                action=action,
                actor=actor,
                at=timestamp(now),
                details=details,
                transition=transition,
                # Whole seconds, like a token's iat: every token issued up to now is older.
                tokens_not_before=int(now.timestamp()) + 1 if tokens_cut else None,
                teardown=teardown(device) if teardown else None,
            )
            try:
                device = self._devices.apply(
                    device, change, with_writes=with_writes(device) if with_writes else ()
                )
            except DeviceChanged as changed:
                device = self._current(device_id, changed)
                continue
            self._notify(action, device)
            return device
        raise ConcurrentModification(f"device {device_id} kept changing; retry")

    def _revoke_issued(self, device: Device) -> Sequence[Write]:
        """A decommission revokes the certificates fleetkey issued that are still in force
        (current or pending; a retired one was revoked when it was retired): listed in the CRL
        until they expire, in the transaction that decommissions."""
        if self._revocations is None:
            return ()
        at = timestamp(self._clock())
        return self._revocations.revocations(
            [
                Revocation(
                    serial=c.serial,
                    certificate_id=c.certificate_id,
                    device_id=device.device_id,
                    not_after=c.not_after,
                    revoked_at=at,
                    reason="cessationOfOperation",
                )
                for c in device.certificates
                if c.origin is CertificateOrigin.ISSUED
                and c.serial
                and c.role is not CertificateRole.RETIRED
            ]
        )

    def _notify(self, action: str, device: Device) -> None:
        if self._on_change is not None:
            self._on_change(action, device)


def _check_reason(reason: object) -> None:
    if not isinstance(reason, str) or not _REASON.fullmatch(reason):
        raise InvalidRequest("reason must be 1-256 printable characters on one line")
