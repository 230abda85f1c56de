"""Delegated validation against moto: a relying party asks, the device is commanded and answers
at the token endpoint, the result verifies offline; replays, other devices, late answers and
other principals are refused; refusals name their reason; the token path at two warm AWS calls;
a fault at every AWS call converges with at most one token per assertion."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import jwt
import pytest
from moto.iotdata.models import iotdata_backends

from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.oauth import InvalidClient, InvalidGrant, OAuthError, OAuthInvalidRequest
from fleetkey.domain.validation import principal
from fleetkey.errors import InvalidRequest, NotFound
from fleetkey.services.signing_keys import SigningKeys
from fleetkey.services.tokens import TokenService
from fleetkey.services.validations import ValidationService
from fleetkey.store import schema
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.instrument import AwsCallCounter
from tests.integration.test_tokens import (  # noqa: F401  (acme is a fixture)
    PUMP_FIRMWARE,
    acme,
    change_device,
    enroll,
    fresh_token_service,
    stored_keys,
    suspend,
    verify_pyjwt,
)
from tests.support.faults import FaultInjector

ACCOUNT, REGION = "123456789012", "eu-west-1"
RP = "arn:aws:iam::123456789012:role/clinic-app"
OTHER_RP = "arn:aws:iam::123456789012:role/other-app"
THERAPY = "urn:fleetkey:therapy"
TELEMETRY = "urn:fleetkey:telemetry"
PUMP_VERSION = "2.4.1"


def commands(device_id: str) -> list[dict]:
    topic = f"fleetkey/{device_id}/commands/validate"
    return [
        json.loads(payload)
        for t, payload in iotdata_backends[ACCOUNT][REGION].published_payloads
        if t == topic
    ]


def answer(stack, dev, command: dict, *, firmware=True, service=None, **overrides) -> dict:
    """What a device does with a validate command: a token request whose assertion carries the
    nonce and the validation, with its firmware measurement."""
    claims = {"validation": {"id": command["validation_id"], "purpose": command["purpose"]}}
    claims.update(overrides.pop("extra_claims", {}))
    measurement = (
        {"firmware_version": PUMP_VERSION, "firmware_sha256": PUMP_FIRMWARE} if firmware else {}
    )
    assertion = client_assertion(
        overrides.pop("key", dev.key),
        dev.certificate_id,
        dev.device_id,
        stack.settings.issuer,
        nonce=overrides.pop("nonce", command["nonce"]),
        extra_claims=claims,
        **measurement,
        **overrides,
    )
    form = token_request(assertion, audience=command["audience"])
    return (service or stack.tokens).issue(form)


def ask(stack, dev, *, requester=RP, audience=THERAPY, **options):
    validation = stack.validations.request(
        requester, dev.device_id, "dose-change", audience, **options
    )
    return validation, (commands(dev.device_id) or [None])[-1]


@pytest.fixture
def pump(stack, acme):  # noqa: F811
    return enroll(stack, acme, "pump-validate", profile="infusion-pump")


# ---- the flow ---------------------------------------------------------------------------------


def test_a_pump_proves_itself_and_the_relying_party_verifies_the_result_offline(stack, pump):
    # Given a relying party asks fleetkey to validate a pump before a dose change
    validation, command = ask(stack, pump)
    assert validation.status.value == "pending"
    # Then the pump is commanded with the validation, a nonce and the purpose
    assert command == {
        "validation_id": validation.validation_id,
        "nonce": validation.nonce,
        "purpose": "dose-change",
        "audience": THERAPY,
        "expires_at": command["expires_at"],
    }
    # When the pump answers with its assertion
    response = answer(stack, pump, command)
    # Then the result is validated, with the token the pump was given
    result = stack.validations.result(RP, validation.validation_id)
    assert result.status.value == "validated" and result.token == response["access_token"]
    # and the token verifies against the JWKS for the relying party's audience
    claims = verify_pyjwt(stack, result.token, audience=THERAPY)
    assert claims["sub"] == pump.device_id
    assert claims["validation"] == {"id": validation.validation_id, "purpose": "dose-change"}
    assert claims["firmware_sha256"] == PUMP_FIRMWARE and claims["firmware_version"] == "2.4.1"
    assert claims["exp"] - claims["iat"] <= 60 and "scope" not in claims
    assert jwt.get_unverified_header(result.token)["typ"] == "at+jwt"


def test_a_nonce_answers_one_validation_once(stack, pump):
    validation, command = ask(stack, pump)
    answer(stack, pump, command)
    # When the pump (or whoever captured its answer) answers again with a new assertion
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command)
    # Then the result is the first one
    assert stack.validations.result(RP, validation.validation_id).status.value == "validated"


def test_another_devices_answer_is_refused_and_changes_nothing(stack, acme, pump):  # noqa: F811
    other = enroll(stack, acme, "pump-other", profile="infusion-pump")
    validation, command = ask(stack, pump)
    before = stack.validations.result(RP, validation.validation_id)
    # When another pump answers with the first pump's validation and nonce
    with pytest.raises(InvalidGrant):
        answer(stack, other, command)
    # Then the validation is still pending
    assert stack.validations.result(RP, validation.validation_id) == before


def test_an_answer_that_does_not_fit_leaves_the_validation_pending(stack, pump):
    validation, command = ask(stack, pump)
    misfits = {
        "another nonce": {"nonce": "x" * 43},
        "another purpose": {
            "extra_claims": {
                "validation": {"id": validation.validation_id, "purpose": "firmware-update"}
            }
        },
    }
    for name, override in misfits.items():
        with pytest.raises(InvalidGrant):
            answer(stack, pump, command, **override)
        assert stack.validations.result(RP, validation.validation_id).status.value == "pending", (
            name
        )
    with pytest.raises(InvalidGrant):  # another audience
        answer(stack, pump, {**command, "audience": TELEMETRY})
    # and the right answer still works
    answer(stack, pump, command)


def test_an_answer_after_the_deadline_is_refused_and_the_validation_reads_expired(stack, pump):
    validation, command = ask(stack, pump, expires_in=5)
    later = validation.answer_by + 1

    def clock():
        return datetime.fromtimestamp(later, UTC)

    tokens = TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        stack.signing_keys,
        clock,
        firmware=stack.store.firmware,
        validations=stack.store.validations,
    )
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, service=tokens, now=later)
    service = ValidationService(
        stack.store.devices, stack.store.validations, stack.components.channel, clock=clock
    )
    assert service.result(RP, validation.validation_id).status.value == "expired"


def test_a_result_is_readable_only_by_the_principal_that_asked(stack, pump):
    validation, _ = ask(stack, pump)
    with pytest.raises(NotFound):
        stack.validations.result(OTHER_RP, validation.validation_id)
    # a session of the same role is the same principal
    session = "arn:aws:sts::123456789012:assumed-role/clinic-app/s-1"
    validation, _ = ask(stack, pump, requester=principal(session.replace("s-1", "s-0")))
    assert stack.validations.result(principal(session), validation.validation_id)
    for unknown in ("0" * 32, "not-an-id", "../" * 20):
        with pytest.raises(NotFound):
            stack.validations.result(RP, unknown)


def test_bad_requests_are_refused_and_write_nothing(stack, pump):
    before = stored_keys(stack)
    cases = [
        dict(device_id=pump.device_id, purpose="dose change", audience=THERAPY),
        dict(device_id=pump.device_id, purpose="", audience=THERAPY),
        dict(device_id=pump.device_id, purpose="x" * 65, audience=THERAPY),
        dict(device_id=pump.device_id, purpose="dose", audience="urn:other"),
        dict(device_id=pump.device_id, purpose="dose", audience="a b"),
        dict(device_id=pump.device_id, purpose="dose", audience=THERAPY, expires_in=4),
        dict(device_id=pump.device_id, purpose="dose", audience=THERAPY, expires_in=301),
    ]
    for case in cases:
        device_id, purpose, audience = (
            case.pop("device_id"),
            case.pop("purpose"),
            case.pop("audience"),
        )
        with pytest.raises(InvalidRequest):
            stack.validations.request(RP, device_id, purpose, audience, **case)
    for device_id in ("nobody", "a/b", "x" * 200):
        with pytest.raises(NotFound):
            stack.validations.request(RP, device_id, "dose", THERAPY)
    with pytest.raises(InvalidRequest):
        stack.validations.result(RP, "0" * 32, wait=21)
    assert stored_keys(stack) == before
    assert commands(pump.device_id) == []


# ---- refusals ---------------------------------------------------------------------------------


def test_a_suspended_pump_is_refused_at_once_without_a_command(stack, pump):
    suspend(stack, pump.device_id)
    validation, command = ask(stack, pump)
    assert command is None
    result = stack.validations.result(RP, validation.validation_id)
    assert (result.status.value, result.reason.value) == ("refused", "device_not_active")


def test_a_pump_suspended_before_it_answers_is_refused(stack, pump):
    # Given a token service that already granted the pump a token (its credential is cached)
    answer(stack, pump, ask(stack, pump)[1])
    validation, command = ask(stack, pump)
    suspend(stack, pump.device_id)
    # When the pump answers after its suspension
    with pytest.raises(InvalidClient):
        answer(stack, pump, command)
    # Then the validation is refused: device not ACTIVE
    result = stack.validations.result(RP, validation.validation_id)
    assert (result.status.value, result.reason.value) == ("refused", "device_not_active")


def test_a_pump_on_withdrawn_firmware_is_refused(stack, pump):
    validation, command = ask(stack, pump)
    stack.components.firmware.revoke("infusion-pump", PUMP_FIRMWARE, reason="recall", actor="rel")
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command)
    result = stack.validations.result(RP, validation.validation_id)
    assert (result.status.value, result.reason.value) == ("refused", "firmware_not_released")
    # and no token is granted on it from then on
    with pytest.raises(InvalidGrant):
        stack.tokens.issue(
            token_request(
                pump.assertion(stack, firmware_version=PUMP_VERSION, firmware_sha256=PUMP_FIRMWARE)
            )
        )


def test_attestation_required_by_the_relying_party_and_missing_is_refused(stack, acme):  # noqa: F811
    # A telemetry sensor's profile does not require attestation; the relying party does
    sensor = enroll(stack, acme, "sensor-validate")
    validation, command = ask(stack, sensor, audience=TELEMETRY, require_attestation=True)
    with pytest.raises(InvalidGrant):
        answer(stack, sensor, command, firmware=False)
    result = stack.validations.result(RP, validation.validation_id)
    assert (result.status.value, result.reason.value) == ("refused", "attestation_missing")
    # Without the relying party's requirement, the sensor's unattested answer validates
    validation, command = ask(stack, sensor, audience=TELEMETRY)
    answer(stack, sensor, command, firmware=False)
    assert stack.validations.result(RP, validation.validation_id).status.value == "validated"


def test_a_pump_without_its_measurement_is_refused_attestation_missing(stack, pump):
    validation, command = ask(stack, pump)
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, firmware=False)
    result = stack.validations.result(RP, validation.validation_id)
    assert result.reason.value == "attestation_missing"


def test_an_answer_signed_by_another_key_ends_nothing(stack, acme, pump):  # noqa: F811
    other = enroll(stack, acme, "pump-forger", profile="infusion-pump")
    validation, command = ask(stack, pump)
    # When an answer that knows the nonce is signed by another key (a forger, a tampered copy)
    with pytest.raises(InvalidClient):
        answer(stack, pump, command, key=other.key)
    # Then the validation is still pending: the pump's own answer validates it
    assert stack.validations.result(RP, validation.validation_id).status.value == "pending"
    answer(stack, pump, command)
    assert stack.validations.result(RP, validation.validation_id).status.value == "validated"


def test_the_devices_own_assertion_breaking_a_rule_is_refused_assertion_invalid(stack, pump):
    validation, command = ask(stack, pump)
    with pytest.raises(InvalidClient):
        answer(stack, pump, command, extra_claims={"firmware_version": "2.4.1 beta"})
    result = stack.validations.result(RP, validation.validation_id)
    assert (result.status.value, result.reason.value) == ("refused", "assertion_invalid")


def test_malformed_validation_claims_are_invalid_requests(stack, pump):
    validation, command = ask(stack, pump)
    for claim in (
        "x",
        {"id": validation.validation_id},
        {"id": "nope", "purpose": "dose-change"},
        {"id": validation.validation_id, "purpose": "dose change"},
        {"id": validation.validation_id, "purpose": "dose-change", "more": 1},
    ):
        with pytest.raises(OAuthInvalidRequest):
            answer(stack, pump, command, extra_claims={"validation": claim})
    with pytest.raises(OAuthInvalidRequest):  # a scope beside a validation answer
        assertion = client_assertion(
            pump.key,
            pump.certificate_id,
            pump.device_id,
            stack.settings.issuer,
            nonce=command["nonce"],
            extra_claims={"validation": {"id": validation.validation_id, "purpose": "dose-change"}},
        )
        stack.tokens.issue(token_request(assertion, audience=THERAPY, scope="therapy:report"))
    assert stack.validations.result(RP, validation.validation_id).status.value == "pending"


# ---- concurrency, faults and budgets -----------------------------------------------------------


def test_concurrent_answers_validate_once(stack, pump):
    validation, command = ask(stack, pump)
    results: list[object] = []

    def one():
        try:
            results.append(answer(stack, pump, command, service=fresh_service(stack)))
        except OAuthError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = [r for r in results if isinstance(r, dict)]
    assert len(tokens) == 1, results
    assert stack.validations.result(RP, validation.validation_id).token == tokens[0]["access_token"]


def fresh_service(stack):
    """A token function that just started: no cached device, registry or key."""
    return TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms)),
        firmware=stack.store.firmware,
        validations=stack.store.validations,
    )


def test_a_warm_token_costs_two_aws_calls_and_a_changed_device_is_decided_again(stack, acme):  # noqa: F811
    sensor = enroll(stack, acme, "sensor-warm")
    stack.tokens.issue(token_request(sensor.assertion(stack)))
    counter = AwsCallCounter().watch(*stack.service_clients())
    stack.tokens.issue(token_request(sensor.assertion(stack)))
    assert counter.reset() == ["kms.Sign", "dynamodb.TransactWriteItems"]
    # a validated token costs the same
    _validation, command = ask(stack, sensor, audience=TELEMETRY)
    counter.reset()
    answer(stack, sensor, command, firmware=False)
    assert counter.reset() == ["kms.Sign", "dynamodb.TransactWriteItems"]
    # When the device changes behind the cache (a new profile's audience set, same certificate)
    change_device(stack, sensor.device_id, "profile_changed", profile="infusion-pump")
    counter.reset()
    # Then the failed condition brings the device back and the request is decided again on it
    with pytest.raises(OAuthError):  # the pump profile needs attestation the sensor lacks
        stack.tokens.issue(token_request(sensor.assertion(stack)))
    assert counter.reset() == ["kms.Sign", "dynamodb.TransactWriteItems"]
    # and a suspension behind the cache is refused on the write, then without any write
    change_device(stack, sensor.device_id, "profile_changed", profile="telemetry-sensor")
    stack.tokens.issue(token_request(sensor.assertion(stack)))
    suspend(stack, sensor.device_id)
    counter.reset()
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(sensor.assertion(stack)))
    assert counter.reset() == ["kms.Sign", "dynamodb.TransactWriteItems"]
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(sensor.assertion(stack)))
    assert counter.reset() == ["dynamodb.GetItem"]


def test_a_validation_request_costs_three_aws_calls(stack, pump):
    counter = AwsCallCounter().watch(*stack.service_clients())
    validation, _ = ask(stack, pump)
    assert counter.reset() == ["dynamodb.GetItem", "dynamodb.PutItem", "iot-data.Publish"]
    stack.validations.result(RP, validation.validation_id)
    assert counter.reset() == ["dynamodb.GetItem"]


def test_a_fault_at_any_aws_call_of_an_answer_converges_with_one_token(stack, acme):  # noqa: F811
    injector = FaultInjector().watch(*stack.service_clients())
    counter = AwsCallCounter().watch(*stack.service_clients())
    sensor = enroll(stack, acme, "sensor-answer-calls")
    _, command = ask(stack, sensor, audience=TELEMETRY)
    counter.reset()
    answer(stack, sensor, command, firmware=False, service=fresh_service(stack))
    calls = counter.reset()
    assert calls[0] == "dynamodb.GetItem" and calls[-2:] == [
        "kms.Sign",
        "dynamodb.TransactWriteItems",
    ], calls
    for k in range(1, len(calls) + 1):
        for after in (False, True):
            case = f"call {k} ({calls[k - 1]}) fails {'after' if after else 'before'}"
            dev = enroll(stack, acme, f"sensor-vfault-{k}-{int(after)}")
            validation, command = ask(stack, dev, audience=TELEMETRY)
            service = fresh_service(stack)
            assertion_claims = {"jti": f"fixed-{k}-{int(after)}"}
            injector.arm(k, after=after)
            with pytest.raises(Exception) as failed:
                answer(
                    stack,
                    dev,
                    command,
                    firmware=False,
                    service=service,
                    extra_claims=assertion_claims,
                )
            assert not isinstance(failed.value, OAuthError), case
            injector.arm(None)
            # The same answer sent again: a token unless the write had landed
            landed = k == len(calls) and after
            if landed:
                with pytest.raises(InvalidGrant):
                    answer(
                        stack,
                        dev,
                        command,
                        firmware=False,
                        service=service,
                        extra_claims=assertion_claims,
                    )
            else:
                answer(
                    stack,
                    dev,
                    command,
                    firmware=False,
                    service=service,
                    extra_claims=assertion_claims,
                )
            result = stack.validations.result(RP, validation.validation_id)
            assert result.status.value == "validated", case
            verify_pyjwt(stack, result.token, audience=TELEMETRY)


def test_a_fault_at_any_aws_call_of_a_request_leaves_nothing_half_done(stack, pump):
    injector = FaultInjector().watch(*stack.service_clients())
    for k in (1, 2, 3):
        for after in (False, True):
            injector.arm(k, after=after)
            with pytest.raises(Exception) as failed:
                ask(stack, pump)
            assert not isinstance(failed.value, (OAuthError, InvalidRequest, NotFound))
            injector.arm(None)
            # A retried request works (a new validation; an unsent one expires unanswered)
            validation, command = ask(stack, pump)
            assert command["validation_id"] == validation.validation_id
            answer(stack, pump, command)
            assert stack.validations.result(RP, validation.validation_id).token


def test_validation_items_are_where_the_schema_says(stack, pump):
    validation, _ = ask(stack, pump)
    assert (f"VALIDATION#{validation.validation_id}", "VALIDATION") in stored_keys(stack)
    assert schema.validation_key(validation.validation_id)["pk"].startswith("VALIDATION#")
