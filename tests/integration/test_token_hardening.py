"""Token vending under attack: findings of the security review, each pinned by a test."""

from __future__ import annotations

import base64
import json
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest

from fleetkey.crypto.jose import sign_jwt
from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey.domain.oauth import InvalidClient
from fleetkey.verifier import InvalidToken, TokenVerifier
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.pki import generate_key, pem
from tests.support.pki_cache import ca as cached_ca
from tests.support.registry import write_registry_entry


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
        def do_GET(self):
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
    key, _, event = stack.manufacture(acme, device_id, actor="op", **issue)
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
    _key, _certificate_id = register(stack)
    rogue = generate_key("ec:secp256r1")
    kid = write_registry_entry(
        stack, "00000000-0000-0000-0000-000000000000", rogue.public_key(), actor="attacker"
    )

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
    forged = sign_jwt(
        LocalSigner(),
        kid,
        {
            "iss": stack.settings.issuer,
            "sub": "sensor-1",
            "aud": "urn:fleetkey:telemetry",
            "exp": now + 600,
            "iat": now,
            "jti": "x",
            "client_id": "sensor-1",
            "scope": "admin",
            "cnf": {},
        },
        "at+jwt",
    )
    # When a fresh function reads the registry
    from fleetkey.adapters.kms import KmsKeys
    from fleetkey.services.introspection import IntrospectionService
    from fleetkey.services.signing_keys import SigningKeys

    keys = SigningKeys(stack.store.signing_keys, KmsKeys(client=stack.kms))
    # Then the forged key is neither published nor accepted
    assert kid not in [k["kid"] for k in keys.jwks()["keys"]]
    assert len(keys.jwks()["keys"]) == 1
    introspection = IntrospectionService(
        stack.settings, stack.store.devices, stack.store.token_records, stack.store.audit, keys
    )
    assert introspection.introspect(forged) == {"active": False}


def test_revocation_lasts_as_long_as_any_token_and_is_audited(stack):
    # Given a token
    key, certificate_id = register(stack)
    token = stack.tokens.issue(
        token_request(client_assertion(key, certificate_id, "sensor-1", stack.settings.issuer))
    )["access_token"]
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
    now = datetime.now(UTC)
    key, certificate_id = register(
        stack,
        "sensor-short",
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(seconds=100),
    )
    # When it asks for a token now, Then the token ends with the certificate
    response = stack.tokens.issue(
        token_request(client_assertion(key, certificate_id, "sensor-short", stack.settings.issuer))
    )
    assert response["expires_in"] <= 100
    # When the certificate has expired, Then no token
    from fleetkey.services.tokens import TokenService

    later = TokenService(
        stack.settings,
        stack.store.devices,
        stack.store.token_records,
        stack.signing_keys,
        clock=lambda: now + timedelta(seconds=200),
    )
    with pytest.raises(InvalidClient):
        later.issue(
            token_request(
                client_assertion(key, certificate_id, "sensor-short", stack.settings.issuer)
            )
        )


