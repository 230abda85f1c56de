"""Validation outcome metrics: `ValidationsValidated`, and `ValidationsRefused` by `reason`,
counted once per validation by the invocation whose write decided it (the token function for an
answer, the validations function for a device refused when asked). An answer the validation no
longer takes (a second answer, one after a refusal) counts nothing, and neither does reading a
result: `expired` is computed on read, so it has no count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetkey.composition import Components, count_validation_outcome
from fleetkey.domain.oauth import InvalidClient, InvalidGrant
from fleetkey.observability import metrics
from tests.integration.test_tokens import acme, enroll, suspend  # noqa: F401  (acme: fixture)
from tests.integration.test_validation_functions import (  # noqa: F401  (fixtures)
    REQUEST,
    call,
    device,
    device_answers,
    functions,
    the_command,
)
from tests.integration.test_validations import RP, THERAPY, answer, commands
from tests.support.emf import emitted

UNRELEASED = {"firmware_version": "9.9.9", "firmware_sha256": "ab" * 32}


class Outcomes(list[tuple[str, str | None]]):
    """The outcomes a service reported: (status, reason)."""

    def __call__(self, status: str, reason: str | None) -> None:
        self.append((str(status), None if reason is None else str(reason)))


def observed(stack, outcomes: Outcomes, clock=None) -> Components:
    """The stack's services over its clients, reporting validation outcomes to `outcomes`."""
    options: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return Components(
        stack.settings,
        dynamodb=stack.dynamodb,
        iot=stack.iot,
        kms=stack.kms,
        iot_data=stack.iot_data,
        sqs=stack.sqs,
        on_validation_outcome=outcomes,
        **options,
    )


def ask(services: Components, dev, **options):
    validation = services.validations.request(RP, dev.device_id, "dose-change", THERAPY, **options)
    return validation, (commands(dev.device_id) or [None])[-1]


@pytest.fixture
def pump(stack, acme):  # noqa: F811
    return enroll(stack, acme, "pump-metrics", profile="infusion-pump")


# ---- once per validation, by the write that decided it ---------------------------------------


def test_a_validated_answer_is_counted_once(stack, pump):
    # Given a validation asked of a pump, and services that report outcomes
    outcomes = Outcomes()
    services = observed(stack, outcomes)
    _, command = ask(services, pump)
    assert outcomes == []

    # When the pump answers
    answer(stack, pump, command, service=services.tokens)

    # Then one validated outcome is reported
    assert outcomes == [("validated", None)]

    # When the same command is answered again, well or with unreleased firmware
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, service=services.tokens)
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, firmware=False, service=services.tokens, **UNRELEASED)

    # Then neither decides anything: no further outcome (the second is refused by the write's
    # condition, the validation being no longer pending)
    assert outcomes == [("validated", None)]


def test_a_refused_answer_is_counted_once_with_its_reason(stack, pump):
    # Given a validation asked of a pump
    outcomes = Outcomes()
    services = observed(stack, outcomes)
    validation, command = ask(services, pump)

    # When the pump answers with firmware that is not a published release
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, firmware=False, service=services.tokens, **UNRELEASED)

    # Then one refused outcome is reported, with its reason
    assert outcomes == [("refused", "firmware_not_released")]
    assert services.validations.result(RP, validation.validation_id).status.value == "refused"

    # When it answers again, with released firmware, and once more with the unreleased one
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, service=services.tokens)
    with pytest.raises(InvalidGrant):
        answer(stack, pump, command, firmware=False, service=services.tokens, **UNRELEASED)

    # Then the validation stays refused and nothing more is reported
    assert outcomes == [("refused", "firmware_not_released")]


def test_an_answer_from_a_device_suspended_since_is_counted_refused(stack, pump):
    # Given a validation asked of a pump that is suspended before it answers
    outcomes = Outcomes()
    services = observed(stack, outcomes)
    _, command = ask(services, pump)
    suspend(stack, pump.device_id)

    # When it answers, twice
    for _ in range(2):
        with pytest.raises(InvalidClient):
            answer(stack, pump, command, service=services.tokens)

    # Then the first answer refused the validation, and only it is reported
    assert outcomes == [("refused", "device_not_active")]


def test_a_device_refused_when_asked_is_counted_by_the_request(stack, pump):
    # Given a suspended pump
    outcomes = Outcomes()
    services = observed(stack, outcomes)
    suspend(stack, pump.device_id)

    # When a relying party asks for a validation
    validation, command = ask(services, pump)

    # Then it is refused at once, no command sent, and the refusal is reported
    assert (validation.status.value, command) == ("refused", None)
    assert outcomes == [("refused", "device_not_active")]


