"""Token vending against moto: issued access tokens verified by pyjwt and by an independent JOSE
library (jwcrypto); client-assertion attacks refused with nothing written; scopes, audiences,
firmware attestation, challenges, introspection, and a fault at every AWS call."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from fleetkey.adapters.kms import KmsKeys
from fleetkey.clock import timestamp, utc_now
from fleetkey.crypto.jose import b64url, jwk_thumbprint, public_jwk
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.lifecycle import DeviceState, Transition
from fleetkey.domain.oauth import (
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    OAuthError,
    OAuthInvalidRequest,
    UnsupportedGrantType,
)
from fleetkey.domain.profiles import get_profile
from fleetkey.ports import DeviceChange
from fleetkey.services.signing_keys import SigningKeys
from fleetkey.services.tokens import TokenService
from fleetkey.settings import Settings
from fleetkey.store import schema
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.pki import PrivateKey, generate_key
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca as cached_ca

PUMP_FIRMWARE = hashlib.sha256(b"fleetkey-demo-pump-firmware-2.4.1").hexdigest()
TELEMETRY = "urn:fleetkey:telemetry"


# ---- helpers ------------------------------------------------------------------------------------


@cache
def device_key(kind: str, name: str) -> PrivateKey:
    """Key generation (RSA above all) dominates; each named device keeps its key across tests."""
    return generate_key(kind)


@dataclass
class Enrolled:
    device_id: str
    key: PrivateKey
    certificate_der: bytes
    certificate_id: str
    profile: str

    def assertion(self, stack, **kw) -> str:
        return client_assertion(
            self.key, self.certificate_id, self.device_id, stack.settings.issuer, **kw
        )


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


def enroll(
    stack, authority, device_id, *, profile="telemetry-sensor", key_kind="ec:secp256r1"
) -> Enrolled:
    """Allow-list a device, connect it for the first time and register it: it is ACTIVE."""
    key, cert, event = stack.manufacture(
        authority, device_id, profile=profile, actor="op", key=device_key(key_kind, device_id)
    )
    assert stack.register(event).accepted
    return Enrolled(
        device_id,
        key,
        cert.public_bytes(serialization.Encoding.DER),
        event["certificateId"],
        profile,
    )


def issue(stack, assertion, service=None, **kw) -> dict:
    return (service or stack.tokens).issue(token_request(assertion, **kw))


def verify_pyjwt(stack, token: str, audience=TELEMETRY) -> dict:
    jwks = jwt.PyJWKSet.from_dict(stack.signing_keys.jwks())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    return jwt.decode(
        token, key, algorithms=["ES256"], audience=audience, issuer=stack.settings.issuer
    )


def verify_jwcrypto(stack, token: str) -> tuple[dict, dict]:
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(stack.signing_keys.jwks()))
    verified = jwcrypto_jwt.JWT(jwt=token, key=keyset, algs=["ES256"], expected_type="JWS")
    return json.loads(verified.claims), verified.token.jose_header


def stored_keys(stack) -> set[tuple[str, str]]:
    """Every (pk, sk) in the table, read with a harness client (not counted, never faulted)."""
    client = getattr(stack, "_test_scan_client", None) or stack.make_client("dynamodb")
    stack._test_scan_client = client
    items = client.scan(TableName=stack.settings.table_name)["Items"]
    return {(i["pk"]["S"], i["sk"]["S"]) for i in items}


def jti_recorded(stack, device_id: str, jti: str) -> bool:
    key = schema.assertion_key(device_id, jti)
    return (key["pk"], key["sk"]) in stored_keys(stack)


def claims_of(assertion: str) -> dict:
    return jwt.decode(assertion, options={"verify_signature": False})


def change_device(stack, device_id: str, action: str, **changes):
    """Apply a change through the device repository, as the services do: conditional, with its
    audit record."""
    device = stack.store.devices.get(device_id)
    change = DeviceChange(action=action, actor="test", at=timestamp(utc_now()), **changes)
    return stack.store.devices.apply(device, change)


def suspend(stack, device_id: str):
    return change_device(stack, device_id, "suspended", transition=Transition.SUSPEND)


def replace_certificate(stack, device_id: str, new_id: str = "c" * 64):
    current = stack.store.devices.get(device_id).current_certificate
    return change_device(
        stack,
        device_id,
        "certificate_rotated",
        certificates=(dataclasses.replace(current, certificate_id=new_id),),
    )


class MovableClock:
    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _b64json(value: dict) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


# ---- issuing ------------------------------------------------------------------------------------

DEVICES = [
    # (id, profile, key kind, assertion algorithm or None for the key's default)
    ("sensor-p256", "telemetry-sensor", "ec:secp256r1", None),
    ("sensor-p384", "telemetry-sensor", "ec:secp384r1", None),
    ("sensor-rsa", "telemetry-sensor", "rsa:2048", "PS256"),
    ("sensor-rsa", "telemetry-sensor", "rsa:2048", "RS256"),
    ("pump-1", "infusion-pump", "ec:secp256r1", None),
]


@pytest.mark.parametrize(
    "device_id,profile,key_kind,algorithm",
    DEVICES,
    ids=[f"{d[0]}-{d[3] or 'default'}" for d in DEVICES],
)
def test_a_registered_device_gets_a_verifiable_access_token(
    stack, acme, device_id, profile, key_kind, algorithm
):
    # Given an ACTIVE device of the profile, with its key of the kind
    dev = enroll(stack, acme, device_id, profile=profile, key_kind=key_kind)
    rules = get_profile(profile).token_rules
    firmware = (
        {"firmware_version": "2.4.1", "firmware_sha256": PUMP_FIRMWARE}
        if rules.require_attestation
        else {}
    )

    # When it asks for a token with a client assertion signed by its own key
    before = int(time.time())
    response = issue(stack, dev.assertion(stack, algorithm=algorithm, **firmware))

    # Then the response is RFC 6749 §5.1 with the profile's lifetime and every scope of the profile
    assert set(response) == {"access_token", "token_type", "expires_in", "scope"}
    assert response["token_type"] == "Bearer"
    assert response["expires_in"] == rules.lifetime_seconds
    assert response["scope"] == " ".join(sorted(rules.scopes))
    token = response["access_token"]

    # and the header is RFC 9068's, kid the RFC 7638 thumbprint of the KMS key's public half
    kms_public = serialization.load_der_public_key(
        stack.kms.get_public_key(KeyId=stack.token_key_id)["PublicKey"]
    )
    header = jwt.get_unverified_header(token)
    assert header == {
        "typ": "at+jwt",
        "alg": "ES256",
        "kid": jwk_thumbprint(public_jwk(kms_public)),
    }
    assert header["kid"] == jwcrypto_jwk.JWK.from_pyca(kms_public).thumbprint()

    # and pyjwt and jwcrypto both verify it against the published JWKS
    audiences = sorted(rules.audiences)
    claims = verify_pyjwt(stack, token, audience=audiences[0])
    independent, jose_header = verify_jwcrypto(stack, token)
    assert independent == claims
    assert jose_header["typ"] == "at+jwt"

    # and the claims are RFC 9068's, bound to the certificate (RFC 8705)
    expected_aud = audiences[0] if len(audiences) == 1 else audiences
    assert claims["iss"] == stack.settings.issuer
    assert claims["sub"] == claims["client_id"] == device_id
    assert claims["aud"] == expected_aud
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == rules.lifetime_seconds
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["scope"] == response["scope"]
    assert claims["cnf"] == {"x5t#S256": b64url(hashlib.sha256(dev.certificate_der).digest())}
    assert dev.certificate_id == hashlib.sha256(dev.certificate_der).hexdigest()
    assert claims["device_profile"] == profile
    if rules.require_attestation:  # the released firmware's measurement, attested
        assert claims["firmware_sha256"] == PUMP_FIRMWARE and claims["firmware_version"] == "2.4.1"
    else:
        assert "firmware_sha256" not in claims

    # and a second token has a jti of its own
    again = verify_pyjwt(
        stack,
        issue(stack, dev.assertion(stack, algorithm=algorithm, **firmware))["access_token"],
        audience=audiences[0],
    )
    assert again["jti"] != claims["jti"]


def test_a_warm_token_costs_two_aws_calls_and_no_public_key_reads(stack, acme):
    # Given an ACTIVE device and a token function that served it a token already
    dev = enroll(stack, acme, "sensor-budget")
    issue(stack, dev.assertion(stack))
    counter = AwsCallCounter().watch(*stack.service_clients())

    # When the device asks for two more tokens
    per_request = []
    for _ in range(2):
        counter.reset()
        issue(stack, dev.assertion(stack))
        per_request.append(counter.reset())

    # Then each is one KMS signature and one conditional write (the device is cached by its
    # certificate and checked in the write)
    for calls in per_request:
        assert calls == ["kms.Sign", "dynamodb.TransactWriteItems"], calls

    # and another device's first token on this function reads that device once
    other = enroll(stack, acme, "sensor-budget-2")
    counter.reset()
    issue(stack, other.assertion(stack))
    assert counter.reset() == ["dynamodb.GetItem", "kms.Sign", "dynamodb.TransactWriteItems"]


def test_the_first_token_of_a_cold_function_reads_and_confirms_the_registry_once(stack, acme):
    # Given a token function that just started (no cached registry)
    dev = enroll(stack, acme, "sensor-cold")
    service = fresh_token_service(stack)
    counter = AwsCallCounter().watch(*stack.service_clients())
    # When it issues its first token
    issue(stack, dev.assertion(stack), service=service)
    # Then the extra calls are the registry read and KMS confirming the key (public key and tag)
    assert counter.calls == COLD_CALLS
    # And the second token has none of them, nor the device read
    counter.reset()
    issue(stack, dev.assertion(stack), service=service)
    assert counter.calls == ["kms.Sign", "dynamodb.TransactWriteItems"]


# ---- attacks ------------------------------------------------------------------------------------


def _alg_none(stack, me, other):
    claims = claims_of(me.assertion(stack))
    return (
        _b64json({"alg": "none", "typ": "JWT", "kid": me.certificate_id})
        + "."
        + _b64json(claims)
        + "."
    )


def _hs256_with_public_key(stack, me, other):
    """The RS/ES -> HS confusion: an HMAC keyed with the public key the server holds."""
    claims = claims_of(me.assertion(stack))
    public_pem = stack.store.devices.get(me.device_id).certificate_public_key.encode()
    signing_input = (
        _b64json({"alg": "HS256", "typ": "JWT", "kid": me.certificate_id}) + "." + _b64json(claims)
    )
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def _es384_with_a_p256_key(stack, me, other):
    return me.assertion(stack, algorithm="ES384")


def _kid_of_another_device(stack, me, other):
    return client_assertion(me.key, other().certificate_id, me.device_id, stack.settings.issuer)


def _another_devices_kid_and_sub(stack, me, other):
    them = other()
    return client_assertion(me.key, them.certificate_id, them.device_id, stack.settings.issuer)


def _sub_of_another_device(stack, me, other):
    return client_assertion(me.key, me.certificate_id, other().device_id, stack.settings.issuer)


def _signed_by_another_key(stack, me, other):
    return client_assertion(
        device_key("ec:secp256r1", "impostor"),
        me.certificate_id,
        me.device_id,
        stack.settings.issuer,
    )


def _unknown_device(stack, me, other):
    return client_assertion(me.key, me.certificate_id, "ghost-1", stack.settings.issuer)


def _expired(stack, me, other):
    return me.assertion(stack, now=time.time() - 1000)


def _issued_in_the_future(stack, me, other):
    return me.assertion(stack, now=time.time() + 3600)


def _not_before_in_the_future(stack, me, other):
    return me.assertion(stack, extra_claims={"nbf": int(time.time()) + 3600})


def _lifetime_over_five_minutes(stack, me, other):
    return me.assertion(stack, lifetime=301)


def _zero_lifetime(stack, me, other):
    return me.assertion(stack, lifetime=0)


def _wrong_audience(stack, me, other):
    return client_assertion(me.key, me.certificate_id, me.device_id, "https://elsewhere.example")


def _issuer_differs_from_subject(stack, me, other):
    return me.assertion(stack, extra_claims={"iss": "someone-else"})


def _no_jti(stack, me, other):
    return me.assertion(stack, extra_claims={"jti": None})


def _long_jti(stack, me, other):
    return me.assertion(stack, extra_claims={"jti": "j" * 129})


def _kid_not_a_certificate_id(stack, me, other):
    return client_assertion(me.key, "../" + me.certificate_id, me.device_id, stack.settings.issuer)


def _not_a_jwt(stack, me, other):
    return "not.a-jwt.at-all"


ATTACKS = [
    (_alg_none, InvalidClient),
    (_hs256_with_public_key, InvalidClient),
    (_es384_with_a_p256_key, InvalidClient),
    (_kid_of_another_device, InvalidClient),
    (_another_devices_kid_and_sub, InvalidClient),
    (_sub_of_another_device, InvalidClient),
    (_signed_by_another_key, InvalidClient),
    (_unknown_device, InvalidClient),
    (_expired, InvalidClient),
    (_issued_in_the_future, InvalidClient),
    (_not_before_in_the_future, InvalidClient),
    (_lifetime_over_five_minutes, InvalidClient),
    (_zero_lifetime, InvalidClient),
    (_wrong_audience, InvalidClient),
    (_issuer_differs_from_subject, InvalidClient),
    (_no_jti, InvalidClient),
    (_long_jti, InvalidClient),
    (_kid_not_a_certificate_id, InvalidClient),
    (_not_a_jwt, InvalidClient),
]


def test_attacks_are_refused_and_nothing_is_written(stack, acme):
    # Given an ACTIVE device (and, when an attack needs one, another)
    me = enroll(stack, acme, "sensor-me")
    others = []

    def other():
        if not others:
            others.append(enroll(stack, acme, "sensor-other"))
        return others[0]

    failures = []
    for attack, error in ATTACKS:
        name = attack.__name__.strip("_")
        assertion = attack(stack, me, other)
        before = stored_keys(stack)

        # When each crafted assertion is presented
        try:
            issue(stack, assertion)
        except error as refused:
            # Then it is refused with its OAuth error
            if refused.to_body()["error"] != error.code:
                failures.append(f"{name}: body {refused.to_body()}")
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{name}: a token was issued")
        # and nothing was written (no jti, no token)
        written = stored_keys(stack) - before
        if written:
            failures.append(f"{name}: wrote {sorted(written)}")
    assert not failures, failures

    # and the device itself is not locked out
    verify_pyjwt(stack, issue(stack, me.assertion(stack))["access_token"])


def test_an_rsa_device_may_use_only_ps256_and_rs256(stack, acme):
    # Given an RSA device
    dev = enroll(stack, acme, "sensor-rsa", key_kind="rsa:2048")
    # When it signs with another RSA algorithm, or HMACs with its public key
    # Then invalid_client
    for algorithm in ("RS384", "RS512", "PS384", "PS512"):
        with pytest.raises(InvalidClient):
            issue(stack, dev.assertion(stack, algorithm=algorithm))
    with pytest.raises(InvalidClient):
        issue(stack, _hs256_with_public_key(stack, dev, None))
    # while PS256 and RS256 both work
    for algorithm in ("PS256", "RS256"):
        issue(stack, dev.assertion(stack, algorithm=algorithm))


def test_a_replayed_assertion_is_refused_once_used(stack, acme):
    # Given an assertion that got a token
    dev = enroll(stack, acme, "sensor-replay")
    assertion = dev.assertion(stack)
    issue(stack, assertion)
    assert jti_recorded(stack, dev.device_id, claims_of(assertion)["jti"])
    before = stored_keys(stack)

    # When it is presented again
    with pytest.raises(InvalidGrant):
        issue(stack, assertion)

    # Then it is refused as invalid_grant and nothing more is written
    assert stored_keys(stack) == before
    # while the same jti from another device is that device's own
    other = enroll(stack, acme, "sensor-replay-2")
    issue(stack, other.assertion(stack, extra_claims={"jti": claims_of(assertion)["jti"]}))


def test_a_certificate_that_is_no_longer_current_is_refused(stack, acme):
    # Given a device whose current certificate changed (e.g. rotated)
    dev = enroll(stack, acme, "sensor-rotated")
    replace_certificate(stack, dev.device_id)
    assertion = dev.assertion(stack)
    before = stored_keys(stack)
    # When it signs with the key of its former certificate and names it
    with pytest.raises(InvalidClient):
        issue(stack, assertion)
    # Then it is refused and nothing is written
    assert stored_keys(stack) == before


def test_a_device_that_is_not_active_gets_no_token(stack, acme):
    # Given a SUSPENDED device, and one only allow-listed (never registered)
    dev = enroll(stack, acme, "sensor-suspended")
    suspend(stack, dev.device_id)
    assert stack.store.devices.get(dev.device_id).state is DeviceState.SUSPENDED
    stack.allowlist.add(
        AllowlistEntry(
            device_id="sensor-listed",
            serial_number="SN-L",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    listed = client_assertion(dev.key, dev.certificate_id, "sensor-listed", stack.settings.issuer)
    before = stored_keys(stack)

    # When either asks for a token
    # Then both are refused as invalid_client, nothing written
    with pytest.raises(InvalidClient) as suspended:
        issue(stack, dev.assertion(stack))
    with pytest.raises(InvalidClient):
        issue(stack, listed)
    assert stored_keys(stack) == before
    assert suspended.value.reason == "device not active"

    # and once resumed, the device gets tokens again
    change_device(stack, dev.device_id, "resumed", transition=Transition.RESUME)
    issue(stack, dev.assertion(stack))


def test_refusals_do_not_tell_which_check_failed(stack, acme):
    # Given an ACTIVE device and a SUSPENDED one
    dev = enroll(stack, acme, "sensor-same")
    gone = enroll(stack, acme, "sensor-gone")
    suspend(stack, gone.device_id)
    cases = {
        "unknown device": _unknown_device(stack, dev, None),
        "bad signature": _signed_by_another_key(stack, dev, None),
        "suspended": gone.assertion(stack),
        "wrong kid": client_assertion(
            dev.key, gone.certificate_id, dev.device_id, stack.settings.issuer
        ),
        "expired": _expired(stack, dev, None),
    }
    # When each is presented
    bodies = {}
    for name, assertion in cases.items():
        with pytest.raises(InvalidClient) as refused:
            issue(stack, assertion)
        bodies[name] = refused.value.to_body()
    # Then every caller reads the same body
    assert all(body == bodies["unknown device"] for body in bodies.values()), bodies
    assert bodies["unknown device"] == {
        "error": "invalid_client",
        "error_description": "client authentication failed",
    }
    assert InvalidClient("x").status == 401


@pytest.mark.parametrize(
    "form,error",
    [
        ({}, OAuthInvalidRequest),
        ({"grant_type": "password"}, UnsupportedGrantType),
        ({"grant_type": "client_credentials"}, OAuthInvalidRequest),
        (
            {"grant_type": "client_credentials", "client_assertion_type": "urn:other"},
            OAuthInvalidRequest,
        ),
        (token_request(""), OAuthInvalidRequest),
        (token_request("a" * (8 * 1024 + 1)), OAuthInvalidRequest),
    ],
    ids=[
        "empty",
        "password-grant",
        "no-assertion-type",
        "wrong-assertion-type",
        "no-assertion",
        "too-large",
    ],
)
def test_malformed_requests_are_refused_before_any_aws_call(form, error):
    # Given a token service whose store and keys must not be touched
    service = TokenService(
        Settings(table_name="t", region="eu-west-1"),
        devices=None,
        records=None,
        signing_keys=None,
        clock=MovableClock(),
    )
    # When a malformed request arrives, Then it is refused with the right error
    with pytest.raises(error):
        service.issue(form)


MALFORMED_TIMES = {
    "string-times": (lambda now: {"iat": str(now), "exp": str(now + 300)}, False),
    "list-exp": (lambda now: {"exp": [now + 300]}, False),
    "infinite-exp": (lambda now: {"exp": float("inf")}, False),
    "null-exp-with-nonce": (lambda now: {"exp": None}, True),
}


def test_signed_assertions_with_malformed_times_are_invalid_client(stack, acme):
    # Given an ACTIVE device that signs assertions whose time claims are not integers
    dev = enroll(stack, acme, "sensor-times")
    for _name, (claims, nonce) in MALFORMED_TIMES.items():
        extra = {"nonce": stack.tokens.challenge()["nonce"]} if nonce else {}
        assertion = dev.assertion(stack, extra_claims={**claims(int(time.time())), **extra})
        # When each is presented, Then it is refused as invalid_client (not a server error)
        with pytest.raises(InvalidClient):
            issue(stack, assertion)


# ---- scopes, audiences, attestation -------------------------------------------------------------


def test_scopes_and_audiences_are_the_profiles(stack, acme):
    # Given an infusion pump (two scopes, two audiences) with attested firmware
    dev = enroll(stack, acme, "pump-scopes", profile="infusion-pump")
    firmware = {"firmware_version": "2.4.1", "firmware_sha256": PUMP_FIRMWARE}

    # When it asks for a scope outside its profile, Then invalid_scope, the assertion left unused
    assertion = dev.assertion(stack, **firmware)
    with pytest.raises(InvalidScope):
        issue(stack, assertion, scope="telemetry:write admin:all")
    with pytest.raises(InvalidScope):
        issue(stack, assertion, audience="urn:fleetkey:billing")
    assert not jti_recorded(stack, dev.device_id, claims_of(assertion)["jti"])

    # When it asks for a subset, Then it gets exactly that subset
    response = issue(stack, assertion, scope="therapy:report", audience="urn:fleetkey:therapy")
    assert response["scope"] == "therapy:report"
    claims = verify_pyjwt(stack, response["access_token"], audience="urn:fleetkey:therapy")
    assert claims["scope"] == "therapy:report" and claims["aud"] == "urn:fleetkey:therapy"

    # and with no scope or audience asked, every one of the profile's
    claims = verify_pyjwt(
        stack,
        issue(stack, dev.assertion(stack, **firmware))["access_token"],
        audience="urn:fleetkey:therapy",
    )
    assert claims["scope"] == "fleetkey:data-key telemetry:write therapy:report"
    assert claims["aud"] == ["urn:fleetkey:telemetry", "urn:fleetkey:therapy"]

    # and a telemetry sensor may not ask for the pump's scope or audience
    sensor = enroll(stack, acme, "sensor-scope")
    with pytest.raises(InvalidScope):
        issue(stack, sensor.assertion(stack), scope="therapy:report")
    with pytest.raises(InvalidScope):
        issue(stack, sensor.assertion(stack), audience="urn:fleetkey:therapy")


def test_a_pump_without_an_allowed_firmware_measurement_gets_no_token(stack, acme):
    # Given an infusion pump (attestation required)
    dev = enroll(stack, acme, "pump-attest", profile="infusion-pump")
    refusals = {
        "no claims": {},
        "version only": {"firmware_version": "2.4.1"},
        "unknown measurement": {
            "firmware_sha256": hashlib.sha256(b"tampered firmware").hexdigest()
        },
        "not canonical hex": {"firmware_sha256": PUMP_FIRMWARE.upper()},
        "not a string": {
            "firmware_sha256": None,
            "extra_claims": {"firmware_sha256": [PUMP_FIRMWARE]},
        },
    }
    for name, firmware in refusals.items():
        assertion = dev.assertion(stack, **firmware)
        before = stored_keys(stack)
        # When its assertion carries no allowed measurement
        with pytest.raises(InvalidGrant):
            issue(stack, assertion)
        # Then invalid_grant, nothing written
        assert stored_keys(stack) == before, name


# ---- challenges ---------------------------------------------------------------------------------


def test_a_challenge_nonce_replaces_the_clock_once(stack, acme):
    # Given a device without a trusted clock and a fresh challenge
    dev = enroll(stack, acme, "sensor-noclock")
    challenge = stack.tokens.challenge()
    assert challenge["expires_in"] == 120 and len(challenge["nonce"]) >= 32

    # When it signs an assertion with the nonce and no iat/exp
    assertion = dev.assertion(stack, nonce=challenge["nonce"])
    assert "iat" not in claims_of(assertion) and "exp" not in claims_of(assertion)
    claims = verify_pyjwt(stack, issue(stack, assertion)["access_token"])

    # Then it gets a token, and the nonce is consumed
    assert claims["sub"] == dev.device_id
    nonce_key = schema.nonce_key(challenge["nonce"])
    assert (nonce_key["pk"], nonce_key["sk"]) not in stored_keys(stack)

    # and the nonce cannot be used again, even with a new jti (which is then not recorded)
    again = dev.assertion(stack, nonce=challenge["nonce"])
    with pytest.raises(InvalidGrant):
        issue(stack, again)
    assert not jti_recorded(stack, dev.device_id, claims_of(again)["jti"])
    # nor the same assertion
    with pytest.raises(InvalidGrant):
        issue(stack, assertion)

    # and a nonce the service never gave is refused, with nothing written
    made_up = dev.assertion(stack, nonce="made-up-nonce")
    before = stored_keys(stack)
    with pytest.raises(InvalidGrant):
        issue(stack, made_up)
    assert stored_keys(stack) == before


def test_an_expired_nonce_is_refused(stack, acme):
    # Given a token service on a clock the test moves, and a challenge from it
    dev = enroll(stack, acme, "sensor-late")
    clock = MovableClock()
    service = TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        stack.signing_keys,
        clock=clock,
    )
    late, in_time = service.challenge()["nonce"], service.challenge()["nonce"]

    # When the device answers at the last second of the challenge, Then it gets a token
    clock.advance(120)
    service.issue(token_request(dev.assertion(stack, nonce=in_time)))
    # When it answers one second later, Then invalid_grant
    clock.advance(1)
    with pytest.raises(InvalidGrant):
        service.issue(token_request(dev.assertion(stack, nonce=late)))


# ---- faults -------------------------------------------------------------------------------------

# A token function that just started: device read, jti write, registry read, KMS confirming the
# registry's key (once per key per process), KMS signature.
# The device read, the registry read and KMS confirming its key, the signature, then the write
# that records the jti (signed first: a token is handed out only once its write committed).
COLD_CALLS = [
    "dynamodb.GetItem",
    "dynamodb.GetItem",
    "kms.DescribeKey",
    "kms.GetPublicKey",
    "kms.ListResourceTags",
    "kms.GetKeyPolicy",
    "kms.Sign",
    "dynamodb.TransactWriteItems",
]
JTI_WRITE = 8


def fresh_token_service(stack) -> TokenService:
    return TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms)),
    )


FAULTS = [(k, after) for k in range(1, len(COLD_CALLS) + 1) for after in (False, True)]


def test_a_fault_at_any_aws_call_never_gives_two_tokens_for_one_assertion(stack, acme):
    injector = FaultInjector().watch(*stack.service_clients())
    for k, after in FAULTS:
        case = (
            f"call {k} ({COLD_CALLS[k - 1]}) fails {'after' if after else 'before'} AWS applied it"
        )
        # Given an ACTIVE device and a token function that just started
        dev = enroll(stack, acme, f"sensor-fault-{k}-{int(after)}")
        service = fresh_token_service(stack)
        assertion = dev.assertion(stack)
        injector.arm(k, after=after)

        # When the k-th AWS call of the issue fails
        with pytest.raises(Exception) as failed:
            service.issue(token_request(assertion))
        assert injector.fired == COLD_CALLS[k - 1].split(".")[1], case
        assert not isinstance(failed.value, OAuthError), (
            f"{case}: an AWS failure is not the client's fault"
        )
        injector.arm(None)

        # Then a new assertion from the same device gets a token (nothing is stuck)
        verify_pyjwt(stack, service.issue(token_request(dev.assertion(stack)))["access_token"])

        # and the failed assertion gets a token only if its jti was never written, and never twice
        if k < JTI_WRITE or (k == JTI_WRITE and not after):
            verify_pyjwt(stack, service.issue(token_request(assertion))["access_token"])
        with pytest.raises(InvalidGrant):
            service.issue(token_request(assertion))


def test_a_fault_on_the_challenge_write(stack, acme):
    dev = enroll(stack, acme, "sensor-challenge-fault")
    injector = FaultInjector().watch(*stack.service_clients())
    for after in (False, True):
        # Given the nonce write fails (before or after DynamoDB applied it)
        injector.arm(1, after=after)
        # When a challenge is asked for, Then it fails without a nonce for the caller
        with pytest.raises(Exception) as failed:
            stack.tokens.challenge()
        assert injector.fired == "PutItem" and not isinstance(failed.value, OAuthError)
        # and the next challenge works
        injector.arm(None)
        issue(stack, dev.assertion(stack, nonce=stack.tokens.challenge()["nonce"]))


# ---- introspection ------------------------------------------------------------------------------


def test_an_issued_token_introspects_active_with_its_claims(stack, acme):
    dev = enroll(stack, acme, "sensor-intro")
    token = issue(stack, dev.assertion(stack))["access_token"]
    result = stack.introspection.introspect(token)
    assert result == {"active": True, "token_type": "Bearer", **verify_pyjwt(stack, token)}


def test_tokens_that_are_not_valid_introspect_inactive(stack, acme):
    # Given a device, a valid token of it, an expired one, and forgeries of several kinds
    dev = enroll(stack, acme, "sensor-forged")
    token = issue(stack, dev.assertion(stack))["access_token"]
    header, payload, _ = token.split(".")
    claims = claims_of(token)
    kid = jwt.get_unverified_header(token)["kid"]
    impostor = device_key("ec:secp256r1", "impostor")
    # (and a token issued two hours ago, by a token service on a clock set back: its signature is
    # good, only its lifetime is over)
    past = TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        stack.signing_keys,
        clock=MovableClock(datetime.now(UTC) - timedelta(hours=2)),
    )
    expired = issue(stack, dev.assertion(stack), service=past)["access_token"]
    jwt.decode(
        expired,
        jwt.PyJWKSet.from_dict(stack.signing_keys.jwks())[kid],
        algorithms=["ES256"],
        options={"verify_exp": False, "verify_aud": False},
    )
    forged = {
        "expired": expired,
        "garbage": "garbage",
        "empty": "",
        "bad signature": f"{header}.{payload}.{b64url(bytes(64))}",
        "other key, same kid": jwt.encode(
            claims, impostor, algorithm="ES256", headers={"typ": "at+jwt", "kid": kid}
        ),
        "alg none": _b64json({"alg": "none", "typ": "at+jwt", "kid": kid}) + "." + payload + ".",
        "unknown kid": jwt.encode(
            claims, impostor, algorithm="ES256", headers={"typ": "at+jwt", "kid": "nope"}
        ),
        "a client assertion": dev.assertion(stack),
        "too large": token + "A" * 8192,
        "other issuer": f"{header}.{_b64json({**claims, 'iss': 'https://evil.example'})}.{token.split('.')[2]}",
    }
    # When each is introspected, Then it is inactive (never an error)
    for name, candidate in forged.items():
        assert stack.introspection.introspect(candidate) == {"active": False}, name
    # while the genuine one is active
    assert stack.introspection.introspect(token)["active"] is True


def test_tokens_of_suspended_or_rebound_devices_and_revoked_tokens_introspect_inactive(stack, acme):
    # Given a token of a device then SUSPENDED, and one of a device whose certificate changed
    suspended = enroll(stack, acme, "sensor-intro-susp")
    of_suspended = issue(stack, suspended.assertion(stack))["access_token"]
    suspend(stack, suspended.device_id)
    rebound = enroll(stack, acme, "sensor-intro-cert")
    of_rebound = issue(stack, rebound.assertion(stack))["access_token"]
    replace_certificate(stack, rebound.device_id)
    # When they are introspected, Then they are inactive
    assert stack.introspection.introspect(of_suspended) == {"active": False}
    assert stack.introspection.introspect(of_rebound) == {"active": False}

    # Given two tokens of an ACTIVE device
    dev = enroll(stack, acme, "sensor-revoke")
    revoked = issue(stack, dev.assertion(stack))["access_token"]
    kept = issue(stack, dev.assertion(stack))["access_token"]
    claims = claims_of(revoked)
    # When one is revoked by its jti until it expires
    stack.introspection.revoke(claims["jti"], actor="op")
    # Then it is inactive and the other is still active
    assert stack.introspection.introspect(revoked) == {"active": False}
    assert stack.introspection.introspect(kept)["active"] is True
