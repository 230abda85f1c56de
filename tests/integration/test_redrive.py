"""`fleetkey redrive`: every failure queue the CDK stack creates, filled with what AWS leaves in it
(Lambda's invocation records, AWS IoT's error action messages, EventBridge's dead letters, SQS's
dead letters), re-delivered to the function that failed: the real functions, loaded as Lambda
loads them, run on the stack; the re-invocation goes through the asynchronous invocation port
(`fleetkey_local.lambda_invoke.AsyncInvoker` here, boto3's Lambda Invoke with InvocationType Event
deployed and against the local stack's Lambda endpoint). That these are all the stack's failure
queues: tests/infra/test_infra_redrive.py."""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from cryptography.hazmat.primitives.asymmetric import ec

from fleetkey.crypto.certificates import certificate_id
from fleetkey.domain.lifecycle import DeviceState
from fleetkey_cli import redrive
from fleetkey_cli.main import _parser, main
from fleetkey_cli.redrive import (
    BY_NAME,
    QUEUES,
    Environment,
    LambdaInvoker,
    LocalInvoker,
    RedeliveryFailed,
    Redriver,
    Target,
)
from fleetkey_local.device import rotation_assertion, rotation_csr, rotation_request
from fleetkey_local.failure_queues import (
    REGISTRATION_RETRY_OUTPUT,
    destination_record,
    local_outputs,
    provision_failure_queues,
    rule_error_message,
    schedule_dead_letter,
)
from fleetkey_local.lambda_invoke import AsyncInvoker, LocalLambdaEndpoint
from fleetkey_local.queues import QueueWorker
from fleetkey_local.rules import RULES, RulesEngine
from fleetkey_local.serve import scheduled_event
from fleetkey_local.stack import ACCOUNT, REGION, TABLE
from tests.conftest import ROOT, load_event
from tests.support.handlers import load_handler
from tests.support.pki_cache import ca as cached_ca

DATA_ENDPOINT = "https://data-ats.iot.eu-west-1.amazonaws.com"
RUNBOOK = ROOT / "docs" / "runbook-redrive.md"
SWEEP_RULE = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/Fleetkey-SchedulesRotationSweep-1A2B"
MAINTENANCE_RULE = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/Fleetkey-SchedulesMaintenance-3C4D"
# The command lines docs/runbook-redrive.md shows (after `fleetkey`), each run by a test below.
COMMANDS = {
    "list all": "redrive all --dry-run",
    "list registrations": "redrive registration-failures --dry-run",
    "registrations": "redrive registration-failures",
    "lifecycle": "redrive lifecycle-dlq --max 10",
    "deployed list": "--region eu-west-1 redrive all --dry-run --stack Fleetkey",
    "deployed tamper": "--region eu-west-1 redrive tamper-rule-errors --stack Fleetkey",
}


def command_line(name: str) -> list[str]:
    return COMMANDS[name].split()


# ---- the harness ---------------------------------------------------------------------------------


class Harness:
    """The stack with the deployed failure queues, its outputs, Lambda's asynchronous invocation
    (synchronous here: the attempts run before `invoke` returns) and a redriver."""

    def __init__(self, stack, loader=load_handler) -> None:
        self.stack = stack
        self.sqs = stack.make_client("sqs")
        # The retry queue gives a failed registration back twice, at once (deployed: 10 times,
        # 3 minutes apart), before SQS moves it to registration-failures.
        self.failure_queues = provision_failure_queues(
            self.sqs, retry_max_receive_count=2, retry_visibility_timeout=0
        )
        self.outputs = local_outputs(
            lifecycle_queue_url=stack.settings.lifecycle_queue_url,
            lifecycle_dead_letter_queue_url=stack.lifecycle_dead_letter_queue_url,
            failure_queue_urls=self.failure_queues,
        )
        self.lambda_ = self.invoker(loader)
        self.loader = loader
        self.out = io.StringIO()

    def retry_registrations(self) -> QueueWorker:
        """Lambda's event source mapping of the registration retry queue, until it is empty."""
        worker = QueueWorker(
            self.sqs,
            self.failure_queues[REGISTRATION_RETRY_OUTPUT],
            "registration",
            loader=self.loader,
        )
        assert worker.drain(timeout=30)
        return worker

    def invoker(self, loader=load_handler) -> AsyncInvoker:
        return AsyncInvoker.with_destinations(
            self.sqs, self.failure_queues, synchronous=True, retry_delays=(), loader=loader
        )

    def redriver(self, invoker: Any = None, **options: Any) -> Redriver:
        return Redriver(
            self.sqs,
            invoker or LocalInvoker(self.lambda_),
            self.outputs,
            wait_seconds=0,
            out=self.out,
            **options,
        )

    def run(self, name: str, **options: Any) -> redrive.Report:
        return self.redriver().run(BY_NAME[name], **options)

    def url(self, name: str) -> str:
        return self.outputs[BY_NAME[name].queue_output]

    def send(self, name: str, body: Any, attributes: dict | None = None) -> None:
        request = {"QueueUrl": self.url(name), "MessageBody": body}
        if not isinstance(body, str):
            request["MessageBody"] = json.dumps(body)
        if attributes:
            request["MessageAttributes"] = attributes
        self.sqs.send_message(**request)
        time.sleep(0.002)  # a redrive takes what was sent before it started (SentTimestamp)

    def bodies(self, name: str) -> list[Any]:
        """What the queue holds, every message visible (a peek: VisibilityTimeout 0)."""
        messages = self.sqs.receive_message(
            QueueUrl=self.url(name), MaxNumberOfMessages=10, VisibilityTimeout=0
        ).get("Messages", [])
        return [json.loads(m["Body"]) for m in messages]


