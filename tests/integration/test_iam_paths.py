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

from fleetkey.domain.profiles import PROFILES
from fleetkey_local.apigw import proxy_event
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.stack import TABLE, EmbeddedStack
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"
ISSUER = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"


@pytest.fixture
def handlers(
    stack: EmbeddedStack, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, ModuleType]]:
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_ISSUER", ISSUER)
    loaded = {name: load_handler(name) for name in ("registration", "admin", "token")}
    yield loaded
    loaded["registration"].service.cache_clear()
    loaded["admin"].services.cache_clear()
    loaded["token"].service.cache_clear()


def admin_call(admin: ModuleType, method: str, path: str) -> tuple[int, Any]:
    response = admin.handler(proxy_event(method, path, caller_arn=OPERATOR), LambdaContext())
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def registered_event(stack: EmbeddedStack, device_id: str) -> tuple[Any, dict[str, Any]]:
    acme = cached_ca("acme")
    stack.register_ca(acme)
    key, _, event = stack.manufacture(acme, device_id, actor="op")
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
