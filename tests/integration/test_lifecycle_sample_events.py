"""The canonical sample events of the lifecycle triggers (events/): each has AWS's shape as its
function parses it, and its function, run on it against the local stack, does what it says.

    tamper-report                 IoT rule (TAMPER_RULE_SQL) -> device_events
    lifecycle-queue-message       SQS (the lifecycle queue) -> converge
    data-key-request              API Gateway REST proxy, POST /v1/devices/{device_id}/data-key
    admin-*-request               API Gateway REST proxy, /v1/admin/{proxy+} (IAM) -> admin
"""

from __future__ import annotations

import hashlib
import json
import re

import jwt
import pytest
from aws_lambda_powertools.utilities.parser.models import APIGatewayProxyEventModel, SqsModel

from fleetkey.adapters.queue import SqsLifecycleQueue
from fleetkey.api.models import DecommissionRequest, RecommissionRequest, SuspendRequest
from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import TeardownStatus
from fleetkey.events import TAMPER_RULE_SQL
from fleetkey_local.data_keys import device_open
from fleetkey_local.device import client_assertion
from fleetkey_local.stack import TABLE
from tests.conftest import load_event
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
DEVICE = "pump-0001"  # the device every sample names
ADMIN_SAMPLES = {
    "admin-suspend-request": ("suspend", SuspendRequest),
    "admin-decommission-request": ("decommission", DecommissionRequest),
    "admin-recommission-request": ("recommission", RecommissionRequest),
}


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


@pytest.fixture
def functions(stack, monkeypatch):
    """The lifecycle functions as Lambda loads them, configured for the local stack."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", DATA_ENDPOINT)
    for name, value in stack.environment().items():
        monkeypatch.setenv(name, value)
    loaded = {
        name: load_handler(name) for name in ("admin", "converge", "device_events", "data_keys")
    }
    from fleetkey import composition

    composition.components.cache_clear()
    yield loaded
    composition.components.cache_clear()
    for name in ("converge", "device_events", "data_keys"):
        loaded[name].components.cache_clear()


@pytest.fixture
def device(stack, acme):
    """The samples' device, registered (ACTIVE with its factory certificate): (key, cert id)."""
    key, cert, event = stack.manufacture(acme, DEVICE)
    assert stack.register(event).accepted
    return key, certificate_id(cert)


def respond(response: dict) -> tuple[int, dict]:
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else {}


# ---- shapes --------------------------------------------------------------------------------------


def test_tamper_report_holds_what_the_tamper_rule_selects():
    # Given the tamper rule's SQL and the sample of what it delivers
    event = load_event("tamper-report")
    select, topic_filter = re.fullmatch(r"SELECT (.+) FROM '([^']+)'", TAMPER_RULE_SQL).groups()
    # Then the event holds exactly the rule's selected aliases (nothing of the payload)
    assert "*" not in select
    assert list(event) == re.findall(r"\bAS (\w+)", select) == ["device_id"]
    # and the device id is topic(2) of a topic the rule's filter matches, as the handler reads it
    assert select.startswith("topic(2) AS device_id")
    topic = f"fleetkey/{event['device_id']}/events/tamper"
    levels = topic_filter.split("/")
    assert len(topic.split("/")) == len(levels)
    assert all(f in ("+", t) for f, t in zip(levels, topic.split("/"), strict=True))
    assert load_handler("device_events")._DEVICE_ID.fullmatch(event["device_id"])


def test_lifecycle_queue_message_is_an_sqs_event_as_lambda_delivers_it():
    # Given the sample of the converge function's event
    event = load_event("lifecycle-queue-message")
    # Then Powertools' SQS model reads it, every record from the lifecycle queue
    parsed = SqsModel.model_validate(event)
    assert len(parsed.Records) == 1
    record = parsed.Records[0]
    raw = event["Records"][0]
    assert record.eventSource == "aws:sqs"
    assert record.md5OfBody == hashlib.md5(raw["body"].encode()).hexdigest()  # noqa: S324
    assert record.messageAttributes == {}
    assert {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    } <= set(raw["attributes"])
    assert record.attributes.ApproximateReceiveCount == "1"
    arn = record.eventSourceARN.split(":")
    assert (arn[:3], arn[3], arn[4]) == (["arn", "aws", "sqs"], record.awsRegion, "123456789012")
    # and its body is byte for byte what fleetkey enqueues for the device's life
    sent: list[dict] = []

    class Recorder:
        def send_message(self, **kwargs):
            sent.append(kwargs)

    SqsLifecycleQueue("https://sqs.example/q", client=Recorder()).enqueue(DEVICE, 1)
    assert raw["body"] == sent[0]["MessageBody"]
    assert json.loads(raw["body"]) == {"device_id": DEVICE, "epoch": 1}


def test_data_key_request_is_a_rest_proxy_event_of_the_data_key_route():
    # Given the sample of a device's data-key request
    event = load_event("data-key-request")
    # Then it is an API Gateway REST proxy event of the route, its device in the path
    parsed = APIGatewayProxyEventModel.model_validate(event)
    assert parsed.resource == parsed.requestContext.resourcePath
    assert parsed.resource == "/v1/devices/{device_id}/data-key"
    assert parsed.httpMethod == "POST"
    assert parsed.pathParameters == {"device_id": DEVICE}
    assert parsed.path == f"/v1/devices/{DEVICE}/data-key"
    assert parsed.requestContext.path == f"/{parsed.requestContext.stage}{parsed.path}"
    # not IAM-authenticated: the client assertion authenticates the device
    assert parsed.requestContext.identity.userArn is None
    assert parsed.headers["content-type"] == "application/json" and not parsed.isBase64Encoded
    # and its body is the one field the service takes, a client assertion shaped as at /v1/token
    body = json.loads(event["body"])
    assert list(body) == ["client_assertion"]
    header = jwt.get_unverified_header(body["client_assertion"])
    claims = jwt.decode(body["client_assertion"], options={"verify_signature": False})
    assert header["alg"] == "ES256" and re.fullmatch(r"[0-9a-f]{64}", header["kid"])
    assert claims["iss"] == claims["sub"] == DEVICE
    assert {"aud", "jti", "iat", "exp"} <= set(claims)
    assert 0 < claims["exp"] - claims["iat"] <= 300


