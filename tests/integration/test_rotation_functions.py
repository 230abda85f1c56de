"""Hostile input at the rotation functions as Lambda runs them: the device routes (rotation request
and commit), EST's simplereenroll, and rotation_events (presence events, the schedule). Every
refusal is a 4xx (an event: ignored), never a 5xx or an exception, and changes nothing: the
table, AWS IoT's certificates and things, and the commands sent are the same after as before.
A refused device route never says which check failed for an assertion."""

from __future__ import annotations

import base64
import copy
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from moto.iotdata.models import iotdata_backends

from fleetkey.crypto.certificates import certificate_id
from fleetkey_local.apigw import client_cert_context, proxy_event
from fleetkey_local.device import (
    client_assertion,
    csr_sha256,
    rotation_assertion,
    rotation_csr,
    rotation_request,
)
from fleetkey_local.pki import generate_key, pem
from fleetkey_local.stack import ACCOUNT, REGION, TABLE
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
DEVICE = "pump-0001"  # hostile rotation requests name it (no rotation pending: a slip is a 201)
OTHER = "pump-0002"  # another device, for its certificate and its key
ROTATING = "pump-0003"  # has a rotation pending: hostile commits and presence events name it
REQUEST_RESOURCE = "/v1/devices/{device_id}/certificates"
COMMIT_RESOURCE = "/v1/devices/{device_id}/certificates/{certificate_id}/commit"
EST_PATH = "/.well-known/est/simplereenroll"
EST_DOMAIN = "est.fleet.example.com"
INVALID_CLIENT = {"error": "invalid_client", "error_description": "client authentication failed"}


# ---- the world -----------------------------------------------------------------------------------


class Registered:
    """A registered device (ACTIVE with its factory certificate) and the CSR of a new key."""

    def __init__(self, stack, acme, device_id: str) -> None:
        self.stack = stack
        self.device_id = device_id
        self.key, self.certificate, event = stack.manufacture(acme, device_id)
        self.certificate_id = certificate_id(self.certificate)
        assert stack.register(event).accepted
        self.new_key = ec.generate_private_key(ec.SECP256R1())
        self.csr = rotation_csr(self.new_key, device_id)

    def assertion(self, csr: x509.CertificateSigningRequest | None = None, **options) -> str:
        """An assertion by the current key, bound to `csr` (default: the new key's)."""
        return rotation_assertion(
            self.key,
            self.certificate_id,
            self.device_id,
            self.stack.settings.issuer,
            csr or self.csr,
            **options,
        )

    def body(self, csr: x509.CertificateSigningRequest | None = None) -> dict[str, str]:
        return rotation_request(csr or self.csr, self.assertion(csr))


@dataclass
class World:
    stack: Any
    functions: dict[str, Any]
    pump: Registered
    other: Registered
    rotating: Registered
    pending_id: str

    def commit_assertion(self, **options) -> str:
        """An assertion by the rotating device's new key, for its pending certificate."""
        return client_assertion(
            self.rotating.new_key,
            self.pending_id,
            ROTATING,
            self.stack.settings.issuer,
            **options,
        )


def make_world(stack, functions) -> World:
    """Three registered devices; ROTATING with a rotation pending (its new key's certificate)."""
    acme = cached_ca("acme")
    stack.register_ca(acme)
    pump, other, rotating = (Registered(stack, acme, d) for d in (DEVICE, OTHER, ROTATING))
    status, answer = stack.rotation.request(ROTATING, rotating.body())
    assert status == 201
    return World(stack, functions, pump, other, rotating, answer["certificate_id"])


def load_functions() -> dict[str, Any]:
    return {name: load_handler(name) for name in ("rotation", "rotation_events")}


def environment(stack) -> dict[str, str]:
    return {"FLEETKEY_TABLE": TABLE, "FLEETKEY_IOT_DATA_ENDPOINT": DATA_ENDPOINT} | (
        stack.environment()
    )


@pytest.fixture(scope="class")
def shared():
    """One world for the refusals, which change nothing (each checks it): the stack is built
    once for all of them. Its own moto, stopped at the end of the class, before any test that
    builds a stack of its own."""
    from moto import mock_aws

    from fleetkey_local.stack import EmbeddedStack, client_factory

    with mock_aws(config={"iot": {"use_valid_cert": True}}), pytest.MonkeyPatch.context() as env:
        stack = EmbeddedStack(client_factory()).provision()
        for name, value in environment(stack).items():
            env.setenv(name, value)
        functions = load_functions()
        yield make_world(stack, functions)
        for module in functions.values():
            module.components.cache_clear()


@pytest.fixture
def world(stack, monkeypatch):
    """A world of its own, for a test that changes it."""
    for name, value in environment(stack).items():
        monkeypatch.setenv(name, value)
    functions = load_functions()
    yield make_world(stack, functions)
    for module in functions.values():
        module.components.cache_clear()


