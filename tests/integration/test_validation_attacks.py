"""A hostile review of delegated validation, firmware releases and the cached token path (issue
10), as attacks: a cloned key of one device, a captured assertion, a known validation id or
certificate id, a malicious relying party, a release-role operator. Each test is an attack that
must fail; the ones that succeed are findings. Every DynamoDB request these paths send is also
checked for what moto tolerates and AWS refuses (unused or undefined expression names and values,
reserved words outside #names)."""

# ruff: noqa: F811  (the fixtures imported from the neighbouring modules)

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import moto
import pytest

from fleetkey.domain.models import CertificateRole
from fleetkey.domain.oauth import InvalidClient, InvalidGrant, OAuthError, OAuthInvalidRequest
from fleetkey.domain.validation import principal
from fleetkey.errors import NotFound
from fleetkey.services.tokens import TokenService
from fleetkey.services.validations import ValidationService
from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.instrument import AwsCallCounter
from tests.integration.test_tokens import (  # noqa: F401  (acme is a fixture)
    PUMP_FIRMWARE,
    acme,
    change_device,
    enroll,
    stored_keys,
    suspend,
    verify_pyjwt,
)
from tests.integration.test_validation_functions import (  # noqa: F401  (fixtures)
    ISSUER,
    REQUEST,
    call,
    device,
    functions,
    the_command,
)
from tests.integration.test_validations import (  # noqa: F401  (pump is a fixture)
    OTHER_RP,
    PUMP_VERSION,
    RP,
    TELEMETRY,
    THERAPY,
    answer,
    ask,
    commands,
    fresh_service,
    pump,
)
from tests.support.handlers import LambdaContext

# ---- DynamoDB requests as AWS would parse them --------------------------------------------------

_RESERVED = frozenset(
    (Path(moto.__file__).parent / "dynamodb" / "parsing" / "reserved_keywords.txt")
    .read_text()
    .split()
)
_SYNTAX = frozenset({"AND", "OR", "NOT", "BETWEEN", "IN", "SET", "REMOVE", "ADD", "DELETE"})
_FUNCTIONS = frozenset(
    {
        "attribute_exists",
        "attribute_not_exists",
        "attribute_type",
        "begins_with",
        "contains",
        "size",
        "if_not_exists",
        "list_append",
    }
)
_EXPRESSIONS = (
    "ConditionExpression",
    "UpdateExpression",
    "ProjectionExpression",
    "KeyConditionExpression",
    "FilterExpression",
)


def test_the_expression_check_finds_what_aws_refuses():
    assert expression_mistakes(
        {
            "UpdateExpression": "SET status = :a, #n = :b",
            "ConditionExpression": "#m = :c",
            "ExpressionAttributeNames": {"#n": "n", "#x": "x"},
            "ExpressionAttributeValues": {":a": 1, ":b": 2, ":d": 4},
        }
    ) == [
        "unused name #x",
        "undefined name #m",
        "unused value :d",
        "undefined value :c",
        "reserved word 'status' outside #names",
    ]


def expression_mistakes(request: dict) -> list[str]:
    """What AWS refuses in one request (or one action of a transaction) and moto lets through."""
    text = " ".join(request[k] for k in _EXPRESSIONS if k in request)
    names = set(request.get("ExpressionAttributeNames") or {})
    values = set(request.get("ExpressionAttributeValues") or {})
    used_names = set(re.findall(r"#[A-Za-z0-9_]+", text))
    used_values = set(re.findall(r":[A-Za-z0-9_]+", text))
    mistakes = [f"unused name {n}" for n in sorted(names - used_names)]
    mistakes += [f"undefined name {n}" for n in sorted(used_names - names)]
    mistakes += [f"unused value {v}" for v in sorted(values - used_values)]
    mistakes += [f"undefined value {v}" for v in sorted(used_values - values)]
    bare = re.sub(r"[#:][A-Za-z0-9_]+", " ", text)
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare):
        if word.upper() in _SYNTAX or word in _FUNCTIONS:
            continue
        if word.upper() in _RESERVED:
            mistakes.append(f"reserved word {word!r} outside #names")
    return mistakes


