"""The local stack's parts of certificate rotation, over real sockets: the rotation routes and
their precedence, binary media types as API Gateway applies them (the DER CRL), the API over
mutual TLS as a custom domain with client certificates delivers them to the function (EST), its
truststore (AWS IoT's registered CAs, read again when they change, plus extra anchors), the
issuing CA's public routes served by the real rotation function, and the sweep's schedule."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey_local.api_gateway import (
    BINARY_MEDIA_TYPES,
    ROUTES,
    LocalApiGateway,
    MutualTlsDomain,
)
from fleetkey_local.iot_core import TrustStore, ensure_endpoint_pki, registry_backend
from fleetkey_local.pki import CertificateAuthority, key_pem, pem
from fleetkey_local.serve import (
    EST_SERVER_FILES,
    RateSchedule,
    est_truststore,
    scheduled_event,
)
from fleetkey_local.server import local_aws
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory
from tests.conftest import load_event
from tests.support.pki_cache import ca as cached_ca

pytestmark = pytest.mark.xdist_group("pki-endpoints")

TIMEOUT = 30


class Function:
    """A function double: records its events, answers as told (default 200 `{}`)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.answers: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict, context) -> dict:
        with self._lock:
            self.events.append(event)
            return self.answers.pop(0) if self.answers else {"statusCode": 200, "body": "{}"}


class World:
    def __init__(self, stack: EmbeddedStack, tmp: Path, rotation: Function) -> None:
        self.stack = stack
        self.tmp = tmp
        self.rotation = rotation
        self.real: LocalApiGateway | None = None
        self.doubled: LocalApiGateway | None = None
        self.mtls: MutualTlsDomain | None = None
        self.truststore: TrustStore | None = None
        self.factory = cached_ca("est-factory")
        self.endpoint_ca = tmp / "iot-endpoint-ca.pem"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """moto with fleetkey's resources (and the issuing CA); the API with the real functions; the
    API with a rotation double, also over mutual TLS under the EST truststore."""
    tmp = tmp_path_factory.mktemp("pki-endpoints")
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        world = World(stack, tmp, Function())
        stack.register_ca(world.factory)
        doubles = {route.function: Function() for route in ROUTES}
        doubles["rotation"] = world.rotation
        with (
            LocalApiGateway(0) as real,
            LocalApiGateway(0, functions=doubles) as doubled,
        ):
            world.real, world.doubled = real, doubled
            world.truststore = est_truststore(stack, tmp, "127.0.0.1")
            with MutualTlsDomain(doubled, world.truststore.context, port=0) as mtls:
                world.mtls = mtls
                yield world


def device_files(
    world: World, authority: CertificateAuthority, device_id: str
) -> tuple[Path, Path]:
    key, certificate = authority.issue_device(device_id, serial_number=f"SN-{device_id}")
    certfile, keyfile = world.tmp / f"{device_id}.pem", world.tmp / f"{device_id}.key"
    certfile.write_text(pem(certificate))
    keyfile.write_text(key_pem(key))
    return certfile, keyfile


def https(world: World, method: str, path: str, cert: tuple[Path, Path] | None = None, **kw):
    """A request to the world's mutual-TLS domain (the client certificate, if any, from
    `cert`); the response's status, headers and body."""
    return https_to(world.mtls, world.endpoint_ca, method, path, cert, **kw)