def snapshot(stack) -> dict:
    """What a request could change: every item of the table, AWS IoT's certificates (status,
    things), and the commands published."""
    pages = stack.dynamodb.get_paginator("scan").paginate(TableName=TABLE)
    items = sorted(
        (
            json.dumps(item, sort_keys=True, default=repr)
            for page in pages
            for item in page["Items"]
        ),
    )
    certificates = {}
    for page in stack.harness_iot.get_paginator("list_certificates").paginate():
        for certificate in page["certificates"]:
            arn = certificate["certificateArn"]
            things = stack.harness_iot.list_principal_things(principal=arn)["things"]
            certificates[certificate["certificateId"]] = (certificate["status"], sorted(things))
    published = list(iotdata_backends[ACCOUNT][REGION].published_payloads)
    return {"table": items, "iot": certificates, "published": published}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict:
        return json.loads(self.text)


def call(world: World, function: str, event: Any) -> Answer:
    """One invocation of `function`; an exception out of its handler (Lambda's 502) fails the
    test."""
    response = world.functions[function].handler(event, LambdaContext())
    headers = dict(response.get("headers") or {})
    headers.update({k: v[-1] for k, v in (response.get("multiValueHeaders") or {}).items()})
    return Answer(response["statusCode"], headers, response.get("body") or "")


def refused(world: World, function: str, event: Any) -> Answer:
    """`event` is refused with a 4xx and changes nothing."""
    before = snapshot(world.stack)
    answer = call(world, function, event)
    assert 400 <= answer.status < 500, (answer.status, answer.text)
    assert snapshot(world.stack) == before
    return answer


def ignored(world: World, event: Any) -> None:
    """`event` is ignored by rotation_events and changes nothing."""
    before = snapshot(world.stack)
    result = world.functions["rotation_events"].handler(event, LambdaContext())
    assert result == {"outcome": "ignored"}
    assert snapshot(world.stack) == before


# ---- events --------------------------------------------------------------------------------------


def device_event(
    resource: str,
    path: str,
    body: str | None,
    *,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    path_parameters: dict[str, str],
) -> dict:
    sent = {} if content_type is None else {"content-type": content_type}
    sent.update(headers or {})
    return proxy_event(
        "POST",
        path,
        body=body,
        headers=sent,
        resource=resource,
        path_parameters=path_parameters,
        source_ip="198.51.100.7",
    )


def request_event(body: Any, *, device_segment: str = DEVICE, raw: bool = False, **options):
    """POST /v1/devices/{device_segment}/certificates; `device_segment` as sent (encoded);
    `body` JSON-encoded unless `raw`."""
    return device_event(
        REQUEST_RESOURCE,
        f"/v1/devices/{device_segment}/certificates",
        body if raw else json.dumps(body),
        path_parameters={"device_id": unquote(device_segment)},
        **options,
    )


def commit_event(
    body: Any,
    certificate_segment: str,
    *,
    device_segment: str = ROTATING,
    raw: bool = False,
    **options,
) -> dict:
    """POST /v1/devices/{device_segment}/certificates/{certificate_segment}/commit."""
    return device_event(
        COMMIT_RESOURCE,
        f"/v1/devices/{device_segment}/certificates/{certificate_segment}/commit",
        body if raw else json.dumps(body),
        path_parameters={
            "device_id": unquote(device_segment),
            "certificate_id": unquote(certificate_segment),
        },
        **options,
    )


def est_event(
    body: str | None,
    client_cert: dict | None,
    *,
    content_type: str | None = "application/pkcs10",
) -> dict:
    headers = {"Content-Transfer-Encoding": "base64", "Host": EST_DOMAIN}
    if content_type is not None:
        headers["Content-Type"] = content_type
    return proxy_event(
        "POST",
        EST_PATH,
        body=body,
        headers=headers,
        resource=EST_PATH,
        path_parameters={},
        domain_name=EST_DOMAIN,
        client_cert=client_cert,
    )


def der(item) -> bytes:
    return item.public_bytes(serialization.Encoding.DER)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def csr_named(common_name: str, key=None) -> x509.CertificateSigningRequest:
    """A CSR whose subject CN is `common_name` as given (no length rule applied)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    with warnings.catch_warnings():
        # cryptography warns of a CN longer than X.520's bound, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        attribute = x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
        return (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([attribute]))
            .sign(key, hashes.SHA256())
        )


def csr_with(device_id: str, key=None, *, extension=None, algorithm=None):
    """A CSR for `device_id` by `key` (a new P-256 key), asking for `extension` if any."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    )
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, algorithm)


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# ---- the cases -----------------------------------------------------------------------------------
# Each builder takes the world and answers its events by name; the tests below list the names, so
# that each case is a test of its own (and can be marked on its own).


