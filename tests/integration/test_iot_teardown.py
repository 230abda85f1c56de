"""The AWS IoT side of suspend, resume and decommission (moto, with AWS's rules where moto departs
from them: `fleetkey_local.moto_patches`): certificate status, the certificate and thing
teardown in the order AWS IoT requires, its bounded waits for eventual consistency, and the
data-plane channel to devices (commands, DeleteConnection)."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from fleetkey.adapters.iot import (
    TEARDOWN_DELAYS,
    IotRegistry,
    TeardownNotSettled,
    ThingConflict,
)
from fleetkey.adapters.iot_data import DeviceChannel, forget_data_endpoints
from fleetkey_local import moto_patches
from fleetkey_local.pki import pem
from tests.support.faults import FaultInjector
from tests.support.pki_cache import ca

REGION = "eu-west-1"
ACCOUNT = "123456789012"
THING_TYPE = "fleetkey-telemetry-sensor"
OWNED = frozenset({THING_TYPE, "fleetkey-infusion-pump"})
POLICY = "fleetkey-telemetry-sensor"
DATA_ENDPOINT = f"https://data-ats.iot.{REGION}.amazonaws.com"  # where moto serves iot-data


@pytest.fixture
def iot(moto):
    """The harness's IoT client (setting up and checking AWS IoT), with AWS's rules."""
    moto_patches.apply()
    client = boto3.client("iot", region_name=REGION)
    client.create_thing_type(thingTypeName=THING_TYPE)
    client.create_policy(
        policyName=POLICY,
        policyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}],
            }
        ),
    )
    return client


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def registry_client(iot):
    """The registry's own client, so its calls can be counted and failed on purpose."""
    return boto3.client("iot", region_name=REGION)


@pytest.fixture
def registry(registry_client, sleeps) -> IotRegistry:
    return IotRegistry(client=registry_client, sleep=sleeps.append)


def register(iot, device_id: str, n: int, status: str = "ACTIVE") -> tuple[str, str]:
    _, certificate = ca("teardown-factory").issue_device(device_id, serial_number=f"SN-{n}")
    registered = iot.register_certificate_without_ca(certificatePem=pem(certificate), status=status)
    return registered["certificateId"], registered["certificateArn"]


def onboard(iot, device_id: str, *, pending: bool = True) -> list[tuple[str, str]]:
    """A device as registration leaves it (thing, policy, exclusive attachment, ACTIVE), with a
    rotation in flight when `pending` (a PENDING_ACTIVATION certificate, attached as well)."""
    registry = IotRegistry(client=iot)
    current = register(iot, device_id, 0, "PENDING_ACTIVATION")
    registry.ensure_thing(
        device_id, THING_TYPE, {"certificate_id": current[0]}, current[1], owned_thing_types=OWNED
    )
    certificates = [current]
    if pending:
        certificates.append(register(iot, device_id, 1, "PENDING_ACTIVATION"))
    for _, arn in certificates:
        registry.attach_policy(POLICY, arn)
        registry.attach_exclusively(device_id, arn)
    registry.activate_certificate(current[0])
    return certificates


def teardown(registry: IotRegistry, device_id: str, certificates) -> bool:
    done = [registry.teardown_certificate(certificate_id) for certificate_id, _ in certificates]
    return all(done) and registry.delete_thing(device_id, owned_thing_types=OWNED)


def status(iot, certificate_id: str) -> str:
    return iot.describe_certificate(certificateId=certificate_id)["certificateDescription"][
        "status"
    ]


def exists(call, **kwargs) -> bool:
    try:
        call(**kwargs)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ResourceNotFoundException"
        return False
    return True


def assert_gone(iot, device_id: str, certificates) -> None:
    """Nothing of the device left in AWS IoT: certificates, thing, attachments."""
    for certificate_id, arn in certificates:
        assert not exists(iot.describe_certificate, certificateId=certificate_id)
        assert iot.list_principal_things(principal=arn)["things"] == []
    assert not exists(iot.describe_thing, thingName=device_id)
    targets = iot.list_targets_for_policy(policyName=POLICY)["targets"]
    assert not {arn for _, arn in certificates} & set(targets)
    # the profile's policy is shared by the fleet: detached, never deleted
    assert iot.get_policy(policyName=POLICY)["policyName"] == POLICY


