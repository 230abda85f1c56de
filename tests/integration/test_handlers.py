"""The functions as Lambda runs them: sample events in, responses and side effects out."""

from __future__ import annotations

import json

import pytest
from botocore.exceptions import ClientError

from fleetkey.domain.allowlist import AllowlistEntry
from fleetkey_local.apigw import proxy_event
from fleetkey_local.pki import pem
from fleetkey_local.stack import TABLE
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"


@pytest.fixture
def functions(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    registration = load_handler("registration")
    admin = load_handler("admin")
    yield registration, admin
    registration.service.cache_clear()
    admin.services.cache_clear()


def call_admin(admin, method, path, body=None, headers=None, caller=OPERATOR):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    response = admin.handler(
        proxy_event(method, path, body=body, headers=headers or {}, caller_arn=caller),
        LambdaContext(),
    )
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def test_sample_event_has_the_documented_shape():
    from fleetkey.events import CertificateRegisteredEvent

    # Given / When the canonical sample event is parsed by the model the handler uses
    event = CertificateRegisteredEvent.model_validate(load_event("certificate-registered"))
    # Then it is the PENDING_ACTIVATION notification
    assert event.certificateStatus == "PENDING_ACTIVATION"


def test_registration_handler_accepts_a_device(stack, functions):
    registration, _admin = functions
    acme = cached_ca("acme")
    stack.register_ca(acme)
    stack.allowlist.add(
        AllowlistEntry(
            device_id="pump-7",
            serial_number="SN-7",
            manufacturer_ca="acme",
            profile="infusion-pump",
        ),
        actor="op",
    )
    _, cert = acme.issue_device("pump-7", serial_number="SN-7")
    generated = stack.first_connect(pem(cert), acme.pem)
    # Given the sample event, pointing at this certificate
    event = {
        **load_event("certificate-registered"),
        **{k: generated[k] for k in ("certificateId", "caCertificateId")},
    }
    # When the function runs
    result = registration.handler(event, LambdaContext())
    # Then the device is registered
    assert result == {"status": "accepted", "device_id": "pump-7"}
    assert stack.devices.get("pump-7").state.value == "ACTIVE"


def test_malformed_event_is_audited_and_not_retried(stack, functions):
    registration, _ = functions
    # Given the malformed sample event
    event = load_event("certificate-registered-malformed")
    # When the function runs, it returns normally (Lambda will not retry)
    result = registration.handler(event, LambdaContext())
    # Then the event is in the audit trail of malformed events
    assert result["status"] == "malformed"
    records, verification = stack.devices.audit("stream:registration-events")
    assert records[0].action == "malformed_event" and verification.records == 1


def test_transient_failure_is_raised_for_lambda_to_retry(stack, functions, monkeypatch):
    registration, _ = functions
    acme = cached_ca("acme")
    stack.register_ca(acme)
    _, cert = acme.issue_device("x-1", serial_number="SN-x")
    event = stack.first_connect(pem(cert), acme.pem)
    service = registration.service()

    def throttled(**_):
        raise ClientError(
            {"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
            "DescribeCertificate",
        )

    monkeypatch.setattr(service._registry._client, "describe_certificate", throttled)
    # When / Then the error propagates out of the handler
    with pytest.raises(ClientError):
        registration.handler(event, LambdaContext())


def test_admin_allowlist_add_get_and_audit(stack, functions):
    _, admin = functions
    # Given an operator adds a device
    entry = {
        "device_id": "well-1",
        "serial_number": "SN-1",
        "manufacturer_ca": "acme",
        "profile": "telemetry-sensor",
        "attributes": {"site": "permian-14"},
    }
    status, body = call_admin(admin, "POST", "/v1/admin/allowlist", entry)
    assert status == 201 and body["state"] == "ALLOWLISTED"
    # When the same entry is added again, and a different one with the same id
    assert call_admin(admin, "POST", "/v1/admin/allowlist", entry)[0] == 201
    status, body = call_admin(
        admin, "POST", "/v1/admin/allowlist", {**entry, "serial_number": "SN-2"}
    )
    assert (status, body["error"]) == (409, "conflict")
    # Then the device and its verified audit trail can be read, naming the operator
    status, body = call_admin(admin, "GET", "/v1/admin/devices/well-1")
    assert status == 200 and body["attributes"] == {"site": "permian-14"}
    status, body = call_admin(admin, "GET", "/v1/admin/devices/well-1/audit")
    assert status == 200 and body["verified"] is True
    assert [r["action"] for r in body["records"]] == ["allowlisted"]
    assert body["records"][0]["actor"] == OPERATOR


@pytest.mark.parametrize(
    "body,code",
    [
        ("{not json", "invalid_request"),
        ("[]", "invalid_request"),
        (
            json.dumps(
                {
                    "device_id": "bad id!",
                    "serial_number": "1",
                    "manufacturer_ca": "acme",
                    "profile": "telemetry-sensor",
                }
            ),
            "invalid_request",
        ),
        (
            json.dumps(
                {
                    "device_id": "d",
                    "serial_number": "1",
                    "manufacturer_ca": "acme",
                    "profile": "toaster",
                }
            ),
            "invalid_request",
        ),
        (
            json.dumps(
                {
                    "device_id": "d",
                    "serial_number": "1",
                    "manufacturer_ca": "acme",
                    "profile": "telemetry-sensor",
                    "admin": True,
                }
            ),
            "invalid_request",
        ),
    ],
    ids=["malformed-json", "not-an-object", "bad-device-id", "unknown-profile", "extra-field"],
)
def test_admin_bad_input_is_a_400_and_changes_nothing(stack, functions, body, code):
    _, admin = functions
    # When an operator sends a bad entry
    status, response = call_admin(admin, "POST", "/v1/admin/allowlist", body)
    # Then it is a 400 with a clear code, and nothing was written
    assert (status, response["error"]) == (400, code)
    assert stack.store.devices.get("d") is None


def test_admin_unknown_things_are_404(functions):
    _, admin = functions
    assert call_admin(admin, "GET", "/v1/admin/devices/nope")[0] == 404
    assert call_admin(admin, "GET", "/v1/admin/devices/nope/audit")[0] == 404
    assert call_admin(admin, "GET", "/v1/admin/cas/nope")[0] == 404
    assert call_admin(admin, "GET", "/v1/admin/no-such-route")[0] == 404


def test_admin_import_csv_sample_event(stack, functions):
    _, admin = functions
    # Given the canonical CSV import request
    event = load_event("admin-import-manifest-csv")
    # When it is handled
    response = admin.handler(event, LambdaContext())
    # Then both rows are imported
    body = json.loads(response["body"])
    assert response["statusCode"] == 200
    assert (body["imported"], body["rejected"]) == (2, [])
    assert stack.devices.get("pump-0001").attributes == {"site": "ward-7"}


def test_admin_import_ten_thousand_rows_with_rejects(stack, functions):
    _, admin = functions
    # Given a 10,000-row manifest with a few bad rows and one device already allow-listed
    stack.allowlist.add(
        AllowlistEntry(
            device_id="dev-00010",
            serial_number="OTHER",
            manufacturer_ca="acme",
            profile="telemetry-sensor",
        ),
        actor="op",
    )
    lines = ["device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile"]
    for i in range(10_000):
        lines.append(f"dev-{i:05d},SN-{i:05d},acme,,telemetry-sensor")
    lines[101] = "dev-00100,SN-00100,acme,,toaster"  # unknown profile
    lines[202] = "dev 00201,SN-00201,acme,,telemetry-sensor"  # bad id
    lines[303] = "dev-00005,SN-00005,acme,,telemetry-sensor"  # duplicate of row 6
    manifest = "\n".join(lines) + "\n"
    # When it is imported
    status, report = call_admin(
        admin,
        "POST",
        "/v1/admin/allowlist/import?format=csv",
        manifest,
        headers={"content-type": "text/csv"},
    )
    # Then every good row is in, and each bad row is reported with its reason
    assert status == 200
    assert report["received"] == 10_000
    assert report["imported"] == 10_000 - 4
    assert {r["row"] for r in report["rejected"]} == {11, 101, 202, 303}
    assert stack.devices.get("dev-09999").state.value == "ALLOWLISTED"
    assert stack.devices.get("dev-00010").serial_number == "OTHER"
    # And re-running the same import converges: nothing new, the same rows refused
    status, again = call_admin(
        admin,
        "POST",
        "/v1/admin/allowlist/import?format=csv",
        manifest,
        headers={"content-type": "text/csv"},
    )
    assert (again["imported"], again["unchanged"]) == (0, 10_000 - 4)
    assert {r["row"] for r in again["rejected"]} == {11, 101, 202, 303}


def test_admin_import_json_and_bad_manifest(stack, functions):
    _, admin = functions
    rows = [
        {
            "device_id": "j-1",
            "serial_number": "1",
            "manufacturer_ca": "acme",
            "profile": "telemetry-sensor",
        },
        {"device_id": "j-2", "serial_number": "2"},
    ]
    status, report = call_admin(admin, "POST", "/v1/admin/allowlist/import", {"devices": rows})
    assert status == 200 and report["imported"] == 1 and report["rejected"][0]["row"] == 2
    status, body = call_admin(admin, "POST", "/v1/admin/allowlist/import?format=csv", "a,b\n1,2\n")
    assert (status, body["error"]) == (400, "invalid_request")
    status, body = call_admin(admin, "POST", "/v1/admin/allowlist/import?format=xml", "<x/>")
    assert status == 400


def test_admin_registers_and_disables_a_ca(stack, functions):
    _, admin = functions
    acme = cached_ca("acme")
    # Given the account's registration code and a proof of possession made with the CA key
    status, body = call_admin(admin, "GET", "/v1/admin/cas/registration-code")
    proof = pem(acme.verification_certificate(body["registration_code"]))
    request = {"name": "acme", "certificate_pem": acme.pem, "verification_certificate_pem": proof}
    # When the CA is registered (twice: the second converges)
    status, ca = call_admin(admin, "POST", "/v1/admin/cas", request)
    assert status == 201 and ca["status"] == "ACTIVE"
    assert call_admin(admin, "POST", "/v1/admin/cas", request)[0] == 201
    # Then it is a trust anchor, registered with AWS IoT
    described = stack.harness_iot.describe_ca_certificate(certificateId=ca["iot_ca_id"])
    assert described["certificateDescription"]["status"] == "ACTIVE"
    # When it is disabled
    status, ca = call_admin(admin, "POST", "/v1/admin/cas/acme/disable")
    # Then fleetkey and AWS IoT both stop trusting it, and the audit trail says so
    assert ca["status"] == "DISABLED"
    described = stack.harness_iot.describe_ca_certificate(certificateId=ca["iot_ca_id"])
    assert described["certificateDescription"]["status"] == "INACTIVE"
    status, audit = call_admin(admin, "GET", "/v1/admin/cas/acme/audit")
    assert [r["action"] for r in audit["records"]] == ["ca_registered", "ca_disabled"]


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda r: {**r, "certificate_pem": "garbage"}, "invalid_certificate"),
        (
            lambda r: {**r, "verification_certificate_pem": r["certificate_pem"]},
            "invalid_certificate",
        ),
        (lambda r: {**r, "name": "Not A Name"}, "invalid_request"),
        (lambda r: {"name": "acme"}, "invalid_request"),
    ],
    ids=["bad-pem", "bad-proof", "bad-name", "missing-fields"],
)
def test_admin_ca_registration_bad_input(stack, functions, mutate, code):
    _, admin = functions
    acme = cached_ca("acme")
    _, body = call_admin(admin, "GET", "/v1/admin/cas/registration-code")
    request = {
        "name": "acme",
        "certificate_pem": acme.pem,
        "verification_certificate_pem": pem(
            acme.verification_certificate(body["registration_code"])
        ),
    }
    status, response = call_admin(admin, "POST", "/v1/admin/cas", mutate(request))
    assert (status, response["error"]) == (400, code)
    assert stack.store.anchors.list() == []


