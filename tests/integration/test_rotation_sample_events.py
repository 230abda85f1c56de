"""The canonical sample events of certificate rotation's triggers (events/): each has AWS's shape
as its function receives it, and its function, run on it (with a real CSR, assertion or client
certificate put in place of the sample's) against the local stack, does what it says.

    rotation-request              REST proxy, POST /v1/devices/{device_id}/certificates -> rotation
    rotation-commit-request       REST proxy, POST .../certificates/{certificate_id}/commit
    est-simplereenroll-request    REST proxy on a mutual-TLS custom domain (clientCert), PKCS#10
    est-cacerts-request           REST proxy, GET /.well-known/est/cacerts
    pki-ca-request                REST proxy, GET /v1/pki/ca
    pki-crl-request               REST proxy, GET /v1/pki/crl
    admin-pki-init-request        REST proxy, /v1/admin/pki/{proxy+} (IAM) -> rotation
    presence-connected            IoT rule (PRESENCE_CONNECTED_RULE_SQL) -> rotation_events
    scheduled-rotation-sweep      EventBridge schedule, rate(1 minute) -> rotation_events
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import time
from datetime import datetime, timedelta

import jwt
import pytest
from aws_lambda_powertools.utilities.parser.models import (
    APIGatewayProxyEventModel,
    EventBridgeModel,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from moto.iot.models import iot_backends
from moto.iotdata.models import iotdata_backends

from fleetkey.api.models import PkiInitRequest
from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.models import CertificateRole
from fleetkey.events import PRESENCE_CONNECTED_RULE_SQL
from fleetkey_local.api_gateway import AWS_IAM, NONE, ROUTES
from fleetkey_local.apigw import client_cert_context
from fleetkey_local.device import (
    client_assertion,
    csr_sha256,
    rotation_assertion,
    rotation_csr,
    rotation_request,
)
from fleetkey_local.stack import (
    ACCOUNT,
    LOCAL_ISSUING_CA_KEY_SPEC,
    LOCAL_ISSUING_CA_SUBJECT,
    LOCAL_ISSUING_CA_VALIDITY_DAYS,
    REGION,
    TABLE,
)
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
DEVICE = "pump-0001"  # the device every sample names
OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# The REST samples: (method, resource, function's route authorization)
REST_SAMPLES = {
    "rotation-request": ("POST", "/v1/devices/{device_id}/certificates", NONE),
    "rotation-commit-request": (
        "POST",
        "/v1/devices/{device_id}/certificates/{certificate_id}/commit",
        NONE,
    ),
    "est-simplereenroll-request": ("POST", "/.well-known/est/simplereenroll", NONE),
    "est-cacerts-request": ("GET", "/.well-known/est/cacerts", NONE),
    "pki-ca-request": ("GET", "/v1/pki/ca", NONE),
    "pki-crl-request": ("GET", "/v1/pki/crl", NONE),
    "admin-pki-init-request": ("POST", "/v1/admin/pki/{proxy+}", AWS_IAM),
}
PRESENCE_FIELDS = {
    "clientId": str,
    "timestamp": int,
    "eventType": str,
    "sessionIdentifier": str,
    "principalIdentifier": str,
    "ipAddress": str,
    "versionNumber": int,
}


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


@pytest.fixture
def functions(stack, monkeypatch):
    """The rotation functions as Lambda loads them, configured for the local stack."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    loaded = {name: load_handler(name) for name in ("rotation", "rotation_events")}
    yield loaded
    for module in loaded.values():
        module.components.cache_clear()


class Pump:
    """The samples' device, registered (ACTIVE with its factory certificate)."""

    def __init__(self, stack, acme) -> None:
        self.stack = stack
        self.key, self.certificate, event = stack.manufacture(acme, DEVICE)
        self.certificate_id = certificate_id(self.certificate)
        assert stack.register(event).accepted
        self.new_key = ec.generate_private_key(ec.SECP256R1())
        self.csr = rotation_csr(self.new_key, DEVICE)

    def rotation_body(self) -> str:
        assertion = rotation_assertion(
            self.key, self.certificate_id, DEVICE, self.stack.settings.issuer, self.csr
        )
        return json.dumps(rotation_request(self.csr, assertion))

    def record(self):
        return self.stack.devices.get(DEVICE)