class Refusing:
    """The IoT client, with `operation` refused with `code` its first `times` calls: AWS IoT
    while earlier detaches have not settled yet."""

    def __init__(self, client, operation: str, code: str, times: int) -> None:
        self._client, self._operation, self._code, self._times = client, operation, code, times
        self.calls = 0

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if name != self._operation:
            return attribute

        def refused(**kwargs):
            self.calls += 1
            if self.calls <= self._times:
                raise ClientError({"Error": {"Code": self._code, "Message": "settling"}}, name)
            return attribute(**kwargs)

        return refused


# ---- teardown ---------------------------------------------------------------------------------


def test_teardown_leaves_nothing_of_the_device_in_aws_iot(iot, registry, sleeps):
    # Given an onboarded device with a rotation in flight, its thing and policy attached
    certificates = onboard(iot, "pump-0001")
    assert [status(iot, c) for c, _ in certificates] == ["ACTIVE", "PENDING_ACTIVATION"]

    # When its certificates and its thing are torn down
    assert teardown(registry, "pump-0001", certificates)

    # Then AWS IoT has nothing of it left, and nothing had to wait
    assert_gone(iot, "pump-0001", certificates)
    assert sleeps == []


def test_teardown_twice_is_a_no_op(iot, registry, registry_client):
    certificates = onboard(iot, "pump-0002")
    assert teardown(registry, "pump-0002", certificates)
    injector = FaultInjector().watch(registry_client)
    injector.arm(None)

    assert teardown(registry, "pump-0002", certificates)

    # one read per certificate and one for the thing: AWS IoT says they are gone
    assert injector.calls == ["DescribeCertificate", "DescribeCertificate", "DescribeThing"]
    assert_gone(iot, "pump-0002", certificates)


@pytest.mark.parametrize("after", [False, True], ids=["before-aws", "after-aws"])
def test_a_teardown_interrupted_at_any_call_is_finished_by_the_next_run(
    iot, registry, registry_client, after
):
    # Each call of the teardown in turn fails: before AWS IoT sees it (no effect) or after AWS IoT
    # applied it (the caller sees a timeout). The next run (the queue's redelivery) finishes.
    injector = FaultInjector().watch(registry_client)
    k = 1
    while True:
        device_id = f"pump-1{k:02d}"
        certificates = onboard(iot, device_id)
        injector.arm(k, after=after)
        try:
            teardown(registry, device_id, certificates)
        except (ClientError, ReadTimeoutError):
            assert injector.fired is not None
        else:
            assert injector.fired is None  # every call has failed once: done
            break
        injector.arm(None)
        assert teardown(registry, device_id, certificates), injector.fired
        assert_gone(iot, device_id, certificates)
        k += 1
    # 2 certificates x (describe, deactivate, list policies, detach, list things, detach,
    # delete) + the thing (describe, list principals, delete)
    assert k == 18


def test_a_partial_teardown_done_by_hand_is_finished(iot, registry):
    # Given a device an operator half took apart: one certificate deactivated and its policy
    # detached, the other detached from the thing
    (current, current_arn), (pending, pending_arn) = onboard(iot, "pump-0003")
    iot.update_certificate(certificateId=current, newStatus="INACTIVE")
    iot.detach_policy(policyName=POLICY, target=current_arn)
    iot.detach_thing_principal(thingName="pump-0003", principal=pending_arn)

    # When the teardown runs
    assert teardown(registry, "pump-0003", [(current, current_arn), (pending, pending_arn)])

    # Then it finishes what is left
    assert_gone(iot, "pump-0003", [(current, current_arn), (pending, pending_arn)])


def test_call_budgets(iot, registry, registry_client):
    [(certificate_id, arn)] = onboard(iot, "pump-0004", pending=False)
    injector = FaultInjector().watch(registry_client)

    injector.arm(None)
    assert registry.teardown_certificate(certificate_id)
    assert injector.calls == [
        "DescribeCertificate",
        "UpdateCertificate",
        "ListAttachedPolicies",
        "DetachPolicy",
        "ListPrincipalThings",
        "DetachThingPrincipal",
        "DeleteCertificate",
    ]

    injector.arm(None)
    assert registry.delete_thing("pump-0004", owned_thing_types=OWNED)
    assert injector.calls == ["DescribeThing", "ListThingPrincipals", "DeleteThing"]
    assert_gone(iot, "pump-0004", [(certificate_id, arn)])


