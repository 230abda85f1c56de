"""Firmware releases: what a release may be (profile, version, measurement), and the service's
rules over an in-memory fake of the `FirmwareReleases` port."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from fleetkey.api.models import FirmwarePublishRequest, FirmwareReleaseView, FirmwareRevokeRequest
from fleetkey.domain.firmware import (
    FIRMWARE_VERSION,
    FirmwareRelease,
    ReleaseStatus,
    is_firmware_sha256,
    validate_release,
    validate_revoke_reason,
)
from fleetkey.domain.profiles import PROFILES
from fleetkey.errors import InvalidRequest, NotFound
from fleetkey.ports import AlreadyExists
from fleetkey.services.firmware import FirmwareService

SHA = hashlib.sha256(b"image").hexdigest()
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

BAD_VERSIONS = ["", "2.4 1", "x" * 65, "2.4.1\n", "v\u00e9", "\x00", "2.4.1\t", 241, None]
BAD_SHAS = [
    "",
    SHA.upper(),
    SHA[:-1],
    SHA + "0",
    SHA + "\n",
    " " + SHA[1:],
    "g" * 64,
    "\u0661" * 64,  # Arabic-Indic digits: str.isdigit() says yes, hex says no
    int(SHA, 16),
    None,
    [SHA],
]


class FakeReleases:
    """The port in memory: the same answers as the DynamoDB adapter, and its calls."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], FirmwareRelease] = {}
        self.calls: list[tuple] = []
        self.records: list[tuple[str, str]] = []

    def get(self, profile, sha256):
        self.calls.append(("get", profile, sha256))
        return self.items.get((profile, sha256))

    def list(self, profile):
        self.calls.append(("list", profile))
        return [r for (p, _), r in sorted(self.items.items()) if p == profile]

    def publish(self, release, actor, at):
        self.calls.append(("publish", release.sha256))
        existing = self.items.get((release.profile, release.sha256))
        if existing is not None:
            if existing.published and existing.version == release.version:
                return existing
            raise AlreadyExists("taken", current=existing)
        published = replace(release, published_at=at, published_by=actor)
        self.items[(release.profile, release.sha256)] = published
        self.records.append(("firmware_published", release.sha256))
        return published

    def revoke(self, profile, sha256, reason, actor, at):
        self.calls.append(("revoke", profile, sha256))
        existing = self.items.get((profile, sha256))
        if existing is None:
            raise NotFound("no such firmware release")
        if not existing.published:
            return existing
        revoked = replace(
            existing,
            status=ReleaseStatus.REVOKED,
            revoked_at=at,
            revoked_by=actor,
            revoke_reason=reason,
        )
        self.items[(profile, sha256)] = revoked
        self.records.append(("firmware_revoked", sha256))
        return revoked

    def released_check(self, profile, sha256, version):  # pragma: no cover - not the service's
        raise NotImplementedError


@pytest.fixture
def releases() -> FakeReleases:
    return FakeReleases()


@pytest.fixture
def service(releases) -> FirmwareService:
    return FirmwareService(releases, clock=lambda: NOW)


# ---- the domain's rules -----------------------------------------------------------------------


def test_a_valid_release_is_answered_as_given():
    assert validate_release("infusion-pump", "2.4.1", SHA) == ("infusion-pump", "2.4.1", SHA)
    assert validate_release("telemetry-sensor", "!~" * 32, SHA)[1] == "!~" * 32


@pytest.mark.parametrize("profile", ["", "nope", "INFUSION-PUMP", "infusion-pump ", None, 7])
def test_an_unknown_profile_is_an_invalid_request(profile):
    with pytest.raises(InvalidRequest):
        validate_release(profile, "2.4.1", SHA)


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_malformed_version_is_an_invalid_request(version):
    with pytest.raises(InvalidRequest, match="version"):
        validate_release("infusion-pump", version, SHA)


@pytest.mark.parametrize("sha256", BAD_SHAS)
def test_a_malformed_measurement_is_an_invalid_request(sha256):
    assert not is_firmware_sha256(sha256)
    with pytest.raises(InvalidRequest, match="sha256"):
        validate_release("infusion-pump", "2.4.1", sha256)


def test_the_version_rule_is_printable_ascii_without_spaces():
    # The rule tokens copy a reported version by (the token service imports it from here)
    assert FIRMWARE_VERSION.fullmatch("2.4.1-rc.1+build.7")
    assert not FIRMWARE_VERSION.fullmatch("2.4.1 ")
    assert not FIRMWARE_VERSION.fullmatch("x" * 65)


@pytest.mark.parametrize("reason", ["", "x" * 257, "a\nb", "\x1b[31m", 7])
def test_a_revoke_reason_must_be_printable_and_short(reason):
    with pytest.raises(InvalidRequest):
        validate_revoke_reason(reason)


