"""Firmware releases against moto: the store's transactions (release and audit record together,
idempotent retries, conditions that refuse), the service, and the admin routes as the admin
function serves them."""

from __future__ import annotations

import hashlib
import json

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.domain.firmware import FIRMWARE_STREAM, FirmwareRelease, ReleaseStatus
from fleetkey.errors import InvalidRequest, NotFound
from fleetkey.ports import AlreadyExists, FirmwareNotReleased
from fleetkey.store.firmware import DynamoFirmwareReleases
from fleetkey_local.apigw import proxy_event
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.provision import DEMO_FIRMWARE
from fleetkey_local.stack import TABLE
from tests.support.faults import FaultInjector
from tests.support.handlers import LambdaContext, load_handler

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleetkey-release/pipeline"
STREAM = f"stream:{FIRMWARE_STREAM}"
SHA = hashlib.sha256(b"fleetkey-pump-firmware-2.5.0").hexdigest()
OTHER = hashlib.sha256(b"fleetkey-sensor-firmware-1.0").hexdigest()
INJECTED = (ClientError, BotoCoreError)


def trail(stack) -> list[tuple[str, dict]]:
    """The firmware-releases stream's records (action, details), once its chain verified."""
    records, verification = stack.devices.audit(STREAM)
    assert verification.head == stack.store.audit.stream_head(FIRMWARE_STREAM)
    return [(r.action, r.details) for r in records]


def check(stack, profile: str, sha256: str, version: str) -> None:
    """Run `released_check` as a transaction of its own (the token path carries it in its)."""
    stack.store.table.transact_or_refuse(
        [stack.store.firmware.released_check(profile, sha256, version)]
    )


# ---- provisioning -----------------------------------------------------------------------------


def test_the_local_stack_starts_with_the_demo_pump_firmware_released(stack):
    # Given a freshly provisioned stack / Then the demo fleet's firmware is a published release
    profile, version, sha256 = DEMO_FIRMWARE
    release = stack.components.firmware.get(profile, sha256)
    assert (release.version, release.status, release.published_by) == (
        version,
        ReleaseStatus.PUBLISHED,
        "provisioning",
    )
    assert trail(stack) == [
        (
            "firmware_published",
            {"profile": profile, "version": version, "sha256": sha256},
        )
    ]
    check(stack, profile, sha256, version)


# ---- the store and the service ----------------------------------------------------------------


def test_publish_writes_the_release_and_its_record_and_a_retry_changes_nothing(stack):
    firmware = stack.components.firmware
    calls = AwsCallCounter().watch(*stack.service_clients())
    # When a release is published
    outcome = firmware.publish("infusion-pump", "2.5.0", SHA, actor=OPERATOR)
    # Then it is there, with its record on the stream, in 2 calls (head, one transaction)
    assert outcome.changed and outcome.release.status is ReleaseStatus.PUBLISHED
    assert calls.reset() == ["dynamodb.GetItem", "dynamodb.TransactWriteItems"]
    assert firmware.get("infusion-pump", SHA) == outcome.release
    assert trail(stack)[-1] == (
        "firmware_published",
        {"profile": "infusion-pump", "version": "2.5.0", "sha256": SHA},
    )
    # When it is published again (a retry, or another operator)
    again = firmware.publish("infusion-pump", "2.5.0", SHA, actor="someone-else")
    # Then the release is answered as it was, with no second record
    assert not again.changed and again.release == outcome.release
    assert len(trail(stack)) == 2


@pytest.mark.parametrize("revoked", [False, True], ids=["other-version", "revoked"])
def test_a_conflicting_publish_is_refused_and_changes_nothing(stack, revoked):
    firmware = stack.components.firmware
    firmware.publish("infusion-pump", "2.5.0", SHA, actor=OPERATOR)
    if revoked:
        firmware.revoke("infusion-pump", SHA, reason="recalled", actor=OPERATOR)
    before = (firmware.get("infusion-pump", SHA), trail(stack))
    # When the measurement is published with another version (or again, once withdrawn)
    with pytest.raises(AlreadyExists) as refused:
        firmware.publish("infusion-pump", "2.5.0" if revoked else "2.5.1", SHA, actor="x")
    # Then it is a 409 naming what is there, and nothing changed
    assert refused.value.status == 409 and refused.value.current == before[0]
    assert (firmware.get("infusion-pump", SHA), trail(stack)) == before