def environment(stack) -> dict[str, str]:
    """The functions' environment, as the stack provisioned it."""
    return {"FLEETKEY_TABLE": TABLE, "FLEETKEY_IOT_DATA_ENDPOINT": DATA_ENDPOINT} | (
        stack.environment()
    )


@pytest.fixture
def harness(stack, monkeypatch):
    for name, value in environment(stack).items():
        monkeypatch.setenv(name, value)
    return Harness(stack)


@pytest.fixture
def acme(stack):
    authority = cached_ca("acme")
    stack.register_ca(authority)
    return authority


def registered(stack, acme, device_id: str):
    key, certificate, event = stack.manufacture(acme, device_id)
    assert stack.register(event).accepted
    return key, certificate


def flaky(failures: int):
    """A loader whose handlers fail (AWS throttling) `failures` times in all, then run."""
    left = {"n": failures}

    def load(name: str):
        real = load_handler(name).handler

        def handler(event, context):
            if left["n"] > 0:
                left["n"] -= 1
                raise ClientError(
                    {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                    "TransactWriteItems",
                )
            return real(event, context)

        return SimpleNamespace(handler=handler)

    return load


# ---- Lambda's on-failure destinations ----------------------------------------------------------


def test_a_registration_that_failed_every_retry_is_finished_by_the_redrive(harness, acme):
    stack, iot = harness.stack, harness.stack.harness_iot
    # Given another team's thing named like the device: the registration fails (ThingConflict)
    iot.create_thing(thingName="pump-r1", attributePayload={"attributes": {"owner": "them"}})
    _, certificate, event = stack.manufacture(acme, "pump-r1")
    # When AWS IoT's rule invokes the registration function asynchronously: three attempts fail,
    # Lambda leaves its invocation record in the retry queue, the function's retries of it fail
    # too, and SQS moves it to the failure queue
    invocation = harness.lambda_.invoke("fleetkey-registration", event)
    assert (invocation.status, invocation.attempts) == ("failed", 3)
    retries = harness.retry_registrations()
    assert retries.counters["batches_failed"] == 2 and retries.counters["deleted"] == 0
    [record] = harness.bodies("registration-failures")
    assert record["requestPayload"] == event
    assert record["requestContext"]["functionArn"].endswith(
        ":function:fleetkey-registration:$LATEST"
    )
    assert record["responsePayload"]["errorType"] == "ThingConflict"

    # When the operator lists the queue
    report = harness.run("registration-failures", dry_run=True)
    # Then it shows the function, the event, when it first failed, how often it was received and
    # why it failed, and leaves it where it is
    [entry] = report.entries
    assert entry.function == "registration" and entry.outcome == "listed"
    assert entry.summary.startswith(f"certificate {event['certificateId'][:12]}")
    # (received at least twice: the peek above and this listing; moto, like SQS, keeps the
    # retry queue's two receives on a message it moves to the dead-letter queue)
    assert entry.first_failure is not None and entry.receive_count == 4
    assert "RetriesExhausted after 3 attempts: ThingConflict" in entry.error
    assert len(harness.bodies("registration-failures")) == 1
    assert "registration-failures: 1 message(s) listed" in harness.out.getvalue()

    # When it is redriven before the clash is resolved: Lambda accepts the event, the function
    # fails again, and the new record goes the same way back to the queue (the redrive does not
    # loop on it)
    report = harness.run("registration-failures")
    assert [e.outcome for e in report.entries] == ["redriven"]
    harness.retry_registrations()
    [again] = harness.bodies("registration-failures")
    assert again["requestPayload"] == event and again != record
    assert stack.certificate_status(certificate_id(certificate)) == "PENDING_ACTIVATION"

    # When the operator resolves the clash and redrives
    iot.delete_thing(thingName="pump-r1")
    report = harness.run("registration-failures")
    # Then the registration is finished: the device is ACTIVE, its certificate too, and the
    # queue is empty
    assert [e.outcome for e in report.entries] == ["redriven"] and report.ok
    assert stack.devices.get("pump-r1").state is DeviceState.ACTIVE
    assert stack.certificate_status(certificate_id(certificate)) == "ACTIVE"
    assert harness.bodies("registration-failures") == []
    # And a second copy of the event changes nothing (idempotent): the redrive has nothing left
    assert harness.run("registration-failures").entries == []
    assert harness.lambda_.invoke("registration", event).result["status"] == "accepted"


def test_a_tamper_report_that_failed_is_redriven_once_and_suspends_the_device(
    stack, acme, monkeypatch
):
    for name, value in environment(stack).items():
        monkeypatch.setenv(name, value)
    # Given the device_events function throttled for all three attempts of a tamper report
    harness = Harness(stack, loader=flaky(3))
    _, certificate = registered(stack, acme, "pump-t1")
    harness.lambda_.invoke("device_events", {"device_id": "pump-t1"})
    # and Lambda wrote the record twice (an asynchronous invocation may run more than once)
    [record] = harness.bodies("device-event-failures")
    harness.send("device-event-failures", record)
    # When the operator redrives the failure queue
    report = harness.run("device-event-failures")
    # Then the report is re-invoked once (the copy is deleted as a duplicate), the device is
    # suspended for tamper, and nothing is left
    assert [e.outcome for e in report.entries] == ["redriven", "duplicate"]
    assert report.entries[0].summary == "tamper report of pump-t1"
    assert stack.devices.get("pump-t1").state is DeviceState.SUSPENDED
    assert stack.certificate_status(certificate_id(certificate)) == "INACTIVE"
    assert harness.bodies("device-event-failures") == []
    assert [i.result for i in harness.lambda_.invocations[1:]] == [
        {"status": "suspended", "device_id": "pump-t1"}
    ]


def test_the_local_iot_rules_leave_their_functions_failures_in_the_failure_queue(harness):
    # Given the local IoT rules engine with Lambda's on-failure destinations, and a
    # device_events function that fails every attempt
    engine = RulesEngine(RULES, retry_delays=(), loader=flaky(3))
    engine.on_failure = harness.lambda_.destination_for_rules
    # When a device reports tampering
    engine.dispatch("fleetkey/pump-t3/events/tamper", b'{"sensor": "case-open"}')
    assert engine.drain(30)
    engine.close()
    # Then Lambda's record of the three attempts is in device_events' failure queue, with the
    # event the rule gave the function
    [record] = harness.bodies("device-event-failures")
    assert record["requestPayload"] == {"device_id": "pump-t3"}
    assert record["requestContext"]["approximateInvokeCount"] == 3
    assert record["responsePayload"]["errorType"] == "ClientError"
    assert "ThrottlingException" in record["responsePayload"]["errorMessage"]


def test_failed_sweeps_are_one_run_and_presence_events_each_their_own(harness):
    # Given the rotation_events function's failure queue with three failed sweeps and two
    # presence events, and a record of another function
    arn = harness.lambda_.function_arn("rotation_events")
    presence = [{**load_event("presence-connected"), "clientId": f"pump-p{i}"} for i in range(2)]
    sweeps = [scheduled_event(SWEEP_RULE) for _ in range(3)]
    for event in (sweeps[0], presence[0], sweeps[1], presence[1], sweeps[2]):
        record = destination_record(
            function_arn=arn, event=event, error_type="ClientError", error_message="throttled"
        )
        harness.send("rotation-event-failures", record)
    foreign = destination_record(
        function_arn=harness.lambda_.function_arn("registration"),
        event={},
        error_type="E",
        error_message="x",
    )
    harness.send("rotation-event-failures", foreign)
    # When the operator redrives it
    report = harness.run("rotation-event-failures")
    # Then one sweep runs for the three, each presence event is re-invoked, and the record of
    # another function is left in the queue, with why
    assert [e.outcome for e in report.entries] == [
        "redriven",
        "redriven",
        "covered",
        "redriven",
        "covered",
        "skipped",
    ]
    assert "a record of function fleetkey-registration, not fleetkey-rotation_events" in (
        report.entries[-1].detail
    )
    invoked = [i.event for i in harness.lambda_.invocations]
    assert invoked == [sweeps[0], presence[0], presence[1]]
    assert [i.status for i in harness.lambda_.invocations] == ["succeeded"] * 3
    assert harness.bodies("rotation-event-failures") == [foreign]
    assert not report.ok  # something was left: exit status 1


# ---- AWS IoT rules' error actions --------------------------------------------------------------


def test_a_tamper_rule_error_is_the_rules_sql_applied_to_the_original_message(harness, acme):
    stack = harness.stack
    registered(stack, acme, "pump-t2")
    arn = harness.lambda_.function_arn("device_events")
    # Given AWS IoT could not invoke the function for a tamper report on the device's topic,
    # whose payload names another device (the rule reads the device from the topic alone)
    message = rule_error_message(
        rule_name="TamperRuleRule1A2B3C",
        topic="fleetkey/pump-t2/events/tamper",
        payload={"device_id": "pump-t9", "sensor": "case-open"},
        function_arn=arn,
        client_id="pump-t2",
    )
    harness.send("tamper-rule-errors", message)
    # and a message on a topic the rule does not read
    stray = rule_error_message(
        rule_name="TamperRuleRule1A2B3C",
        topic="fleetkey/pump-t2/events/other",
        payload={},
        function_arn=arn,
    )
    harness.send("tamper-rule-errors", stray)
    # When the operator lists, then redrives the queue
    listed = harness.run("tamper-rule-errors", dry_run=True)
    assert [e.summary for e in listed.entries] == [
        "tamper report of pump-t2",
        "message on fleetkey/pump-t2/events/other",
    ]
    assert listed.entries[0].error.startswith("LambdaAction: Failed to invoke lambda function")
    report = harness.run("tamper-rule-errors")
    # Then the function gets what the rule would have given it (the topic's device), the
    # device is suspended, and the stray message is left, with why
    assert [e.outcome for e in report.entries] == ["redriven", "skipped"]
    assert [i.event for i in harness.lambda_.invocations] == [{"device_id": "pump-t2"}]
    assert stack.devices.get("pump-t2").state is DeviceState.SUSPENDED
    assert "is not the tamper rule's" in report.entries[1].detail
    assert harness.bodies("tamper-rule-errors") == [stray]


def test_a_registration_rule_error_registers_the_device(harness, acme):
    stack = harness.stack
    _, certificate, event = stack.manufacture(acme, "pump-r2")
    arn = harness.lambda_.function_arn("registration")
    topic = f"$aws/events/certificates/registered/{event['caCertificateId']}"
    harness.send(
        "registration-rule-errors",
        rule_error_message(rule_name="Reg", topic=topic, payload=event, function_arn=arn),
    )
    # and one whose payload is not the JSON `SELECT *` needs
    garbled = rule_error_message(
        rule_name="Reg", topic=topic, payload=b"\x00\xff", function_arn=arn
    )
    harness.send("registration-rule-errors", garbled)
    report = harness.run("registration-rule-errors")
    assert [e.outcome for e in report.entries] == ["redriven", "skipped"]
    assert "not a JSON object" in report.entries[1].detail
    assert [i.event for i in harness.lambda_.invocations] == [event]
    assert stack.devices.get("pump-r2").state is DeviceState.ACTIVE
    assert stack.certificate_status(certificate_id(certificate)) == "ACTIVE"


def test_a_presence_rule_error_commits_the_pending_rotation(harness, acme):
    stack = harness.stack
    key, certificate = registered(stack, acme, "pump-p9")
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr = rotation_csr(new_key, "pump-p9")
    assertion = rotation_assertion(
        key, certificate_id(certificate), "pump-p9", stack.settings.issuer, csr
    )
    status, answer = stack.rotation.request("pump-p9", rotation_request(csr, assertion))
    assert status == 201
    pending = answer["certificate_id"]
    # Given the device connected with its new certificate, and AWS IoT could not invoke the
    # rotation_events function with the presence event
    presence = {
        **load_event("presence-connected"),
        "clientId": "pump-p9",
        "principalIdentifier": pending,
        "timestamp": int(time.time() * 1000),
    }
    harness.send(
        "presence-rule-errors",
        rule_error_message(
            rule_name="PresenceRule",
            topic="$aws/events/presence/connected/pump-p9",
            payload=presence,
            function_arn=harness.lambda_.function_arn("rotation_events"),
            client_id="pump-p9",
        ),
    )
    # When the operator redrives the queue, Then the rotation is committed
    report = harness.run("presence-rule-errors")
    assert [e.outcome for e in report.entries] == ["redriven"]
    assert report.entries[0].summary == f"pump-p9 connected with certificate {pending[:12]}…"
    assert [i.result for i in harness.lambda_.invocations] == [{"outcome": "committed"}]
    assert stack.devices.get("pump-p9").certificate_id == pending


# ---- EventBridge's dead letters ----------------------------------------------------------------


def test_schedule_dead_letters_are_one_run_of_their_function(harness):
    sweep_target = harness.lambda_.function_arn("rotation_events")
    for _ in range(3):
        body, attributes = schedule_dead_letter(
            scheduled_event(SWEEP_RULE), target_arn=sweep_target
        )
        harness.send("rotation-sweep-dlq", body, attributes)
    maintenance = scheduled_event(MAINTENANCE_RULE)
    body, attributes = schedule_dead_letter(
        maintenance, target_arn=harness.lambda_.function_arn("maintenance")
    )
    harness.send("maintenance-dlq", body, attributes)
    # When the operator lists every failure queue
    args = _parser().parse_args(command_line("list all"))
    environment_ = Environment(harness.sqs, LocalInvoker(harness.lambda_), harness.outputs)
    out = io.StringIO()
    assert redrive.command(args, environment=environment_, out=out, wait_seconds=0) == 0
    listing = out.getvalue()
    assert "rotation-sweep-dlq: 3 message(s) listed" in listing
    assert "maintenance-dlq: 1 message(s) listed" in listing
    assert "MaximumRetryAttemptsExhausted: SDK_CLIENT_ERROR: Rate Exceeded." in listing
    assert f"scheduled run of {maintenance['time']} (rule Fleetkey-SchedulesMaintenance-3C4D)" in (
        listing
    )
    # When they are redriven, Then one sweep runs for the three, and maintenance runs once
    sweeps = harness.run("rotation-sweep-dlq")
    assert [e.outcome for e in sweeps.entries] == ["redriven", "covered", "covered"]
    runs = harness.run("maintenance-dlq")
    assert [e.outcome for e in runs.entries] == ["redriven"]
    assert [(i.function, i.status) for i in harness.lambda_.invocations] == [
        ("rotation_events", "succeeded"),
        ("maintenance", "succeeded"),
    ]
    assert harness.lambda_.invocations[1].result["status"] == "done"
    assert harness.bodies("rotation-sweep-dlq") == harness.bodies("maintenance-dlq") == []


# ---- the lifecycle queue's dead letters ----------------------------------------------------------


def test_lifecycle_dead_letters_go_back_to_the_lifecycle_queue(harness, acme):
    stack = harness.stack
    for device_id in ("pump-l1", "pump-l2"):
        registered(stack, acme, device_id)
        stack.lifecycle.decommission(device_id, reason="end of life", actor="ops")
    # Given the converge function failed both teardowns until SQS dead-lettered them
    queue_url = stack.settings.lifecycle_queue_url
    harness.sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "0"})

    def refusing(event, context):
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]]}

    assert stack.lifecycle_worker(function=refusing).drain(30)
    assert len(harness.bodies("lifecycle-dlq")) == 2
    # When the operator lists the dead letters
    listed = harness.run("lifecycle-dlq", dry_run=True)
    assert sorted(e.summary for e in listed.entries) == [
        "converge pump-l1 (epoch 1)",
        "converge pump-l2 (epoch 1)",
    ]
    assert all(e.receive_count > 8 and e.first_failure for e in listed.entries)
    # When one is redriven (--max 1), Then it is back in the lifecycle queue, the other waits
    first = harness.run("lifecycle-dlq", max_messages=1)
    assert [e.outcome for e in first.entries] == ["redriven"]
    assert len(harness.bodies("lifecycle-dlq")) == 1
    rest = harness.run("lifecycle-dlq")
    assert [e.outcome for e in rest.entries] == ["redriven"]
    # And the converge function finishes both teardowns
    converge = load_handler("converge")
    assert stack.lifecycle_worker(function=converge.handler).drain(30)
    for device_id in ("pump-l1", "pump-l2"):
        assert stack.devices.get(device_id).teardown.status.value == "completed"
    assert harness.bodies("lifecycle-dlq") == []
    converge.components.cache_clear()


