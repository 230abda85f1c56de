"""Stock clients against the local stack (docs/stock-clients.md): a device that gets tokens with
Authlib's `private_key_jwt` client (OAuth2Session + PrivateKeyJWT, over requests), a relying party
that validates them with Authlib's RFC 9068 resource-server validator, and a device that
publishes its telemetry with `mosquitto_pub` (Debian's mosquitto-clients, `make mosquitto`) over
MQTT/TLS to the local AWS IoT Core.

Authlib's defaults are refused by /v1/token, as draft-ietf-oauth-rfc7523bis asks: `aud` must be
the issuer identifier (Authlib puts the token endpoint URL there) and the assertion may live at
most 300 s (Authlib signs for an hour). Those refusals depend on the request alone, so the error
description says which setting is missing; a refusal that depends on a device keeps the one
sentence for every case."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2 import JsonRequest, ResourceProtector
from authlib.oauth2.rfc6750 import InsufficientScopeError, InvalidTokenError
from authlib.oauth2.rfc7523 import PrivateKeyJWT, private_key_jwt_sign
from authlib.oauth2.rfc9068 import JWTBearerTokenValidator
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from joserfc import jwt
from joserfc.errors import InvalidKeyTypeError
from joserfc.jwk import ECKey, KeySet

from fleetkey_local.api_gateway import LocalApiGateway
from fleetkey_local.device import client_assertion, token_request
from fleetkey_local.fleet import post_form
from fleetkey_local.iot import certificate_id
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.rules import RULES, Rule
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory
from tests.support.pki_cache import ca as cached_ca
from tests.support.recorder import Recorder

# One worker holds the module's stack (a moto server, the gateway and the MQTT broker).
pytestmark = pytest.mark.xdist_group("stock-clients")

ROOT = Path(__file__).resolve().parents[2]
TELEMETRY = "urn:fleetkey:telemetry"
GENERIC = "client authentication failed"


# ---- the stock device and relying party, as docs/stock-clients.md shows them -------------------


class FleetkeyPrivateKeyJWT(PrivateKeyJWT):
    """Authlib's `private_key_jwt` client authentication with the settings /v1/token needs:
    `kid` = the device certificate's AWS IoT id, `alg` = the device key's, `aud` = the issuer
    (Authlib puts its `token_endpoint` argument in `aud`), and a lifetime of at most 300 s
    (Authlib 1.9 signs for 3600 s and has no option for it: `sign` passes `expires_in`); typed
    `client-authentication+jwt` (draft-ietf-oauth-rfc7523bis; Authlib's `JWT` is accepted too).
    Extra `claims` are copied for each assertion (Authlib writes its jti into the dict given)."""

    def __init__(self, issuer, kid, alg="ES256", lifetime=300, claims=None):
        headers = {"kid": kid, "typ": "client-authentication+jwt"}
        super().__init__(token_endpoint=issuer, claims=claims, headers=headers, alg=alg)
        self.lifetime = lifetime

    def sign(self, auth, token_endpoint):
        return private_key_jwt_sign(
            auth.client_secret,
            client_id=auth.client_id,
            token_endpoint=token_endpoint,
            claims=dict(self.claims or {}),
            header=dict(self.headers),
            alg=self.alg,
            expires_in=self.lifetime,
        )


def device_session(device_id: str, key_pem_text: str, auth: PrivateKeyJWT) -> OAuth2Session:
    """The device's OAuth client: its id is its thing name, its secret its private key."""
    session = OAuth2Session(
        client_id=device_id,
        client_secret=ECKey.import_key(key_pem_text),
        token_endpoint_auth_method="private_key_jwt",  # noqa: S106 (a method's name)
    )
    session.register_client_auth_method(auth)
    session.trust_env = False  # the local stack on 127.0.0.1: no proxy from the environment
    return session


class FleetkeyTokenValidator(JWTBearerTokenValidator):
    """Authlib's RFC 9068 validator for a relying party: fleetkey's keys from the issuer's
    metadata (`jwks_uri`), and the token's certificate binding (RFC 8705 `cnf.x5t#S256`)
    checked against the client certificate the relying party's TLS terminator saw."""

    JWKS_SECONDS = 180  # the JWKS's Cache-Control max-age: a new key signs 5 minutes after

    def __init__(self, issuer: str, resource_server: str, http: requests.Session) -> None:
        super().__init__(issuer=issuer, resource_server=resource_server)
        self._http = http
        self._keys: KeySet | None = None
        self._fetched = 0.0

    def get_jwks(self) -> KeySet:
        if self._keys is None or time.monotonic() - self._fetched > self.JWKS_SECONDS:
            metadata_url = f"{self.issuer}/.well-known/oauth-authorization-server"
            metadata = self._http.get(metadata_url, timeout=10).json()
            jwks = self._http.get(metadata["jwks_uri"], timeout=10).json()
            self._keys, self._fetched = KeySet.import_key_set(jwks), time.monotonic()
        return self._keys

    def validate_token(self, token, scopes, request, **kwargs):
        super().validate_token(token, scopes, request, **kwargs)
        der = request.client_certificate
        thumbprint = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
        if (token.get("cnf") or {}).get("x5t#S256") != thumbprint:
            raise InvalidTokenError(description="the token is bound to another certificate")


def resource_request(token: str, client_certificate: bytes) -> JsonRequest:
    """A request as the relying party's API sees it: the bearer token, and the client
    certificate of its mutual TLS connection (DER)."""
    request = JsonRequest(
        "GET", "https://rp.example/readings", {"Authorization": f"Bearer {token}"}
    )
    request.client_certificate = client_certificate
    return request


# ---- the local stack ----------------------------------------------------------------------------


@dataclass
class Device:
    device_id: str
    kid: str
    key_pem: str
    certificate: x509.Certificate
    certfile: Path
    keyfile: Path


@dataclass
class Local:
    stack: EmbeddedStack
    api: LocalApiGateway
    emulator: IotCoreEmulator
    acme: CertificateAuthority
    tmp: Path
    telemetry: Recorder

    @property
    def issuer(self) -> str:
        return self.api.url

    @property
    def token_endpoint(self) -> str:
        return f"{self.api.url}/v1/token"

    def device(self, device_id: str) -> Device:
        """A telemetry sensor of acme's factory, registered (ACTIVE), with its key and
        certificate in files."""
        key, certificate, event = self.stack.manufacture(self.acme, device_id)
        assert self.stack.register(event).accepted
        certfile, keyfile = self.tmp / f"{device_id}.crt", self.tmp / f"{device_id}.key"
        certfile.write_text(pem(certificate))
        keyfile.write_text(key_pem(key))
        # The kid: AWS IoT's certificate id, the SHA-256 of the certificate's DER, in hex
        kid = hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
        assert kid == certificate_id(pem(certificate))
        return Device(device_id, kid, key_pem(key), certificate, certfile, keyfile)

    def http(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        return session


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Iterator[Local]:
    """moto on 127.0.0.1 with fleetkey's resources, the local API gateway (the issuer) and the
    local AWS IoT Core with a rule recording the devices' telemetry, each on a free port."""
    tmp = tmp_path_factory.mktemp("stock-clients")
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        # The functions read the provisioned resources from their environment (local_aws()
        # restores it on the way out).
        os.environ.update(stack.environment())
        acme = cached_ca("acme")
        stack.register_ca(acme)
        with LocalApiGateway(0) as api:
            # The issuer is the API's address; functions read it when they first run.
            os.environ["FLEETKEY_ISSUER"] = api.url
            telemetry = Recorder()
            rules = [
                *RULES,
                Rule.select_all(
                    "telemetry_double",
                    "SELECT *, topic(2) AS device_id FROM 'fleetkey/+/telemetry/#'",
                    telemetry,
                ),
            ]
            emulator = IotCoreEmulator(tmp / "state", port=0, rules=rules, endpoint_url=endpoint)
            emulator.start()
            try:
                yield Local(stack, api, emulator, acme, tmp, telemetry)
            finally:
                emulator.stop()


def refusal(session: OAuth2Session, url: str) -> tuple[str, str]:
    with pytest.raises(OAuthError) as refused:
        session.fetch_token(url, grant_type="client_credentials")
    return refused.value.error, refused.value.description


# ---- a device with Authlib's private_key_jwt -----------------------------------------------


def test_authlibs_defaults_are_refused_each_with_the_setting_it_needs(local):
    device = local.device("sensor-stock-0001")
    # The issuer and the token endpoint, from the issuer's metadata (RFC 8414)
    metadata_url = f"{local.api.url}/.well-known/oauth-authorization-server"
    metadata = local.http().get(metadata_url, timeout=10).json()
    issuer, url = metadata["issuer"], metadata["token_endpoint"]
    assert (issuer, url) == (local.issuer, local.token_endpoint)

    # Authlib's default algorithm, RS256, does not sign with the device's EC key: refused locally
    defaults = device_session(device.device_id, device.key_pem, PrivateKeyJWT())
    with pytest.raises(InvalidKeyTypeError):
        defaults.fetch_token(url, grant_type="client_credentials")

    # With the key's algorithm only: no kid, and the error says which one
    es256 = device_session(device.device_id, device.key_pem, PrivateKeyJWT(alg="ES256"))
    assert refusal(es256, url) == (
        "invalid_client",
        "the client assertion's kid header must be the AWS IoT certificate id of the device's "
        "certificate (64 lowercase hex digits)",
    )

    # With the kid: Authlib's aud is the token endpoint URL, and the error names the issuer
    with_kid = PrivateKeyJWT(alg="ES256", headers={"kid": device.kid})
    assert refusal(device_session(device.device_id, device.key_pem, with_kid), url) == (
        "invalid_client",
        f"the client assertion's aud must be the issuer identifier {issuer} alone (a "
        "string, or an array holding only it), not the token endpoint URL",
    )

    # With aud = the issuer: Authlib's one-hour assertion is too long
    aud_issuer = PrivateKeyJWT(token_endpoint=issuer, alg="ES256", headers={"kid": device.kid})
    assert refusal(device_session(device.device_id, device.key_pem, aud_issuer), url) == (
        "invalid_client",
        "the client assertion's lifetime, exp - iat, must be 1 to 300 seconds",
    )

    # With every setting: a token, again and again (each assertion with a new jti)
    stock = FleetkeyPrivateKeyJWT(issuer, device.kid)
    session = device_session(device.device_id, device.key_pem, stock)
    assertion = jwt.decode(stock.sign(session.client_auth(stock), issuer), session.client_secret)
    assert assertion.header == {
        "alg": "ES256",
        "kid": device.kid,
        "typ": "client-authentication+jwt",
    }
    claims = assertion.claims
    assert claims["iss"] == claims["sub"] == device.device_id and claims["aud"] == issuer
    assert claims["exp"] - claims["iat"] == 300 and claims["jti"]
    for _ in range(2):
        token = session.fetch_token(url, grant_type="client_credentials", scope="telemetry:write")
        assert token["token_type"] == "Bearer" and token["scope"] == "telemetry:write"
        assert 0 < token["expires_in"] <= 900


def test_a_device_dependent_refusal_keeps_the_one_sentence(local):
    # Given an assertion with every setting right, for a device fleetkey does not know, and one
    # signed by the key of another device
    device = local.device("sensor-stock-0002")
    other = local.device("sensor-stock-0003")
    stranger = device_session(
        "sensor-stock-9999", device.key_pem, FleetkeyPrivateKeyJWT(local.issuer, device.kid)
    )
    forged = device_session(
        device.device_id, other.key_pem, FleetkeyPrivateKeyJWT(local.issuer, device.kid)
    )
    # Then both read the sentence every refusal on a device reads
    assert refusal(stranger, local.token_endpoint) == ("invalid_client", GENERIC)
    assert refusal(forged, local.token_endpoint) == ("invalid_client", GENERIC)
    # while a rule of the request alone is explained whatever device it names
    unknown_aud = PrivateKeyJWT(alg="ES256", headers={"kid": device.kid})
    error, description = refusal(
        device_session("sensor-stock-9999", device.key_pem, unknown_aud), local.token_endpoint
    )
    assert error == "invalid_client" and description.startswith("the client assertion's aud")


def test_authlibs_extra_claims_repeat_one_jti_and_the_replay_is_refused(local):
    # Given Authlib's own PrivateKeyJWT with extra claims (here a 300 s exp, fixed when made)
    device = local.device("sensor-stock-0004")
    stock = PrivateKeyJWT(
        token_endpoint=local.issuer,
        claims={"exp": int(time.time()) + 300},
        headers={"kid": device.kid},
        alg="ES256",
    )
    session = device_session(device.device_id, device.key_pem, stock)
    # When it asks twice, Then the second assertion repeats the first one's jti (Authlib 1.9
    # writes the jti it makes into that dict) and /v1/token refuses the replay
    assert session.fetch_token(local.token_endpoint, grant_type="client_credentials")
    assert refusal(session, local.token_endpoint) == (
        "invalid_grant",
        "the assertion was already used",
    )
    # while the subclass, which copies its claims for each assertion, gets a token every time
    fresh = FleetkeyPrivateKeyJWT(local.issuer, device.kid, claims={"firmware_version": "1.0.0"})
    session = device_session(device.device_id, device.key_pem, fresh)
    for _ in range(2):
        token = session.fetch_token(local.token_endpoint, grant_type="client_credentials")
        assert token["access_token"]


def test_each_rule_of_the_request_alone_is_explained_in_the_characters_rfc6749_allows(local):
    # Given a registered device, and assertions that each break one rule of their own
    device = local.device("sensor-stock-0005")
    key = load_pem_private_key(device.key_pem.encode(), None)
    issuer, now = local.issuer, int(time.time())

    def signed(device_id=device.device_id, **options):
        return client_assertion(key, device.kid, device_id, issuer, **options)

    unsigned = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in ({"alg": "none", "kid": device.kid}, {"sub": device.device_id})
    )
    nonce = local.stack.tokens.challenge()["nonce"]
    cases = {
        "not a JWS": (token_request("x.y.z"), "the client assertion is not a well-formed"),
        "alg none": (token_request(unsigned + "."), "the client assertion's alg must be"),
        "a kid that is no certificate id": (
            token_request(signed(extra_headers={"kid": "my-device-certificate"})),
            "the client assertion's kid header",
        ),
        "an access token's typ": (
            token_request(signed(typ="at+jwt")),
            "the client assertion's typ header",
        ),
        "a sub that is no device id": (
            token_request(signed(device_id="not a device id")),
            "the client assertion's sub",
        ),
        "iss other than sub": (
            token_request(signed(extra_claims={"iss": "someone-else"})),
            "the client assertion's iss",
        ),
        "another client_id": (
            token_request(signed(), client_id="sensor-stock-9999"),
            "client_id, when sent",
        ),
        "a string iat": (
            token_request(signed(extra_claims={"iat": str(now)})),
            "the client assertion's iat must be an integer",
        ),
        "a nonce assertion for an hour": (
            token_request(signed(nonce=nonce, extra_claims={"exp": now + 3600})),
            "a client assertion with a nonce must expire within 300 seconds",
        ),
    }
    for name, (form, description) in cases.items():
        # When each is sent to /v1/token
        status, body = post_form(local.token_endpoint, form)
        # Then invalid_client, saying which rule, in RFC 6749 §5.2's characters
        assert (status, body["error"]) == (401, "invalid_client"), name
        assert body["error_description"].startswith(description), (name, body)
        assert re.fullmatch(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+", body["error_description"]), name


# ---- a relying party with Authlib's RFC 9068 validator -------------------------------------


def test_a_relying_party_validates_the_token_with_authlibs_rfc9068_validator(local):
    # Given a device's token, got with Authlib
    device = local.device("sensor-stock-0101")
    session = device_session(
        device.device_id, device.key_pem, FleetkeyPrivateKeyJWT(local.issuer, device.kid)
    )
    token = session.fetch_token(local.token_endpoint, grant_type="client_credentials")
    access_token = token["access_token"]
    der = device.certificate.public_bytes(Encoding.DER)

    # When the relying party's API (the telemetry audience) validates it with Authlib
    protector = ResourceProtector()
    protector.register_token_validator(
        FleetkeyTokenValidator(local.issuer, TELEMETRY, local.http())
    )
    claims = protector.validate_request(["telemetry:write"], resource_request(access_token, der))

    # Then it is the device's, for this audience, bound to its certificate
    assert claims["sub"] == claims["client_id"] == device.device_id
    assert claims["iss"] == local.issuer and claims["aud"] == TELEMETRY
    assert claims.header["typ"] == "at+jwt"
    assert set(claims["scope"].split()) == {"telemetry:write", "fleetkey:data-key"}

    # and it is refused for a scope it does not carry, by another audience's API, from another
    # certificate's connection, or altered
    with pytest.raises(InsufficientScopeError):
        protector.validate_request(["admin:all"], resource_request(access_token, der))
    therapy = ResourceProtector()
    therapy.register_token_validator(
        FleetkeyTokenValidator(local.issuer, "urn:fleetkey:therapy", local.http())
    )
    with pytest.raises(InvalidTokenError):
        therapy.validate_request(None, resource_request(access_token, der))
    other = local.device("sensor-stock-0102").certificate.public_bytes(Encoding.DER)
    with pytest.raises(InvalidTokenError):
        protector.validate_request(None, resource_request(access_token, other))
    header, payload, signature = access_token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["scope"] += " admin:all"
    altered = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidTokenError):
        protector.validate_request(None, resource_request(f"{header}.{altered}.{signature}", der))
    # and a validator that expects another issuer refuses it, even with the same keys
    another_issuer = FleetkeyTokenValidator("https://another.example", TELEMETRY, local.http())
    keys = protector.get_token_validator("bearer").get_jwks()
    another_issuer._keys, another_issuer._fetched = keys, time.monotonic()
    elsewhere = ResourceProtector()
    elsewhere.register_token_validator(another_issuer)
    with pytest.raises(InvalidTokenError):
        elsewhere.validate_request(None, resource_request(access_token, der))


# ---- a device with mosquitto_pub -----------------------------------------------------------------


def mosquitto_pub() -> str:
    """The mosquitto_pub `make mosquitto` unpacked into build/, or one on PATH; missing, the test
    skips (and fails under CI, where `make test` fetched it)."""
    found = os.environ.get("FLEETKEY_MOSQUITTO_PUB") or str(
        ROOT / "build" / "mosquitto" / "bin" / "mosquitto_pub"
    )
    if not Path(found).is_file():
        found = shutil.which("mosquitto_pub") or ""
    if not found:
        if os.environ.get("CI"):
            pytest.fail("mosquitto_pub is missing: `make mosquitto` fetches it")
        pytest.skip("mosquitto_pub is missing: `make mosquitto` fetches it")
    return found


def publish(local: Local, device: Device, topic: str, message: str) -> subprocess.CompletedProcess:
    host, port = local.emulator.address
    return subprocess.run(
        [
            mosquitto_pub(),
            "-h", host,
            "-p", str(port),
            "--cafile", str(local.emulator.endpoint_ca_path),
            "--cert", str(device.certfile),
            "--key", str(device.keyfile),
            "-i", device.device_id,
            "-q", "1",
            "-t", topic,
            "-m", message,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip


def eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_device_publishes_its_telemetry_with_mosquitto_pub(local):
    # Given a registered device with its certificate and key in files
    device = local.device("sensor-stock-0201")
    topic = f"fleetkey/{device.device_id}/telemetry/temperature"

    # When it publishes with mosquitto_pub over MQTT/TLS, its thing name as client id
    published = publish(local, device, topic, '{"celsius": 21.5}')

    # Then the message reaches the rule, the device named by its topic
    assert published.returncode == 0, published.stderr
    event = local.telemetry.wait_for(lambda e: e.get("device_id") == device.device_id)
    assert event == {"celsius": 21.5, "device_id": device.device_id}


def test_mosquitto_pub_under_another_identity_or_to_another_topic_is_refused(local):
    device = local.device("sensor-stock-0202")
    other = local.device("sensor-stock-0203")
    stolen_topic = f"fleetkey/{other.device_id}/telemetry/temperature"

    # With another device's thing name as client id, the connection is refused
    refused = publish(local, replace(device, device_id=other.device_id), stolen_topic, "{}")
    assert refused.returncode != 0
    assert "not authorised" in refused.stderr

    # To another device's topic, the publish is denied and the connection closed. (The local
    # emulator's broker acknowledges the PUBLISH before its policy check, where AWS IoT sends no
    # PUBACK, so mosquitto_pub exits 0 here: the broker's count and the rule tell.)
    denied = local.emulator.statistics()["publishes"].get("denied", 0)
    publish(local, device, stolen_topic, '{"celsius": 99}')
    assert eventually(lambda: local.emulator.statistics()["publishes"].get("denied", 0) > denied)
    assert local.emulator.drain(10)
    assert not [e for e in local.telemetry.events if e.get("celsius") == 99]