def test_admin_hostile_ca_certificates_are_400s(stack, functions, tmp_path):
    from tests.support.hostile_x509 import HostileX509

    _, admin = functions
    for case in HostileX509(tmp_path).ca_cases():
        # Given a CA certificate wrong in one way (a malformed extension, an odd key, ...)
        request = {
            "name": "hostile",
            "certificate_pem": case.pem,
            "verification_certificate_pem": case.pem,
        }
        # When an operator registers it
        status, response = call_admin(admin, "POST", "/v1/admin/cas", request)
        # Then the answer is a 400 naming the certificate, never a 5xx, and nothing is recorded
        assert (status, response["error"]) == (400, "invalid_certificate"), case.name
    assert stack.store.anchors.list() == []


def test_registration_handler_acknowledges_an_event_that_does_not_match_aws_iot(stack, functions):
    registration, _ = functions
    acme = cached_ca("acme")
    stack.register_ca(acme)
    _, cert = acme.issue_device("x-2", serial_number="SN-x2")
    generated = stack.first_connect(pem(cert), acme.pem)
    # Given the sample event, naming this certificate but a CA that did not issue it
    event = {**load_event("certificate-registered"), "certificateId": generated["certificateId"]}
    # When the function runs
    result = registration.handler(event, LambdaContext())
    # Then it returns normally (not retried) and the certificate is left as AWS IoT has it
    assert result == {"status": "mismatched"}
    assert stack.certificate_status(generated["certificateId"]) == "PENDING_ACTIVATION"