def test_revoke_withdraws_the_release_once(stack):
    firmware = stack.components.firmware
    firmware.publish("infusion-pump", "2.5.0", SHA, actor=OPERATOR)
    check(stack, "infusion-pump", SHA, "2.5.0")
    # When it is revoked
    outcome = firmware.revoke("infusion-pump", SHA, reason="CVE-2026-0042", actor=OPERATOR)
    # Then it is revoked, recorded, and the token path's check refuses it
    release = outcome.release
    assert outcome.changed and release.status is ReleaseStatus.REVOKED
    assert (release.revoked_by, release.revoke_reason) == (OPERATOR, "CVE-2026-0042")
    assert firmware.get("infusion-pump", SHA) == release
    assert trail(stack)[-1] == (
        "firmware_revoked",
        {
            "profile": "infusion-pump",
            "version": "2.5.0",
            "sha256": SHA,
            "reason": "CVE-2026-0042",
        },
    )
    with pytest.raises(FirmwareNotReleased):
        check(stack, "infusion-pump", SHA, "2.5.0")
    # When it is revoked again / Then it is answered unchanged in one read, with no record
    calls = AwsCallCounter().watch(*stack.service_clients())
    again = firmware.revoke("infusion-pump", SHA, actor="another")
    assert not again.changed and again.release == release
    assert calls.calls == ["dynamodb.GetItem"]
    assert len(trail(stack)) == 3


def test_a_revocation_without_a_reason_records_none(stack):
    firmware = stack.components.firmware
    firmware.publish("telemetry-sensor", "1.0", OTHER, actor=OPERATOR)
    release = firmware.revoke("telemetry-sensor", OTHER, actor=OPERATOR).release
    assert release.revoke_reason is None
    assert "reason" not in trail(stack)[-1][1]


def test_an_unknown_release_is_not_found_and_nothing_is_written(stack):
    firmware = stack.components.firmware
    before = trail(stack)
    with pytest.raises(NotFound):
        firmware.get("infusion-pump", SHA)
    with pytest.raises(NotFound):
        firmware.revoke("infusion-pump", SHA, actor=OPERATOR)
    assert trail(stack) == before


@pytest.mark.parametrize(
    "profile,sha256,version",
    [
        ("infusion-pump", SHA, "2.5.0"),  # never published
        ("telemetry-sensor", DEMO_FIRMWARE[2], DEMO_FIRMWARE[1]),  # another profile's
        ("infusion-pump", DEMO_FIRMWARE[2], "2.4.2"),  # another version
    ],
    ids=["unknown", "other-profile", "other-version"],
)
def test_the_release_check_refuses_what_is_not_released(stack, profile, sha256, version):
    with pytest.raises(FirmwareNotReleased):
        check(stack, profile, sha256, version)


@pytest.mark.parametrize(
    "sha256,version",
    [(SHA.upper(), "2.5.0"), ("x" * 5000, "2.5.0"), (SHA, "2 5"), (SHA, "v" * 65)],
    ids=["upper", "huge", "space", "long-version"],
)
def test_the_release_check_refuses_malformed_claims_before_any_call(stack, sha256, version):
    calls = AwsCallCounter().watch(*stack.service_clients())
    with pytest.raises(FirmwareNotReleased):
        stack.store.firmware.released_check("infusion-pump", sha256, version)
    assert calls.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ("nope", "1.0", SHA),
        ("infusion-pump", "1 0", SHA),
        ("infusion-pump", "1.0", SHA.upper()),
        ("infusion-pump\x00", "1.0", SHA),
        ("infusion-pump", "1.0", "0" * 63),
    ],
    ids=["unknown-profile", "space", "upper", "nul", "short"],
)
def test_a_refused_publish_makes_no_aws_call(stack, args):
    calls = AwsCallCounter().watch(*stack.service_clients())
    with pytest.raises(InvalidRequest):
        stack.components.firmware.publish(*args, actor=OPERATOR)
    assert calls.calls == []


def test_list_queries_each_profile_partition_once(stack):
    firmware = stack.components.firmware
    firmware.publish("telemetry-sensor", "1.0", OTHER, actor=OPERATOR)
    firmware.publish("infusion-pump", "2.5.0", SHA, actor=OPERATOR)
    calls = AwsCallCounter().watch(*stack.service_clients())
    # When every release is listed
    releases = firmware.list()
    # Then each profile's partition is one Query (never a Scan), by profile then measurement
    assert calls.calls == ["dynamodb.Query", "dynamodb.Query"]
    assert [(r.profile, r.sha256) for r in releases] == sorted(
        [
            ("infusion-pump", DEMO_FIRMWARE[2]),
            ("infusion-pump", SHA),
            ("telemetry-sensor", OTHER),
        ]
    )
    assert [r.sha256 for r in firmware.list("telemetry-sensor")] == [OTHER]


