"""AWS IoT's rate limits in front of moto: a request over its API's rate gets AWS IoT's
ThrottlingException without reaching the endpoint; only the clients it is installed on are
limited; a registration throttled midway converges when retried."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from fleetkey.adapters.aws import is_transient
from fleetkey_local.iot_limits import IotRateLimits
from fleetkey_local.pki import pem
from fleetkey_local.stack import REGION, EmbeddedStack
from tests.support.pki_cache import ca as cached_ca

NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})


class Clock:
    """Time stands still unless a test moves it: a bucket refills only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _client(service: str = "iot"):
    return boto3.session.Session(region_name=REGION).client(service, config=NO_RETRIES)


def test_a_request_over_the_rate_is_throttled_as_aws_iot_throttles_it(moto):
    # Given a client limited to 2 ListThings a second (time standing still)
    limits = IotRateLimits({"ListThings": 2}, clock=Clock())
    iot = limits.install(_client())
    sent = []
    iot.meta.events.register("after-call.iot.ListThings", lambda **kw: sent.append(kw))
    # When it lists things three times
    iot.list_things()
    iot.list_things()
    with pytest.raises(ClientError) as refused:
        iot.list_things()
    # Then the third gets AWS IoT's ThrottlingException, a transient error for fleetkey
    error = refused.value.response
    assert error["Error"] == {"Code": "ThrottlingException", "Message": "Rate exceeded"}
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert is_transient(refused.value)
    assert limits.statistics() == {"ListThings": {"allowed": 2, "throttled": 1}}
    # and installing it again changes nothing
    limits.install(iot)
    with pytest.raises(ClientError):
        iot.list_things()
    assert limits.statistics()["ListThings"]["throttled"] == 2


def test_the_sdk_retries_a_throttled_request(moto):
    # Given a client with retries and a bucket that refills as the SDK backs off
    clock = Clock()
    limits = IotRateLimits({"ListThings": 1}, clock=clock)
    iot = boto3.session.Session(region_name=REGION).client(
        "iot", config=Config(retries={"mode": "standard", "total_max_attempts": 3})
    )
    limits.install(iot)
    iot.list_things()

    def refill(**_):
        clock.now += 1.0

    iot.meta.events.register("needs-retry.iot.ListThings", refill)
    # When the next request is throttled once
    iot.list_things()
    # Then the SDK's retry went through
    assert limits.statistics() == {"ListThings": {"allowed": 2, "throttled": 1}}


def test_a_session_limits_the_clients_it_creates_afterwards(moto):
    session = boto3.session.Session(region_name=REGION)
    before = session.client("iot", config=NO_RETRIES)
    limits = IotRateLimits({"ListThings": 1}, clock=Clock())
    limits.install(session)
    after = session.client("iot", config=NO_RETRIES)
    before.list_things()
    before.list_things()  # created before the installation: not limited
    after.list_things()
    with pytest.raises(ClientError):
        after.list_things()
    # and other services are not limited
    session.client("dynamodb", config=NO_RETRIES).list_tables()
    limits.uninstall(session)
    session.client("iot", config=NO_RETRIES).list_things()
    assert limits.statistics() == {"ListThings": {"allowed": 1, "throttled": 1}}


def test_the_stack_limits_its_services_but_never_the_harness(moto):
    # Given a stack whose services' AWS IoT calls are limited
    limits = IotRateLimits({"DescribeCertificate": 1}, clock=Clock())
    stack = EmbeddedStack(_client, iot_limits=limits).provision()
    acme = cached_ca("acme")
    stack.register_ca(acme)
    _, cert = acme.issue_device("dev-1", serial_number="SN-dev-1")
    event = stack.first_connect(pem(cert), acme.pem)
    # When the harness (AWS IoT's side) and then the services describe the certificate
    for _ in range(3):
        stack.harness_iot.describe_certificate(certificateId=event["certificateId"])
    stack.iot.describe_certificate(certificateId=event["certificateId"])
    # Then only the services' call drew on the limit
    assert limits.statistics() == {"DescribeCertificate": {"allowed": 1, "throttled": 0}}
    with pytest.raises(ClientError):
        stack.iot.describe_certificate(certificateId=event["certificateId"])


def test_a_registration_throttled_midway_converges_when_retried(moto):
    # Given a stack whose AWS IoT allows one UpdateCertificate, and a registration that used it
    clock = Clock()
    limits = IotRateLimits({"UpdateCertificate": 1}, clock=clock)
    stack = EmbeddedStack(_client, iot_limits=limits).provision()
    acme = cached_ca("acme")
    stack.register_ca(acme)
    stack.anchors.refresh()
    first = stack.manufacture(acme, "dev-1")[2]
    assert stack.register(first).accepted
    # When the next device's registration is throttled at its activation
    second = stack.manufacture(acme, "dev-2")[2]
    with pytest.raises(ClientError) as throttled:
        stack.register(second)
    assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
    assert stack.certificate_status(second["certificateId"]) == "PENDING_ACTIVATION"
    # Then the retry (Lambda's, or a redrive's) finishes it once the rate allows
    clock.now += 1.0
    outcome = stack.register(second)
    assert outcome.accepted and not outcome.decided  # the decision was made the first time
    assert stack.certificate_status(second["certificateId"]) == "ACTIVE"
    assert stack.devices.get("dev-2").state.value == "ACTIVE"
    assert limits.statistics() == {"UpdateCertificate": {"allowed": 2, "throttled": 1}}