@pytest.fixture
def pump(stack, acme):
    return Pump(stack, acme)


def with_body(event: dict, body: str) -> dict:
    changed = copy.deepcopy(event)
    changed["body"] = body
    return changed


def headers_of(response: dict) -> dict:
    """Powertools answers REST events with multiValueHeaders; the last value of each."""
    merged = dict(response.get("headers") or {})
    merged.update({k: v[-1] for k, v in (response.get("multiValueHeaders") or {}).items()})
    return merged


def invoke(function, event) -> tuple[int, dict, str]:
    response = function.handler(event, LambdaContext())
    return response["statusCode"], headers_of(response), response.get("body") or ""


def request_rotation(functions, pump: Pump) -> dict:
    """The rotation-request sample with the pump's CSR and assertion: the 201 answer."""
    event = with_body(load_event("rotation-request"), pump.rotation_body())
    status, _, body = invoke(functions["rotation"], event)
    assert status == 201, body
    return json.loads(body)


def assertion_parts(assertion: str) -> tuple[dict, dict]:
    return (
        jwt.get_unverified_header(assertion),
        jwt.decode(assertion, options={"verify_signature": False}),
    )


# ---- shapes --------------------------------------------------------------------------------------


def test_presence_connected_is_what_the_presence_rule_selects():
    # Given the presence rule's SQL and the sample of what it delivers
    event = load_event("presence-connected")
    rule = re.fullmatch(r"SELECT (.+) FROM '([^']+)'", PRESENCE_CONNECTED_RULE_SQL)
    assert rule is not None
    select, topic_filter = rule.groups()
    # Then the rule selects the whole event, which holds exactly AWS IoT's presence fields
    assert select == "*"
    assert list(event) == list(PRESENCE_FIELDS)
    assert all(type(event[name]) is kind for name, kind in PRESENCE_FIELDS.items())
    assert event["eventType"] == "connected"
    assert event["clientId"] == DEVICE
    # published on the client's own presence topic, which the rule's filter matches
    topic = f"$aws/events/presence/connected/{event['clientId']}"
    levels = topic_filter.split("/")
    assert len(topic.split("/")) == len(levels)
    assert all(f in ("+", t) for f, t in zip(levels, topic.split("/"), strict=True))
    # the connection's certificate is its AWS IoT id, the time in milliseconds
    assert re.fullmatch(r"[0-9a-f]{64}", event["principalIdentifier"])
    assert len(str(event["timestamp"])) == 13
    assert re.fullmatch(r"[0-9a-f]{32}", event["sessionIdentifier"])
    ipaddress.ip_address(event["ipAddress"])
    assert event["versionNumber"] >= 0


def test_scheduled_rotation_sweep_is_an_eventbridge_scheduled_event():
    # Given the sample of the one-minute schedule's event
    event = load_event("scheduled-rotation-sweep")
    # Then Powertools' EventBridge model reads it, a scheduled event of one rule
    parsed = EventBridgeModel.model_validate(event)
    assert (parsed.source, parsed.detail_type, parsed.detail) == (
        "aws.events",
        "Scheduled Event",
        {},
    )
    assert parsed.version == "0"
    [rule] = parsed.resources
    assert rule.startswith(f"arn:aws:events:{parsed.region}:{parsed.account}:rule/")
    # the same keys as the maintenance schedule's sample, and the function takes it as a schedule
    assert set(event) == set(load_event("scheduled-maintenance"))
    assert load_handler("rotation_events")._is_schedule(event)


