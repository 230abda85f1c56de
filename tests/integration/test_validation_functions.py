"""The validations function as Lambda runs it (API Gateway proxy events with the caller's IAM
identity), with the device's answer through the token function: statuses, refusals as JSON
errors (never a 5xx for what a caller sent), and results kept to the principal that asked."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from moto.iotdata.models import iotdata_backends

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import pem
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

ISSUER = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"
RP = "arn:aws:sts::123456789012:assumed-role/clinic-app/session-1"
OTHER = "arn:aws:iam::123456789012:user/someone-else"
TELEMETRY = "urn:fleetkey:telemetry"


@pytest.fixture
def functions(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_ISSUER", ISSUER)
    # The account's iot-data endpoint, as the stack configures it (moto serves this host).
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", "https://data-ats.iot.eu-west-1.amazonaws.com")
    loaded = {name: load_handler(name) for name in ("validations", "token")}
    yield loaded
    loaded["validations"].services.cache_clear()
    loaded["token"].service.cache_clear()


@pytest.fixture
def device(stack):
    acme = cached_ca("acme")
    stack.register_ca(acme)
    stack.allowlist.add(
        AllowlistEntry(
            device_id="well-0001",
            serial_number="SN-1",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    key, cert = acme.issue_device("well-0001", serial_number="SN-1")
    event = stack.first_connect(pem(cert), acme.pem)
    assert stack.register(event).accepted
    return key, event["certificateId"]


def call(function, method, path, body=None, caller=RP, query=None):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    target = path + (f"?{urlencode(query)}" if query else "")
    resource = "/v1/validations" if method == "POST" else "/v1/validations/{validation_id}"
    parameters = None if method == "POST" else {"validation_id": path.rsplit("/", 1)[-1]}
    event = proxy_event(
        method,
        target,
        body=body,
        headers={"content-type": "application/json"} if body is not None else {},
        caller_arn=caller,
        resource=resource,
        path_parameters=parameters,
    )
    response = function.handler(event, LambdaContext())
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def the_command(device_id: str) -> dict:
    topic = f"fleetkey/{device_id}/commands/validate"
    published = iotdata_backends["123456789012"]["eu-west-1"].published_payloads
    return json.loads([p for t, p in published if t == topic][-1])


def device_answers(functions, device, command) -> tuple[int, dict]:
    key, certificate_id = device
    assertion = client_assertion(
        key,
        certificate_id,
        "well-0001",
        ISSUER,
        nonce=command["nonce"],
        extra_claims={"validation": {"id": command["validation_id"], "purpose": "valve-open"}},
    )
    event = proxy_event(
        "POST",
        "/v1/token",
        body=urlencode(token_request(assertion, audience=command["audience"])),
        headers={"content-type": "application/x-www-form-urlencoded"},
        resource="/v1/token",
    )
    response = functions["token"].handler(event, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


REQUEST = {"device_id": "well-0001", "purpose": "valve-open", "audience": TELEMETRY}


def test_a_validation_through_the_functions(functions, device):
    validations = functions["validations"]
    status, created = call(validations, "POST", "/v1/validations", REQUEST)
    assert status == 201 and created["status"] == "pending", created
    path = f"/v1/validations/{created['validation_id']}"
    assert call(validations, "GET", path)[1]["status"] == "pending"

    status, answered = device_answers(functions, device, the_command("well-0001"))
    assert status == 200, answered

    status, result = call(validations, "GET", path, query={"wait": "1"})
    assert status == 200 and result["status"] == "validated"
    assert result["token"] == answered["access_token"]
    assert result["decided_at"] and result["expires_at"] == created["expires_at"]
    # Another session of the same role reads it; another principal does not
    same_role = RP.replace("session-1", "session-2")
    assert call(validations, "GET", path, caller=same_role)[0] == 200
    status, body = call(validations, "GET", path, caller=OTHER)
    assert (status, body["error"]) == (404, "not_found")


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        {**REQUEST, "extra": 1},
        {**REQUEST, "require_attestation": "true"},
        {**REQUEST, "expires_in": "30"},
        {**REQUEST, "expires_in": 4},
        {**REQUEST, "expires_in": 10**40},
        {**REQUEST, "purpose": "valve open"},
        {**REQUEST, "purpose": "v" * 65},
        {**REQUEST, "audience": "urn:not-for-this-device"},
        {**REQUEST, "audience": "x" * 257},
        {"device_id": "well-0001", "purpose": "valve-open"},
        {**REQUEST, "device_id": 7},
    ],
)
def test_bad_requests_are_400_and_send_nothing(functions, device, body):
    before = len(iotdata_backends["123456789012"]["eu-west-1"].published_payloads)
    status, answer = call(functions["validations"], "POST", "/v1/validations", body)
    assert (status, answer["error"]) == (400, "invalid_request"), answer
    assert len(iotdata_backends["123456789012"]["eu-west-1"].published_payloads) == before


def test_unknown_devices_and_validations_are_404(functions, device):
    validations = functions["validations"]
    for device_id in ("nobody", "../../x", "x" * 128):
        status, body = call(
            validations, "POST", "/v1/validations", {**REQUEST, "device_id": device_id}
        )
        assert (status, body["error"]) == (404, "not_found"), device_id
    for validation_id in ("0" * 32, "nope", "%2e%2e"):
        status, body = call(validations, "GET", f"/v1/validations/{validation_id}")
        assert (status, body["error"]) == (404, "not_found"), validation_id


@pytest.mark.parametrize("wait", ["-1", "21", "abc", "1.5", ""])
def test_a_wait_out_of_bounds_is_400(functions, device, wait):
    status, created = call(functions["validations"], "POST", "/v1/validations", REQUEST)
    status, body = call(
        functions["validations"],
        "GET",
        f"/v1/validations/{created['validation_id']}",
        query={"wait": wait},
    )
    assert (status, body["error"]) == (400, "invalid_request"), body


def test_a_suspended_device_is_refused_at_once(stack, functions, device):
    stack.lifecycle.suspend("well-0001", reason="maintenance", actor="op")
    status, created = call(functions["validations"], "POST", "/v1/validations", REQUEST)
    assert status == 201 and created["status"] == "refused"
    status, result = call(
        functions["validations"], "GET", f"/v1/validations/{created['validation_id']}"
    )
    assert (result["status"], result["reason"]) == ("refused", "device_not_active")
    assert "token" not in result or result["token"] is None