def body_cases(world: World) -> dict[str, dict]:
    """Hostile rotation requests to the pump's own path, each with an otherwise valid CSR and
    assertion wherever the case leaves room for them."""
    pump = world.pump
    good = pump.body()
    csr = good["csr"]
    assertion = good["client_assertion"]
    factory_pem = pem(pump.certificate)

    def bound(csr: x509.CertificateSigningRequest) -> dict:
        """A request for `csr`, with the pump's assertion bound to it."""
        return request_event(rotation_request(csr, pump.assertion(csr)))

    garbage_pem = (
        "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n"
    )
    return {
        "text-plain": request_event(good, content_type="text/plain"),
        "no-content-type": request_event(good, content_type=None),
        "form-urlencoded": request_event(good, content_type="application/x-www-form-urlencoded"),
        "json-suffix-lookalike": request_event(good, content_type="application/json-patch+json"),
        "charset-latin-1": request_event(good, content_type="application/json; charset=latin-1"),
        "charset-utf-16": request_event(good, content_type="application/json; charset=utf-16"),
        "not-json": request_event(f"csr={csr}&client_assertion={assertion}", raw=True),
        "empty-body": request_event("", raw=True),
        "json-array": request_event([good]),
        "json-string": request_event(json.dumps(good)),
        "json-null": request_event(None),
        "deeply-nested": request_event("[" * 10_000 + "]" * 10_000, raw=True),
        "5000-digit-number": request_event(
            '{"csr": ' + "1" * 5000 + ', "client_assertion": "x"}', raw=True
        ),
        "huge-body": request_event({**good, "client_assertion": assertion + "A" * 25 * 1024}),
        "unknown-field": request_event({**good, "nonce": "x"}),
        "missing-csr": request_event({"client_assertion": assertion}),
        "missing-assertion": request_event({"csr": csr}),
        "empty-object": request_event({}),
        "csr-number": request_event({**good, "csr": 42}),
        "csr-null": request_event({**good, "csr": None}),
        "csr-list": request_event({**good, "csr": [csr]}),
        "csr-object": request_event({**good, "csr": {"pem": csr}}),
        "assertion-number": request_event({**good, "client_assertion": 1}),
        "assertion-empty": request_event({**good, "client_assertion": ""}),
        "garbage-pem": request_event({**good, "csr": garbage_pem}),
        "not-pem": request_event({**good, "csr": "hello"}),
        "non-ascii-pem": request_event({**good, "csr": csr.replace("MI", "\u00fc", 1)}),
        "lone-surrogate-csr": request_event(
            '{"csr": "\\ud800", "client_assertion": ' + json.dumps(assertion) + "}", raw=True
        ),
        "two-csrs": request_event({**good, "csr": csr + csr}),
        "csr-and-certificate": request_event({**good, "csr": csr + factory_pem}),
        "certificate-instead-of-csr": request_event({**good, "csr": factory_pem}),
        "der-base64-instead-of-pem": request_event({**good, "csr": b64(der(pump.csr))}),
        "authorization-header": request_event(good, headers={"Authorization": "Bearer abc"}),
        "authorization-header-basic": request_event(
            good, headers={"authorization": "Basic cHVtcDpzZWNyZXQ="}
        ),
        "csr-ed25519-key": bound(csr_with(DEVICE, ed25519.Ed25519PrivateKey.generate())),
        "csr-p521-key": bound(
            csr_with(DEVICE, ec.generate_private_key(ec.SECP521R1()), algorithm=hashes.SHA512())
        ),
        "csr-rsa-1024-key": bound(
            csr_with(
                DEVICE,
                rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
                algorithm=hashes.SHA256(),
            )
        ),
        "csr-asks-for-a-san": bound(
            csr_with(
                DEVICE,
                extension=x509.SubjectAlternativeName([x509.DNSName("fleetkey.example")]),
                algorithm=hashes.SHA256(),
            )
        ),
        "csr-asks-to-be-a-ca": bound(
            csr_with(
                DEVICE,
                extension=x509.BasicConstraints(ca=True, path_length=None),
                algorithm=hashes.SHA256(),
            )
        ),
        "base64-body-not-utf8": {
            **request_event(good),
            "body": b64(b"\xff\xfe{" + b"\x80" * 16),
            "isBase64Encoded": True,
        },
    }


BODY_CASES = [
    "text-plain",
    "no-content-type",
    "form-urlencoded",
    "json-suffix-lookalike",
    "charset-latin-1",
    "charset-utf-16",
    "not-json",
    "empty-body",
    "json-array",
    "json-string",
    "json-null",
    "deeply-nested",
    "5000-digit-number",
    "huge-body",
    "unknown-field",
    "missing-csr",
    "missing-assertion",
    "empty-object",
    "csr-number",
    "csr-null",
    "csr-list",
    "csr-object",
    "assertion-number",
    "assertion-empty",
    "garbage-pem",
    "not-pem",
    "non-ascii-pem",
    "lone-surrogate-csr",
    "two-csrs",
    "csr-and-certificate",
    "certificate-instead-of-csr",
    "der-base64-instead-of-pem",
    "authorization-header",
    "authorization-header-basic",
    "csr-ed25519-key",
    "csr-p521-key",
    "csr-rsa-1024-key",
    "csr-asks-for-a-san",
    "csr-asks-to-be-a-ca",
    "base64-body-not-utf8",
]