@pytest.mark.parametrize("name", sorted(REST_SAMPLES))
def test_rest_samples_are_proxy_events_of_the_rotation_functions_routes(name):
    # Given a REST sample
    event = load_event(name)
    method, resource, authorization = REST_SAMPLES[name]
    # Then Powertools' model reads it, an event of its resource, routed to the rotation function
    parsed = APIGatewayProxyEventModel.model_validate(event)
    assert parsed.httpMethod == parsed.requestContext.httpMethod == method
    assert parsed.resource == parsed.requestContext.resourcePath == resource
    [route] = [
        r
        for r in ROUTES
        if r.resource == resource and r.method in (method, "ANY") and r.function == "rotation"
    ]
    assert route.authorization == authorization
    # the path is the resource with its parameters in place
    template = re.escape(resource)
    for variable in re.findall(r"\{(\w+)\+?\}", resource):
        template = template.replace(re.escape(f"{{{variable}}}"), f"(?P<{variable}>[^/]+)")
        template = template.replace(re.escape(f"{{{variable}+}}"), f"(?P<{variable}>.+)")
    matched = re.fullmatch(template, parsed.path)
    assert matched is not None
    assert (parsed.pathParameters or {}) == matched.groupdict()
    identity = parsed.requestContext.identity
    if authorization == AWS_IAM:
        assert identity.userArn == OPERATOR
        assert identity.accountId == parsed.requestContext.accountId
    else:
        # not IAM-authenticated: a device (or anyone) on a public route
        assert identity.userArn is None and identity.accessKey is None
    if identity.clientCert is None:
        # the execute-api endpoint: the stage in front of the path
        assert parsed.requestContext.domainName.endswith(".execute-api.eu-west-1.amazonaws.com")
        assert parsed.requestContext.path == f"/{parsed.requestContext.stage}{parsed.path}"
    else:
        # a custom domain (mutual TLS) mapping the API at its root: no stage in the path
        assert not parsed.requestContext.domainName.endswith(".amazonaws.com")
        assert parsed.requestContext.path == parsed.path
    assert parsed.isBase64Encoded is False
    assert (parsed.body is None) == (method == "GET")


def test_rotation_request_holds_a_csr_and_an_assertion_bound_to_it():
    event = load_event("rotation-request")
    assert event["headers"]["content-type"] == "application/json"
    body = json.loads(event["body"])
    # Then the body is the two fields the service takes
    assert list(body) == ["csr", "client_assertion"]
    # the CSR: one PEM PKCS#10 for the device, signed by its new key, asking for nothing else
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert body["csr"].count("-----BEGIN ") == 1
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={DEVICE}"
    assert list(csr.extensions) == []
    # the assertion: a /v1/token client assertion by the current certificate, naming the CSR
    header, claims = assertion_parts(body["client_assertion"])
    assert header["alg"] == "ES256" and re.fullmatch(r"[0-9a-f]{64}", header["kid"])
    assert header["typ"] == "client-authentication+jwt"
    assert claims["iss"] == claims["sub"] == DEVICE
    assert {"aud", "jti", "iat", "exp"} <= set(claims)
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["csr_sha256"] == csr_sha256(csr)


def test_rotation_commit_request_is_proven_by_the_new_certificate():
    event = load_event("rotation-commit-request")
    body = json.loads(event["body"])
    assert list(body) == ["client_assertion"]
    header, claims = assertion_parts(body["client_assertion"])
    # Then the assertion's kid is the certificate the path commits, without csr_sha256
    assert header["kid"] == event["pathParameters"]["certificate_id"]
    assert re.fullmatch(r"[0-9a-f]{64}", header["kid"])
    assert claims["iss"] == claims["sub"] == event["pathParameters"]["device_id"] == DEVICE
    assert "csr_sha256" not in claims
    assert 0 < claims["exp"] - claims["iat"] <= 300


