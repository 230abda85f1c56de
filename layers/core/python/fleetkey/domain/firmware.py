"""Firmware releases: the measurements (SHA-256 of an image) a device profile accepts when its
devices attest their firmware. Releases are data, published and revoked by operators (the
release role) through the admin API, each change on the `firmware-releases` audit stream; a
revoked release stays revoked (publishing it again is refused), so a withdrawn image never
attests again.

The rules for what may be written are here: a release names a defined profile, a lowercase hex
SHA-256 and a version fleetkey would copy into a token (`FIRMWARE_VERSION`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeGuard

from fleetkey.domain.profiles import get_profile
from fleetkey.errors import InvalidRequest

# A firmware version as a device reports it (assertion claim `firmware_version`) and an operator
# publishes it: printable ASCII without spaces, 1-64 characters (the rule of `jti`).
FIRMWARE_VERSION = re.compile(r"[\x21-\x7e]{1,64}")
# A measurement: SHA-256 of the image, 64 lowercase hex digits (one spelling, so one item each).
FIRMWARE_SHA256 = re.compile(r"[0-9a-f]{64}")
# The audit stream of every publish and revoke (subject `stream:firmware-releases`).
FIRMWARE_STREAM = "firmware-releases"
REVOKE_REASON_MAX = 256


class ReleaseStatus(StrEnum):
    PUBLISHED = "published"
    # Withdrawn: attestation of this measurement fails from then on; never published again.
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class FirmwareRelease:
    """A released firmware image of a profile, named by its measurement. `version` is the one
    a device running it must report; times are ISO 8601, actors IAM principals."""

    profile: str
    version: str
    sha256: str
    status: ReleaseStatus
    published_at: str
    published_by: str
    revoked_at: str | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None

    @property
    def published(self) -> bool:
        return self.status is ReleaseStatus.PUBLISHED

    def to_public(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "version": self.version,
            "sha256": self.sha256,
            "status": self.status.value,
            "published_at": self.published_at,
            "published_by": self.published_by,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "revoke_reason": self.revoke_reason,
        }


def is_firmware_sha256(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and FIRMWARE_SHA256.fullmatch(value) is not None


def is_firmware_version(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and FIRMWARE_VERSION.fullmatch(value) is not None


def validate_release(profile: object, version: object, sha256: object) -> tuple[str, str, str]:
    """The release's (profile, version, sha256), checked.

    Raises:
        InvalidRequest: the profile is not a defined one, the version is not 1-64 printable
            ASCII characters without spaces, or the measurement is not 64 lowercase hex digits.
    """
    if not isinstance(profile, str):
        raise InvalidRequest("profile must be a device profile's name")
    get_profile(profile)
    if not is_firmware_version(version):
        raise InvalidRequest("version must be 1-64 printable ASCII characters, without spaces")
    if not is_firmware_sha256(sha256):
        raise InvalidRequest("sha256 must be the image's SHA-256: 64 lowercase hex digits")
    return profile, version, sha256


def validate_revoke_reason(reason: object) -> str | None:
    """Raises InvalidRequest for a reason that is not 1-256 printable characters (None: none)."""
    if reason is None:
        return None
    if (
        not isinstance(reason, str)
        or not 0 < len(reason) <= REVOKE_REASON_MAX
        or not reason.isprintable()
    ):
        raise InvalidRequest("reason must be 1-256 printable characters")
    return reason