ODD_COMMON_NAMES = {
    "nul": f"{DEVICE}\x00",
    "newline": f"{DEVICE}\nCN=admin",
    "trailing-space": f"{DEVICE} ",
    "slash-dots": f"{DEVICE}/../../x",
    "comma-rdn": f"{DEVICE},CN=admin",
    "unicode-hyphen": "pump\u20100001",
    "rtl-override": "pump-\u202e1000",
    "fullwidth": "\uff50ump-0001",
    "empty": "",
    "long-200": "p" * 200,
    "long-10000": "p" * 10_000,
}

# Device ids in the path as sent (percent-encoded, as API Gateway hands `path` over).
DEVICE_SEGMENTS = {
    "dot-dot": "..",
    "dot-dot-slash-encoded": "..%2F..%2Fpump-0001",
    "encoded-slash": "pump-0001%2Fcertificates",
    "encoded-dots": "%2E%2E",
    "double-encoded": "pump%252D0001",
    "nul": "pump-0001%00",
    "unicode-encoded": "p%C3%BCmp-0001",
    "unicode-raw": "p\u00fcmp-0001",
    "500-characters": "p" * 500,
    "space": "pump%200001",
}


def assertion_refusals(world: World) -> dict[str, dict]:
    """Rotation requests whose assertion does not authenticate, each for a CSR the path's device
    could be issued."""
    pump, other = world.pump, world.other
    issuer = world.stack.settings.issuer
    csr = pump.csr
    bound = {"csr_sha256": csr_sha256(csr)}
    stranger = generate_key()
    ghost_csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), "pump-9999")
    ghost = client_assertion(
        stranger, "ab" * 32, "pump-9999", issuer, extra_claims={"csr_sha256": csr_sha256(ghost_csr)}
    )

    def to_pump(assertion: str) -> dict:
        return request_event({"csr": csr_pem(csr), "client_assertion": assertion})

    def signed(key, kid: str, device_id: str = DEVICE, audience: str = issuer, **options) -> dict:
        return to_pump(
            client_assertion(key, kid, device_id, audience, extra_claims=bound, **options)
        )

    unsigned = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in (
            {"alg": "none", "kid": pump.certificate_id},
            {"iss": DEVICE, "sub": DEVICE, "aud": issuer, "jti": "x", **bound},
        )
    )
    return {
        "unknown-device": request_event(
            rotation_request(ghost_csr, ghost), device_segment="pump-9999"
        ),
        "unknown-device-64-characters": request_event(
            rotation_request(
                csr_named("p" * 64),
                client_assertion(
                    stranger,
                    "ef" * 32,
                    "p" * 64,
                    issuer,
                    extra_claims={"csr_sha256": csr_sha256(csr_named("p" * 64))},
                ),
            ),
            device_segment="p" * 64,
        ),
        "bad-signature": signed(stranger, pump.certificate_id),
        "wrong-kid": signed(pump.key, "cd" * 32),
        "another-devices-kid": signed(pump.key, other.certificate_id),
        "another-devices-assertion": signed(other.key, other.certificate_id, OTHER),
        "wrong-audience": signed(pump.key, pump.certificate_id, audience="https://elsewhere"),
        "expired": signed(pump.key, pump.certificate_id, now=time.time() - 3600),
        "alg-none": to_pump(unsigned + "."),
        "not-a-jwt": to_pump("not-a-jwt"),
        "three-dots-of-garbage": to_pump("a.b.c"),
        "five-parts": to_pump("a.b.c.d.e"),
        "lone-surrogate": request_event(
            '{"csr": ' + json.dumps(csr_pem(csr)) + ', "client_assertion": "\\ud800.a.b"}',
            raw=True,
        ),
    }


ASSERTION_REFUSALS = [
    "unknown-device",
    "unknown-device-64-characters",
    "bad-signature",
    "wrong-kid",
    "another-devices-kid",
    "another-devices-assertion",
    "wrong-audience",
    "expired",
    "alg-none",
    "not-a-jwt",
    "three-dots-of-garbage",
    "five-parts",
    "lone-surrogate",
]


def commit_cases(world: World) -> dict[str, tuple[dict, int, str]]:
    """Hostile commits of the rotating device's pending certificate: (event, status, error)."""
    pending_id = world.pending_id
    good = {"client_assertion": world.commit_assertion()}
    issuer = world.stack.settings.issuer
    old_key = client_assertion(world.rotating.key, pending_id, ROTATING, issuer)
    refused_client = {
        "not-hex": commit_event(good, "not-a-certificate-id"),
        "uppercase-hex": commit_event(good, pending_id.upper()),
        "63-hex": commit_event(good, pending_id[:-1]),
        "65-hex": commit_event(good, pending_id + "0"),
        "dot-dot": commit_event(good, ".."),
        "encoded-slash": commit_event(good, f"{pending_id}%2F.."),
        "another-devices-path": commit_event(good, pending_id, device_segment=OTHER),
        "signed-by-the-old-key": commit_event({"client_assertion": old_key}, pending_id),
        "not-a-jwt": commit_event({"client_assertion": "x.y.z"}, pending_id),
    }
    refused_request = {
        "text-plain": commit_event(good, pending_id, content_type="text/plain"),
        "charset-latin-1": commit_event(
            good, pending_id, content_type="application/json;charset=iso-8859-1"
        ),
        "not-json": commit_event("client_assertion=x", pending_id, raw=True),
        "json-array": commit_event([good], pending_id),
        "huge-body": commit_event({"client_assertion": "A" * 25 * 1024}, pending_id),
        "unknown-field": commit_event({**good, "csr": "x"}, pending_id),
        "missing-assertion": commit_event({}, pending_id),
        "assertion-number": commit_event({"client_assertion": 7}, pending_id),
        "authorization-header": commit_event(
            good, pending_id, headers={"Authorization": "Bearer x"}
        ),
    }
    return {
        **{name: (event, 401, "invalid_client") for name, event in refused_client.items()},
        **{name: (event, 400, "invalid_request") for name, event in refused_request.items()},
    }