def test_est_simplereenroll_carries_the_client_certificate_and_a_base64_pkcs10():
    event = load_event("est-simplereenroll-request")
    parsed = APIGatewayProxyEventModel.model_validate(event)
    # Then the client certificate is as API Gateway describes the TLS handshake's: every text
    # field agrees with the PEM
    cert = parsed.requestContext.identity.clientCert
    der = x509.load_pem_x509_certificate(cert.clientCertPem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert event["requestContext"]["identity"]["clientCert"] == client_cert_context(der)
    assert "CN=pump-0001" in cert.subjectDN.split(",")
    # and the body is base64 text of a DER PKCS#10 (RFC 8951), sent as such (not binary)
    assert parsed.headers["Content-Type"] == "application/pkcs10"
    csr = x509.load_der_x509_csr(base64.b64decode(event["body"], validate=True))
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={DEVICE}"


@pytest.mark.parametrize(
    "name,accept",
    [
        ("est-cacerts-request", "*/*"),
        ("pki-crl-request", "application/pkix-crl"),
        ("pki-ca-request", "application/pem-certificate-chain"),
    ],
)
def test_the_public_pki_samples_are_anonymous_gets(name, accept):
    parsed = APIGatewayProxyEventModel.model_validate(load_event(name))
    assert parsed.httpMethod == "GET" and parsed.body is None
    assert parsed.headers["Accept"] == accept
    assert parsed.pathParameters is None and parsed.queryStringParameters is None


def test_admin_pki_init_body_is_what_its_model_accepts():
    event = load_event("admin-pki-init-request")
    assert event["headers"]["content-type"] == "application/json"
    request = PkiInitRequest.model_validate_json(event["body"])
    # the API's defaults, spelled out
    assert request == PkiInitRequest()
    assert set(json.loads(event["body"])) == {"key_spec", "subject", "validity_days"}


# ---- the functions on the samples ----------------------------------------------------------------


def test_rotation_request_sample_issues_the_device_a_certificate(stack, pump, functions):
    before = pump.record()
    # When the sample, whose assertion's signature is a placeholder, reaches the function
    status, _, body = invoke(functions["rotation"], load_event("rotation-request"))
    # Then the route is found and the assertion refused like any that does not authenticate
    assert (status, json.loads(body)["error"]) == (401, "invalid_client")
    assert pump.record() == before

    # When the same event carries a CSR of the device's new key and its assertion
    answer = request_rotation(functions, pump)
    # Then 201: a certificate for the new key, chaining to the issuing CA, pending beside the
    # current one in the table and ACTIVE in AWS IoT
    issued = x509.load_pem_x509_certificate(answer["certificate_pem"].encode())
    assert issued.public_key() == pump.new_key.public_key()
    assert issued.subject.rfc4514_string() == f"CN={DEVICE}"
    assert answer["certificate_id"] == certificate_id(issued)
    assert answer["serial_number"] == format(issued.serial_number, "x")
    chain = x509.load_pem_x509_certificates(answer["ca_chain_pem"].encode())
    issued.verify_directly_issued_by(chain[0])
    assert answer["ca_chain_pem"] == stack.pki.chain_pem()
    assert {"not_before", "not_after", "commit_deadline"} <= set(answer)
    held = pump.record().holds(answer["certificate_id"])
    assert held.role is CertificateRole.PENDING
    assert stack.certificate_status(answer["certificate_id"]) == "ACTIVE"
    assert stack.certificate_status(pump.certificate_id) == "ACTIVE"


def test_rotation_request_sample_answers_never_cached(stack, pump, functions):
    event = with_body(load_event("rotation-request"), pump.rotation_body())
    status, headers, _ = invoke(functions["rotation"], event)
    assert status == 201
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"


def test_rotation_commit_sample_commits_with_the_new_key(stack, pump, functions):
    answer = request_rotation(functions, pump)
    new_id = answer["certificate_id"]
    # When the commit sample names the new certificate and carries an assertion by the new key
    event = copy.deepcopy(load_event("rotation-commit-request"))
    old_id = event["pathParameters"]["certificate_id"]
    event["path"] = event["path"].replace(old_id, new_id)
    event["requestContext"]["path"] = event["requestContext"]["path"].replace(old_id, new_id)
    event["pathParameters"]["certificate_id"] = new_id
    event["body"] = json.dumps(
        {"client_assertion": client_assertion(pump.new_key, new_id, DEVICE, stack.settings.issuer)}
    )
    status, headers, body = invoke(functions["rotation"], event)
    # Then 200: committed; the new certificate current, the factory one retired and INACTIVE
    assert status == 200, body
    committed = json.loads(body)
    assert (committed["device_id"], committed["certificate_id"], committed["committed"]) == (
        DEVICE,
        new_id,
        True,
    )
    assert headers["Cache-Control"] == "no-store"
    record = pump.record()
    assert record.current_certificate.certificate_id == new_id
    assert [c.certificate_id for c in record.retired_certificates] == [pump.certificate_id]
    assert stack.certificate_status(pump.certificate_id) == "INACTIVE"


def test_presence_connected_sample_commits_the_pending_rotation(stack, pump, functions):
    answer = request_rotation(functions, pump)
    # When AWS IoT reports the device connected with its new certificate (the sample, its
    # certificate and time the rotation's)
    event = {
        **load_event("presence-connected"),
        "principalIdentifier": answer["certificate_id"],
        "timestamp": int(time.time() * 1000),
    }
    result = functions["rotation_events"].handler(event, LambdaContext())
    # Then the rotation is committed
    assert result == {"outcome": "committed"}
    record = pump.record()
    assert record.current_certificate.certificate_id == answer["certificate_id"]
    assert record.pending_certificate is None
    assert stack.certificate_status(pump.certificate_id) == "INACTIVE"
    # and the same event again (AWS delivers at least once) changes nothing
    again = functions["rotation_events"].handler(event, LambdaContext())
    assert again == {"outcome": "current"}
    assert pump.record() == record


def test_presence_connected_sample_as_is_names_no_known_certificate(stack, pump, functions):
    before = pump.record()
    result = functions["rotation_events"].handler(load_event("presence-connected"), LambdaContext())
    assert result == {"outcome": "ignored"}
    assert pump.record() == before


def test_scheduled_rotation_sweep_sample_sweeps_and_answers_its_counts(stack, pump, functions):
    # When the schedule's event reaches rotation_events (the device's factory certificate is due
    # for renewal at once under its profile)
    counts = functions["rotation_events"].handler(
        load_event("scheduled-rotation-sweep"), LambdaContext()
    )
    # Then the sweep's counts: the device asked to renew, nothing failed, nothing overdue
    assert set(counts) == {
        "due",
        "rolled_back",
        "deleted",
        "renewals_requested",
        "failed",
        "crl_published",
        "overdue",
    }
    assert all(type(value) is int and value >= 0 for value in counts.values())
    assert (counts["due"], counts["renewals_requested"], counts["failed"]) == (1, 1, 0)
    assert counts["overdue"] == 0
    assert pump.record().current_certificate.renewal_requested_at is not None
    [(topic, payload)] = iotdata_backends[ACCOUNT][REGION].published_payloads
    assert topic == f"fleetkey/{DEVICE}/commands/rotate"
    assert json.loads(payload) == {
        "reason": "renewal",
        "certificate_id": pump.certificate_id,
        "not_after": pump.record().current_certificate.not_after,
    }
    # and a second run a moment later asks nobody again
    again = functions["rotation_events"].handler(
        load_event("scheduled-rotation-sweep"), LambdaContext()
    )
    assert (again["renewals_requested"], again["failed"]) == (0, 0)


def test_est_simplereenroll_sample_answers_a_pkcs7_the_pkcs7_loader_reads(stack, pump, functions):
    # When the sample arrives as is (its client certificate is not the device's)
    status, headers, body = invoke(functions["rotation"], load_event("est-simplereenroll-request"))
    # Then 401, as text (RFC 7030 §4.2.3)
    assert status == 401 and headers["Content-Type"] == "text/plain"

    # When it carries the device's current certificate and a CSR of its new key
    event = copy.deepcopy(load_event("est-simplereenroll-request"))
    event["requestContext"]["identity"]["clientCert"] = client_cert_context(
        pump.certificate.public_bytes(serialization.Encoding.DER)
    )
    event["body"] = base64.b64encode(pump.csr.public_bytes(serialization.Encoding.DER)).decode()
    status, headers, body = invoke(functions["rotation"], event)
    # Then 200: base64 text of a DER PKCS#7 certs-only holding the new certificate
    assert status == 200, body
    assert headers["Content-Type"] == PKCS7_CERTS_ONLY
    assert headers["Content-Transfer-Encoding"] == "base64"
    assert headers["Cache-Control"] == "no-store"
    [issued] = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body, validate=True))
    assert issued.public_key() == pump.new_key.public_key()
    assert pump.record().pending_certificate.certificate_id == certificate_id(issued)


