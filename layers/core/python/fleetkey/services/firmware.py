"""Firmware releases: what operators (the release role) publish and revoke, and what attested
tokens check (`FirmwareReleases.released_check`, in the token's own transaction).

Inputs are checked before any AWS call: a publish names a defined profile, a version and a
SHA-256 (else 400, nothing written); a release is named in a path by its profile and
measurement, and a name that no release can have is answered 404 like one that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.domain.firmware import (
    FirmwareRelease,
    ReleaseStatus,
    is_firmware_sha256,
    validate_release,
    validate_revoke_reason,
)
from fleetkey.domain.profiles import PROFILES, get_profile
from fleetkey.errors import NotFound
from fleetkey.ports import FirmwareReleases


@dataclass(frozen=True, slots=True)
class ReleaseChange:
    """A release as a publish or revoke left it; `changed` is False when the request changed
    nothing (it was already published the same, or already revoked)."""

    release: FirmwareRelease
    changed: bool


class FirmwareService:
    def __init__(self, releases: FirmwareReleases, clock: Clock = utc_now) -> None:
        self._releases = releases
        self._clock = clock

    def publish(self, profile: str, version: str, sha256: str, *, actor: str) -> ReleaseChange:
        """Publish a release of `profile`: devices of the profile that attest firmware
        `sha256` reporting `version` get tokens from then on. Publishing the same release
        again answers it unchanged (`changed` False).

        AWS calls: 2 (the stream head, the transaction), more on races; none for a refusal of
        the input.

        Raises:
            InvalidRequest: unknown profile, malformed version or measurement.
            AlreadyExists (409): the measurement is released with another version, or was
                revoked (a withdrawn release is never published again).
        """
        profile, version, sha256 = validate_release(profile, version, sha256)
        intended = FirmwareRelease(
            profile=profile,
            version=version,
            sha256=sha256,
            status=ReleaseStatus.PUBLISHED,
            published_at=timestamp(self._clock()),
            published_by=actor,
        )
        release = self._releases.publish(intended, actor, intended.published_at)
        # The store answers what it wrote, or the release that was there (another time or
        # actor; the same to the millisecond and principal is this very publish, retried).
        return ReleaseChange(release, changed=release == intended)

    def revoke(
        self, profile: str, sha256: str, *, reason: str | None = None, actor: str
    ) -> ReleaseChange:
        """Withdraw a release: attestation of that measurement fails from the revocation on.
        Revoking it again answers it unchanged (`changed` False, the first revocation's
        reason).

        AWS calls: 3 (the release, the stream head, the transaction); 1 when already revoked;
        none for a name no release can have.

        Raises:
            InvalidRequest: a reason that is not 1-256 printable characters.
            NotFound: no such release (including a profile or measurement that cannot be one).
        """
        reason = validate_revoke_reason(reason)
        self._check_name(profile, sha256)
        at = timestamp(self._clock())
        release = self._releases.revoke(profile, sha256, reason, actor, at)
        return ReleaseChange(
            release, changed=(release.revoked_at, release.revoked_by) == (at, actor)
        )

    def get(self, profile: str, sha256: str) -> FirmwareRelease:
        """AWS calls: 1 (GetItem); none for a name no release can have.

        Raises:
            NotFound: no such release (including a profile or measurement that cannot be one).
        """
        self._check_name(profile, sha256)
        release = self._releases.get(profile, sha256)
        if release is None:
            raise NotFound("no such firmware release")
        return release

    def list(self, profile: str | None = None) -> list[FirmwareRelease]:
        """The releases of `profile`, or of every defined profile (by profile name), each
        profile's by measurement.

        AWS calls: 1 Query per profile listed.

        Raises:
            InvalidRequest: `profile` is not a defined profile.
        """
        if profile is not None:
            get_profile(profile)
        names = [profile] if profile is not None else sorted(PROFILES)
        return [release for name in names for release in self._releases.list(name)]

    @staticmethod
    def _check_name(profile: str, sha256: str) -> None:
        """A path's release name that no release can have is answered as an unknown one,
        without reading the table (nor echoing what was sent)."""
        if profile not in PROFILES or not is_firmware_sha256(sha256):
            raise NotFound("no such firmware release")
