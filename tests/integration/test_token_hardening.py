"""Token vending under attack: findings of the security review, each pinned by a test."""

from __future__ import annotations

import base64
import json
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from fleetkey.crypto.jose import jwk_thumbprint, public_jwk, sign_jwt
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.oauth import InvalidClient
from fleetkey.verifier import InvalidToken, TokenVerifier
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import generate_key, pem
from tests.support.pki_cache import ca as cached_ca


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nested_jwt() -> str:
    deep = b"[" * 1500 + b"]" * 1500
    return f"{b64(deep)}.{b64(deep)}.{b64(b'sig')}"


@contextmanager
def served_jwks(jwks: dict):
    """The JWKS over HTTP on 127.0.0.1, as a relying party fetches it; yields its URL and the
    list of fetches made."""
    body, fetches = json.dumps(jwks).encode(), []

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", fetches
    finally:
        server.shutdown()


def register(stack, device_id="sensor-1", **issue):
    acme = cached_ca("acme")
    if not stack.cas.list():
        stack.register_ca(acme)
    stack.allowlist.add(AllowlistEntry(device_id=device_id, serial_number=f"SN-{device_id}",
                                       manufacturer_ca="acme", profile="telemetry-sensor"), actor="op")
    key, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}", **issue)
    event = stack.first_connect(pem(cert), acme.pem)
    assert stack.register(event).accepted
    return key, event["certificateId"]


def test_deeply_nested_json_is_refused_not_crashed(stack):
    # Given a token-shaped string whose JSON nests 1,500 deep
    hostile = nested_jwt()
    # When the token endpoint, introspection and the verifier meet it, Then each refuses cleanly
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(hostile))
    assert stack.introspection.introspect(hostile) == {"active": False}
    with pytest.raises(InvalidToken):
        TokenVerifier("http://127.0.0.1:9").verify(hostile, audience="urn:fleetkey:telemetry")