@pytest.fixture
def strict_dynamodb(stack) -> Iterator[list[str]]:
    """Every DynamoDB request the stack's clients send, checked as AWS would (the mistakes found,
    by operation)."""
    found: list[str] = []
    seen: list[str] = []

    def check(params, model, **_):
        seen.append(model.name)
        requests = (
            [next(iter(a.values())) for a in params.get("TransactItems", [])]
            if model.name == "TransactWriteItems"
            else [params]
        )
        for request in requests:
            found.extend(f"{model.name}: {m}" for m in expression_mistakes(request))

    event = "provide-client-params.dynamodb.*"
    stack.dynamodb.meta.events.register(event, check)
    yield found
    stack.dynamodb.meta.events.unregister(event, check)
    # the check saw the paths' requests (an event name that matched nothing would pass anything)
    assert {"TransactWriteItems", "UpdateItem", "PutItem", "GetItem"} <= set(seen), seen


def token_service(stack, clock) -> TokenService:
    return TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        stack.signing_keys,
        clock,
        firmware=stack.store.firmware,
        validations=stack.store.validations,
    )


def at(epoch: float):
    moment = datetime.fromtimestamp(epoch, UTC)
    return lambda: moment


def answer_assertion(stack, dev, command, *, purpose="dose-change", **claims) -> str:
    return client_assertion(
        dev.key,
        dev.certificate_id,
        dev.device_id,
        stack.settings.issuer,
        nonce=command["nonce"],
        extra_claims={"validation": {"id": command["validation_id"], "purpose": purpose}},
        **claims,
    )


def status_of(stack, validation_id: str, requester: str = RP) -> tuple[str, str | None]:
    result = stack.validations.result(requester, validation_id)
    return result.status.value, result.reason.value if result.reason else None


# ---- findings -----------------------------------------------------------------------------------


def test_an_answer_signed_before_a_suspension_is_not_honoured_after_the_resume(stack, pump):
    """tokens_not_before says an assertion signed before a suspension is never honoured; a
    validation answer may leave out iat (nonce), so one signed before the suspension (captured,
    or held back by a cloned device) validates after the resume."""
    validation, command = ask(stack, pump, expires_in=300)
    # The pump (or a clone of its key) signs the answer, without iat: the nonce stands for it
    signed_before = answer_assertion(
        stack, pump, command, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE
    )
    # The pump is suspended (suspected clone) and resumed
    stack.lifecycle.suspend(pump.device_id, reason="suspected clone", actor="op")
    stack.lifecycle.resume(pump.device_id, actor="op")
    later = token_service(stack, at(datetime.now(UTC).timestamp() + 5))
    # When the answer signed before the suspension arrives after the resume
    with pytest.raises(OAuthError):
        later.issue(token_request(signed_before, audience=THERAPY))
    # Then the validation is not validated on it
    assert status_of(stack, validation.validation_id)[0] != "validated"


def test_a_validation_token_carries_no_firmware_version_fleetkey_did_not_check(stack, acme):
    """A validation answer's measurement is vouched for (a published release), but a version sent
    without a measurement is copied into the validated result unchecked: the relying party gets
    a signed `firmware_version` nobody verified."""
    sensor = enroll(stack, acme, "sensor-fw-claim")
    validation, command = ask(stack, sensor, audience=TELEMETRY)
    answer(
        stack, sensor, command, firmware=False, extra_claims={"firmware_version": "2.4.1-released"}
    )
    result = stack.validations.result(RP, validation.validation_id)
    assert result.status.value == "validated"
    claims = verify_pyjwt(stack, result.token, audience=TELEMETRY)
    assert "firmware_version" not in claims or "firmware_sha256" in claims, claims


def test_a_tampered_copy_of_a_captured_answer_does_not_end_the_validation(stack, pump):
    """Whoever sees an answer on its way (or the command's nonce) ends the validation with a
    copy whose signature does not verify: `assertion_invalid` is recorded for an answer that
    proves nothing about the device, and the device's own answer is then refused."""
    validation, command = ask(stack, pump)
    genuine = answer_assertion(
        stack, pump, command, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE
    )
    head, body, signature = genuine.split(".")
    tampered = f"{head}.{body}.{signature[:-4]}AAAA"
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(tampered, audience=THERAPY))
    # Then the validation is still the device's to answer
    assert status_of(stack, validation.validation_id) == ("pending", None)
    stack.tokens.issue(token_request(genuine, audience=THERAPY))
    assert status_of(stack, validation.validation_id)[0] == "validated"