def test_est_cacerts_sample_answers_the_chain_as_base64_pkcs7(stack, functions):
    response = functions["rotation"].handler(load_event("est-cacerts-request"), LambdaContext())
    headers = headers_of(response)
    assert response["statusCode"] == 200
    # the body is base64 text (RFC 8951), not an API Gateway binary answer
    assert not response.get("isBase64Encoded")
    assert headers["Content-Type"] == PKCS7_CERTS_ONLY
    assert headers["Content-Transfer-Encoding"] == "base64"
    certificates = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response["body"]))
    assert certificates == x509.load_pem_x509_certificates(stack.pki.chain_pem().encode())


def test_pki_crl_sample_answers_the_der_crl_binary(stack, functions):
    response = functions["rotation"].handler(load_event("pki-crl-request"), LambdaContext())
    headers = headers_of(response)
    assert response["statusCode"] == 200
    # a binary answer: API Gateway decodes it for application/pkix-crl (binaryMediaTypes)
    assert response["isBase64Encoded"] is True
    assert headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(base64.b64decode(response["body"], validate=True))
    ca = x509.load_pem_x509_certificates(stack.pki.chain_pem().encode())[0]
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())
    assert len(crl) == 0


def test_pki_ca_sample_answers_the_pem_chain(stack, functions):
    response = functions["rotation"].handler(load_event("pki-ca-request"), LambdaContext())
    headers = headers_of(response)
    assert response["statusCode"] == 200
    assert headers["Content-Type"] == "application/pem-certificate-chain"
    assert not response.get("isBase64Encoded")
    chain = x509.load_pem_x509_certificates(response["body"].encode())
    assert chain[0].subject.rfc4514_string() == LOCAL_ISSUING_CA_SUBJECT
    assert response["body"] == stack.pki.chain_pem()
    assert (
        chain[0].public_bytes(serialization.Encoding.PEM).decode()
        == (stack.issuing_ca["certificate_pem"])
    )