@pytest.mark.parametrize("name", sorted(ADMIN_SAMPLES))
def test_admin_samples_are_iam_authenticated_proxy_events_of_the_admin_api(name):
    # Given an admin sample
    event = load_event(name)
    action, model = ADMIN_SAMPLES[name]
    # Then it is a REST proxy event of the admin API's {proxy+} resource, as an operator sends it
    parsed = APIGatewayProxyEventModel.model_validate(event)
    assert parsed.resource == parsed.requestContext.resourcePath == "/v1/admin/{proxy+}"
    assert parsed.httpMethod == "POST"
    assert parsed.path == f"/v1/admin/devices/{DEVICE}/{action}"
    assert parsed.pathParameters == {"proxy": parsed.path.removeprefix("/v1/admin/")}
    assert parsed.requestContext.path == f"/{parsed.requestContext.stage}{parsed.path}"
    identity = parsed.requestContext.identity
    assert identity.userArn.startswith("arn:aws:sts::123456789012:assumed-role/")
    assert identity.accountId == parsed.requestContext.accountId
    # and its body is what the route's model accepts
    assert parsed.headers["content-type"] == "application/json"
    model.model_validate_json(event["body"])


# ---- the functions on the samples ----------------------------------------------------------------


def test_tamper_report_sample_suspends_the_registered_device(stack, device, functions):
    # When the tamper rule delivers the sample for the registered device
    result = functions["device_events"].handler(load_event("tamper-report"), LambdaContext())
    # Then it is suspended for tamper, its certificate INACTIVE in AWS IoT
    assert result == {"status": "suspended", "device_id": DEVICE}
    assert stack.devices.get(DEVICE).state is DeviceState.SUSPENDED
    assert stack.certificate_status(device[1]) == "INACTIVE"
    records, _ = stack.devices.audit(f"device:{DEVICE}")
    assert (records[-1].action, records[-1].details["reason"]) == ("suspended", "tamper")


def test_admin_suspend_sample_suspends_the_registered_device(stack, device, functions):
    # When the operator's suspend request (the sample) reaches the admin function
    status, body = respond(
        functions["admin"].handler(load_event("admin-suspend-request"), LambdaContext())
    )
    # Then 200 with the device SUSPENDED, recorded as the operator's, for the sample's reason
    assert (status, body["state"]) == (200, "SUSPENDED")
    assert stack.certificate_status(device[1]) == "INACTIVE"
    records, _ = stack.devices.audit(f"device:{DEVICE}")
    assert records[-1].actor == "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"
    assert records[-1].details["reason"] == "reported stolen"


def test_decommission_queue_and_recommission_samples_take_the_device_to_its_next_life(
    stack, device, functions
):
    # When the operator decommissions the device (the sample)
    status, body = respond(
        functions["admin"].handler(load_event("admin-decommission-request"), LambdaContext())
    )
    # Then 202, DECOMMISSIONED, its teardown pending
    assert (status, body["state"], body["teardown"]["status"]) == (202, "DECOMMISSIONED", "pending")

    # When the converge function receives the queue's message (the sample) for it
    result = functions["converge"].handler(load_event("lifecycle-queue-message"), LambdaContext())
    # Then the message succeeded and the teardown is complete: nothing of it left in AWS IoT
    assert result == {"batchItemFailures": []}
    torn_down = stack.devices.get(DEVICE)
    assert torn_down.teardown.status is TeardownStatus.COMPLETED
    with pytest.raises(stack.harness_iot.exceptions.ResourceNotFoundException):
        stack.harness_iot.describe_thing(thingName=DEVICE)
    with pytest.raises(stack.harness_iot.exceptions.ResourceNotFoundException):
        stack.harness_iot.describe_certificate(certificateId=device[1])

    # When the operator recommissions it for a new owner (the sample)
    status, body = respond(
        functions["admin"].handler(load_event("admin-recommission-request"), LambdaContext())
    )
    # Then 200: ALLOWLISTED in its next life, for the sample's owner
    assert (status, body["state"], body["epoch"], body["owner"]) == (
        200,
        "ALLOWLISTED",
        2,
        "clinic-2",
    )


def test_data_key_request_sample_reaches_the_data_key_route(stack, device, functions):
    # When the sample, whose assertion is a placeholder, reaches the data-key function
    event = load_event("data-key-request")
    status, body = respond(functions["data_keys"].handler(event, LambdaContext()))
    # Then the route is found and the assertion refused like any that does not authenticate
    assert (status, body["error"]) == (401, "invalid_client")

    # When the same event carries an assertion the device signed
    key, cert_id = device
    assertion = client_assertion(key, cert_id, DEVICE, stack.settings.issuer)
    signed = {**event, "body": json.dumps({"client_assertion": assertion})}
    status, body = respond(functions["data_keys"].handler(signed, LambdaContext()))
    # Then 200 with the data key sealed to the device's key
    assert status == 200, body
    assert (body["device_id"], body["certificate_id"], body["epoch"]) == (DEVICE, cert_id, 1)
    assert len(device_open(key, body, device_id=DEVICE, epoch=1, owner=None)) == 32