def test_an_answer_from_the_devices_next_life_does_not_validate_its_previous_lifes_request(
    stack, pump
):
    """A validation binds the device id only: asked of the pump of one owner, it is validated by
    the same pump after a decommission and a recommission to another owner (epoch + 1; the
    factory certificate registers again with the same id) within the deadline."""
    validation, command = ask(stack, pump, expires_in=300)
    change_device(stack, pump.device_id, "recommissioned", epoch=2, owner="another-clinic")
    with pytest.raises(OAuthError):
        answer(stack, pump, command)
    assert status_of(stack, validation.validation_id)[0] != "validated"


def test_a_validation_result_grants_no_scope_a_resource_server_could_honour(stack, pump):
    """Any relying party (an IAM principal the deployer admitted) may validate any device for an
    audience its profile allows, and the result is an RFC 9068 token of the device for that
    audience. It carries no scope and names its validation, so a resource server that requires
    a scope (as RFC 9068 §4 has it check) never takes a validation result for a grant; and it is
    bound to the device's certificate (`cnf`), which the relying party cannot present."""
    analytics = "arn:aws:iam::123456789012:role/analytics-app"
    validation, command = ask(stack, pump, requester=analytics, audience=THERAPY)
    answer(stack, pump, command)
    token = stack.validations.result(analytics, validation.validation_id).token
    introspected = stack.introspection.introspect(token)
    assert introspected["active"] and "scope" not in introspected
    assert introspected["validation"]["id"] == validation.validation_id
    assert introspected["cnf"]["x5t#S256"]


def test_a_replayed_assertion_costs_no_kms_signature(stack, acme):
    """The warm path signs before it writes: every replay of a captured assertion (and every
    answer to a validation it does not fit) spends a KMS Sign on the one signing key whose
    request quota the whole fleet shares; before, a replay cost one refused write."""
    sensor = enroll(stack, acme, "sensor-replay-sign")
    captured = sensor.assertion(stack)
    stack.tokens.issue(token_request(captured))  # warm: the credential is cached
    counter = AwsCallCounter().watch(*stack.service_clients())
    for _ in range(3):
        with pytest.raises(InvalidGrant):
            stack.tokens.issue(token_request(captured))
    assert "kms.Sign" not in counter.reset()


# ---- attacks that held (regressions) ------------------------------------------------------------


def test_the_validation_and_firmware_paths_send_only_expressions_aws_accepts(
    stack,
    acme,
    pump,
    strict_dynamodb,
):
    # request, answer, read
    validation, command = ask(stack, pump)
    answer(stack, pump, command)
    stack.validations.result(RP, validation.validation_id, wait=0)
    # an answer refused (its refusal recorded), and one that does not fit
    _, command = ask(stack, pump)
    other = enroll(stack, acme, "pump-expr-other", profile="infusion-pump")
    with pytest.raises(InvalidClient):  # the pump's own assertion breaking a rule: recorded
        answer(stack, pump, command, firmware=False, extra_claims={"firmware_version": "a b"})
    _, command = ask(stack, pump)
    with pytest.raises(InvalidGrant):
        answer(stack, other, command)
    # the cached credential refused on the write (suspended behind the cache), then refreshed
    sensor = enroll(stack, acme, "sensor-expr")
    stack.tokens.issue(token_request(sensor.assertion(stack)))
    change_device(stack, sensor.device_id, "owner_changed", owner="clinic-b")
    stack.tokens.issue(token_request(sensor.assertion(stack)))
    suspend(stack, sensor.device_id)
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(sensor.assertion(stack)))
    # a challenge
    challenge = stack.tokens.challenge()["nonce"]
    stack.tokens.issue(
        token_request(
            pump.assertion(
                stack, nonce=challenge, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE
            )
        )
    )
    # a device refused at once
    ask(stack, sensor, audience=TELEMETRY)
    # firmware: publish, list, revoke with and without a reason
    firmware = stack.components.firmware
    for n, reason in enumerate(("recall", None)):
        sha = f"{n:064x}"
        firmware.publish("infusion-pump", f"9.{n}", sha, actor="rel")
        firmware.revoke("infusion-pump", sha, reason=reason, actor="rel")
    firmware.list()
    assert strict_dynamodb == []