@pytest.mark.parametrize(
    "body",
    ["[" * 100_000, '{"device_id": ' + "9" * 5000 + "}"],
    ids=["deep-nesting", "huge-number"],
)
def test_admin_hostile_json_is_a_400(functions, body):
    _, admin = functions
    status, response = call_admin(admin, "POST", "/v1/admin/allowlist", body)
    assert (status, response["error"]) == (400, "invalid_request")
    status, response = call_admin(admin, "POST", "/v1/admin/allowlist/import?format=json", body)
    assert (status, response["error"]) == (400, "invalid_request")


def test_admin_ids_that_cannot_exist_are_404(functions):
    _, admin = functions
    assert call_admin(admin, "GET", "/v1/admin/devices/" + "d" * 3000)[0] == 404
    assert call_admin(admin, "GET", "/v1/admin/cas/" + "c" * 1500)[0] == 404
    assert call_admin(admin, "GET", "/v1/admin/certificates/not-hex/audit")[0] == 404


def test_admin_aws_outage_is_a_503_and_aws_refusal_a_400(stack, functions, monkeypatch):
    _, admin = functions
    services = admin.services()

    def throttled(**_):
        raise ClientError(
            {"Error": {"Code": "ThrottlingException", "Message": "slow down"}},
            "GetRegistrationCode",
        )

    monkeypatch.setattr(services.cas._registry._client, "get_registration_code", throttled)
    status, body = call_admin(admin, "GET", "/v1/admin/cas/registration-code")
    assert (status, body["error"]) == (503, "service_unavailable")

    def refused(**_):
        raise ClientError(
            {"Error": {"Code": "CertificateValidationException", "Message": "no"}},
            "GetRegistrationCode",
        )

    monkeypatch.setattr(services.cas._registry._client, "get_registration_code", refused)
    status, body = call_admin(admin, "GET", "/v1/admin/cas/registration-code")
    assert (status, body["error"]) == (400, "invalid_request")
