"""Firmware releases (pk FIRMWARE#<profile>, sk RELEASE#<sha256>; one partition per profile, one
Query lists it) and their audit trail, the `firmware-releases` stream: the `FirmwareReleases`
port. Each publish and revoke is one transaction of the release's conditional write and the
stream's record, so the trail holds every change and nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fleetkey.domain.firmware import (
    FIRMWARE_STREAM,
    FirmwareRelease,
    ReleaseStatus,
    is_firmware_sha256,
    is_firmware_version,
)
from fleetkey.errors import NotFound, TransientAwsError
from fleetkey.ports import AlreadyExists, FirmwareNotReleased, Write
from fleetkey.store import schema
from fleetkey.store.audit_log import DynamoAuditLog
from fleetkey.store.table import MAX_TRANSACTION_ATTEMPTS, Action, ConditionFailed, Table, ser

RELEASE_PREFIX = "RELEASE#"
# The name of the release's write in its transaction.
RELEASE_WRITE = "firmware-release"


def release_from_item(item: Mapping[str, Any]) -> FirmwareRelease:
    return FirmwareRelease(
        profile=item["profile"],
        version=item["version"],
        sha256=item["sha256"],
        status=ReleaseStatus(item["status"]),
        published_at=item["published_at"],
        published_by=item["published_by"],
        revoked_at=item.get("revoked_at"),
        revoked_by=item.get("revoked_by"),
        revoke_reason=item.get("revoke_reason"),
    )


class DynamoFirmwareReleases:
    def __init__(self, table: Table) -> None:
        self._table = table
        self._audit = DynamoAuditLog(table)

    def get(self, profile: str, sha256: str) -> FirmwareRelease | None:
        """The release of `profile` with measurement `sha256`, None if there is none (the
        service checks both are well formed first: nothing else can be a key).
        AWS calls: 1 (GetItem, strongly consistent)."""
        item = self._table.get(schema.firmware_key(profile, sha256))
        return release_from_item(item) if item else None

    def list(self, profile: str) -> list[FirmwareRelease]:
        """Every release of `profile`, published and revoked, by measurement. AWS calls: 1
        (Query of the profile's partition, all pages; never a Scan)."""
        items = self._table.query(schema.firmware_partition(profile), sk_prefix=RELEASE_PREFIX)
        return [release_from_item(i) for i in items]

    def publish(self, release: FirmwareRelease, actor: str, at: str) -> FirmwareRelease:
        """Publish `release` (its profile, version and measurement) as published by `actor` at
        `at`, with a `firmware_published` record on the `firmware-releases` stream, in one
        transaction conditional on the release not existing.

        Idempotent: when the same measurement is already published with the same version, that
        release is answered unchanged (no second record). A retry whose first attempt landed
        gets the release as that attempt wrote it.

        AWS calls: 2 (GetItem of the stream head, TransactWriteItems); 2 more per lost race on
        the head.

        Raises:
            AlreadyExists: the measurement is released with another version, or was revoked (a
                withdrawn release stays withdrawn); `current` is the release.
            TransientAwsError: the stream head kept moving for MAX_TRANSACTION_ATTEMPTS tries.
        """
        published = replace(
            release,
            status=ReleaseStatus.PUBLISHED,
            published_at=at,
            published_by=actor,
            revoked_at=None,
            revoked_by=None,
            revoke_reason=None,
        )
        item = {
            **schema.firmware_key(release.profile, release.sha256),
            **published.to_public(),
        }
        put = Action(
            RELEASE_WRITE,
            {
                "Put": {
                    "TableName": self._table.name,
                    "Item": ser(item),
                    "ConditionExpression": "attribute_not_exists(pk)",
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
        )
        details = {
            "profile": release.profile,
            "version": release.version,
            "sha256": release.sha256,
        }
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            _, stream = self._audit.stream_writes(
                FIRMWARE_STREAM, action="firmware_published", actor=actor, details=details, at=at
            )
            try:
                self._table.transact([put, *stream])
                return published
            except ConditionFailed as failure:
                if RELEASE_WRITE not in failure.failed:
                    continue  # another change moved the stream head first (STREAM_HEAD_WRITE)
                found = failure.items.get(RELEASE_WRITE)
                existing = release_from_item(found) if found else self.get(*_key_of(release))
                if existing is None:
                    continue  # releases are never deleted; read it again to be sure
                if existing.published and existing.version == release.version:
                    return existing
                raise _taken(existing) from None
        raise TransientAwsError("could not publish the firmware release; retry")

    def revoke(
        self, profile: str, sha256: str, reason: str | None, actor: str, at: str
    ) -> FirmwareRelease:
        """Withdraw a published release: from the transaction on, `released_check` refuses it.
        One transaction of the release's update (conditional on its being published) and a
        `firmware_revoked` record on the `firmware-releases` stream.

        Idempotent: a revoked release is answered unchanged (its first revocation's time, actor
        and reason; no second record).

        AWS calls: 3 (GetItem of the release, GetItem of the stream head, TransactWriteItems);
        1 for a release already revoked; 2 more per lost race on the head.

        Raises:
            NotFound: no such release.
            TransientAwsError: the stream head kept moving for MAX_TRANSACTION_ATTEMPTS tries.
        """
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            current = self.get(profile, sha256)
            if current is None:
                raise NotFound("no such firmware release")
            if not current.published:
                return current
            revoked = replace(
                current,
                status=ReleaseStatus.REVOKED,
                revoked_at=at,
                revoked_by=actor,
                revoke_reason=reason,
            )
            update = Action(
                RELEASE_WRITE,
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": ser(schema.firmware_key(profile, sha256)),
                        "UpdateExpression": (
                            "SET #status = :revoked, revoked_at = :at, revoked_by = :actor"
                            + (", revoke_reason = :reason" if reason is not None else "")
                        ),
                        "ConditionExpression": "#status = :published",
                        "ExpressionAttributeNames": {"#status": "status"},
                        "ExpressionAttributeValues": ser(
                            {
                                ":revoked": ReleaseStatus.REVOKED.value,
                                ":published": ReleaseStatus.PUBLISHED.value,
                                ":at": at,
                                ":actor": actor,
                                ":reason": reason,
                            }
                        ),
                    }
                },
            )
            details: dict[str, Any] = {
                "profile": profile,
                "version": current.version,
                "sha256": sha256,
            }
            if reason is not None:
                details["reason"] = reason
            _, stream = self._audit.stream_writes(
                FIRMWARE_STREAM, action="firmware_revoked", actor=actor, details=details, at=at
            )
            try:
                self._table.transact([update, *stream])
                return revoked
            except ConditionFailed:
                # Read again: a concurrent revocation (answered as it is) or another change on
                # the stream moved its head.
                continue
        raise TransientAwsError("could not revoke the firmware release; retry")

    def released_check(self, profile: str, sha256: str, version: str) -> Write:
        """A check, for another write's transaction (the token's), that `sha256` is a published
        release of `profile` with `version` (refusal: FirmwareNotReleased). No AWS call of its
        own: it is one ConditionCheck of that transaction.

        Raises:
            FirmwareNotReleased: at once, for a measurement or version no release can have (not
                64 lowercase hex digits, not a firmware version), which could not be a key.
        """
        if not is_firmware_sha256(sha256) or not is_firmware_version(version):
            raise FirmwareNotReleased("firmware measurement is not a released one")
        return Action(
            RELEASE_WRITE,
            {
                "ConditionCheck": {
                    "TableName": self._table.name,
                    "Key": ser(schema.firmware_key(profile, sha256)),
                    "ConditionExpression": "#status = :published AND #version = :version",
                    "ExpressionAttributeNames": {"#status": "status", "#version": "version"},
                    "ExpressionAttributeValues": ser(
                        {":published": ReleaseStatus.PUBLISHED.value, ":version": version}
                    ),
                }
            },
            refusal=lambda _items: FirmwareNotReleased(
                f"firmware {version} is not a released firmware of profile {profile}"
            ),
        )


def _key_of(release: FirmwareRelease) -> tuple[str, str]:
    return release.profile, release.sha256


def _taken(existing: FirmwareRelease) -> AlreadyExists:
    if existing.published:
        why = f"is already released as version {existing.version}"
    else:
        why = "was revoked; a withdrawn release is not published again"
    return AlreadyExists(
        f"firmware {existing.sha256} of profile {existing.profile} {why}", current=existing
    )