def test_another_principal_can_neither_read_nor_learn_a_result(stack, pump):
    validation, command = ask(stack, pump)
    answer(stack, pump, command)
    for caller in (
        OTHER_RP,
        "arn:aws:sts::123456789012:assumed-role/clinic-app-2/s",
        "arn:aws:sts::210987654321:assumed-role/clinic-app/s",  # same role name, other account
        "arn:aws:iam::123456789012:user/clinic-app",
        "arn:aws:sts::123456789012:federated-user/clinic-app",
        "unknown",
        "",
    ):
        with pytest.raises(NotFound):
            stack.validations.result(principal(caller), validation.validation_id)


def test_a_relying_party_cannot_end_a_validation_it_knows_the_id_of(stack, pump):
    """Knowing the validation id (the relying party's) but not the nonce (only the device gets
    it): an answer with a guessed nonce, signed by the device's key or verified by the stand-in
    key, leaves the validation pending."""
    validation, command = ask(stack, pump)
    forged = {**command, "nonce": "guessed-nonce"}
    with pytest.raises(InvalidGrant):
        answer(stack, pump, forged)
    unsigned = client_assertion(
        pump.key,
        "0" * 64,  # not its certificate: verified against the stand-in key, refused
        pump.device_id,
        stack.settings.issuer,
        nonce="guessed-nonce",
        extra_claims={"validation": {"id": validation.validation_id, "purpose": "dose-change"}},
    )
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(unsigned, audience=THERAPY))
    assert status_of(stack, validation.validation_id) == ("pending", None)
    answer(stack, pump, command)  # the device's own answer still validates
    assert status_of(stack, validation.validation_id)[0] == "validated"


def test_a_cloned_key_of_one_device_answers_no_other_devices_validation(stack, acme, pump):
    """A cloned key of one device answers no other device's validation: as itself (with the
    other's nonce) the answer does not fit; as the other device (without its nonce) it is
    refused and the refusal does not land."""
    clone = enroll(stack, acme, "pump-cloned", profile="infusion-pump")
    validation, command = ask(stack, pump)
    # As itself, with the pump's validation and nonce
    with pytest.raises(InvalidGrant):
        answer(stack, clone, command)
    # As the pump (sub), with its own key and kid
    as_pump = client_assertion(
        clone.key,
        clone.certificate_id,
        pump.device_id,
        stack.settings.issuer,
        nonce="not-the-nonce",
        extra_claims={"validation": {"id": validation.validation_id, "purpose": "dose-change"}},
        firmware_version=PUMP_VERSION,
        firmware_sha256=PUMP_FIRMWARE,
    )
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(as_pump, audience=THERAPY))
    assert status_of(stack, validation.validation_id) == ("pending", None)


def test_a_cached_credential_does_not_survive_a_recommission_or_a_rotation(stack, acme):
    sensor = enroll(stack, acme, "sensor-cache-epoch")
    stack.tokens.issue(token_request(sensor.assertion(stack)))  # cached now
    # A new life (epoch + 1) with the same certificate, as a recommission could leave it
    change_device(stack, sensor.device_id, "recommissioned", epoch=2, owner="new-owner")
    token = stack.tokens.issue(token_request(sensor.assertion(stack)))["access_token"]
    # the token was decided on the device as it is (the write refreshed the cache)
    assert verify_pyjwt(stack, token)["sub"] == sensor.device_id
    cached = stack.tokens._credentials[sensor.certificate_id]
    assert (cached.epoch, cached.owner) == (2, "new-owner")
    # A rotation retires the certificate behind the cache: refused, the validation too
    validation, command = ask(stack, sensor, audience=TELEMETRY)
    current = stack.store.devices.get(sensor.device_id).current_certificate
    change_device(
        stack,
        sensor.device_id,
        "certificate_rotated",
        certificates=(
            dataclasses.replace(current, role=CertificateRole.RETIRED),
            dataclasses.replace(current, certificate_id="d" * 64),
        ),
    )
    with pytest.raises(InvalidClient):
        answer(stack, sensor, command, firmware=False)
    assert status_of(stack, validation.validation_id)[0] != "validated"