def test_a_release_to_public_is_what_its_view_documents():
    release = FirmwareRelease(
        profile="infusion-pump",
        version="2.4.1",
        sha256=SHA,
        status=ReleaseStatus.REVOKED,
        published_at="2026-01-01T00:00:00.000+00:00",
        published_by="arn:aws:iam::123456789012:user/ops",
        revoked_at="2026-02-01T00:00:00.000+00:00",
        revoked_by="arn:aws:iam::123456789012:user/ops",
        revoke_reason="CVE-2026-0001",
    )
    view = FirmwareReleaseView.model_validate(release.to_public())
    assert set(release.to_public()) == set(FirmwareReleaseView.model_fields)
    assert view.model_extra == {} and not release.published


# ---- the request models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"profile": "infusion-pump", "version": "2.4.1"},
        {"profile": "infusion-pump", "version": "2.4.1", "sha256": SHA.upper()},
        {"profile": "infusion-pump", "version": "2 4", "sha256": SHA},
        {"profile": "infusion-pump", "version": 241, "sha256": SHA},
        {"profile": "", "version": "2.4.1", "sha256": SHA},
        {"profile": "infusion-pump", "version": "2.4.1", "sha256": SHA, "image": "x"},
        {"profile": "infusion-pump", "version": "2.4.1", "sha256": SHA + "\n"},
    ],
    ids=["no-sha", "upper", "space", "number", "empty-profile", "extra", "newline"],
)
def test_the_publish_request_refuses_malformed_bodies(body):
    with pytest.raises(ValidationError):
        FirmwarePublishRequest.model_validate(body)


def test_the_revoke_request_takes_an_optional_reason():
    assert FirmwareRevokeRequest.model_validate({}).reason is None
    assert FirmwareRevokeRequest.model_validate({"reason": "bad build"}).reason == "bad build"
    with pytest.raises(ValidationError):
        FirmwareRevokeRequest.model_validate({"reason": "x", "force": True})


# ---- the service ------------------------------------------------------------------------------


def test_publish_then_publish_again_changes_once(service, releases):
    # When a release is published, then published again
    first = service.publish("infusion-pump", "2.4.1", SHA, actor="ops")
    again = service.publish("infusion-pump", "2.4.1", SHA, actor="someone-else")
    # Then the first changed, the second answered the same release unchanged
    assert first.changed and not again.changed
    assert again.release == first.release
    assert first.release.published_at == "2026-03-01T12:00:00.000+00:00"
    assert first.release.published_by == "ops"
    assert releases.records == [("firmware_published", SHA)]


@pytest.mark.parametrize("version", BAD_VERSIONS[:4])
def test_a_refused_publish_never_reaches_the_store(service, releases, version):
    with pytest.raises(InvalidRequest):
        service.publish("infusion-pump", version, SHA, actor="ops")
    with pytest.raises(InvalidRequest):
        service.publish("no-such-profile", "2.4.1", SHA, actor="ops")
    assert releases.calls == []


def test_revoke_then_revoke_again_changes_once(service, releases):
    service.publish("infusion-pump", "2.4.1", SHA, actor="ops")
    first = service.revoke("infusion-pump", SHA, reason="CVE", actor="sec")
    again = service.revoke("infusion-pump", SHA, reason="another", actor="sec2")
    assert first.changed and not again.changed
    assert again.release.revoke_reason == "CVE" and again.release.revoked_by == "sec"
    # And a withdrawn release is not published again
    with pytest.raises(AlreadyExists):
        service.publish("infusion-pump", "2.4.1", SHA, actor="ops")


@pytest.mark.parametrize(
    "profile,sha256",
    [
        ("infusion-pump", SHA.upper()),
        ("infusion-pump", "../" + SHA),
        ("infusion-pump", "x" * 100_000),
        ("nope", SHA),
        ("", SHA),
        ("infusion-pump\x00", SHA),
    ],
    ids=["upper", "traversal", "huge", "unknown-profile", "empty-profile", "nul"],
)
def test_a_name_no_release_can_have_is_not_found_without_a_read(service, releases, profile, sha256):
    with pytest.raises(NotFound):
        service.get(profile, sha256)
    with pytest.raises(NotFound):
        service.revoke(profile, sha256, actor="ops")
    assert releases.calls == []


def test_an_unknown_release_is_not_found(service):
    with pytest.raises(NotFound):
        service.get("infusion-pump", SHA)
    with pytest.raises(NotFound):
        service.revoke("infusion-pump", SHA, actor="ops")


def test_a_bad_reason_is_refused_before_the_store(service, releases):
    with pytest.raises(InvalidRequest):
        service.revoke("infusion-pump", SHA, reason="a\nb", actor="ops")
    assert releases.calls == []


def test_list_reads_one_partition_per_profile(service, releases):
    service.publish("infusion-pump", "2.4.1", SHA, actor="ops")
    other = hashlib.sha256(b"sensor").hexdigest()
    service.publish("telemetry-sensor", "1.0", other, actor="ops")
    releases.calls.clear()
    # When every release is listed / Then each defined profile's partition is read once
    assert [r.sha256 for r in service.list()] == [SHA, other]
    assert releases.calls == [("list", name) for name in sorted(PROFILES)]
    # And one profile's, only its own
    assert [r.profile for r in service.list("telemetry-sensor")] == ["telemetry-sensor"]
    with pytest.raises(InvalidRequest):
        service.list("nope")
