"""The sample events of delegated validation (events/): each has API Gateway's shape as its
function receives it, and its function, run on it against the local stack, does what it says.

    validation-request        REST proxy, POST /v1/validations (IAM: a relying party's session)
    validation-result         REST proxy, GET /v1/validations/{validation_id}?wait=10 (IAM)
    token-validation-answer   REST proxy, POST /v1/token: the device's answer (public)
"""

from __future__ import annotations

import copy
import json
import re
from urllib.parse import parse_qsl, urlencode

import jwt
import pytest
from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventModel
from moto.iotdata.models import iotdata_backends

from fleetkey.api.validations import ValidationRequest
from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.validation import MAX_WAIT_SECONDS, principal
from fleetkey_local.api_gateway import AWS_IAM, NONE, ROUTES
from fleetkey_local.device import validation_answer
from fleetkey_local.fleet import PUMP_FIRMWARE
from fleetkey_local.stack import ACCOUNT, REGION, TABLE
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

ISSUER = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"
DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
DEVICE = "pump-0001"  # the device every sample names
RELYING_PARTY_ROLE = "arn:aws:sts::123456789012:assumed-role/clinic-app"
RUNNING = {"firmware_version": PUMP_FIRMWARE[0], "firmware_sha256": PUMP_FIRMWARE[1]}
# name: (method, resource, function, authorization)
SAMPLES = {
    "validation-request": ("POST", "/v1/validations", "validations", AWS_IAM),
    "validation-result": ("GET", "/v1/validations/{validation_id}", "validations", AWS_IAM),
    "token-validation-answer": ("POST", "/v1/token", "token", NONE),
}


@pytest.fixture
def functions(stack, monkeypatch):
    """The validations and token functions as Lambda loads them, for the local stack, with the
    deployed API's issuer (the one the samples' assertion names)."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_ISSUER", ISSUER)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    loaded = {name: load_handler(name) for name in ("validations", "token")}
    yield loaded
    loaded["validations"].services.cache_clear()
    loaded["token"].service.cache_clear()


class Pump:
    """The samples' device: an infusion pump, registered (ACTIVE with its factory certificate)."""

    def __init__(self, stack) -> None:
        acme = cached_ca("acme")
        stack.register_ca(acme)
        self.key, certificate, event = stack.manufacture(acme, DEVICE, profile="infusion-pump")
        assert stack.register(event).accepted
        self.certificate_id = certificate_id(certificate)
        self.device_id = DEVICE

    def answer(self, command: dict) -> str:
        """The body of its answer to `command`, as the pump sends it."""
        form = validation_answer(self.key, self.certificate_id, DEVICE, ISSUER, command, **RUNNING)
        return urlencode(form)


@pytest.fixture
def pump(stack):
    return Pump(stack)


def invoke(function, event: dict) -> tuple[int, dict]:
    response = function.handler(event, LambdaContext())
    return response["statusCode"], json.loads(response.get("body") or "{}")


def result_event(validation_id: str, *, wait: str | None = None, caller: str | None = None):
    """The validation-result sample for `validation_id` (its path and path parameter), with
    another `wait` (None: none) or another caller."""
    event = copy.deepcopy(load_event("validation-result"))
    event["path"] = f"/v1/validations/{validation_id}"
    event["requestContext"]["path"] = f"/prod/v1/validations/{validation_id}"
    event["pathParameters"] = {"validation_id": validation_id}
    if wait is None:
        event["queryStringParameters"] = event["multiValueQueryStringParameters"] = None
    else:
        event["queryStringParameters"] = {"wait": wait}
        event["multiValueQueryStringParameters"] = {"wait": [wait]}
    if caller is not None:
        event["requestContext"]["identity"]["userArn"] = caller
    return event


def with_body(event: dict, body: str) -> dict:
    changed = copy.deepcopy(event)
    changed["body"] = body
    return changed


def commands() -> list[dict]:
    topic = f"fleetkey/{DEVICE}/commands/validate"
    published = iotdata_backends[ACCOUNT][REGION].published_payloads
    return [json.loads(payload) for t, payload in published if t == topic]


def assertion_claims(event: dict) -> tuple[dict, dict, dict[str, str]]:
    form = dict(parse_qsl(event["body"]))
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    return header, jwt.decode(assertion, options={"verify_signature": False}), form


# ---- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_are_proxy_events_of_their_routes(name):
    # Given a sample
    event = load_event(name)
    method, resource, function, authorization = SAMPLES[name]
    # Then Powertools' model reads it, an event of its resource, routed to its function
    parsed = APIGatewayProxyEventModel.model_validate(event)
    assert parsed.httpMethod == parsed.requestContext.httpMethod == method
    assert parsed.resource == parsed.requestContext.resourcePath == resource
    [route] = [r for r in ROUTES if r.resource == resource and r.method == method]
    assert (route.function, route.authorization) == (function, authorization)
    assert parsed.requestContext.path == f"/{parsed.requestContext.stage}{parsed.path}"
    identity = parsed.requestContext.identity
    if authorization == AWS_IAM:
        # a relying party's assumed-role session, of the API's account
        assert identity.userArn.startswith(RELYING_PARTY_ROLE + "/")
        assert identity.accountId == parsed.requestContext.accountId
    else:
        assert identity.userArn is None and identity.accessKey is None
    assert parsed.isBase64Encoded is False
    assert (parsed.body is None) == (method == "GET")