def test_a_resume_after_a_suspension_invalidates_a_cached_assertion_signed_before(stack, acme):
    sensor = enroll(stack, acme, "sensor-cache-tnb")
    stack.tokens.issue(token_request(sensor.assertion(stack)))  # cached
    signed_before = sensor.assertion(stack)  # with iat
    stack.lifecycle.suspend(sensor.device_id, reason="x", actor="op")
    stack.lifecycle.resume(sensor.device_id, actor="op")
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(signed_before))


def test_one_assertion_validates_once_and_yields_one_token(stack, pump):
    validation, command = ask(stack, pump)
    assertion = answer_assertion(
        stack, pump, command, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE
    )
    first = stack.tokens.issue(token_request(assertion, audience=THERAPY))
    for service in (stack.tokens, fresh_service(stack)):
        with pytest.raises(InvalidGrant):
            service.issue(token_request(assertion, audience=THERAPY))
    assert stack.validations.result(RP, validation.validation_id).token == first["access_token"]
    # An unused answer is no assertion for the other grants (rotation, data keys): its nonce
    # is not a challenge's
    _, command = ask(stack, pump)
    unused = answer_assertion(
        stack, pump, command, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE
    )
    with pytest.raises(InvalidGrant):
        stack.tokens.record_assertion(stack.tokens.authenticate(unused, None))


def test_a_late_answer_neither_validates_nor_refuses(stack, acme, pump):
    validation, command = ask(stack, pump, expires_in=5)
    late = token_service(stack, at(validation.answer_by))
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, service=late, now=validation.answer_by)
    # an invalid late answer with the nonce does not turn it into "refused" either
    other = enroll(stack, acme, "pump-late-forger", profile="infusion-pump")
    with pytest.raises(InvalidClient):
        answer(stack, pump, command, service=late, key=other.key, now=validation.answer_by)
    service = ValidationService(
        stack.store.devices,
        stack.store.validations,
        stack.components.channel,
        clock=at(validation.answer_by),
    )
    assert service.result(RP, validation.validation_id).status.value == "expired"


@pytest.mark.parametrize(
    "claim",
    [
        {f"k{i}": i for i in range(400)},  # a huge dict
        {"id": "a" * 32, "purpose": {"nested": ["x"] * 100}},
        {"id": ["a" * 32], "purpose": "dose"},
        {"id": "A" * 32, "purpose": "dose"},
        {"id": "a" * 32 + "\n", "purpose": "dose"},
        {"id": "a" * 32, "purpose": "dose\n"},
        [1, 2, 3],
        12,
        True,
        "",
    ],
    ids=lambda c: type(c).__name__ + str(len(str(c))),
)
def test_odd_validation_claims_are_invalid_requests_that_write_nothing(stack, pump, claim):
    before = stored_keys(stack)
    assertion = client_assertion(
        pump.key,
        pump.certificate_id,
        pump.device_id,
        stack.settings.issuer,
        nonce="n" * 43,
        extra_claims={"validation": claim},
    )
    with pytest.raises(OAuthInvalidRequest):
        stack.tokens.issue(token_request(assertion, audience=THERAPY))
    assert stored_keys(stack) == before


@pytest.mark.parametrize(
    "nonce", [None, 0, 1.5, True, [], {}, {"a": "b"}, "", "x" * 6000, "\u0000", "é" * 10]
)
def test_odd_nonces_of_an_answer_are_refused_and_write_nothing(stack, pump, nonce):
    validation, _ = ask(stack, pump)
    before = stored_keys(stack)
    claims = {"validation": {"id": validation.validation_id, "purpose": "dose-change"}}
    if nonce is not None:
        claims["nonce"] = nonce
    assertion = client_assertion(
        pump.key,
        pump.certificate_id,
        pump.device_id,
        stack.settings.issuer,
        extra_claims=claims,
        firmware_version=PUMP_VERSION,
        firmware_sha256=PUMP_FIRMWARE,
    )
    with pytest.raises(OAuthError):
        stack.tokens.issue(token_request(assertion, audience=THERAPY))
    assert stored_keys(stack) == before
    assert status_of(stack, validation.validation_id) == ("pending", None)


# ---- hostile requests through the functions ----------------------------------------------------