# ---- refusals ----------------------------------------------------------------------------------


class Refusing:
    def __init__(self) -> None:
        self.calls = 0

    def invoke_event(self, target: Target, payload: Any) -> None:
        self.calls += 1
        raise RedeliveryFailed("TooManyRequestsException: Rate exceeded")


def test_a_refused_redelivery_keeps_the_message_and_the_redrive_stops(harness):
    arn = harness.lambda_.function_arn("device_events")
    for index in range(5):
        record = destination_record(
            function_arn=arn,
            event={"device_id": f"pump-x{index}"},
            error_type="E",
            error_message="x",
        )
        harness.send("device-event-failures", record)
    # When Lambda refuses every re-invocation
    refusing = Refusing()
    report = harness.redriver(refusing).run(BY_NAME["device-event-failures"])
    # Then the redrive stops after three failures in a row and every message is still there,
    # visible again
    assert refusing.calls == 3 and report.stopped and not report.ok
    assert [e.outcome for e in report.entries] == ["failed"] * 3
    assert len(harness.bodies("device-event-failures")) == 5


def test_the_lambda_invoker_invokes_asynchronously_and_reports_a_refusal():
    client = boto3.client("lambda", region_name=REGION)
    target = Target("registration", "Fleetkey-FunctionsRegistration1A2B-CDEF")
    with Stubber(client) as stub:
        stub.add_response(
            "invoke",
            {"StatusCode": 202},
            {
                "FunctionName": target.deployed_name,
                "InvocationType": "Event",
                "Payload": json.dumps({"certificateId": "c"}).encode(),
            },
        )
        LambdaInvoker(client).invoke_event(target, {"certificateId": "c"})
        stub.add_client_error("invoke", "ResourceNotFoundException", http_status_code=404)
        with pytest.raises(RedeliveryFailed, match="ResourceNotFoundException"):
            LambdaInvoker(client).invoke_event(target, {})


