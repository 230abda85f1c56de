"""Paths the IAM check (tests/support/aws_calls.py) must see run through the HANDLERS, as Lambda
runs them: a call made only through a service object in a test is not attributed to a function,
so a grant it needs would go unproven. Each test also checks the path's outcome."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from urllib.parse import urlencode

import pytest
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from fleetkey.composition import components
from fleetkey.domain.profiles import PROFILES
from fleetkey.store import schema
from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.provision import DEMO_FIRMWARE
from fleetkey_local.stack import TABLE, EmbeddedStack
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"
RELYING_PARTY = "arn:aws:sts::123456789012:assumed-role/dose-app/session-1"
ISSUER = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"


@pytest.fixture
def handlers(
    stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, ModuleType]]:
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_ISSUER", ISSUER)
    # As the tests of the other functions that publish: moto's DescribeEndpoint names a host it
    # does not serve (aws_calls.ENDPOINT_REASON).
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", "https://data-ats.iot.eu-west-1.amazonaws.com")
    loaded = {
        name: load_handler(name) for name in ("registration", "admin", "token", "validations")
    }
    yield loaded
    loaded["registration"].service.cache_clear()
    loaded["admin"].services.cache_clear()
    loaded["token"].service.cache_clear()
    components.cache_clear()  # the validations function's (and admin's)


def admin_call(admin: ModuleType, method: str, path: str) -> tuple[int, Any]:
    response = admin.handler(proxy_event(method, path, caller_arn=OPERATOR), LambdaContext())
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def registered_event(stack: EmbeddedStack, device_id: str) -> tuple[Any, dict[str, Any]]:
    return registered_event_of(stack, device_id, "telemetry-sensor")


def registered_event_of(
    stack: EmbeddedStack, device_id: str, profile: str
) -> tuple[Any, dict[str, Any]]:
    acme = cached_ca("acme")
    stack.register_ca(acme)
    key, _, event = stack.manufacture(acme, device_id, profile=profile, actor="op")
    return key, event


def test_the_registration_function_takes_over_an_existing_thing(
    stack: EmbeddedStack, handlers: dict[str, ModuleType]
) -> None:
    # Given a thing of fleetkey's (a profile's thing type: an earlier life of the device) named
    # like the device, with a stale active certificate attached
    iot = stack.harness_iot
    iot.create_thing(
        thingName="take-1",
        thingTypeName=PROFILES["telemetry-sensor"].thing_type_name(stack.settings.name_prefix),
        attributePayload={"attributes": {"owner": "legacy"}},
    )
    stale = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(thingName="take-1", principal=stale["certificateArn"])
    _, event = registered_event(stack, "take-1")

    # When the registration function runs on the certificate-registered event
    handlers["registration"].handler(event, LambdaContext())

    # Then the thing carries only the device's certificate (ListThingPrincipals and
    # DetachThingPrincipal ran in the function, so the IAM check sees them)
    arn = iot.describe_certificate(certificateId=event["certificateId"])["certificateDescription"][
        "certificateArn"
    ]
    assert iot.list_thing_principals(thingName="take-1")["principals"] == [arn]
    assert stack.certificate_status(event["certificateId"]) == "ACTIVE"


def test_the_admin_function_rotates_and_retires_signing_keys(
    stack: EmbeddedStack, handlers: dict[str, ModuleType]
) -> None:
    # Given the admin function
    admin = handlers["admin"]
    first = stack.signing_keys.keys()[0]

    # When an operator rotates the signing key
    status, rotated = admin_call(admin, "POST", "/v1/admin/signing-keys/rotate")

    # Then the new key is published beside the first, which is now retiring
    assert status == 201, rotated
    head, items = stack.store.signing_keys.get()
    assert [i["kid"] for i in items] == [first.kid, rotated["kid"]]

    # When the first key's tokens are all over (its retire_after moved to the past, as time
    # would) and the operator asks for the due retirements
    items[0]["retire_after"] = 1
    record = head.next_record(
        subject="stream:signing-keys",
        at="2026-01-01T00:00:00Z",
        action="test_clock",
        actor="test",
        details={},
    )
    stack.store.signing_keys.put(head, items, record)
    retire_status, retired = admin_call(admin, "POST", "/v1/admin/signing-keys/retire")

    # Then its KMS key's deletion is scheduled and only the new key stays published
    assert retire_status == 200 and retired == {"retired": [first.key_id]}
    state = stack.kms.describe_key(KeyId=first.key_id)["KeyMetadata"]["KeyState"]
    assert state == "PendingDeletion"


def test_a_challenge_based_token_consumes_its_nonce(
    stack: EmbeddedStack, handlers: dict[str, ModuleType]
) -> None:
    # Given an active device and a challenge from the token function
    key, event = registered_event(stack, "nonce-1")
    assert stack.register(event).accepted
    token = handlers["token"]
    challenge = token.handler(load_event("challenge-request"), LambdaContext())
    nonce = json.loads(challenge["body"])["nonce"]

    # When the device answers with the nonce
    form = token_request(
        client_assertion(key, event["certificateId"], "nonce-1", ISSUER, nonce=nonce)
    )
    request = json.loads(json.dumps(load_event("token-request")))
    request["body"] = urlencode(form)
    first = token.handler(request, LambdaContext())
    again = token.handler(request, LambdaContext())

    # Then it gets a token once (the transaction wrote JTI# and deleted NONCE#), never twice
    assert first["statusCode"] == 200, first["body"]
    assert again["statusCode"] == 400


def validations_call(
    validations: ModuleType, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    """The validations function behind its IAM routes, called by the relying party."""
    parameters = None
    resource = "/v1/validations"
    if path != resource:
        resource = "/v1/validations/{validation_id}"
        parameters = {"validation_id": path.rsplit("/", 1)[1]}
    event = proxy_event(
        method,
        path,
        body=json.dumps(body) if body is not None else None,
        headers={"content-type": "application/json"} if body is not None else None,
        caller_arn=RELYING_PARTY,
        resource=resource,
        path_parameters=parameters,
    )
    response = validations.handler(event, LambdaContext())
    return response["statusCode"], json.loads(response["body"])


def stored_validation(stack: EmbeddedStack, validation_id: str) -> dict[str, Any]:
    """The validation's record as stored (its nonce is the device's to know: it came with the
    command)."""
    key = {
        k: TypeSerializer().serialize(v) for k, v in schema.validation_key(validation_id).items()
    }
    item = stack.dynamodb.get_item(TableName=TABLE, Key=key, ConsistentRead=True)["Item"]
    return {k: TypeDeserializer().deserialize(v) for k, v in item.items()}


def test_a_validation_is_asked_answered_and_read_through_the_functions(
    stack: EmbeddedStack, handlers: dict[str, ModuleType]
) -> None:
    # Given an ACTIVE infusion pump (its profile attests firmware) running the released firmware
    key, event = registered_event_of(stack, "val-pump-1", "infusion-pump")
    assert stack.register(event).accepted
    profile, version, sha256 = DEMO_FIRMWARE
    audience = sorted(PROFILES[profile].token_rules.audiences)[0]

    # When a relying party asks for a validation (validations: the device read, the validation
    # put, the command published)
    status, created = validations_call(
        handlers["validations"],
        "POST",
        "/v1/validations",
        {"device_id": "val-pump-1", "purpose": "dose-change", "audience": audience},
    )
    assert status == 201, created
    validation_id = created["validation_id"]
    nonce = stored_validation(stack, validation_id)["nonce"]

    # and the pump answers at the token endpoint with the command's nonce and its measurement
    # (token: the validation decided in the jti's transaction, the release checked there too)
    assertion = client_assertion(
        key,
        event["certificateId"],
        "val-pump-1",
        ISSUER,
        nonce=nonce,
        firmware_version=version,
        firmware_sha256=sha256,
        extra_claims={"validation": {"id": validation_id, "purpose": "dose-change"}},
    )
    request = json.loads(json.dumps(load_event("token-request")))
    request["body"] = urlencode(token_request(assertion, audience=audience))
    answered = handlers["token"].handler(request, LambdaContext())
    assert answered["statusCode"] == 200, answered["body"]

    # Then the relying party reads the validation validated, with the device's token
    status, result = validations_call(
        handlers["validations"], "GET", f"/v1/validations/{validation_id}"
    )
    assert status == 200, result
    assert result["status"] == "validated"
    assert result["token"] == json.loads(answered["body"])["access_token"]


def test_a_validation_answered_without_attestation_is_refused_through_the_token_function(
    stack: EmbeddedStack, handlers: dict[str, ModuleType]
) -> None:
    # Given a validation that requires attestation, of an ACTIVE telemetry sensor
    key, event = registered_event_of(stack, "val-sensor-1", "telemetry-sensor")
    assert stack.register(event).accepted
    audience = sorted(PROFILES["telemetry-sensor"].token_rules.audiences)[0]
    status, created = validations_call(
        handlers["validations"],
        "POST",
        "/v1/validations",
        {
            "device_id": "val-sensor-1",
            "purpose": "reboot",
            "audience": audience,
            "require_attestation": True,
        },
    )
    assert status == 201, created
    validation_id = created["validation_id"]
    nonce = stored_validation(stack, validation_id)["nonce"]

    # When the device answers without a firmware measurement
    assertion = client_assertion(
        key,
        event["certificateId"],
        "val-sensor-1",
        ISSUER,
        nonce=nonce,
        extra_claims={"validation": {"id": validation_id, "purpose": "reboot"}},
    )
    request = json.loads(json.dumps(load_event("token-request")))
    request["body"] = urlencode(token_request(assertion, audience=audience))
    answered = handlers["token"].handler(request, LambdaContext())

    # Then no token, and the token function refused the validation (its own Update)
    assert answered["statusCode"] == 400, answered["body"]
    status, result = validations_call(
        handlers["validations"], "GET", f"/v1/validations/{validation_id}"
    )
    assert (status, result["status"], result["reason"]) == (200, "refused", "attestation_missing")
