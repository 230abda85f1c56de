"""The token, discovery and introspection functions as Lambda runs them, from the sample events."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from botocore.exceptions import ClientError

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import pem
from fleetkey_local.stack import TABLE
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

ISSUER = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"


@pytest.fixture
def functions(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_ISSUER", ISSUER)
    loaded = {name: load_handler(name) for name in ("token", "discovery", "introspect")}
    yield loaded
    loaded["token"].service.cache_clear()
    loaded["discovery"].context.cache_clear()
    loaded["introspect"].service.cache_clear()


@pytest.fixture
def device(stack):
    acme = cached_ca("acme")
    stack.register_ca(acme)
    stack.allowlist.add(
        AllowlistEntry(
            device_id="pump-0001",
            serial_number="SN-1",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    key, cert = acme.issue_device("pump-0001", serial_number="SN-1")
    event = stack.first_connect(pem(cert), acme.pem)
    assert stack.register(event).accepted
    return key, event["certificateId"]


def headers_of(response: dict) -> dict:
    """API Gateway REST answers carry headers or multiValueHeaders; Powertools uses the latter."""
    merged = dict(response.get("headers") or {})
    merged.update({k: v[-1] for k, v in (response.get("multiValueHeaders") or {}).items()})
    return merged


def call(function, event):
    response = function.handler(event, LambdaContext())
    return response["statusCode"], json.loads(response["body"]), headers_of(response)


def with_body(
    event: dict, body: str, content_type: str = "application/x-www-form-urlencoded"
) -> dict:
    event = json.loads(json.dumps(event))
    event["body"] = body
    event["headers"]["content-type"] = content_type
    event["multiValueHeaders"]["content-type"] = [content_type]
    return event


def test_sample_token_request_with_a_forged_assertion_is_invalid_client(functions):
    # Given the sample request (its assertion's signature is a placeholder)
    status, body, headers = call(functions["token"], load_event("token-request"))
    # Then: 401 invalid_client, not cacheable
    assert (status, body["error"]) == (401, "invalid_client")
    assert headers["Cache-Control"] == "no-store"


def test_token_request_issues_a_token_and_introspection_sees_it(functions, device):
    key, certificate_id = device
    form = token_request(client_assertion(key, certificate_id, "pump-0001", ISSUER))
    # When the device asks for a token
    status, body, _ = call(
        functions["token"], with_body(load_event("token-request"), urlencode(form))
    )
    # Then it gets one, which introspection reports active
    assert status == 200 and body["token_type"] == "Bearer"
    introspection = with_body(
        load_event("introspection-request"), urlencode({"token": body["access_token"]})
    )
    status, answer, _ = call(functions["introspect"], introspection)
    assert status == 200 and answer["active"] is True and answer["sub"] == "pump-0001"


@pytest.mark.parametrize(
    "body,content_type,error",
    [
        ("grant_type=client_credentials", "application/json", "invalid_request"),
        ("grant_type=client_credentials&grant_type=client_credentials", None, "invalid_request"),
        ("grant_type=password&username=a&password=b", None, "unsupported_grant_type"),
        ("client_assertion=x", None, "invalid_request"),
        ("%%%", None, "invalid_request"),
        (
            "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion="
            + "a" * 9000,
            None,
            "invalid_request",
        ),
    ],
    ids=[
        "not-a-form",
        "repeated-parameter",
        "other-grant",
        "no-grant",
        "malformed-form",
        "oversized-assertion",
    ],
)
def test_malformed_token_requests_are_400(functions, body, content_type, error):
    event = with_body(
        load_event("token-request"), body, content_type or "application/x-www-form-urlencoded"
    )
    status, answer, _ = call(functions["token"], event)
    assert (status, answer["error"]) == (400, error)


def test_kms_outage_is_503_temporarily_unavailable(functions, device, monkeypatch):
    key, certificate_id = device
    service = functions["token"].service()
    _, signer = service._keys.current()

    def throttled(**_):
        raise ClientError(
            {"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "Sign"
        )

    monkeypatch.setattr(signer._client, "sign", throttled)
    form = token_request(client_assertion(key, certificate_id, "pump-0001", ISSUER))
    status, body, _ = call(
        functions["token"], with_body(load_event("token-request"), urlencode(form))
    )
    assert (status, body["error"]) == (503, "temporarily_unavailable")


def test_challenge_jwks_and_metadata_samples(functions, device):
    status, body, _ = call(functions["token"], load_event("challenge-request"))
    assert status == 200 and body["expires_in"] == 120 and len(body["nonce"]) >= 32
    response = functions["discovery"].handler(load_event("jwks-request"), LambdaContext())
    assert response["statusCode"] == 200
    assert headers_of(response)["Content-Type"] == "application/jwk-set+json"
    assert "max-age" in headers_of(response)["Cache-Control"]
    assert json.loads(response["body"])["keys"][0]["alg"] == "ES256"
    status, metadata, _ = call(
        functions["discovery"], load_event("authorization-server-metadata-request")
    )
    assert metadata["issuer"] == ISSUER and metadata["token_endpoint"] == f"{ISSUER}/v1/token"
    assert metadata["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]


def test_introspection_sample_and_missing_token(functions):
    status, body, _ = call(functions["introspect"], load_event("introspection-request"))
    assert (status, body) == (200, {"active": False})
    status, body, _ = call(
        functions["introspect"], with_body(load_event("introspection-request"), "nothing=here")
    )
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    "body,base64_flag,status,error",
    [
        ("!!!not-base64", True, 400, "invalid_request"),
        ("/w==", True, 400, "invalid_request"),  # base64 of a byte that is not UTF-8
        (
            "grant_type=client_credentials&client_assertion_type="
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
            "&client_assertion=%FF%FE.%00.%00",
            False,
            401,
            "invalid_client",
        ),
        (
            "grant_type=client_credentials&client_assertion_type="
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
            "&client_assertion=WyJhIl0.e30.AA",
            False,
            401,
            "invalid_client",
        ),  # header ["a"]
        (
            "grant_type=client_credentials&client_assertion_type="
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
            "&client_assertion=eyJhbGciOlsiRVMyNTYiXX0.e30.AA",
            False,
            401,
            "invalid_client",
        ),
    ],
    ids=[
        "bad-base64-body",
        "non-utf8-base64-body",
        "non-utf8-assertion",
        "header-array",
        "alg-array",
    ],
)
def test_hostile_bodies_get_their_oauth_error_never_a_5xx(
    functions, body, base64_flag, status, error
):
    # Given a token request whose body or assertion is hostile in its encoding
    event = with_body(load_event("token-request"), body)
    event["isBase64Encoded"] = base64_flag
    # When the function answers, Then with the path's OAuth error, not a crash or a 5xx
    answered, answer, _ = call(functions["token"], event)
    assert (answered, answer["error"]) == (status, error)


def test_a_client_id_naming_another_device_is_invalid_client_at_the_function(functions, device):
    # Given a device's valid assertion sent with a client_id that names another client
    key, certificate_id = device
    assertion = client_assertion(key, certificate_id, "pump-0001", ISSUER)
    form = token_request(assertion, client_id="pump-0002")
    # When the function answers, Then 401 invalid_client (RFC 7521 §4.2.1)
    status, body, _ = call(
        functions["token"], with_body(load_event("token-request"), urlencode(form))
    )
    assert (status, body["error"]) == (401, "invalid_client")
    # and with its own client_id, a token
    form = token_request(
        client_assertion(key, certificate_id, "pump-0001", ISSUER), client_id="pump-0001"
    )
    status, body, _ = call(
        functions["token"], with_body(load_event("token-request"), urlencode(form))
    )
    assert status == 200 and body["token_type"] == "Bearer"


def token_event(device, content_type="application/x-www-form-urlencoded", suffix="", **headers):
    """A sample token request event carrying a fresh, valid assertion of `device`."""
    key, certificate_id = device
    form = token_request(client_assertion(key, certificate_id, "pump-0001", ISSUER))
    event = with_body(load_event("token-request"), urlencode(form) + suffix, content_type)
    for name, value in headers.items():
        event["headers"][name] = value
        event["multiValueHeaders"][name] = [value]
    return event


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencodedXYZ",
        "application/x-www-form-urlencoded-json",
        "application/x-www-form-urlencoded; charset=iso-8859-1",
        'application/x-www-form-urlencoded; charset="utf-16"',
        "application/x-www-form-urlencoded; charset",
        "application/x-www-form-urlencoded, application/json",
        "text/plain; x=application/x-www-form-urlencoded",
    ],
    ids=["suffix", "other-subtype", "latin-1", "utf-16", "bare-parameter", "list", "text"],
)
def test_a_token_request_that_is_not_exactly_a_utf8_form_is_400(functions, device, content_type):
    # Given a valid token request whose content type is not application/x-www-form-urlencoded,
    # or names a charset other than UTF-8
    event = token_event(device, content_type)
    # When the function answers, Then 400 invalid_request (no assertion is read)
    status, body, _ = call(functions["token"], event)
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    "content_type,suffix",
    [
        ("application/x-www-form-urlencoded; charset=utf-8", ""),
        ('Application/X-WWW-Form-URLEncoded;charset="UTF-8"', ""),
        ("application/x-www-form-urlencoded", "&"),
    ],
    ids=["charset", "any-case-quoted", "trailing-ampersand"],
)
def test_a_utf8_form_with_parameters_or_a_trailing_ampersand_gets_a_token(
    functions, device, content_type, suffix
):
    # Given a valid token request with a charset parameter, or a trailing '&' (RFC 6749 clients
    # that append "name=value&" send one)
    event = token_event(device, content_type, suffix)
    # When the function answers, Then a token
    status, body, _ = call(functions["token"], event)
    assert status == 200 and body["token_type"] == "Bearer", body


@pytest.mark.parametrize(
    "suffix,headers",
    [
        ("", {"authorization": "Basic cHVtcC0wMDAxOnNlY3JldA=="}),
        ("", {"Authorization": "Bearer x"}),
        ("&client_secret=secret", {}),
    ],
    ids=["basic", "bearer", "client-secret"],
)
def test_a_second_client_authentication_method_is_invalid_request(
    functions, device, suffix, headers
):
    # Given a valid token request that also authenticates the client another way (RFC 6749 §2.3)
    event = token_event(device, suffix=suffix, **headers)
    # When the function answers, Then 400 invalid_request
    status, body, _ = call(functions["token"], event)
    assert (status, body["error"]) == (400, "invalid_request")


def test_a_zip_header_on_the_assertion_is_invalid_client(functions, device):
    # Given a device's assertion whose header asks for compression (a JWE parameter, RFC 7516)
    key, certificate_id = device
    assertion = client_assertion(
        key, certificate_id, "pump-0001", ISSUER, extra_headers={"zip": "DEF"}
    )
    event = with_body(load_event("token-request"), urlencode(token_request(assertion)))
    # When the function answers, Then 401 invalid_client
    status, body, _ = call(functions["token"], event)
    assert (status, body["error"]) == (401, "invalid_client")


def issued_token(functions, device) -> str:
    status, body, _ = call(functions["token"], token_event(device))
    assert status == 200
    return body["access_token"]


@pytest.mark.parametrize(
    "body_of,content_type",
    [
        (lambda t: urlencode([("token", t), ("token", "x")]), None),
        (lambda t: urlencode([("token", "x"), ("token", t)]), None),
        (lambda t: urlencode({"token": t}), "application/x-www-form-urlencodedXYZ"),
        (lambda t: urlencode({"token": t}), "application/x-www-form-urlencoded; charset=latin1"),
        (lambda t: urlencode({"token": t}), "application/json"),
    ],
    ids=["duplicate-token", "duplicate-token-last-genuine", "suffix", "latin-1", "json"],
)
def test_an_ambiguous_introspection_request_is_400(functions, device, body_of, content_type):
    # Given an introspection request for a genuine token that names two tokens, or is not
    # exactly a UTF-8 form
    token = issued_token(functions, device)
    event = with_body(
        load_event("introspection-request"),
        body_of(token),
        content_type or "application/x-www-form-urlencoded",
    )
    # When the function answers, Then 400 invalid_request (not "the last one wins")
    status, body, _ = call(functions["introspect"], event)
    assert (status, body["error"]) == (400, "invalid_request")


def test_introspection_accepts_a_charset_and_a_trailing_ampersand(functions, device):
    # Given an introspection request with a UTF-8 charset parameter and a trailing '&'
    token = issued_token(functions, device)
    event = with_body(
        load_event("introspection-request"),
        urlencode({"token": token, "token_type_hint": "access_token"}) + "&",
        "application/x-www-form-urlencoded; charset=UTF-8",
    )
    # When the function answers, Then the token is active
    status, body, _ = call(functions["introspect"], event)
    assert status == 200 and body["active"] is True