def test_a_key_written_into_the_registry_without_kms_is_not_trusted(stack):
    # Given an attacker who can write the table adds their own key to the signing-key registry
    key, certificate_id = register(stack)
    head, items = stack.store.get_signing_keys()
    rogue = generate_key("ec:secp256r1")
    jwk = public_jwk(rogue.public_key())
    kid = jwk_thumbprint(jwk)
    forged_entry = {"key_id": "00000000-0000-0000-0000-000000000000", "kid": kid,
                    "jwk": {**jwk, "kid": kid, "use": "sig", "alg": "ES256"},
                    "active_from": 0, "retire_after": None}
    record = head.next_record(subject="stream:signing-keys", at="2026-11-21T00:00:00.000+00:00",
                              action="forged", actor="attacker", details={})
    stack.store.put_signing_keys(head, items + [forged_entry], record)
    # ... and signs a token with it
    class LocalSigner:
        def public_key(self):
            return rogue.public_key()

        def sign_raw(self, message):
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec, utils

            r, s = utils.decode_dss_signature(rogue.sign(message, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    now = int(time.time())
    forged = sign_jwt(LocalSigner(), kid, {"iss": stack.settings.issuer, "sub": "sensor-1",
                                           "aud": "urn:fleetkey:telemetry", "exp": now + 600,
                                           "iat": now, "jti": "x", "client_id": "sensor-1",
                                           "scope": "admin", "cnf": {}}, "at+jwt")
    # When a fresh function reads the registry
    from fleetkey.adapters.kms import KmsKeys
    from fleetkey.services.introspection import IntrospectionService
    from fleetkey.services.signing_keys import SigningKeys

    keys = SigningKeys(stack.store, KmsKeys(client=stack.kms))
    # Then the forged key is neither published nor accepted
    assert kid not in [k["kid"] for k in keys.jwks()["keys"]]
    assert len(keys.jwks()["keys"]) == 1
    introspection = IntrospectionService(stack.settings, stack.store, keys)
    assert introspection.introspect(forged) == {"active": False}


def test_revocation_lasts_as_long_as_any_token_and_is_audited(stack):
    # Given a token
    key, certificate_id = register(stack)
    token = stack.tokens.issue(token_request(client_assertion(key, certificate_id, "sensor-1",
                                                              stack.settings.issuer)))["access_token"]
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    # When an operator revokes it
    until = stack.introspection.revoke(jti, actor="op")
    # Then it is inactive for at least a token's longest life, and the revocation is audited
    assert until >= time.time() + 3600
    assert stack.introspection.introspect(token) == {"active": False}
    records, _ = stack.devices.audit("stream:token-revocations")
    assert records[-1].details["jti"] == jti and records[-1].actor == "op"


def test_an_expired_device_certificate_gets_no_token_and_tokens_never_outlive_it(stack):
    # Given a device whose certificate expires in 100 seconds
    now = datetime.now(timezone.utc)
    key, certificate_id = register(stack, "sensor-short", not_before=now - timedelta(days=1),
                                   not_after=now + timedelta(seconds=100))
    # When it asks for a token now, Then the token ends with the certificate
    response = stack.tokens.issue(token_request(client_assertion(key, certificate_id, "sensor-short",
                                                                 stack.settings.issuer)))
    assert response["expires_in"] <= 100
    # When the certificate has expired, Then no token
    from fleetkey.services.tokens import TokenService

    later = TokenService(stack.settings, stack.store, stack.signing_keys,
                         clock=lambda: now + timedelta(seconds=200))
    with pytest.raises(InvalidClient):
        later.issue(token_request(client_assertion(key, certificate_id, "sensor-short",
                                                   stack.settings.issuer)))


def test_a_challenge_assertion_cannot_carry_a_far_exp(stack):
    key, certificate_id = register(stack)
    nonce = stack.tokens.challenge()["nonce"]
    assertion = client_assertion(key, certificate_id, "sensor-1", stack.settings.issuer, nonce=nonce,
                                 extra_claims={"exp": int(time.time()) + 10**7})
    with pytest.raises(InvalidClient):
        stack.tokens.issue(token_request(assertion))


def test_the_verifier_does_not_refetch_for_every_unknown_kid(stack):
    # Given a JWKS endpoint that counts its fetches
    with served_jwks(stack.signing_keys.jwks()) as (url, fetches):
        verifier = TokenVerifier(stack.settings.issuer, jwks_uri=url)
        # When fifty tokens with made-up key ids arrive
        for i in range(50):
            header = {"alg": "ES256", "typ": "at+jwt", "kid": b64(bytes([i]) * 32)}
            token = f"{b64(json.dumps(header).encode())}.{b64(b'{}')}.{b64(b'x')}"
            with pytest.raises(InvalidToken):
                verifier.verify(token, audience="urn:fleetkey:telemetry")
        # Then the JWKS was fetched at most twice (first load, one refresh)
        assert len(fetches) <= 2


def test_the_verifier_checks_the_certificate_binding(stack):
    from cryptography.hazmat.primitives.serialization import Encoding

    # Given a token of a device, and a JWKS served locally
    acme = cached_ca("acme")
    stack.register_ca(acme)
    stack.allowlist.add(AllowlistEntry(device_id="bound-1", serial_number="SN-b", manufacturer_ca="acme",
                                       profile="telemetry-sensor"), actor="op")
    key, cert = acme.issue_device("bound-1", serial_number="SN-b")
    event = stack.first_connect(pem(cert), acme.pem)
    assert stack.register(event).accepted
    token = stack.tokens.issue(token_request(client_assertion(key, event["certificateId"], "bound-1",
                                                              stack.settings.issuer)))["access_token"]
    with served_jwks(stack.signing_keys.jwks()) as (url, _):
        verifier = TokenVerifier(stack.settings.issuer, jwks_uri=url)
        # When the application checks the binding with the device's own certificate, Then it passes
        claims = verifier.verify(token, audience="urn:fleetkey:telemetry",
                                 client_certificate_der=cert.public_bytes(Encoding.DER))
        assert claims["sub"] == "bound-1"
        # And with another certificate, Then it fails
        _, other = acme.issue_device("bound-1", serial_number="SN-b")
        with pytest.raises(InvalidToken):
            verifier.verify(token, audience="urn:fleetkey:telemetry",
                            client_certificate_der=other.public_bytes(Encoding.DER))