# ---- the command line ----------------------------------------------------------------------------


def test_the_cli_redrives_the_local_stack_through_its_lambda_endpoint(tmp_path, capsys):
    """As `make serve` runs it: moto on 127.0.0.1, the local Lambda endpoint running the
    functions, the outputs file; the CLI's boto3 clients go over HTTP to both."""
    from fleetkey_local.server import FAKE_CREDENTIALS, local_aws
    from fleetkey_local.stack import EmbeddedStack, client_factory

    with local_aws() as endpoint:
        import os

        stack = EmbeddedStack(client_factory(endpoint)).provision()
        os.environ.update(stack.environment())  # local_aws() restores the environment
        sqs = stack.make_client("sqs")
        failure_queues = provision_failure_queues(sqs)
        invoker = AsyncInvoker.with_destinations(sqs, failure_queues)
        with LocalLambdaEndpoint(invoker) as lambda_api:
            outputs = local_outputs(
                lifecycle_queue_url=stack.settings.lifecycle_queue_url,
                lifecycle_dead_letter_queue_url=stack.lifecycle_dead_letter_queue_url,
                failure_queue_urls=failure_queues,
            )
            redrive.write_local_outputs(
                tmp_path,
                outputs,
                aws_endpoint=endpoint,
                lambda_endpoint=lambda_api.url,
                region=REGION,
            )
            acme = cached_ca("acme")
            stack.register_ca(acme)
            _, certificate, event = stack.manufacture(acme, "pump-c1")
            record = destination_record(
                function_arn=invoker.function_arn("registration"),
                event=event,
                error_type="ClientError",
                error_message="Rate exceeded",
            )
            sqs.send_message(
                QueueUrl=outputs["RegistrationFailureQueueUrl"], MessageBody=json.dumps(record)
            )
            time.sleep(0.002)
            state = ["--state-dir", str(tmp_path)]
            # When the operator lists what the failure queues hold
            assert main([*command_line("list registrations"), *state]) == 0
            listing = capsys.readouterr().out
            assert f"certificate {event['certificateId'][:12]}" in listing
            assert "registration-failures: 1 message(s) listed" in listing
            # and redrives them
            assert main([*command_line("registrations"), *state]) == 0
            assert "-> redriven: registration invoked (InvocationType Event)" in (
                capsys.readouterr().out
            )
            # Then Lambda (the local endpoint) ran the registration: the device is ACTIVE
            assert invoker.drain(30)
            assert stack.devices.get("pump-c1").state is DeviceState.ACTIVE
            assert stack.certificate_status(certificate_id(certificate)) == "ACTIVE"
            assert main([*command_line("lifecycle"), *state]) == 0
            assert "lifecycle-dlq: 0 redriven" in capsys.readouterr().out
            # And the endpoint is Lambda's: Event only, known functions, the local credentials
            lambda_client = boto3.client(
                "lambda",
                endpoint_url=lambda_api.url,
                region_name=REGION,
                aws_access_key_id="someone-else",
                aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            )
            with pytest.raises(ClientError, match="AccessDenied"):
                lambda_client.invoke(FunctionName="fleetkey-registration", InvocationType="Event")
            local = boto3.client(
                "lambda",
                endpoint_url=lambda_api.url,
                region_name=REGION,
                aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            )
            with pytest.raises(ClientError, match="InvalidParameterValue"):
                local.invoke(FunctionName="fleetkey-registration")
            with pytest.raises(ClientError, match="ResourceNotFound"):
                local.invoke(FunctionName="fleetkey-nothing", InvocationType="Event")
        invoker.close()
    # Without a local stack, the CLI says so (exit status 2)
    assert main(["redrive", "all", "--state-dir", str(tmp_path / "none")]) == 2
    assert "is the local stack running" in capsys.readouterr().err