def test_a_publish_racing_another_append_to_the_stream_retries(stack, monkeypatch):
    store: DynamoFirmwareReleases = stack.store.firmware
    audit = store._audit
    make = audit.stream_writes
    raced: list[str] = []

    def racing(*args, **kwargs):
        writes = make(*args, **kwargs)
        if not raced:
            # Another publish lands between this one's read of the head and its transaction
            raced.append("racing")
            stack.components.firmware.publish("telemetry-sensor", "1.0", OTHER, actor="b")
        return writes

    monkeypatch.setattr(audit, "stream_writes", racing)
    # When a publish loses the race for the stream's head
    outcome = stack.components.firmware.publish("infusion-pump", "2.5.0", SHA, actor=OPERATOR)
    # Then it is published after all, and the chain holds both records, in order
    assert outcome.changed and raced
    assert [d["sha256"] for _, d in trail(stack)] == [DEMO_FIRMWARE[2], OTHER, SHA]


@pytest.mark.parametrize("after", [False, True], ids=["fail-before-call", "fail-after-call"])
@pytest.mark.parametrize("operation", ["publish", "revoke"])
def test_publish_and_revoke_converge_after_a_failure_at_any_call(stack, after, operation):
    firmware = stack.components.firmware
    faults = FaultInjector().watch(*stack.service_clients())

    def run(sha256: str) -> FirmwareRelease:
        if operation == "publish":
            return firmware.publish("infusion-pump", "3.0", sha256, actor=OPERATOR).release
        return firmware.revoke("infusion-pump", sha256, reason="test", actor=OPERATOR).release

    def image(name: str) -> str:
        sha256 = hashlib.sha256(name.encode()).hexdigest()
        if operation == "revoke":
            firmware.publish("infusion-pump", "3.0", sha256, actor=OPERATOR)
        return sha256

    clean = image("clean")
    faults.arm(None)
    run(clean)
    clean_calls = list(faults.calls)
    wanted = ReleaseStatus.PUBLISHED if operation == "publish" else ReleaseStatus.REVOKED
    for k in range(1, len(clean_calls) + 1):
        sha256 = image(f"image-{k}")
        before = len(trail(stack))
        # Given a failure at the k-th call of the operation
        faults.arm(k, after=after)
        with pytest.raises(INJECTED):
            run(sha256)
        assert faults.fired == clean_calls[k - 1]
        faults.arm(None)
        # When the operator retries / Then it converges, with one record of the change
        assert run(sha256).status is wanted
        actions = [(a, d["sha256"]) for a, d in trail(stack)[before:]]
        assert actions == [(f"firmware_{wanted.value}", sha256)], k


# ---- the admin routes -------------------------------------------------------------------------


@pytest.fixture
def admin(stack, monkeypatch):
    """The admin function (its own clients, as Lambda builds them), and the metrics it adds."""
    from fleetkey.observability import metrics

    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    added: list[str] = []
    monkeypatch.setattr(metrics, "add_metric", lambda name, unit, value: added.append(name))
    handler = load_handler("admin")
    yield handler, added
    handler.services.cache_clear()


def call(admin, method, path, body=None):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    headers = {"content-type": "application/json"} if body is not None else {}
    response = admin.handler(
        proxy_event(method, path, body=body, headers=headers, caller_arn=OPERATOR),
        LambdaContext(),
    )
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def test_publish_read_list_and_revoke_through_the_admin_api(stack, admin):
    handler, metrics = admin
    request = {"profile": "infusion-pump", "version": "2.5.0", "sha256": SHA}
    # When a release is published
    status, body = call(handler, "POST", "/v1/admin/firmware", request)
    # Then it is 201, published by the caller
    assert (status, body["status"], body["published_by"]) == (201, "published", OPERATOR)
    assert body["revoked_at"] is None
    # And publishing it again is 200, the same release
    assert call(handler, "POST", "/v1/admin/firmware", request) == (200, body)
    # And it can be read, and listed with its profile's and every profile's
    assert call(handler, "GET", f"/v1/admin/firmware/infusion-pump/{SHA}") == (200, body)
    status, listed = call(handler, "GET", "/v1/admin/firmware?profile=infusion-pump")
    assert status == 200 and [r["sha256"] for r in listed["releases"]] == sorted(
        [SHA, DEMO_FIRMWARE[2]]
    )
    status, everything = call(handler, "GET", "/v1/admin/firmware")
    assert status == 200 and len(everything["releases"]) == 2
    # When it is revoked, then revoked again
    path = f"/v1/admin/firmware/infusion-pump/{SHA}/revoke"
    status, revoked = call(handler, "POST", path, {"reason": "CVE-2026-0042"})
    assert (status, revoked["status"], revoked["revoke_reason"]) == (
        200,
        "revoked",
        "CVE-2026-0042",
    )
    assert call(handler, "POST", path) == (200, revoked)
    # Then each change counted once, and the audit stream names the operator
    assert metrics == ["FirmwarePublished", "FirmwareRevoked"]
    status, audit = call(handler, "GET", f"/v1/admin/audit-streams/{FIRMWARE_STREAM}")
    assert status == 200 and audit["verified"] is True
    assert [(r["action"], r["actor"]) for r in audit["records"][1:]] == [
        ("firmware_published", OPERATOR),
        ("firmware_revoked", OPERATOR),
    ]
    # And publishing the withdrawn release again is a conflict
    status, error = call(handler, "POST", "/v1/admin/firmware", request)
    assert (status, error["error"]) == (409, "conflict")


