"""Delegated validation (`fleetkey.domain.validation`): a relying party asks, fleetkey commands
the device, the device answers at the token endpoint (`TokenService.issue`), and the relying
party reads the result, waiting for it if it likes.

AWS calls: a request 3 (the device's credential, the record, the command: iot-data Publish);
a read 1, plus 1 per poll while it waits (at most ~25 in 20 s, backing off to one a second).

Outcomes are observed (`OutcomeObserver`: the outcome metrics) once per validation, by the
invocation whose write decided it: a request for a device that is not ACTIVE here, an answer in
`TokenService.issue`. `expired` is never observed: it is computed on read, and nothing is written
when the deadline passes.
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from fleetkey.clock import Clock, utc_now
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import CertificateRole
from fleetkey.domain.profiles import get_profile
from fleetkey.domain.validation import (
    DEFAULT_EXPIRES_IN,
    MAX_EXPIRES_IN,
    MAX_WAIT_SECONDS,
    MIN_EXPIRES_IN,
    PURPOSE,
    VALIDATION_ID,
    RefusalReason,
    Validation,
    ValidationStatus,
)
from fleetkey.errors import InvalidRequest, NotFound
from fleetkey.ports import DeviceConnections, DeviceRepository, ValidationRecords

# Told of a validation's outcome as the write that decides it commits: `validated` (reason None)
# or `refused` with its reason.
OutcomeObserver = Callable[[ValidationStatus, RefusalReason | None], None]

# An audience is an identifier (a URI or a name) a relying party checks in `aud`: printable, no
# spaces (the token request's `audience` parameter is a space-separated list).
_MAX_AUDIENCE = 256
# First poll after this long, then twice as long each time, at most a second apart.
FIRST_POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 1.0


def iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


class ValidationService:
    def __init__(
        self,
        devices: DeviceRepository,
        validations: ValidationRecords,
        connections: DeviceConnections,
        *,
        clock: Clock = utc_now,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        on_outcome: OutcomeObserver | None = None,
    ) -> None:
        self._devices = devices
        self._validations = validations
        self._connections = connections
        self._clock = clock
        self._sleep = sleep
        self._monotonic = monotonic
        self._on_outcome = on_outcome

    def request(
        self,
        requester: str,
        device_id: str,
        purpose: str,
        audience: str,
        *,
        require_attestation: bool = False,
        expires_in: int | None = None,
    ) -> Validation:
        """Ask `device_id` to prove itself for `purpose`; the result's token will be for
        `audience` (one the device's profile allows). A device that is not ACTIVE gets a
        validation refused at once (`device_not_active`, observed as its outcome) and no
        command.

        AWS calls: 1 (the device's credential) + 1 (PutItem) + 1 (iot-data Publish) = 3; a device
        not ACTIVE 2. Nothing is written for a refused request.

        Raises:
            InvalidRequest: a purpose, audience or deadline out of bounds, or an audience the
                device's profile does not allow.
            NotFound: no such device.
            botocore errors: AWS failed (the validation, if recorded, expires unanswered).
        """
        expires_in = DEFAULT_EXPIRES_IN if expires_in is None else expires_in
        if not PURPOSE.fullmatch(purpose):
            raise InvalidRequest("purpose must be 1-64 of A-Z a-z 0-9 . _ : -")
        if (
            not 0 < len(audience) <= _MAX_AUDIENCE
            or not audience.isprintable()
            or not audience.isascii()
            or " " in audience
        ):
            raise InvalidRequest("audience must be 1-256 printable ASCII characters, no spaces")
        if not MIN_EXPIRES_IN <= expires_in <= MAX_EXPIRES_IN:
            raise InvalidRequest(
                f"expires_in must be between {MIN_EXPIRES_IN} and {MAX_EXPIRES_IN} seconds"
            )
        if not DEVICE_ID.fullmatch(device_id):
            raise NotFound(f"device {device_id!r} not found")
        device = self._devices.credential(device_id)
        if device is None:
            raise NotFound(f"device {device_id!r} not found")
        if audience not in get_profile(device.profile).token_rules.audiences:
            raise InvalidRequest(
                "this device's profile does not issue tokens for that audience",
                details={"audiences": sorted(get_profile(device.profile).token_rules.audiences)},
            )
        moment = self._clock().timestamp()
        now = int(moment)
        validation = Validation(
            validation_id=uuid.uuid4().hex,
            device_id=device_id,
            purpose=purpose,
            audience=audience,
            requester=requester,
            require_attestation=require_attestation,
            nonce=secrets.token_urlsafe(32),
            created_at=now,
            # Whole seconds, rounded up: the device has at least `expires_in` seconds.
            answer_by=math.ceil(moment) + expires_in,
            epoch=device.epoch,
        )
        active = device.state is DeviceState.ACTIVE and any(
            c.role is CertificateRole.CURRENT for c in device.certificates
        )
        if not active:
            refused = replace(
                validation,
                status=ValidationStatus.REFUSED,
                reason=RefusalReason.DEVICE_NOT_ACTIVE,
                decided_at=now,
            )
            self._validations.create(refused)
            if self._on_outcome is not None:
                self._on_outcome(ValidationStatus.REFUSED, RefusalReason.DEVICE_NOT_ACTIVE)
            return refused
        self._validations.create(validation)
        self._connections.send_command(
            device_id, "validate", validation.command(iso(validation.answer_by))
        )
        return validation

    def result(self, requester: str, validation_id: str, wait: int = 0) -> Validation:
        """The validation `requester` asked for, waiting up to `wait` seconds (at most 20) while
        it is pending and its deadline has not passed. Its status is as of now (`expired` once
        the deadline passed unanswered).

        AWS calls: 1 (GetItem), + 1 per poll while waiting.

        Raises:
            InvalidRequest: `wait` out of bounds.
            NotFound: no such validation, or another principal's (the same answer for both).
        """
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise InvalidRequest(f"wait must be between 0 and {MAX_WAIT_SECONDS} seconds")
        if not VALIDATION_ID.fullmatch(validation_id):
            raise NotFound("validation not found")
        validation = self._read(requester, validation_id)
        give_up = self._monotonic() + wait
        interval = FIRST_POLL_SECONDS
        while validation.status_at(int(self._clock().timestamp())) is ValidationStatus.PENDING:
            left = min(
                give_up - self._monotonic(),
                validation.answer_by - self._clock().timestamp(),
            )
            if left <= 0:
                break
            self._sleep(min(interval, left))
            interval = min(interval * 2, MAX_POLL_SECONDS)
            validation = self._read(requester, validation_id)
        return replace(validation, status=validation.status_at(self.now()))

    def now(self) -> int:
        return int(self._clock().timestamp())

    def _read(self, requester: str, validation_id: str) -> Validation:
        validation = self._validations.get(validation_id, int(self._clock().timestamp()))
        if validation is None or validation.requester != requester:
            raise NotFound("validation not found")
        return validation
