"""The lifecycle functions as Lambda runs them: the admin routes, the converge function on the
lifecycle queue, the tamper rule's device_events function, and the device-facing data-key route
(and, through them, the IAM check's record of what each function calls)."""

from __future__ import annotations

import json

import pytest

from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.lifecycle import DeviceState
from fleetkey_local.apigw import proxy_event
from fleetkey_local.data_keys import backend_decrypt_telemetry, device_open, encrypt_telemetry
from fleetkey_local.device import client_assertion
from fleetkey_local.pki import pem
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"
DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


@pytest.fixture
def functions(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    loaded = {
        name: load_handler(name)
        for name in ("admin", "converge", "device_events", "data_keys", "registration")
    }
    from fleetkey import composition

    composition.components.cache_clear()
    yield loaded
    composition.components.cache_clear()
    for name in ("converge", "device_events", "data_keys"):
        loaded[name].components.cache_clear()
    loaded["registration"].service.cache_clear()


def call_admin(admin, method, path, body=None):
    response = admin.handler(
        proxy_event(
            method,
            path,
            body=json.dumps(body) if body is not None else None,
            headers={"content-type": "application/json"},
            caller_arn=OPERATOR,
        ),
        LambdaContext(),
    )
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


def run_queue(stack, functions) -> None:
    """Lambda's SQS event source: the converge function on everything queued."""
    worker = stack.lifecycle_worker(function=functions["converge"].handler)
    assert worker.drain(30)


def registered(stack, acme, device_id: str):
    key, cert, event = stack.manufacture(acme, device_id)
    assert stack.register(event).accepted
    return key, cert


def test_operators_suspend_resume_decommission_and_recommission_through_the_api(
    stack, acme, functions
):
    admin = functions["admin"]
    _, cert = registered(stack, acme, "pump-api")
    cert_id = certificate_id(cert)

    # When an operator suspends the device, Then 200 with the device SUSPENDED, AWS IoT in line
    status, body = call_admin(
        admin, "POST", "/v1/admin/devices/pump-api/suspend", {"reason": "stolen"}
    )
    assert (status, body["state"]) == (200, "SUSPENDED")
    assert stack.certificate_status(cert_id) == "INACTIVE"
    # a bad request changes nothing
    status, body = call_admin(admin, "POST", "/v1/admin/devices/pump-api/suspend", {"why": "x"})
    assert (status, body["error"]) == (400, "invalid_request")

    status, body = call_admin(admin, "POST", "/v1/admin/devices/pump-api/resume", {})
    assert (status, body["state"]) == (200, "ACTIVE")
    assert stack.certificate_status(cert_id) == "ACTIVE"

    # When it is decommissioned, Then 202, the teardown queued, finished by the converge function
    status, body = call_admin(
        admin, "POST", "/v1/admin/devices/pump-api/decommission", {"reason": "end of life"}
    )
    assert (status, body["state"], body["teardown"]["status"]) == (202, "DECOMMISSIONED", "pending")
    status, body = call_admin(admin, "POST", "/v1/admin/devices/pump-api/recommission", {})
    assert (status, body["error"]) == (409, "conflict")  # the teardown has not run yet
    run_queue(stack, functions)
    status, body = call_admin(admin, "GET", "/v1/admin/devices/pump-api")
    assert body["teardown"]["status"] == "completed"

    # When AWS IoT meanwhile holds its factory certificate again (it connected in storage, and
    # someone revoked it), and it is recommissioned to a new owner
    stack.first_connect(pem(cert), acme.pem)
    stack.harness_iot.update_certificate(certificateId=cert_id, newStatus="REVOKED")
    status, body = call_admin(
        admin, "POST", "/v1/admin/devices/pump-api/recommission", {"owner": "clinic-2"}
    )
    # Then it is ALLOWLISTED for the new owner, and its factory certificate registers again
    assert (status, body["state"], body["owner"], body["epoch"]) == (
        200,
        "ALLOWLISTED",
        "clinic-2",
        2,
    )
    assert stack.register(stack.first_connect(pem(cert), acme.pem)).accepted


def test_a_tamper_report_suspends_the_device(stack, acme, functions):
    _, cert = registered(stack, acme, "pump-tamper")
    # When the device reports tampering (the rule passes the topic's device id)
    result = functions["device_events"].handler({"device_id": "pump-tamper"}, LambdaContext())
    # Then it is suspended, reason tamper, by the rule
    assert result == {"status": "suspended", "device_id": "pump-tamper"}
    assert stack.devices.get("pump-tamper").state is DeviceState.SUSPENDED
    assert stack.certificate_status(certificate_id(cert)) == "INACTIVE"
    records, _ = stack.devices.audit("device:pump-tamper")
    assert records[-1].details["reason"] == "tamper"
    # and a second report, or one naming nobody, changes nothing
    again = functions["device_events"].handler({"device_id": "pump-tamper"}, LambdaContext())
    assert again["status"] == "suspended"
    assert functions["device_events"].handler({}, LambdaContext())["status"] == "malformed"
    unknown = functions["device_events"].handler({"device_id": "nobody"}, LambdaContext())
    assert unknown["status"] == "ignored"


def data_key_request(device_id: str, assertion, content_type="application/json"):
    return proxy_event(
        "POST",
        f"/v1/devices/{device_id}/data-key",
        body=json.dumps({"client_assertion": assertion}),
        headers={"content-type": content_type},
        resource="/v1/devices/{device_id}/data-key",
        path_parameters={"device_id": device_id},
    )


def test_a_device_gets_its_data_key_and_the_backend_reads_its_data(stack, acme, functions):
    key, cert = registered(stack, acme, "sensor-dk-fn")
    assertion = client_assertion(key, certificate_id(cert), "sensor-dk-fn", stack.settings.issuer)
    # When the device asks for its data key
    response = functions["data_keys"].handler(
        data_key_request("sensor-dk-fn", assertion), LambdaContext()
    )
    assert response["statusCode"] == 200, response
    sealed = json.loads(response["body"])
    assert response["multiValueHeaders"]["Cache-Control"] == ["no-store"]
    # Then it opens it with its own key, and the backend decrypts what it encrypts
    data_key = device_open(key, sealed, device_id="sensor-dk-fn", epoch=1, owner=None)
    envelope = encrypt_telemetry(data_key, b"flow=3.1", device_id="sensor-dk-fn", epoch=1)
    status, grant = call_admin(functions["admin"], "GET", "/v1/admin/devices/sensor-dk-fn/data-key")
    assert status == 200
    assert backend_decrypt_telemetry(stack.kms, grant, envelope) == b"flow=3.1"
    # And the same assertion a second time, or another device's, is refused without detail
    replay = functions["data_keys"].handler(
        data_key_request("sensor-dk-fn", assertion), LambdaContext()
    )
    assert (replay["statusCode"], json.loads(replay["body"])["error"]) == (400, "invalid_grant")
    other = functions["data_keys"].handler(
        data_key_request("someone-else", assertion), LambdaContext()
    )
    assert other["statusCode"] == 401
    wrong_type = functions["data_keys"].handler(
        data_key_request("sensor-dk-fn", assertion, "text/plain"), LambdaContext()
    )
    assert wrong_type["statusCode"] == 400
    latin = functions["data_keys"].handler(
        data_key_request("sensor-dk-fn", assertion, "application/json; charset=latin-1"),
        LambdaContext(),
    )
    assert latin["statusCode"] == 400


def test_malformed_lifecycle_events_are_dropped_not_retried(stack, functions):
    # A tamper event that is not an object, and a converge message nested past any parser
    assert functions["device_events"].handler([], LambdaContext())["status"] == "malformed"
    stack.sqs.send_message(QueueUrl=stack.settings.lifecycle_queue_url, MessageBody="[" * 100000)
    run_queue(stack, functions)
    # dropped, not failed (a failed one would end in the dead-letter queue)
    attributes = stack.sqs.get_queue_attributes(
        QueueUrl=stack.lifecycle_dead_letter_queue_url, AttributeNames=["All"]
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"


def test_a_teardown_destroys_the_data_key_and_jitr_sets_a_returning_device_aside(
    stack, acme, functions
):
    # Given a device with a data key, decommissioned through the API and torn down by the queue
    key, cert = registered(stack, acme, "sensor-gone-fn")
    assertion = client_assertion(key, certificate_id(cert), "sensor-gone-fn", stack.settings.issuer)
    request = data_key_request("sensor-gone-fn", assertion)
    assert functions["data_keys"].handler(request, LambdaContext())["statusCode"] == 200
    status, _ = call_admin(
        functions["admin"], "POST", "/v1/admin/devices/sensor-gone-fn/decommission", {"reason": "x"}
    )
    assert status == 202
    run_queue(stack, functions)
    assert stack.store.table.query("DATAKEY#sensor-gone-fn") == []

    # When the device connects again before any recommission (the registration function runs)
    event = stack.first_connect(pem(cert), acme.pem)
    result = functions["registration"].handler(event, LambdaContext())

    # Then it is refused, its certificate removed from AWS IoT, not revoked
    assert result["status"] == "refused" and result["reason"] == "decommissioned"
    with pytest.raises(stack.harness_iot.exceptions.ResourceNotFoundException):
        stack.harness_iot.describe_certificate(certificateId=certificate_id(cert))