def test_pending_and_expired_validations_count_nothing(stack, pump):
    # Given a validation nobody answers, with the services' clock in hand
    outcomes = Outcomes()
    moment = [datetime.now(UTC)]
    services = observed(stack, outcomes, clock=lambda: moment[0])
    validation, _ = ask(services, pump, expires_in=5)

    # When it is read while pending, then past its deadline, twice
    pending = services.validations.result(RP, validation.validation_id)
    moment[0] += timedelta(seconds=6)
    expired = [services.validations.result(RP, validation.validation_id) for _ in range(2)]

    # Then it read pending, then expired, and no outcome was reported: expiry is computed on
    # read, and a count of reads would not be a count of validations
    assert pending.status.value == "pending"
    assert [e.status.value for e in expired] == ["expired", "expired"]
    assert outcomes == []


# ---- the metrics the functions emit ------------------------------------------------------------


@pytest.fixture
def metrics_on(monkeypatch):
    """Powertools metrics printed (EMF on stdout), as in Lambda: the suite turns them off, and
    what earlier tests added to the shared metric set is dropped first."""
    metrics.clear_metrics()
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    yield
    metrics.clear_metrics()


def test_the_token_function_counts_a_validated_answer_once(
    functions,  # noqa: F811
    device,  # noqa: F811
    metrics_on,
    capsys,
):
    # Given a validation asked through the validations function
    status, created = call(functions["validations"], "POST", "/v1/validations", REQUEST)
    assert status == 201
    command = the_command("well-0001")
    capsys.readouterr()

    # When the device answers through the token function
    status, _ = device_answers(functions, device, command)
    assert status == 200
    out = capsys.readouterr().out

    # Then ValidationsValidated is 1, with the function's service as its only dimension
    [validated] = emitted(out, "ValidationsValidated")
    assert (validated["dimensions"], validated["value"]) == ({"service"}, 1)
    assert emitted(out, "ValidationsRefused") == []

    # When the device answers again, and the relying party reads the result
    status, body = device_answers(functions, device, command)
    assert (status, body["error"]) == (400, "invalid_grant")
    path = f"/v1/validations/{created['validation_id']}"
    assert call(functions["validations"], "GET", path)[1]["status"] == "validated"

    # Then no outcome is counted again
    out = capsys.readouterr().out
    assert emitted(out, "ValidationsValidated") == emitted(out, "ValidationsRefused") == []


def test_the_token_function_counts_a_refusal_by_its_reason_alone(
    stack,
    functions,  # noqa: F811
    device,  # noqa: F811
    metrics_on,
    capsys,
):
    # Given a validation asked of a device that is suspended before it answers
    status, _ = call(functions["validations"], "POST", "/v1/validations", REQUEST)
    assert status == 201
    command = the_command("well-0001")
    stack.lifecycle.suspend("well-0001", reason="maintenance", actor="op")
    capsys.readouterr()

    # When the device answers, twice
    answers = [device_answers(functions, device, command) for _ in range(2)]
    out = capsys.readouterr().out

    # Then both are refused, and one ValidationsRefused is counted, with `reason` in a document
    # of its own: TokensRefused keeps its `error` dimension alone
    assert [(s, body["error"]) for s, body in answers] == [(401, "invalid_client")] * 2
    [refused] = emitted(out, "ValidationsRefused")
    assert (refused["dimensions"], refused["value"]) == ({"service", "reason"}, 1)
    assert refused["document"]["reason"] == "device_not_active"
    assert set(refused["document"]) - {"_aws", "service", "reason"} == {"ValidationsRefused"}
    tokens_refused = emitted(out, "TokensRefused")
    assert [t["dimensions"] for t in tokens_refused] == [{"service", "error"}] * 2
    assert emitted(out, "ValidationsValidated") == []


def test_the_validations_function_counts_a_device_refused_when_asked(
    stack,
    functions,  # noqa: F811
    device,  # noqa: F811
    metrics_on,
    capsys,
):
    # Given a suspended device
    stack.lifecycle.suspend("well-0001", reason="maintenance", actor="op")
    capsys.readouterr()

    # When a relying party asks for a validation
    status, created = call(functions["validations"], "POST", "/v1/validations", REQUEST)
    out = capsys.readouterr().out

    # Then it is refused, counted once by reason, and the request is counted without a reason
    assert (status, created["status"]) == (201, "refused")
    [refused] = emitted(out, "ValidationsRefused")
    assert (refused["dimensions"], refused["value"]) == ({"service", "reason"}, 1)
    assert refused["document"]["reason"] == "device_not_active"
    [requested] = emitted(out, "ValidationsRequested")
    assert (requested["dimensions"], requested["value"]) == ({"service"}, 1)


def test_outcome_metrics_follow_the_metrics_switch(capsys):
    # Given metrics turned off (POWERTOOLS_METRICS_DISABLED, as the suite sets it)
    # When an outcome is counted
    count_validation_outcome("refused", "assertion_invalid")

    # Then nothing is printed
    assert emitted(capsys.readouterr().out, "ValidationsRefused") == []
    metrics.clear_metrics()


def test_an_unknown_status_is_not_counted(metrics_on, capsys):
    # Given metrics on
    # When a status without a metric is reported (expired is computed, never decided)
    count_validation_outcome("expired", None)
    metrics.flush_metrics()

    # Then nothing is counted
    assert "Validations" not in capsys.readouterr().out