COMMIT_CASES = [
    "not-hex",
    "uppercase-hex",
    "63-hex",
    "65-hex",
    "dot-dot",
    "encoded-slash",
    "another-devices-path",
    "signed-by-the-old-key",
    "not-a-jwt",
    "text-plain",
    "charset-latin-1",
    "not-json",
    "json-array",
    "huge-body",
    "unknown-field",
    "missing-assertion",
    "assertion-number",
    "authorization-header",
]


def est_cases(world: World) -> dict[str, tuple[dict, int]]:
    """Hostile EST simplereenroll requests, for the pump's CSR where the case leaves room for
    it: (event, status)."""
    pump, other = world.pump, world.other
    client = client_cert_context(der(pump.certificate))
    body = b64(der(pump.csr))
    garbage = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
    others_csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), OTHER)
    ghosts_csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), "pump-9999")
    return {
        "no-client-cert": (est_event(body, None), 401),
        "client-cert-without-pem": (
            est_event(body, {k: v for k, v in client.items() if k != "clientCertPem"}),
            401,
        ),
        "client-cert-pem-empty": (est_event(body, {**client, "clientCertPem": ""}), 401),
        "client-cert-pem-garbage": (est_event(body, {**client, "clientCertPem": garbage}), 401),
        "client-cert-pem-not-a-string": (est_event(body, {**client, "clientCertPem": 5}), 401),
        "another-devices-certificate": (
            est_event(body, client_cert_context(der(other.certificate))),
            401,
        ),
        "csr-for-another-device": (est_event(b64(der(others_csr)), client), 401),
        "csr-for-an-unknown-device": (est_event(b64(der(ghosts_csr)), client), 401),
        "body-not-base64": (est_event("this is not base64!", client), 400),
        "body-pem-not-base64-der": (est_event(csr_pem(pump.csr), client), 400),
        "body-base64-of-garbage": (est_event(b64(b"garbage" * 10), client), 400),
        "body-base64-of-a-certificate": (est_event(b64(der(pump.certificate)), client), 400),
        "body-empty": (est_event("", client), 400),
        "body-none": (est_event(None, client), 400),
        "body-huge": (est_event(b64(b"\x30" * 20 * 1024), client), 413),
        "csr-common-name-odd": (est_event(b64(der(csr_named(f"{DEVICE}\x00"))), client), 400),
        "csr-common-name-10000": (est_event(b64(der(csr_named("p" * 10_000))), client), 400),
        "csr-of-the-current-key": (
            est_event(b64(der(rotation_csr(pump.key, DEVICE))), client),
            400,
        ),
        "csr-asks-to-be-a-ca": (
            est_event(
                b64(
                    der(
                        csr_with(
                            DEVICE,
                            extension=x509.BasicConstraints(ca=True, path_length=None),
                            algorithm=hashes.SHA256(),
                        )
                    )
                ),
                client,
            ),
            400,
        ),
        "rotation-pending": (
            est_event(
                b64(der(rotation_csr(ec.generate_private_key(ec.SECP256R1()), ROTATING))),
                client_cert_context(der(world.rotating.certificate)),
            ),
            409,
        ),
        "content-type-json": (est_event(body, client, content_type="application/json"), 415),
        "content-type-none": (est_event(body, client, content_type=None), 415),
        "content-type-lookalike": (
            est_event(body, client, content_type="application/pkcs10x"),
            415,
        ),
        "content-type-pkcs7": (est_event(body, client, content_type="application/pkcs7-mime"), 415),
    }


EST_CASES = [
    "no-client-cert",
    "client-cert-without-pem",
    "client-cert-pem-empty",
    "client-cert-pem-garbage",
    "client-cert-pem-not-a-string",
    "another-devices-certificate",
    "csr-for-another-device",
    "csr-for-an-unknown-device",
    "body-not-base64",
    "body-pem-not-base64-der",
    "body-base64-of-garbage",
    "body-base64-of-a-certificate",
    "body-empty",
    "body-none",
    "body-huge",
    "csr-common-name-odd",
    "csr-common-name-10000",
    "csr-of-the-current-key",
    "csr-asks-to-be-a-ca",
    "rotation-pending",
    "content-type-json",
    "content-type-none",
    "content-type-lookalike",
    "content-type-pkcs7",
]

_MISSING = object()