def _ca_resources(stack) -> tuple[int, list[str], list[dict]]:
    """What a CA set-up makes: KMS keys, AWS IoT CAs, and the table's items (records, audit)."""
    keys = stack.kms.list_keys()["Keys"]
    # moto has no ListCACertificates: its backend's CAs
    cas = iot_backends[ACCOUNT][REGION].ca_certificates
    items = stack.dynamodb.get_paginator("scan").paginate(TableName=TABLE)
    table = sorted(
        (item for page in items for item in page["Items"]),
        key=lambda item: json.dumps(item, sort_keys=True, default=repr),
    )
    return len(keys), sorted(cas), table


def init_event(**body) -> dict:
    return with_body(load_event("admin-pki-init-request"), json.dumps(body))


def test_admin_pki_init_sample_conflicts_with_the_local_stacks_ca(stack, functions):
    before = _ca_resources(stack)
    # When the operator's sample (the API's defaults) reaches a stack whose CA has another subject
    status, _, body = invoke(functions["rotation"], load_event("admin-pki-init-request"))
    # Then 409: another CA exists; no key and no AWS IoT CA made
    assert status == 409, body
    assert json.loads(body)["error"] == "conflict"
    assert _ca_resources(stack) == before


def test_admin_pki_init_sample_with_the_stacks_parameters_answers_the_same_ca(stack, functions):
    before = _ca_resources(stack)
    event = init_event(
        key_spec=LOCAL_ISSUING_CA_KEY_SPEC,
        subject=LOCAL_ISSUING_CA_SUBJECT,
        validity_days=LOCAL_ISSUING_CA_VALIDITY_DAYS,
    )
    # When the sample is run again with the parameters the stack's CA was made with
    status, _, body = invoke(functions["rotation"], event)
    # Then the CA as it is (idempotent): same key, same certificate, nothing new made
    assert status == 201, body
    view = json.loads(body)
    assert view["status"] == "active"
    for name in ("key_id", "key_spec", "subject", "certificate_pem", "iot_ca_id"):
        assert view[name] == stack.issuing_ca[name], name
    assert _ca_resources(stack) == before