def test_a_revoked_certificate_is_deleted_without_leaving_revoked(iot, registry, registry_client):
    [(certificate_id, _)] = onboard(iot, "pump-0005", pending=False)
    iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
    injector = FaultInjector().watch(registry_client)
    injector.arm(None)

    assert registry.teardown_certificate(certificate_id)

    assert "UpdateCertificate" not in injector.calls
    assert not exists(iot.describe_certificate, certificateId=certificate_id)


# ---- waiting out AWS IoT's eventual consistency -------------------------------------------------


@pytest.mark.parametrize("code", ["DeleteConflictException", "CertificateStateException"])
@pytest.mark.parametrize("times", range(len(TEARDOWN_DELAYS) + 1))
def test_a_certificate_deletion_refused_while_detaches_settle_is_retried(
    iot, registry_client, code, times
):
    [(certificate_id, _)] = onboard(iot, f"pump-2{times}", pending=False)
    client = Refusing(registry_client, "delete_certificate", code, times)
    sleeps: list[float] = []
    retries: list[str] = []
    registry = IotRegistry(client=client, sleep=sleeps.append, on_retry=retries.append)

    assert registry.teardown_certificate(certificate_id)

    assert client.calls == times + 1
    assert sleeps == list(TEARDOWN_DELAYS[:times])
    assert retries == ["DeleteCertificate"] * times
    assert not exists(iot.describe_certificate, certificateId=certificate_id)


def test_the_waits_are_bounded():
    assert len(TEARDOWN_DELAYS) + 1 <= 5
    assert sum(TEARDOWN_DELAYS) <= 4.0


def test_a_deletion_that_does_not_settle_in_time_is_reported_and_breaks_nothing(
    iot, registry_client
):
    [(certificate_id, arn)] = onboard(iot, "pump-0006", pending=False)
    attempts = len(TEARDOWN_DELAYS) + 1
    client = Refusing(registry_client, "delete_certificate", "DeleteConflictException", attempts)
    sleeps: list[float] = []
    registry = IotRegistry(client=client, sleep=sleeps.append)

    # When AWS IoT refuses the deletion for longer than the bound
    with pytest.raises(TeardownNotSettled) as raised:
        registry.teardown_certificate(certificate_id)

    # Then the caller is told the work is not finished (the queue retries later)...
    error = raised.value
    assert (error.status, error.code) == (503, "teardown_not_settled")
    assert error.details == {
        "resource": certificate_id,
        "operation": "DeleteCertificate",
        "aws_code": "DeleteConflictException",
        "attempts": attempts,
    }
    assert sleeps == list(TEARDOWN_DELAYS)
    # ...with the steps done staying done: out of ACTIVE, detached, still there
    assert status(iot, certificate_id) == "INACTIVE"
    assert iot.list_attached_policies(target=arn)["policies"] == []
    assert iot.list_principal_things(principal=arn)["things"] == []
    # and the next run, once AWS IoT has settled, finishes
    assert IotRegistry(client=registry_client).teardown_certificate(certificate_id)
    assert not exists(iot.describe_certificate, certificateId=certificate_id)


@pytest.mark.parametrize("times", [2, len(TEARDOWN_DELAYS) + 1])
def test_a_thing_deletion_refused_while_principals_detach_is_retried(iot, registry_client, times):
    certificates = onboard(iot, f"pump-3{times}", pending=False)
    [(certificate_id, _)] = certificates
    assert IotRegistry(client=registry_client).teardown_certificate(certificate_id)
    client = Refusing(registry_client, "delete_thing", "InvalidRequestException", times)
    sleeps: list[float] = []
    registry = IotRegistry(client=client, sleep=sleeps.append)

    if times <= len(TEARDOWN_DELAYS):
        assert registry.delete_thing(f"pump-3{times}", owned_thing_types=OWNED)
        assert sleeps == list(TEARDOWN_DELAYS[:times])
        assert_gone(iot, f"pump-3{times}", certificates)
    else:
        with pytest.raises(TeardownNotSettled) as raised:
            registry.delete_thing(f"pump-3{times}", owned_thing_types=OWNED)
        assert raised.value.details["operation"] == "DeleteThing"
        assert exists(iot.describe_thing, thingName=f"pump-3{times}")