def https_to(
    domain: MutualTlsDomain,
    endpoint_ca: Path,
    method: str,
    path: str,
    cert: tuple[Path, Path] | None = None,
    **kw,
):
    context = ssl.create_default_context(cafile=str(endpoint_ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    host, port = domain.url.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=TIMEOUT)
    try:
        connection.request(method, path, **kw)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def http_request(url: str, method: str, path: str, headers=None, body=None):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


# ---- routes ------------------------------------------------------------------------------------


def test_the_rotation_routes_go_to_the_rotation_function(world):
    api = world.doubled
    for method, path, params in (
        ("POST", "/v1/devices/pump-1/certificates", {"device_id": "pump-1"}),
        (
            "POST",
            "/v1/devices/pump-1/certificates/abc/commit",
            {"device_id": "pump-1", "certificate_id": "abc"},
        ),
        ("GET", "/v1/pki/ca", {}),
        ("GET", "/v1/pki/crl", {}),
        ("GET", "/.well-known/est/cacerts", {}),
        ("POST", "/.well-known/est/simplereenroll", {}),
        ("POST", "/v1/admin/pki/init", {"proxy": "init"}),
        ("GET", "/v1/admin/pki", {}),
    ):
        route, got = api.resolve(method, path)
        assert (route.function, got) == ("rotation", params), path
    # The operators' PKI routes win over the admin function's greedy resource (more specific),
    # which keeps everything else under /v1/admin/, rotation status included
    assert api.resolve("GET", "/v1/admin/pki/ca")[0].authorization == "AWS_IAM"
    assert api.resolve("GET", "/v1/admin/devices/pump-1/rotation")[0].function == "admin"
    assert api.resolve("GET", "/v1/admin/pkix/x")[0].function == "admin"


# ---- binary media types ------------------------------------------------------------------------


def test_a_base64_result_is_bytes_for_a_client_accepting_a_binary_type_else_base64_text(world):
    der = bytes(range(256))
    answer = {
        "statusCode": 200,
        "headers": {"Content-Type": "application/pkix-crl"},
        "body": base64.b64encode(der).decode(),
        "isBase64Encoded": True,
    }
    assert "application/pkix-crl" in BINARY_MEDIA_TYPES
    outcomes = {}
    for accept in ("application/pkix-crl", "application/pkix-crl;q=1, */*", "*/*", None):
        world.rotation.answers.append(dict(answer))
        headers = {"Accept": accept} if accept else {}
        status, _, body = http_request(world.doubled.url, "GET", "/v1/pki/crl", headers)
        assert status == 200
        outcomes[accept] = body
    # API Gateway decodes for the first Accept media type when it is a binary media type...
    assert outcomes["application/pkix-crl"] == der
    assert outcomes["application/pkix-crl;q=1, */*"] == der
    # ...and sends the base64 text otherwise (curl's default */* included)
    assert outcomes["*/*"] == answer["body"].encode()
    # Without an Accept header the local gateway decodes
    assert outcomes[None] == der


def test_a_request_body_of_a_binary_media_type_reaches_the_function_base64(world):
    # Given a UTF-8 body sent as a binary media type, and a PKCS#10 body (base64 text, not binary)
    http_request(
        world.doubled.url,
        "POST",
        "/.well-known/est/simplereenroll",
        {"Content-Type": "application/pkix-crl"},
        b"text",
    )
    binary = world.rotation.events[-1]
    http_request(
        world.doubled.url,
        "POST",
        "/.well-known/est/simplereenroll",
        {"Content-Type": "application/pkcs10"},
        b"MIIB",
    )
    text = world.rotation.events[-1]
    # Then the first is base64 in the event, the second text, as API Gateway delivers them
    assert binary["isBase64Encoded"] is True and base64.b64decode(binary["body"]) == b"text"
    assert text["isBase64Encoded"] is False and text["body"] == "MIIB"


# ---- mutual TLS ----------------------------------------------------------------------------------


def test_the_client_certificate_reaches_the_function_as_api_gateway_puts_it(world):
    # Given a device certificate of a registered manufacturer CA
    cert = device_files(world, world.factory, "est-shape-1")
    # When it calls EST over mutual TLS
    status, _, _ = https(
        world,
        "POST",
        "/.well-known/est/simplereenroll",
        cert,
        body=b"MIIB",
        headers={"Content-Type": "application/pkcs10"},
    )
    # Then the function got the REST proxy event with the certificate in the identity
    assert status == 200
    event = world.rotation.events[-1]
    assert event["resource"] == "/.well-known/est/simplereenroll" and event["body"] == "MIIB"
    client = event["requestContext"]["identity"]["clientCert"]
    certificate = x509.load_pem_x509_certificate(cert[0].read_bytes())
    assert client["clientCertPem"] == certificate.public_bytes(serialization.Encoding.PEM).decode()
    assert client["subjectDN"] == "CN=est-shape-1,2.5.4.5=SN-est-shape-1"
    assert client["issuerDN"] == "O=est-factory manufacturing,CN=est-factory device CA"
    assert client["serialNumber"] == str(certificate.serial_number)
    not_after = certificate.not_valid_after_utc
    assert client["validity"]["notAfter"] == (
        f"{not_after:%b} {not_after.day:2d} {not_after:%H:%M:%S %Y} GMT"
    )
    assert set(client["validity"]) == {"notBefore", "notAfter"}
    # as the canonical sample event has it
    sample = load_event("est-simplereenroll-request")["requestContext"]["identity"]["clientCert"]
    assert set(client) == set(sample)


def test_without_a_client_certificate_the_request_is_served_without_one(world):
    # When EST's cacerts is fetched anonymously (RFC 7030 allows it)
    status, _, _ = https(world, "GET", "/.well-known/est/cacerts")
    # Then it is served, and the event has no client certificate
    assert status == 200
    assert "clientCert" not in world.rotation.events[-1]["requestContext"]["identity"]


def test_an_untrusted_client_certificate_ends_the_connection_in_the_handshake(world):
    # Given a certificate of a CA nobody registered
    stranger = device_files(world, cached_ca("unregistered-factory"), "est-stranger")
    calls = len(world.rotation.events)
    before = world.mtls.refusals.get("untrusted_certificate", 0)
    # When it is presented, Then the handshake fails and no function runs
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(world, "GET", "/.well-known/est/cacerts", stranger)
    assert len(world.rotation.events) == calls
    deadline = time.monotonic() + 5
    while world.mtls.refusals.get("untrusted_certificate", 0) == before:
        assert time.monotonic() < deadline, world.mtls.refusals
        time.sleep(0.02)


def test_a_ca_registered_after_start_is_trusted_on_the_next_connection(world):
    # Given a manufacturer CA registered now, after the listener started
    late = CertificateAuthority.create("late-factory")
    cert = device_files(world, late, "est-late-1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(world, "GET", "/.well-known/est/cacerts", cert)
    world.stack.register_ca(late)
    # When its device connects, Then the truststore has it
    status, _, _ = https(world, "GET", "/.well-known/est/cacerts", cert)
    assert status == 200
    assert world.rotation.events[-1]["requestContext"]["identity"]["clientCert"]


def test_the_truststore_takes_extra_anchors_as_they_change(world):
    # Given a truststore with an extra anchor that AWS IoT does not know (as the issuing CA's
    # root is, for a CA installed under a customer's root)
    outside = CertificateAuthority.create("outside-root")
    anchors: list[str] = []
    _, certfile, keyfile = ensure_endpoint_pki(world.tmp / "extra", ["127.0.0.1"], EST_SERVER_FILES)
    store = TrustStore(
        lambda: registry_backend(ACCOUNT, REGION),
        certfile,
        keyfile,
        extra_anchors=lambda: tuple(anchors),
        verify_mode=ssl.CERT_OPTIONAL,
    )
    cert = device_files(world, outside, "est-outside-1")
    endpoint_ca = world.tmp / "extra" / "iot-endpoint-ca.pem"
    with MutualTlsDomain(world.doubled, store.context, port=0) as domain:
        # When its certificate is presented before and after the anchor is added
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_to(domain, endpoint_ca, "GET", "/.well-known/est/cacerts", cert)
        anchors.append(outside.pem)
        status, _, _ = https_to(domain, endpoint_ca, "GET", "/.well-known/est/cacerts", cert)
    # Then it is refused, then trusted
    assert status == 200


def test_the_issuing_ca_is_an_anchor_of_the_est_truststore(world):
    # Given the local stack's issuing CA (set up at provisioning)
    chain = world.stack.pki.chain_pem()
    # Then the EST truststore trusts it, for devices re-enrolling with issued certificates
    context = world.truststore.context()
    issuing = x509.load_pem_x509_certificate(chain.encode())
    trusted = [x509.load_der_x509_certificate(der) for der in _ca_ders(context)]
    assert issuing in trusted


def _ca_ders(context: ssl.SSLContext) -> list[bytes]:
    return list(context.get_ca_certs(binary_form=True))


# ---- the real rotation function's public routes --------------------------------------------------


def test_the_issuing_ca_chain_is_served_as_pem(world):
    status, headers, body = http_request(world.real.url, "GET", "/v1/pki/ca")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/pem-certificate-chain")
    served = x509.load_pem_x509_certificates(body)
    assert served[0] == x509.load_pem_x509_certificate(world.stack.pki.chain_pem().encode())


def test_the_crl_is_der_for_a_client_that_accepts_it(world):
    status, headers, body = http_request(
        world.real.url, "GET", "/v1/pki/crl", {"Accept": "application/pkix-crl"}
    )
    assert status == 200, body
    assert headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(body)
    issuing = x509.load_pem_x509_certificate(world.stack.pki.chain_pem().encode())
    assert crl.issuer == issuing.subject and crl.is_signature_valid(issuing.public_key())


# ---- the sweep's schedule --------------------------------------------------------------------


def test_the_schedule_sends_eventbridges_scheduled_event_until_stopped():
    # Given a schedule every 0.1 s with a recording function
    seen: list[dict] = []
    schedule = RateSchedule("sweep", lambda event, context: seen.append(event), 0.1)
    schedule.start()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    schedule.stop()
    runs = len(seen)
    time.sleep(0.3)
    # Then each run got the scheduled event of its rule, and none came after stop
    assert runs >= 2 and len(seen) == runs
    event = seen[0]
    assert event["source"] == "aws.events" and event["detail-type"] == "Scheduled Event"
    assert event["resources"] == [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/sweep"]
    assert (event["account"], event["region"], event["detail"]) == (ACCOUNT, REGION, {})
    assert set(event) == set(scheduled_event("arn:aws:events:x"))
    assert seen[0]["id"] != seen[1]["id"]


def test_a_failed_scheduled_run_is_counted_and_the_next_runs():
    calls = []

    def failing(event, context):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("AWS busy")
        return {"done": True}

    schedule = RateSchedule("sweep", failing, 60).start()
    try:
        assert schedule.invoke() is None and schedule.failures == 1
        assert schedule.invoke() == {"done": True} and schedule.runs == 2
    finally:
        schedule.stop()


def test_the_sweep_schedule_runs_the_real_rotation_events_function(world):
    # Given the schedule `make serve` runs, on the real function
    schedule = RateSchedule("fleetkey-local-rotation-sweep", "rotation_events", 60).start()
    try:
        # When it fires, Then the sweep ran (its counts come back)
        result = schedule.invoke()
    finally:
        schedule.stop()
    assert schedule.failures == 0, result
    assert isinstance(result, dict), result
    assert json.dumps(result)