def test_admin_pki_init_with_another_validity_is_a_conflict(stack, functions):
    before = _ca_resources(stack)
    event = init_event(
        key_spec=LOCAL_ISSUING_CA_KEY_SPEC, subject=LOCAL_ISSUING_CA_SUBJECT, validity_days=365
    )
    status, _, body = invoke(functions["rotation"], event)
    assert _ca_resources(stack) == before
    assert status == 409, body


@pytest.mark.parametrize(
    "body",
    [
        {"key_spec": "ECC_NIST_P384", "subject": LOCAL_ISSUING_CA_SUBJECT},
        {"key_spec": LOCAL_ISSUING_CA_KEY_SPEC, "subject": "CN=another issuing CA"},
    ],
    ids=["other-key-spec", "other-subject"],
)
def test_admin_pki_init_with_other_parameters_is_a_conflict(stack, functions, body):
    before = _ca_resources(stack)
    status, _, answer = invoke(functions["rotation"], init_event(**body))
    assert status == 409, answer
    assert _ca_resources(stack) == before
    # the answer names the CA that exists, so the operator sees why
    assert json.loads(answer)["details"] == {
        "key_spec": LOCAL_ISSUING_CA_KEY_SPEC,
        "subject": LOCAL_ISSUING_CA_SUBJECT,
    }


def test_the_scheduled_sweep_rolls_back_and_takes_the_certificate_out_of_aws_iot(
    stack, pump, functions
):
    # Given a rotation requested through the function and never committed, and the schedule's
    # event arriving after its deadline (the function's clock moved past it)
    answer = request_rotation(functions, pump)
    late = datetime.fromisoformat(answer["commit_deadline"]) + timedelta(minutes=1)
    services = functions["rotation_events"].components()
    services.rotation._clock = services.pki._clock = lambda: late
    # When the sweep runs through rotation_events
    counts = functions["rotation_events"].handler(
        load_event("scheduled-rotation-sweep"), LambdaContext()
    )
    # Then the rotation is rolled back: the new certificate revoked in a published CRL,
    # detached and deleted from AWS IoT; the factory certificate stays current
    assert (counts["rolled_back"], counts["deleted"], counts["crl_published"]) == (1, 1, 1)
    with pytest.raises(stack.harness_iot.exceptions.ResourceNotFoundException):
        stack.harness_iot.describe_certificate(certificateId=answer["certificate_id"])
    record = pump.record()
    assert record.current_certificate.certificate_id == pump.certificate_id
    assert record.pending_certificate is None and record.retired_certificates == ()
    crl = x509.load_der_x509_crl(stack.components.pki.crl_der())
    assert int(answer["serial_number"], 16) in {entry.serial_number for entry in crl}