def test_the_request_is_what_the_model_accepts():
    event = load_event("validation-request")
    assert event["headers"]["content-type"] == "application/json"
    request = ValidationRequest.model_validate_json(event["body"])
    assert (request.device_id, request.purpose, request.audience) == (
        DEVICE,
        "dose-change",
        "urn:fleetkey:therapy",
    )
    assert request.require_attestation is True and request.expires_in == 30


def test_the_result_is_read_by_another_session_of_the_requesting_role():
    request, result = load_event("validation-request"), load_event("validation-result")
    caller = request["requestContext"]["identity"]["userArn"]
    reader = result["requestContext"]["identity"]["userArn"]
    # Then two sessions, one principal: the role
    assert caller != reader and principal(caller) == principal(reader) == RELYING_PARTY_ROLE
    validation_id = result["pathParameters"]["validation_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", validation_id)
    assert result["path"].endswith("/" + validation_id)
    assert 0 <= int(result["queryStringParameters"]["wait"]) <= MAX_WAIT_SECONDS


def test_the_answer_is_a_client_credentials_request_answering_the_sampled_validation():
    event = load_event("token-validation-answer")
    header, claims, form = assertion_claims(event)
    assert event["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert set(form) == {"grant_type", "client_assertion_type", "client_assertion", "audience"}
    assert form["grant_type"] == "client_credentials" and form["audience"] == "urn:fleetkey:therapy"
    assert header["alg"] == "ES256" and header["typ"] == "client-authentication+jwt"
    assert re.fullmatch(r"[0-9a-f]{64}", header["kid"])
    assert claims["iss"] == claims["sub"] == DEVICE and claims["aud"] == ISSUER
    assert {"jti", "iat", "exp", "nonce"} <= set(claims)
    assert 0 < claims["exp"] - claims["iat"] <= 300
    # the validation it answers is the result sample's, for the request sample's purpose
    result = load_event("validation-result")
    request = json.loads(load_event("validation-request")["body"])
    assert claims["validation"] == {
        "id": result["pathParameters"]["validation_id"],
        "purpose": request["purpose"],
    }
    assert (claims["firmware_version"], claims["firmware_sha256"]) == PUMP_FIRMWARE


# ---- the functions on the samples ----------------------------------------------------------------


def test_validation_request_sample_commands_the_pump(stack, pump, functions):
    # When the sample reaches the validations function
    status, body = invoke(functions["validations"], load_event("validation-request"))
    # Then 201: a pending validation, and the pump is sent its validate command
    assert status == 201, body
    assert set(body) == {"validation_id", "status", "expires_at"}
    assert body["status"] == "pending"
    [command] = commands()
    assert command["validation_id"] == body["validation_id"]
    assert (command["purpose"], command["audience"]) == ("dose-change", "urn:fleetkey:therapy")
    assert command["expires_at"] == body["expires_at"] and command["nonce"]


def test_validation_result_sample_as_is_names_no_validation_here(stack, functions):
    status, body = invoke(functions["validations"], load_event("validation-result"))
    assert (status, body["error"]) == (404, "not_found")


def test_token_validation_answer_sample_as_is_is_refused_and_decides_nothing(
    stack, pump, functions
):
    # Given a validation the pump was asked for
    _, created = invoke(functions["validations"], load_event("validation-request"))
    # When the sample answer arrives as is (its signature is a placeholder)
    status, body = invoke(functions["token"], load_event("token-validation-answer"))
    # Then it is refused like any assertion that does not authenticate
    assert (status, body["error"]) == (401, "invalid_client")
    # and the pump's validation is still pending
    status, result = invoke(
        functions["validations"], result_event(created["validation_id"], wait=None)
    )
    assert (status, result["status"]) == (200, "pending")


def test_the_samples_through_the_whole_flow(stack, pump, functions):
    # Given the request sample: the pump is commanded
    _, created = invoke(functions["validations"], load_event("validation-request"))
    validation_id = created["validation_id"]
    [command] = commands()

    # When the pump answers with the token sample's request, its own assertion in it
    answer = with_body(load_event("token-validation-answer"), pump.answer(command))
    status, token = invoke(functions["token"], answer)
    assert status == 200, token
    assert token["expires_in"] <= 60 and "scope" not in token

    # Then the result sample (another session of the same role) reads it validated at once
    status, result = invoke(functions["validations"], result_event(validation_id, wait="10"))
    assert status == 200, result
    assert result["status"] == "validated" and result["token"] == token["access_token"]
    assert result["validation_id"] == validation_id and result["device_id"] == DEVICE
    # and the token verifies against the JWKS, for the request's audience and this validation
    keys = jwt.PyJWKSet.from_dict(stack.signing_keys.jwks())
    claims = jwt.decode(
        result["token"],
        keys[jwt.get_unverified_header(result["token"])["kid"]],
        algorithms=["ES256"],
        audience="urn:fleetkey:therapy",
        issuer=ISSUER,
    )
    assert claims["validation"] == {"id": validation_id, "purpose": "dose-change"}
    assert claims["firmware_sha256"] == PUMP_FIRMWARE[1]

    # and another principal (another role) reading it gets 404, as for no validation at all
    other = result_event(
        validation_id, caller="arn:aws:sts::123456789012:assumed-role/other-app/s-1"
    )
    status, refused = invoke(functions["validations"], other)
    assert (status, refused["error"]) == (404, "not_found")