def presence(world: World, **changes) -> dict:
    """The presence sample for the rotating device's pending certificate, now, with `changes`
    (`_MISSING` removes a field)."""
    event = {
        **load_event("presence-connected"),
        "clientId": ROTATING,
        "principalIdentifier": world.pending_id,
        "timestamp": int(time.time() * 1000),
    }
    for name, value in changes.items():
        if value is _MISSING:
            event.pop(name)
        else:
            event[name] = value
    return event


PRESENCE_CASES: dict[str, Callable[[World], Any]] = {
    "missing-clientId": lambda w: presence(w, clientId=_MISSING),
    "missing-timestamp": lambda w: presence(w, timestamp=_MISSING),
    "missing-eventType": lambda w: presence(w, eventType=_MISSING),
    "missing-principalIdentifier": lambda w: presence(w, principalIdentifier=_MISSING),
    "clientId-number": lambda w: presence(w, clientId=1),
    "clientId-list": lambda w: presence(w, clientId=[ROTATING]),
    "clientId-null": lambda w: presence(w, clientId=None),
    "clientId-with-slash": lambda w: presence(w, clientId=f"{ROTATING}/x"),
    "clientId-another-device": lambda w: presence(w, clientId=OTHER),
    "clientId-unknown-device": lambda w: presence(w, clientId="pump-9999"),
    "clientId-lone-surrogate": lambda w: presence(w, clientId="\ud800"),
    "timestamp-string": lambda w: presence(w, timestamp=str(int(time.time() * 1000))),
    "timestamp-float": lambda w: presence(w, timestamp=time.time() * 1000),
    "timestamp-bool": lambda w: presence(w, timestamp=True),
    "timestamp-null": lambda w: presence(w, timestamp=None),
    "principal-uppercase": lambda w: presence(w, principalIdentifier=w.pending_id.upper()),
    "principal-short": lambda w: presence(w, principalIdentifier=w.pending_id[:32]),
    "principal-long": lambda w: presence(w, principalIdentifier=w.pending_id + "00"),
    "principal-padded": lambda w: presence(w, principalIdentifier=f" {w.pending_id}"),
    "principal-number": lambda w: presence(w, principalIdentifier=int(w.pending_id, 16)),
    "principal-list": lambda w: presence(w, principalIdentifier=[w.pending_id]),
    "principal-another-devices": lambda w: presence(w, principalIdentifier=w.other.certificate_id),
    "eventType-disconnected": lambda w: presence(
        w,
        eventType="disconnected",
        clientInitiatedDisconnect=True,
        disconnectReason="CLIENT_INITIATED_DISCONNECT",
    ),
    "eventType-capitalized": lambda w: presence(w, eventType="Connected"),
    "eventType-null": lambda w: presence(w, eventType=None),
    "extra-fields-naming-the-pending-certificate": lambda w: presence(
        w,
        principalIdentifier=w.other.certificate_id,
        certificateId=w.pending_id,
        certificate_id=w.pending_id,
        device_id=ROTATING,
    ),
    "not-an-object-list": lambda w: [presence(w)],
    "not-an-object-null": lambda w: None,
    "not-an-object-string": lambda w: json.dumps(presence(w)),
    "empty-object": lambda w: {},
    "sqs-wrapped": lambda w: {"Records": [{"body": json.dumps(presence(w))}]},
}

# Changes to the schedule's sample that make it another EventBridge event.
OTHER_EVENTBRIDGE = {
    "ec2-state-change": {
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
    },
    "scheduled-event-from-a-custom-source": {"source": "fleetkey.custom"},
    "other-detail-type-from-aws-events": {"detail-type": "Custom Event"},
    "detail-type-lowercase": {"detail-type": "scheduled event"},
    "missing-source": {"source": _MISSING},
    "missing-detail-type": {"detail-type": _MISSING},
}


# ---- refusals: one world for all of them ---------------------------------------------------------