def test_an_unexpected_failure_is_not_retried(iot, registry_client):
    [(certificate_id, _)] = onboard(iot, "pump-0007", pending=False)
    client = Refusing(registry_client, "delete_certificate", "AccessDeniedException", 1)
    sleeps: list[float] = []

    with pytest.raises(ClientError):
        IotRegistry(client=client, sleep=sleeps.append).teardown_certificate(certificate_id)

    assert (client.calls, sleeps) == (1, [])


def test_aws_iot_refuses_the_teardown_out_of_order(iot):
    # What the order above is for (and what moto, patched, enforces as AWS IoT does)
    [(certificate_id, _)] = onboard(iot, "pump-0008", pending=False)
    with pytest.raises(ClientError, match="CertificateStateException"):
        iot.delete_certificate(certificateId=certificate_id)
    iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
    with pytest.raises(ClientError, match="DeleteConflictException"):
        iot.delete_certificate(certificateId=certificate_id)
    with pytest.raises(ClientError, match="InvalidRequestException"):
        iot.delete_thing(thingName="pump-0008")


# ---- things that are not fleetkey's ------------------------------------------------------------


@pytest.mark.parametrize("thing_type", ["acme-robot", None])
def test_a_thing_that_is_not_fleetkeys_is_refused_and_left_intact(iot, registry, thing_type):
    # Given a thing named like the device, of another team (another type, or none)
    if thing_type:
        iot.create_thing_type(thingTypeName=thing_type)
        iot.create_thing(thingName="pump-0009", thingTypeName=thing_type)
    else:
        iot.create_thing(thingName="pump-0009")
    theirs, their_arn = register(iot, "pump-0009", 9)
    iot.attach_thing_principal(thingName="pump-0009", principal=their_arn)

    with pytest.raises(ThingConflict) as raised:
        registry.delete_thing("pump-0009", owned_thing_types=OWNED)

    assert raised.value.details == {"thing_name": "pump-0009", "thing_type": thing_type}
    assert iot.list_thing_principals(thingName="pump-0009")["principals"] == [their_arn]
    assert status(iot, theirs) == "ACTIVE"


def test_an_absent_thing_or_certificate_is_torn_down_already(iot, registry):
    assert registry.delete_thing("pump-nowhere", owned_thing_types=OWNED)
    assert registry.teardown_certificate("ab" * 32)


# ---- suspend and resume -----------------------------------------------------------------------


def test_certificates_are_suspended_and_resumed(iot, registry, registry_client):
    [(certificate_id, _)] = onboard(iot, "pump-0010", pending=False)
    injector = FaultInjector().watch(registry_client)

    injector.arm(None)
    assert registry.set_certificate_status(certificate_id, "INACTIVE")
    assert injector.calls == ["DescribeCertificate", "UpdateCertificate"]
    assert status(iot, certificate_id) == "INACTIVE"

    injector.arm(None)
    assert registry.set_certificate_status(certificate_id, "INACTIVE")  # already: one read
    assert injector.calls == ["DescribeCertificate"]

    assert registry.set_certificate_status(certificate_id, "ACTIVE")
    assert status(iot, certificate_id) == "ACTIVE"


def test_a_revoked_certificate_stays_revoked(iot, registry, registry_client):
    [(certificate_id, _)] = onboard(iot, "pump-0011", pending=False)
    iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
    injector = FaultInjector().watch(registry_client)
    injector.arm(None)

    assert registry.set_certificate_status(certificate_id, "ACTIVE") is False
    assert registry.set_certificate_status(certificate_id, "INACTIVE") is False

    assert injector.calls == ["DescribeCertificate", "DescribeCertificate"]
    assert status(iot, certificate_id) == "REVOKED"
    # AWS IoT itself (moto, patched) refuses to leave REVOKED
    with pytest.raises(ClientError, match="CertificateStateException"):
        iot.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")


def test_a_certificate_revoked_between_read_and_update_is_left_revoked(iot, registry_client):
    [(certificate_id, _)] = onboard(iot, "pump-0012", pending=False)

    class RevokedMeanwhile(Refusing):
        def __getattr__(self, name: str):
            if name == "update_certificate":
                iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
            return super().__getattr__(name)

    client = RevokedMeanwhile(registry_client, "none", "", 0)
    assert IotRegistry(client=client).set_certificate_status(certificate_id, "INACTIVE") is False
    assert status(iot, certificate_id) == "REVOKED"


def test_an_absent_certificate_has_no_status_to_set(iot, registry):
    assert registry.set_certificate_status("cd" * 32, "INACTIVE") is False