def test_the_cli_reads_a_deployed_stack_from_its_cloudformation_outputs(
    harness, monkeypatch, capsys
):
    """`--stack NAME`: the queues and functions from DescribeStacks (moto's CloudFormation), the
    functions invoked through the port (the local handlers stand in for Lambda here)."""
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    template = {
        "Resources": {"Nothing": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {key: {"Value": value} for key, value in harness.outputs.items()},
    }
    cloudformation.create_stack(StackName="Fleetkey", TemplateBody=json.dumps(template))
    monkeypatch.setattr(redrive, "LambdaInvoker", lambda client: LocalInvoker(harness.lambda_))
    deployed = redrive.deployed_environment  # moto's SQS is one server: no long polling
    monkeypatch.setattr(
        redrive, "deployed_environment", lambda *a: replace(deployed(*a), wait_seconds=0)
    )
    harness.send(
        "tamper-rule-errors",
        rule_error_message(
            rule_name="TamperRule",
            topic="fleetkey/pump-d1/events/tamper",
            payload={},
            function_arn=harness.lambda_.function_arn("device_events"),
        ),
    )
    assert main(command_line("deployed list")) == 0
    listing = capsys.readouterr().out
    assert "tamper report of pump-d1" in listing
    assert listing.count("message(s) listed") == len(QUEUES)
    # no such device: the function ignores it, which converges too
    assert main(command_line("deployed tamper")) == 0
    assert [i.result for i in harness.lambda_.invocations] == [
        {"status": "ignored", "reason": "not_found"}
    ]
    assert main(["--region", "eu-west-1", "redrive", "all", "--stack", "Nope"]) == 2


def test_the_runbook_shows_only_commands_the_tests_run():
    shown = {
        line.split("#", 1)[0].strip().removeprefix("fleetkey ")
        for line in RUNBOOK.read_text().splitlines()
        if re.match(r"^\s*fleetkey .*\bredrive\b", line)
    }
    assert shown, "the runbook shows no redrive command"
    missing = shown - set(COMMANDS.values())
    assert not missing, f"commands in {RUNBOOK.name} no test runs: {sorted(missing)}"