@pytest.mark.xdist_group("rotation-refusals")
class TestRefusals:
    """Every refusal changes nothing (each checks it), so they share one world."""

    def test_the_case_lists_are_complete(self, shared):
        assert sorted(body_cases(shared)) == sorted(BODY_CASES)
        assert sorted(assertion_refusals(shared)) == sorted(ASSERTION_REFUSALS)
        assert sorted(commit_cases(shared)) == sorted(COMMIT_CASES)
        assert sorted(est_cases(shared)) == sorted(EST_CASES)

    @pytest.mark.parametrize("case", BODY_CASES)
    def test_a_hostile_rotation_request_is_invalid_request(self, shared, case):
        answer = refused(shared, "rotation", body_cases(shared)[case])
        assert (answer.status, answer.json()["error"]) == (400, "invalid_request")
        assert answer.headers["Cache-Control"] == "no-store"

    @pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
    @pytest.mark.parametrize("name", sorted(ODD_COMMON_NAMES))
    def test_a_csr_whose_common_name_is_odd_is_invalid_request(self, shared, name):
        # Given a CSR whose CN is odd, and an assertion by the pump's current key bound to it
        csr = csr_named(ODD_COMMON_NAMES[name])
        body = {"csr": csr_pem(csr), "client_assertion": shared.pump.assertion(csr)}
        # When it asks for the pump's certificate, Then 400 invalid_request, nothing changed
        answer = refused(shared, "rotation", request_event(body))
        assert (answer.status, answer.json()["error"]) == (400, "invalid_request")

    @pytest.mark.parametrize("name", sorted(DEVICE_SEGMENTS))
    def test_a_hostile_device_id_in_the_path_is_invalid_client(self, shared, name):
        # Given the pump's own valid body, sent to a hostile device id
        event = request_event(shared.pump.body(), device_segment=DEVICE_SEGMENTS[name])
        answer = refused(shared, "rotation", event)
        # Then no device by that id authenticates: 401 invalid_client, as for any unknown one
        assert (answer.status, answer.json()) == (401, INVALID_CLIENT)

    @pytest.mark.parametrize("case", ASSERTION_REFUSALS)
    def test_an_assertion_that_does_not_authenticate_is_invalid_client(self, shared, case):
        answer = refused(shared, "rotation", assertion_refusals(shared)[case])
        assert (answer.status, answer.json()) == (401, INVALID_CLIENT)

    def test_a_second_rotation_while_one_is_pending_is_rotation_pending(self, shared):
        rotating = shared.rotating
        csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), ROTATING)
        event = request_event(rotating.body(csr), device_segment=ROTATING)
        answer = refused(shared, "rotation", event)
        assert (answer.status, answer.json()["error"]) == (409, "rotation_pending")

    def test_every_assertion_refusal_reads_the_same(self, shared):
        # When requests fail for an unknown device, a bad signature, a wrong kid and the rest
        answers = {
            name: refused(shared, "rotation", event)
            for name, event in assertion_refusals(shared).items()
        }
        # Then every answer is the same, byte for byte, headers included
        distinct = {(a.status, a.text, tuple(sorted(a.headers.items()))) for a in answers.values()}
        assert len(distinct) == 1, answers
        [(status, text, _)] = distinct
        assert (status, json.loads(text)) == (401, INVALID_CLIENT)

    @pytest.mark.parametrize("case", COMMIT_CASES)
    def test_a_hostile_commit_is_refused_and_the_rotation_stays_pending(self, shared, case):
        event, status, error = commit_cases(shared)[case]
        answer = refused(shared, "rotation", event)
        assert (answer.status, answer.json()["error"]) == (status, error)
        if error == "invalid_client":
            assert answer.json() == INVALID_CLIENT
        assert shared.stack.devices.get(ROTATING).pending_certificate.certificate_id == (
            shared.pending_id
        )

    def test_every_commit_invalid_client_reads_the_same(self, shared):
        answers = {
            name: refused(shared, "rotation", event)
            for name, (event, _, error) in commit_cases(shared).items()
            if error == "invalid_client"
        }
        distinct = {(a.status, a.text, tuple(sorted(a.headers.items()))) for a in answers.values()}
        assert len(distinct) == 1, answers

    def test_est_does_not_tell_an_unknown_device_from_another_devices_certificate(self, shared):
        cases = est_cases(shared)
        answers = {
            name: refused(shared, "rotation", cases[name][0])
            for name in (
                "another-devices-certificate",
                "csr-for-another-device",
                "csr-for-an-unknown-device",
            )
        }
        assert len({(a.status, a.text) for a in answers.values()}) == 1, answers

    @pytest.mark.parametrize("case", EST_CASES)
    def test_a_hostile_simplereenroll_is_refused_as_text(self, shared, case):
        event, status = est_cases(shared)[case]
        answer = refused(shared, "rotation", event)
        assert answer.status == status, answer.text
        # EST answers errors as text (RFC 7030 §4.2.3), never cached
        assert answer.headers["Content-Type"] == "text/plain"
        assert answer.headers["Cache-Control"] == "no-store"

    def test_a_client_certificate_in_a_header_does_not_stand_in_for_the_handshake(self, shared):
        # Only requestContext.identity.clientCert (the TLS handshake) counts, never a header
        flat = pem(shared.pump.certificate).replace("\n", "")
        event = est_event(b64(der(shared.pump.csr)), None)
        for name in ("X-Amzn-Mtls-Clientcert", "X-Client-Cert", "clientCertPem"):
            event["headers"][name] = flat
            event["multiValueHeaders"][name] = [flat]
        assert refused(shared, "rotation", event).status == 401

    @pytest.mark.parametrize("case", sorted(PRESENCE_CASES))
    def test_a_malformed_presence_event_is_ignored(self, shared, case):
        ignored(shared, PRESENCE_CASES[case](shared))
        assert shared.stack.devices.get(ROTATING).pending_certificate.certificate_id == (
            shared.pending_id
        )

    def test_a_connection_with_the_current_certificate_commits_nothing_whatever_it_adds(
        self, shared
    ):
        # A connection with the current certificate, whose event also names the pending one in
        # fields of its own: only principalIdentifier counts
        before = snapshot(shared.stack)
        event = presence(
            shared,
            principalIdentifier=shared.rotating.certificate_id,
            certificateId=shared.pending_id,
            certificate_id=shared.pending_id,
            device_id=ROTATING,
        )
        result = shared.functions["rotation_events"].handler(event, LambdaContext())
        assert result == {"outcome": "current"}
        assert snapshot(shared.stack) == before

    def test_a_presence_event_after_the_deadline_is_late_and_commits_nothing(self, shared):
        before = snapshot(shared.stack)
        far = int((time.time() + 30 * 86400) * 1000)
        event = presence(shared, timestamp=far)
        result = shared.functions["rotation_events"].handler(event, LambdaContext())
        assert result == {"outcome": "late"}
        assert snapshot(shared.stack) == before

    @pytest.mark.parametrize("case", sorted(OTHER_EVENTBRIDGE))
    def test_an_eventbridge_event_that_is_not_the_schedule_does_not_sweep(self, shared, case):
        # Given devices due for renewal (a sweep would publish their rotate commands)
        event = copy.deepcopy(load_event("scheduled-rotation-sweep"))
        for name, value in OTHER_EVENTBRIDGE[case].items():
            if value is _MISSING:
                event.pop(name)
            else:
                event[name] = value
        # When the event reaches rotation_events, Then it is ignored: no sweep, no command
        ignored(shared, event)