def test_a_challenge_assertion_cannot_carry_a_far_exp(stack):
    key, certificate_id = register(stack)
    nonce = stack.tokens.challenge()["nonce"]
    assertion = client_assertion(
        key,
        certificate_id,
        "sensor-1",
        stack.settings.issuer,
        nonce=nonce,
        extra_claims={"exp": int(time.time()) + 10**7},
    )
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
    stack.allowlist.add(
        AllowlistEntry(
            device_id="bound-1",
            serial_number="SN-b",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    key, cert = acme.issue_device("bound-1", serial_number="SN-b")
    event = stack.first_connect(pem(cert), acme.pem)
    assert stack.register(event).accepted
    token = stack.tokens.issue(
        token_request(
            client_assertion(key, event["certificateId"], "bound-1", stack.settings.issuer)
        )
    )["access_token"]
    with served_jwks(stack.signing_keys.jwks()) as (url, _):
        verifier = TokenVerifier(stack.settings.issuer, jwks_uri=url)
        # When the application checks the binding with the device's own certificate, Then it passes
        claims = verifier.verify(
            token,
            audience="urn:fleetkey:telemetry",
            client_certificate_der=cert.public_bytes(Encoding.DER),
        )
        assert claims["sub"] == "bound-1"
        # And with another certificate, Then it fails
        _, other = acme.issue_device("bound-1", serial_number="SN-b")
        with pytest.raises(InvalidToken):
            verifier.verify(
                token,
                audience="urn:fleetkey:telemetry",
                client_certificate_der=other.public_bytes(Encoding.DER),
            )


# ---- JOSE and OAuth by current best practice (issue 7, item 3) --------------------------------


def active_device(stack, device_id="sensor-jose"):
    """An ACTIVE P-256 device: its key, certificate id and an assertion maker."""
    key, certificate_id = register(stack, device_id)

    def assertion(**kw):
        return client_assertion(key, certificate_id, device_id, stack.settings.issuer, **kw)

    return key, certificate_id, assertion


def stored_keys(stack) -> set[tuple[str, str]]:
    """Every (pk, sk) in the table, read with a client the counters do not watch."""
    items = stack.make_client("dynamodb").scan(TableName=stack.settings.table_name)["Items"]
    return {(i["pk"]["S"], i["sk"]["S"]) for i in items}


def issued_or_refused(stack, form) -> str:
    """'issued', or the OAuth error code; anything else (a crash) propagates."""
    from fleetkey.domain.oauth import OAuthError

    try:
        stack.tokens.issue(form)
    except OAuthError as refused:
        return refused.code
    return "issued"


def test_an_assertion_with_a_crit_header_is_invalid_client(stack):
    # Given a device that signs assertions naming critical extensions (RFC 7515 §4.1.11)
    _, _, assertion = active_device(stack)
    critical = {
        "registered claim": {"crit": ["exp"]},
        "private extension": {"crit": ["urn:example:x"], "urn:example:x": True},
        "empty list": {"crit": []},
        "b64 (RFC 7797)": {"crit": ["b64"], "b64": True},
    }
    for name, headers in critical.items():
        # When each is presented, Then invalid_client: fleetkey understands no extension
        assert (
            issued_or_refused(stack, token_request(assertion(extra_headers=headers)))
            == "invalid_client"
        ), name
    # while the same device without crit gets a token
    assert issued_or_refused(stack, token_request(assertion())) == "issued"


@pytest.mark.parametrize(
    "typ,outcome",
    [
        (None, "issued"),  # untyped: 7523bis says servers should not refuse it
        ("JWT", "issued"),
        ("jwt", "issued"),
        ("client-authentication+jwt", "issued"),
        ("application/client-authentication+jwt", "issued"),
        ("Client-Authentication+JWT", "issued"),
        ("at+jwt", "invalid_client"),  # an access token is never an assertion (RFC 8725 §3.11)
        ("application/at+jwt", "invalid_client"),
        ("dpop+jwt", "invalid_client"),
        ("secevent+jwt", "invalid_client"),
        ("JOSE", "invalid_client"),
        (42, "invalid_client"),
    ],
)
def test_an_assertion_must_not_say_it_is_another_kind_of_jwt(stack, typ, outcome):
    # Given an assertion of an ACTIVE device with this typ header
    _, _, assertion = active_device(stack)
    form = token_request(assertion(typ=typ))
    # When it is presented, Then only a client assertion's types (or none) are accepted
    assert issued_or_refused(stack, form) == outcome


def test_the_assertion_audience_is_the_issuer_as_its_sole_value(stack):
    # Given a device, the issuer and the token endpoint URL
    _, _, assertion = active_device(stack)
    issuer = stack.settings.issuer
    cases = {
        "the issuer": (issuer, "issued"),
        "the issuer in a one-element array": ([issuer], "issued"),
        "the issuer among others": ([issuer, "https://other.example"], "invalid_client"),
        "the issuer twice": ([issuer, issuer], "invalid_client"),
        "the token endpoint": (f"{issuer}/v1/token", "invalid_client"),
        "the token endpoint and the issuer": ([f"{issuer}/v1/token", issuer], "invalid_client"),
        "the issuer with a trailing slash": (issuer + "/", "invalid_client"),
        "an empty array": ([], "invalid_client"),
        "null": (None, "invalid_client"),
    }
    for name, (audience, outcome) in cases.items():
        # When each audience is presented, Then only the issuer alone gets a token (7523bis §4)
        form = token_request(assertion(extra_claims={"aud": audience}))
        assert issued_or_refused(stack, form) == outcome, name


def test_a_client_id_parameter_must_name_the_assertions_device(stack):
    # Given two ACTIVE devices
    _, _, assertion = active_device(stack, "sensor-a")
    register(stack, "sensor-b")
    # When the client_id names the other device, an unknown one, or is empty, Then invalid_client
    # (RFC 7521 §4.2: it must identify the client the assertion does; §4.2.1: invalid_client)
    for client_id in ("sensor-b", "ghost", ""):
        before = stored_keys(stack)
        form = token_request(assertion(), client_id=client_id)
        assert issued_or_refused(stack, form) == "invalid_client", client_id
        assert stored_keys(stack) == before
    # When it names the assertion's own device, Then a token
    assert issued_or_refused(stack, token_request(assertion(), client_id="sensor-a")) == "issued"


def _segments(header, payload, signature=b"\x01" * 64) -> str:
    def encode(part):
        if isinstance(part, bytes):
            return b64(part)
        if isinstance(part, str):
            return part
        return b64(json.dumps(part).encode())

    return ".".join(encode(p) for p in (header, payload, signature))


def malformed_assertions(stack, certificate_id) -> dict[str, str]:
    """Assertions broken in their JOSE form, each otherwise naming the ACTIVE device."""
    now = int(time.time())
    claims = {
        "iss": "sensor-jose",
        "sub": "sensor-jose",
        "aud": stack.settings.issuer,
        "jti": "j-1",
        "iat": now,
        "exp": now + 60,
    }
    good = {"alg": "ES256", "kid": certificate_id}
    raw_claims = json.dumps(claims).encode()
    return {
        "header is an array": _segments([good], claims),
        "header is a string": _segments("ES256", claims),
        "header is null": _segments(None, claims),
        "alg is a list": _segments({**good, "alg": ["ES256"]}, claims),
        "alg is an object": _segments({**good, "alg": {"ES256": 1}}, claims),
        "alg is null": _segments({**good, "alg": None}, claims),
        "alg is a number": _segments({**good, "alg": 256}, claims),
        "kid is a number": _segments({**good, "kid": 7}, claims),
        "kid is a list": _segments({**good, "kid": [certificate_id]}, claims),
        "kid is an object": _segments({**good, "kid": {"id": certificate_id}}, claims),
        "typ is a list": _segments({**good, "typ": ["JWT"]}, claims),
        "duplicate alg": _segments(
            b64(b'{"alg":"ES256","kid":"' + certificate_id.encode() + b'","alg":"none"}'), claims
        ),
        "header nested 1,500 deep": _segments(b"[" * 1500 + b"]" * 1500, claims),
        "payload nested deep": _segments(good, {**claims, "x": json.loads("[" * 900 + "]" * 900)}),
        "payload is an array": _segments(good, [claims]),
        "payload 5,000-digit number": _segments(
            good, raw_claims[:-1] + b', "n": ' + b"9" * 5000 + b"}"
        ),
        "payload exp 1e400": _segments(good, raw_claims.replace(str(now + 60).encode(), b"1e400")),
        "payload NaN": _segments(good, raw_claims[:-1] + b', "n": NaN}'),
        "sub is a list": _segments(
            good, {**claims, "sub": ["sensor-jose"], "iss": ["sensor-jose"]}
        ),
        "header not UTF-8": _segments(b'{"alg":"ES256","kid":"\xff"}', claims),
        "header UTF-16": _segments(json.dumps(good).encode("utf-16"), claims),
        "header bad base64": _segments("e@J!", claims),
        "header non-canonical base64": _segments(b64(json.dumps(good).encode())[:-1] + "_", claims)
        if len(b64(json.dumps(good).encode())) % 4
        else _segments("eyJ9", claims),
        "signature bad base64": _segments(good, claims, "***"),
        "four segments": _segments(good, claims) + ".AAAA",
        "two segments": b64(json.dumps(good).encode()) + "." + b64(raw_claims),
        "padding": _segments(good, claims).replace(".", "==.", 1),
        "non-ASCII": _segments(good, claims) + "é",
        "lone surrogate in a claim": _segments(good, {**claims, "firmware_version": "\ud800"}),
        "lone surrogate in the header": _segments({**good, "x": "\udfff"}, claims),
        "zip header": _segments({**good, "zip": "DEF"}, claims),
    }


def test_malformed_assertions_are_invalid_client_never_a_crash(stack):
    # Given an ACTIVE device, and assertions naming it whose JOSE form is broken in every way
    _, certificate_id, _ = active_device(stack)
    failures = []
    for name, assertion in malformed_assertions(stack, certificate_id).items():
        # When each is presented
        try:
            outcome = issued_or_refused(stack, token_request(assertion))
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            outcome = f"crashed: {type(exc).__name__}: {exc}"
        # Then it is invalid_client
        if outcome != "invalid_client":
            failures.append(f"{name}: {outcome}")
    assert not failures, failures


def set_device(stack, device_id, action, **changes):
    """Change a stored device as the services do (conditional write with its audit record)."""
    from fleetkey.clock import timestamp, utc_now
    from fleetkey.ports import DeviceChange

    device = stack.store.devices.get(device_id)
    change = DeviceChange(action=action, actor="test", at=timestamp(utc_now()), **changes)
    stack.store.devices.apply(device, change)


def with_public_key(stack, device_id, pem):
    """The device's current certificate, its stored public key replaced by `pem`."""
    import dataclasses

    current = stack.store.devices.get(device_id).current_certificate
    return (dataclasses.replace(current, public_key_pem=pem),)


def unusable_keys() -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def pem_of(key):
        return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()

    return {
        "garbage PEM": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        "not PEM": "not a key",
        "an Ed25519 key": pem_of(ed25519.Ed25519PrivateKey.generate().public_key()),
        "a P-384 key for a P-256 device": pem_of(generate_key("ec:secp384r1").public_key()),
    }


@pytest.mark.parametrize("kind", list(unusable_keys()))
def test_a_stored_device_key_that_is_unusable_is_invalid_client(stack, kind):
    # Given an ACTIVE P-256 device whose stored certificate key is corrupt or of another kind
    _, _, assertion = active_device(stack, "sensor-corrupt")
    set_device(
        stack,
        "sensor-corrupt",
        "corrupted",
        certificates=with_public_key(stack, "sensor-corrupt", unusable_keys()[kind]),
    )
    # When it asks for a token, Then invalid_client (not a server error)
    assert issued_or_refused(stack, token_request(assertion())) == "invalid_client"


class VerificationSpy:
    """Counts pyjwt's signature verifications, with the algorithm class and key kind of each."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        for cls in (
            jwt.algorithms.ECAlgorithm,
            jwt.algorithms.RSAAlgorithm,
            jwt.algorithms.RSAPSSAlgorithm,
        ):
            original = cls.verify

            def verify(self_, msg, key, sig, _original=original, _cls=cls):
                self.calls.append((_cls.__name__, type(key).__name__))
                return _original(self_, msg, key, sig)

            monkeypatch.setattr(cls, "verify", verify)


def test_every_invalid_client_after_the_device_read_verifies_one_signature(stack, monkeypatch):
    # Given an ACTIVE device, a SUSPENDED one, and a spy on signature verification and AWS calls
    from fleetkey.domain.lifecycle import Transition
    from fleetkey_local.instrument import AwsCallCounter

    key, certificate_id, _assertion = active_device(stack, "sensor-timing")
    _, gone_certificate, gone_assertion = active_device(stack, "sensor-gone")
    set_device(stack, "sensor-gone", "suspended", transition=Transition.SUSPEND)
    _, _, corrupt_assertion = active_device(stack, "sensor-corrupt")
    set_device(
        stack,
        "sensor-corrupt",
        "corrupted",
        certificates=with_public_key(stack, "sensor-corrupt", unusable_keys()["garbage PEM"]),
    )
    issuer = stack.settings.issuer
    impostor = generate_key("ec:secp256r1")
    rsa_impostor = generate_key("rsa:2048")
    cases = {
        "unknown device": client_assertion(impostor, certificate_id, "ghost-7", issuer),
        "unknown device, RSA": client_assertion(
            rsa_impostor, certificate_id, "ghost-8", issuer, algorithm="PS256"
        ),
        "not active": gone_assertion(),
        "not its certificate": client_assertion(key, gone_certificate, "sensor-timing", issuer),
        "algorithm not its key's": client_assertion(
            generate_key("ec:secp384r1"), certificate_id, "sensor-timing", issuer
        ),
        "stored key unusable": corrupt_assertion(),
        "bad signature": client_assertion(impostor, certificate_id, "sensor-timing", issuer),
    }
    spy = VerificationSpy(monkeypatch)
    counter = AwsCallCounter().watch(*stack.service_clients())
    for name, presented in cases.items():
        spy.calls.clear()
        counter.reset()
        # When each is presented
        outcome = issued_or_refused(stack, token_request(presented))
        # Then it is invalid_client after one device read and exactly one signature verification,
        # by the algorithm the assertion names
        assert outcome == "invalid_client", name
        assert counter.reset() == ["dynamodb.GetItem"], name
        alg = jwt.get_unverified_header(presented)["alg"]
        expected = {"ES256": "ECAlgorithm", "ES384": "ECAlgorithm", "PS256": "RSAPSSAlgorithm"}
        assert [c[0] for c in spy.calls] == [expected[alg]], (name, spy.calls)


def kms_signed(stack, claims: dict, **header) -> str:
    """A token signed by the stack's current KMS key with exactly this header (typ at+jwt unless
    given; None drops it), as a forger holding the key's signature could not but fleetkey could."""
    signing_key, signer = stack.signing_keys.current()
    fields = {"alg": "ES256", "typ": "at+jwt", "kid": signing_key.kid, **header}
    fields = {k: v for k, v in fields.items() if v is not None}
    signing_input = b64(json.dumps(fields).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(signer.sign_raw(signing_input.encode()))


def test_introspection_and_the_verifier_refuse_crit_and_insist_on_at_jwt(stack):
    # Given the claims of a genuine token, re-signed by the same KMS key under other headers
    _key, _certificate_id, assertion = active_device(stack, "sensor-rp")
    genuine = stack.tokens.issue(token_request(assertion()))["access_token"]
    claims = jwt.decode(genuine, options={"verify_signature": False})
    cases = {
        "as issued": ({}, True),
        "typ in full media type form": ({"typ": "application/at+jwt"}, True),
        "typ in capitals": ({"typ": "AT+JWT"}, True),
        "crit naming a registered claim": ({"crit": ["exp"]}, False),
        "crit naming a private extension": ({"crit": ["urn:x"], "urn:x": 1}, False),
        "no typ": ({"typ": None}, False),
        "typ JWT": ({"typ": "JWT"}, False),
        "typ of a client assertion": ({"typ": "client-authentication+jwt"}, False),
        "typ not a string": ({"typ": ["at+jwt"]}, False),
    }
    with served_jwks(stack.signing_keys.jwks()) as (url, _):
        verifier = TokenVerifier(stack.settings.issuer, jwks_uri=url)
        for name, (header, accepted) in cases.items():
            token = kms_signed(stack, claims, **header)
            # When introspection and a relying party's verifier meet it
            introspected = stack.introspection.introspect(token)
            try:
                verifier.verify(token, audience="urn:fleetkey:telemetry")
                verified = True
            except InvalidToken:
                verified = False
            # Then both accept it only when typ says at+jwt and nothing is critical
            assert introspected["active"] is accepted, name
            assert verified is accepted, name


def test_malformed_tokens_are_inactive_and_invalid_for_relying_parties(stack):
    # Given tokens broken in their JOSE form (the assertion cases, with the access token's typ)
    _, certificate_id, _ = active_device(stack, "sensor-rp-malformed")
    with served_jwks(stack.signing_keys.jwks()) as (url, _):
        verifier = TokenVerifier(stack.settings.issuer, jwks_uri=url)
        for name, token in malformed_assertions(stack, certificate_id).items():
            # When introspection and the verifier meet each, Then inactive / InvalidToken
            assert stack.introspection.introspect(token) == {"active": False}, name
            with pytest.raises(InvalidToken):
                verifier.verify(token, audience="urn:fleetkey:telemetry")


# ---- firmware_version, client authentication methods, the projected device read -----------------

HOSTILE_FIRMWARE_VERSIONS = {
    "lone surrogate": "2.4\ud800",
    "NUL": "2.4.1\x00",
    "CR LF": "2.4.1\r\nX-Injected: 1",
    "bidi override": "\u202e1.4.2",
    "space": "2.4 1",
    "non-ASCII": "2.4.1é",
    "empty": "",
    "65 characters": "1" * 65,
    "a number": 241,
    "a list": ["2.4.1"],
}


@pytest.mark.parametrize("kind", list(HOSTILE_FIRMWARE_VERSIONS))
def test_a_firmware_version_that_is_not_printable_ascii_gets_no_token(stack, kind):
    # Given an ACTIVE sensor (no attestation required) whose assertion carries a hostile version
    _, _, assertion = active_device(stack, "sensor-firmware")
    presented = assertion(extra_claims={"firmware_version": HOSTILE_FIRMWARE_VERSIONS[kind]})
    before = stored_keys(stack)
    # When it asks for a token, Then invalid_client, like a malformed jti, and nothing is written
    assert issued_or_refused(stack, token_request(presented)) == "invalid_client"
    assert stored_keys(stack) == before


def test_a_printable_firmware_version_is_carried_into_the_token(stack):
    # Given an ACTIVE sensor reporting a version of 64 printable ASCII characters
    _, _, assertion = active_device(stack, "sensor-firmware-ok")
    version = "v2.4.1+build.7~rc1-" + "x" * 45
    # When it asks for a token, Then the token carries the version as sent
    token = stack.tokens.issue(token_request(assertion(firmware_version=version)))
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert claims["firmware_version"] == version


def test_introspection_does_not_echo_a_firmware_version_fleetkey_would_not_issue(stack):
    # Given the claims of a genuine token re-signed with a hostile firmware_version (as a token
    # signed before the rule could carry)
    _key, _certificate_id, assertion = active_device(stack, "sensor-rp-firmware")
    genuine = stack.tokens.issue(token_request(assertion()))["access_token"]
    claims = jwt.decode(genuine, options={"verify_signature": False})
    for kind in ("NUL", "CR LF", "bidi override", "65 characters", "a number"):
        token = kms_signed(stack, {**claims, "firmware_version": HOSTILE_FIRMWARE_VERSIONS[kind]})
        # When a relying party introspects it, Then inactive: the value is not passed on
        assert stack.introspection.introspect(token) == {"active": False}, kind
    # and the genuine token is active
    assert stack.introspection.introspect(genuine)["active"] is True


def test_a_client_secret_beside_the_assertion_is_invalid_request(stack):
    # Given a device's valid assertion, sent with a client_secret as well (two client
    # authentication methods, RFC 6749 §2.3)
    _, _, assertion = active_device(stack, "sensor-two-methods")
    form = {**token_request(assertion()), "client_secret": "s3cret"}
    before = stored_keys(stack)
    # When it asks for a token, Then invalid_request, and the assertion is not used up
    assert issued_or_refused(stack, form) == "invalid_request"
    assert stored_keys(stack) == before


def test_the_token_path_reads_only_the_device_fields_it_needs(stack):
    # Given an ACTIVE device and a record of the GetItem requests the store's client sends
    from fleetkey.store.devices import DEVICE_CREDENTIAL_FIELDS

    _, _, assertion = active_device(stack, "sensor-projection")
    sent = []
    client = stack.store.table.client

    def record(params, **_):
        sent.append(dict(params))

    client.meta.events.register("provide-client-params.dynamodb.GetItem", record)
    try:
        # When it gets a token
        stack.tokens.issue(token_request(assertion()))
    finally:
        client.meta.events.unregister("provide-client-params.dynamodb.GetItem", record)
    # Then its one device read asked for exactly the fields that authenticate it, consistently
    (read,) = [r for r in sent if r["Key"]["pk"]["S"].startswith("DEVICE#")]
    names = read["ExpressionAttributeNames"]
    projected = [names[n.strip()] for n in read["ProjectionExpression"].split(",")]
    assert sorted(projected) == sorted(DEVICE_CREDENTIAL_FIELDS)
    assert "attributes" not in projected and "audit_hash" not in projected
    assert read["ConsistentRead"] is True


def test_an_unknown_device_costs_the_decoding_a_known_one_costs(stack, monkeypatch):
    # Given an ACTIVE device, and counters on botocore's response parsing and on the store's
    # attribute decoding (the CPU work that made an unknown device measurably faster); moto,
    # in this process, decodes attributes too, with deserializers of its own
    import botocore.parsers
    from boto3.dynamodb.types import TypeDeserializer

    from fleetkey.store import table as dynamodb

    key, certificate_id, _ = active_device(stack, "sensor-decoy")
    issuer = stack.settings.issuer
    impostor = generate_key("ec:secp256r1")
    cases = {
        "unknown": client_assertion(impostor, certificate_id, "ghost-decoy", issuer),
        "bad signature": client_assertion(impostor, certificate_id, "sensor-decoy", issuer),
        "wrong kid": client_assertion(key, "0" * 64, "sensor-decoy", issuer),
    }
    counts = {"parsed": 0, "decoded": 0}

    def counting(name, original):
        def counted(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return counted

    monkeypatch.setattr(
        botocore.parsers.ResponseParser,
        "_parse_shape",
        counting("parsed", botocore.parsers.ResponseParser._parse_shape),
    )
    store_deserializer = TypeDeserializer()
    store_deserializer.deserialize = counting("decoded", store_deserializer.deserialize)
    monkeypatch.setattr(dynamodb, "_deserializer", store_deserializer)
    work = {}
    for name, presented in cases.items():
        counts.update(parsed=0, decoded=0)
        # When each is refused
        assert issued_or_refused(stack, token_request(presented)) == "invalid_client", name
        work[name] = dict(counts)
    # Then the unknown device's refusal decoded as many attributes as a known device's, and
    # parsed at least as much (its own empty answer, and the decoy's item)
    known = work["bad signature"]
    assert work["wrong kid"] == known and known["decoded"] > 0
    assert work["unknown"]["decoded"] == known["decoded"], work
    assert work["unknown"]["parsed"] >= known["parsed"], work