def test_only_active_and_inactive_can_be_set(iot, registry):
    [(certificate_id, _)] = onboard(iot, "pump-0013", pending=False)
    with pytest.raises(ValueError, match="ACTIVE or INACTIVE"):
        registry.set_certificate_status(certificate_id, "REVOKED")  # type: ignore[arg-type]
    assert status(iot, certificate_id) == "ACTIVE"


# ---- the data plane ---------------------------------------------------------------------------


class RecordingData:
    """An iot-data client that records what it is asked."""

    def __init__(self, not_connected: bool = False) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.not_connected = not_connected

    def publish(self, **kwargs) -> dict:
        self.requests.append(("Publish", kwargs))
        return {}

    def delete_connection(self, **kwargs) -> dict:
        self.requests.append(("DeleteConnection", kwargs))
        if self.not_connected:
            error = {"Error": {"Code": "ResourceNotFoundException", "Message": "no client"}}
            raise ClientError(error, "DeleteConnection")
        return {}


def test_a_command_is_json_on_the_devices_command_topic_at_qos_1():
    data = RecordingData()
    DeviceChannel(client=data).send_command("pump-0001", "reset", {"reason": "decommissioned"})
    [(operation, request)] = data.requests
    assert operation == "Publish"
    assert request["topic"] == "fleetkey/pump-0001/commands/reset"
    assert request["qos"] == 1
    assert json.loads(request["payload"]) == {"reason": "decommissioned"}


def test_disconnect_discards_the_session_and_the_will():
    data = RecordingData()
    assert DeviceChannel(client=data).disconnect("pump-0001") is True
    assert data.requests == [
        (
            "DeleteConnection",
            {"clientId": "pump-0001", "cleanSession": True, "preventWillMessage": True},
        )
    ]
    assert DeviceChannel(client=RecordingData(not_connected=True)).disconnect("pump-0001") is False


UNSAFE_DEVICE_IDS = ["pump-0001/x", "pump-+", "#", "$aws", ""]


@pytest.mark.parametrize(
    ("device_id", "command"),
    [("pump-0001", "shutdown"), *((device_id, "reset") for device_id in UNSAFE_DEVICE_IDS)],
)
def test_a_command_that_would_change_the_topic_is_refused_before_aws(device_id, command):
    data = RecordingData()
    with pytest.raises(ValueError):
        DeviceChannel(client=data).send_command(device_id, command, {})
    assert data.requests == []


@pytest.mark.parametrize("device_id", UNSAFE_DEVICE_IDS)
def test_a_client_id_aws_iot_cannot_have_is_refused_before_aws(device_id):
    data = RecordingData()
    with pytest.raises(ValueError):
        DeviceChannel(client=data).disconnect(device_id)
    assert data.requests == []


def test_commands_and_disconnections_against_aws_iot_data(iot):
    # moto records the publish; DeleteConnection (a moto patch) finds no connected client, as AWS
    # IoT answers for a device that is offline
    channel = DeviceChannel(endpoint_url=DATA_ENDPOINT, region=REGION)
    channel.send_command("pump-0001", "validate", {"nonce": "n-1"})
    assert channel.disconnect("pump-0001") is False

    from moto.iotdata.models import iotdata_backends

    [(topic, payload)] = iotdata_backends[ACCOUNT][REGION].published_payloads
    assert topic == "fleetkey/pump-0001/commands/validate"
    assert json.loads(payload) == {"nonce": "n-1"}


def test_the_data_endpoint_is_asked_once_per_process_when_not_configured():
    class Endpoints:
        calls = 0

        def describe_endpoint(self, endpointType: str) -> dict:
            assert endpointType == "iot:Data-ATS"
            Endpoints.calls += 1
            return {"endpointAddress": "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"}

    forget_data_endpoints()
    try:
        for _ in range(2):
            channel = DeviceChannel(region=REGION, iot_client=Endpoints())  # type: ignore[arg-type]
            client = channel._data()  # built on first use, not at construction
            assert (
                client.meta.endpoint_url == "https://a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"
            )
        assert Endpoints.calls == 1
        configured = DeviceChannel(endpoint_url=DATA_ENDPOINT, iot_client=Endpoints())  # type: ignore[arg-type]
        assert configured._data().meta.endpoint_url == DATA_ENDPOINT
        assert Endpoints.calls == 1
    finally:
        forget_data_endpoints()