# ---- status codes and what changes ---------------------------------------------------------------


def test_the_schedule_itself_sweeps_what_the_other_events_leave(world):
    # (what the EventBridge refusals would have noticed: the schedule's own event asks the
    # devices due for renewal to rotate, the pump and the other device, not the rotating one)
    counts = world.functions["rotation_events"].handler(
        load_event("scheduled-rotation-sweep"), LambdaContext()
    )
    assert (counts["renewals_requested"], counts["failed"]) == (2, 0)
    published = iotdata_backends[ACCOUNT][REGION].published_payloads
    assert sorted(topic for topic, _ in published) == [
        f"fleetkey/{DEVICE}/commands/rotate",
        f"fleetkey/{OTHER}/commands/rotate",
    ]


def test_status_codes_of_the_device_routes(world):
    pump = world.pump
    # invalid_grant 400: the assertion names another CSR
    other_csr = rotation_csr(ec.generate_private_key(ec.SECP256R1()), DEVICE)
    mismatched = {"csr": csr_pem(pump.csr), "client_assertion": pump.assertion(other_csr)}
    answer = refused(world, "rotation", request_event(mismatched))
    assert (answer.status, answer.json()["error"]) == (400, "invalid_grant")
    # the rotation: 201; then another CSR while it is pending: 409 rotation_pending
    first = pump.body()
    created = call(world, "rotation", request_event(first))
    assert created.status == 201, created.text
    answer = refused(world, "rotation", request_event(pump.body(other_csr)))
    assert (answer.status, answer.json()["error"]) == (409, "rotation_pending")
    assert answer.headers["Cache-Control"] == "no-store"
    # the pending rotation's own CSR again (its answer was lost): 200, the same certificate
    again = call(world, "rotation", request_event(pump.body()))
    assert (again.status, again.json()) == (200, created.json())
    # the same assertion again: 400 invalid_grant (replayed), nothing changed
    replayed = refused(world, "rotation", request_event(first))
    assert (replayed.status, replayed.json()["error"]) == (400, "invalid_grant")


def test_the_commit_route_commits_after_the_refusals(world):
    # The refused commits leave the rotation to commit with the new key as usual
    for event, _, _ in commit_cases(world).values():
        assert 400 <= call(world, "rotation", event).status < 500
    good = commit_event({"client_assertion": world.commit_assertion()}, world.pending_id)
    answer = call(world, "rotation", good)
    assert answer.status == 200, answer.text
    current = world.stack.devices.get(ROTATING).current_certificate
    assert current.certificate_id == world.pending_id


def test_presence_events_pairing_a_device_with_another_ones_certificate_commit_neither(world):
    # Given the other device has a rotation pending too
    status, answer = world.stack.rotation.request(OTHER, world.other.body())
    assert status == 201
    # When the events pair each device with the other's pending certificate
    for client_id, principal in (
        (OTHER, world.pending_id),
        (ROTATING, answer["certificate_id"]),
    ):
        ignored(world, presence(world, clientId=client_id, principalIdentifier=principal))
    # Then both rotations are still pending; each commits with its own certificate
    for client_id, principal in (
        (ROTATING, world.pending_id),
        (OTHER, answer["certificate_id"]),
    ):
        event = presence(world, clientId=client_id, principalIdentifier=principal)
        result = world.functions["rotation_events"].handler(event, LambdaContext())
        assert result == {"outcome": "committed"}


def test_fields_aws_may_add_to_a_presence_event_do_not_stop_a_commit(world):
    # AWS IoT adds fields to its events over time, and the rule selects them all (SELECT *)
    event = presence(world, ipAddress="2001:db8::1", newField={"nested": [1, 2]})
    result = world.functions["rotation_events"].handler(event, LambdaContext())
    assert result == {"outcome": "committed"}