@pytest.mark.parametrize(
    "body,message",
    [
        ({"profile": "nope", "version": "1", "sha256": SHA}, "unknown device profile"),
        ({"profile": "infusion-pump", "version": "1", "sha256": SHA.upper()}, "sha256"),
        ({"profile": "infusion-pump", "version": "1 2", "sha256": SHA}, "version"),
        ({"profile": "infusion-pump", "version": "1", "sha256": 7}, "sha256"),
        ({"profile": "infusion-pump", "version": "1"}, "sha256: Field required"),
        ({"profile": "infusion-pump", "version": "1", "sha256": SHA, "x": 1}, "x: Extra"),
        ("[]", "request body must be a JSON object"),
        ("{not json", "request body must be JSON"),
        (None, "request body must be a JSON object; it is empty"),
    ],
    ids=[
        "unknown-profile",
        "upper-sha",
        "space-in-version",
        "number-sha",
        "no-sha",
        "extra-field",
        "not-an-object",
        "not-json",
        "no-body",
    ],
)
def test_a_bad_publish_is_400_and_changes_nothing(stack, admin, body, message):
    handler, metrics = admin
    before = (stack.components.firmware.list(), trail(stack))
    status, error = call(handler, "POST", "/v1/admin/firmware", body)
    assert (status, error["error"]) == (400, "invalid_request") and message in error["message"]
    assert (stack.components.firmware.list(), trail(stack)) == before
    assert metrics == []


@pytest.mark.parametrize(
    "segment",
    [
        f"infusion-pump/{SHA.upper()}",
        f"infusion-pump/{SHA[:-1]}",
        "infusion-pump/" + "a" * 5000,
        f"infusion-pump/{SHA}%0A",
        f"nope/{DEMO_FIRMWARE[2]}",
        f"infusion-pump%00/{DEMO_FIRMWARE[2]}",
        f"%2e%2e/{DEMO_FIRMWARE[2]}",
        f"infusion-pump/{SHA}",  # well formed, never published
    ],
    ids=["upper", "short", "huge", "newline", "unknown-profile", "nul", "dot-dot", "unknown"],
)
def test_a_release_name_that_is_not_one_is_404_for_read_and_revoke(stack, admin, segment):
    handler, _ = admin
    before = trail(stack)
    status, error = call(handler, "GET", f"/v1/admin/firmware/{segment}")
    assert (status, error["error"]) == (404, "not_found")
    status, error = call(handler, "POST", f"/v1/admin/firmware/{segment}/revoke", {})
    assert (status, error["error"]) == (404, "not_found")
    assert trail(stack) == before


def test_a_bad_revoke_body_or_list_filter_is_400(stack, admin):
    handler, _ = admin
    path = f"/v1/admin/firmware/infusion-pump/{DEMO_FIRMWARE[2]}/revoke"
    for body in ({"reason": ""}, {"reason": "a\nb"}, {"reason": "x" * 257}, {"why": "x"}, "[]"):
        status, error = call(handler, "POST", path, body)
        assert (status, error["error"]) == (400, "invalid_request"), body
    assert stack.components.firmware.get("infusion-pump", DEMO_FIRMWARE[2]).published
    for query in ("profile=nope", "profile=", "profile=%00", "profile=" + "p" * 10_000):
        status, error = call(handler, "GET", f"/v1/admin/firmware?{query}")
        assert (status, error["error"]) == (400, "invalid_request"), query