@pytest.mark.parametrize(
    "path,query",
    [
        ("/v1/validations/" + "a" * 32, {"wait": "1e3"}),
        ("/v1/validations/" + "a" * 32, {"wait": "0x10"}),
        ("/v1/validations/" + "a" * 32, {"wait": "\u0661"}),  # an Arabic-Indic digit one
        ("/v1/validations/" + "a" * 32, {"wait": "1_0"}),
        ("/v1/validations/" + "a" * 32, {"wait": " 1"}),
        ("/v1/validations/" + "a" * 32, {"wait": "9" * 400}),
        ("/v1/validations/" + "a" * 5000, None),
        ("/v1/validations/%00", None),
        ("/v1/validations/%F0%9F%98%80", None),
        ("/v1/validations/..%2F..%2Fadmin", None),
    ],
)
def test_hostile_reads_are_answered_4xx(functions, device, path, query):
    status, body = call(functions["validations"], "GET", path, query=query)
    assert 400 <= status < 500, (status, body)


def test_a_repeated_wait_is_not_a_5xx(functions, device):
    created = call(functions["validations"], "POST", "/v1/validations", REQUEST)[1]
    event = proxy_event(
        "GET",
        f"/v1/validations/{created['validation_id']}?wait=0&wait=abc",
        caller_arn=RP,
        resource="/v1/validations/{validation_id}",
        path_parameters={"validation_id": created["validation_id"]},
    )
    response = functions["validations"].handler(event, LambdaContext())
    assert response["statusCode"] < 500, response


@pytest.mark.parametrize(
    "body",
    [
        "null",
        "1e999",
        '{"device_id": "well-0001", "device_id": "other", "purpose": "p", "audience": "a"}',
        {**REQUEST, "device_id": "well-0001\u0000"},
        {**REQUEST, "device_id": ""},
        {**REQUEST, "purpose": "valve-open\n"},
        {**REQUEST, "audience": TELEMETRY + "\u00a0"},
        {**REQUEST, "audience": "\u0085"},
        {**REQUEST, "expires_in": True},
        {**REQUEST, "expires_in": 30.0},
        {**REQUEST, "require_attestation": 1},
        {**REQUEST, "purpose": None},
        {**REQUEST, "device_id": ["well-0001"]},
        "[" * 5000 + "]" * 5000,
    ],
    ids=lambda b: str(b)[:40],
)
def test_hostile_requests_are_4xx_and_command_nothing(functions, device, body):
    from moto.iotdata.models import iotdata_backends

    published = iotdata_backends["123456789012"]["eu-west-1"].published_payloads
    before = len(published)
    status, answer_ = call(functions["validations"], "POST", "/v1/validations", body)
    assert 400 <= status < 500, (status, answer_)
    assert len(published) == before


def test_an_answer_through_the_token_function_with_hostile_claims_is_4xx(functions, device):
    key, certificate_id = device
    created = call(functions["validations"], "POST", "/v1/validations", REQUEST)[1]
    command = the_command("well-0001")
    for claims, audience in [
        ({"validation": {"id": created["validation_id"], "purpose": "valve-open"}}, None),
        ({"validation": {"id": created["validation_id"], "purpose": "valve-open"}}, "a b"),
        ({"validation": {f"k{i}": "v" * 10 for i in range(300)}}, TELEMETRY),
        (
            {"validation": {"id": created["validation_id"], "purpose": "valve-open"}, "exp": 1.5},
            TELEMETRY,
        ),
        (
            {"validation": {"id": created["validation_id"], "purpose": "valve-open"}, "iat": "0"},
            TELEMETRY,
        ),
        (
            {"validation": {"id": created["validation_id"], "purpose": "valve-open"}, "jti": 7},
            TELEMETRY,
        ),
        (
            {
                "validation": {"id": created["validation_id"], "purpose": "valve-open"},
                "firmware_sha256": 7,
            },
            TELEMETRY,
        ),
        (
            {
                "validation": {"id": created["validation_id"], "purpose": "valve-open"},
                "firmware_version": {"a": 1},
            },
            TELEMETRY,
        ),
    ]:
        assertion = client_assertion(
            key, certificate_id, "well-0001", ISSUER, nonce=command["nonce"], extra_claims=claims
        )
        event = proxy_event(
            "POST",
            "/v1/token",
            body=urlencode(token_request(assertion, audience=audience)),
            headers={"content-type": "application/x-www-form-urlencoded"},
            resource="/v1/token",
        )
        response = functions["token"].handler(event, LambdaContext())
        assert 400 <= response["statusCode"] < 500, (claims, response)
