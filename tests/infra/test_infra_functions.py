"""The functions: runtime, layer, tracing, logs, environment and the failure destination."""

import pytest

from fleetkey_infra import constants
from infra_template import data_key_key_id, function_by_service, of_type, only, render

SERVICES = [
    constants.REGISTRATION_SERVICE_NAME,
    constants.ADMIN_SERVICE_NAME,
    constants.TOKEN_SERVICE_NAME,
    constants.DISCOVERY_SERVICE_NAME,
    constants.INTROSPECT_SERVICE_NAME,
    constants.MAINTENANCE_SERVICE_NAME,
    constants.CONVERGE_SERVICE_NAME,
    constants.DEVICE_EVENTS_SERVICE_NAME,
    constants.DATA_KEYS_SERVICE_NAME,
    constants.ROTATION_SERVICE_NAME,
    constants.ROTATION_EVENTS_SERVICE_NAME,
    constants.VALIDATIONS_SERVICE_NAME,
]


def test_there_are_exactly_the_fleetkey_functions(resources: dict[str, dict]) -> None:
    # Given the synthesized stack
    # When listing its functions
    functions = of_type(resources, "AWS::Lambda::Function")

    # Then there are registration, admin, token, discovery, introspect, maintenance, converge,
    # device_events, data_keys, rotation, rotation_events and validations and nothing else (no
    # CDK helpers)
    assert len(functions) == len(SERVICES)
    for service in SERVICES:
        function_by_service(resources, service)


@pytest.mark.parametrize("service", SERVICES)
def test_function_runs_python312_on_arm64_with_the_core_layer(
    resources: dict[str, dict], service: str
) -> None:
    # Given the function of one service and the core layer
    layer_id, layer = only(resources, "AWS::Lambda::LayerVersion")
    _, function = function_by_service(resources, service)
    props = function["Properties"]

    # When reading its runtime settings
    # Then it runs the layer's runtime and architecture, with the layer attached and traced
    assert props["Runtime"] == "python3.12"
    assert props["Architectures"] == ["arm64"]
    assert props["Handler"] == "handler.handler"
    assert props["Layers"] == [{"Ref": layer_id}]
    assert props["TracingConfig"] == {"Mode": "Active"}
    assert layer["Properties"]["CompatibleRuntimes"] == ["python3.12"]
    assert layer["Properties"]["CompatibleArchitectures"] == ["arm64"]


@pytest.mark.parametrize(
    ("service", "memory", "timeout"),
    [
        (constants.REGISTRATION_SERVICE_NAME, 512, 30),
        (constants.ADMIN_SERVICE_NAME, 512, 29),
        (constants.TOKEN_SERVICE_NAME, 512, 10),
        (constants.DISCOVERY_SERVICE_NAME, 512, 10),
        (constants.INTROSPECT_SERVICE_NAME, 512, 10),
        (constants.MAINTENANCE_SERVICE_NAME, 256, 60),
        (constants.CONVERGE_SERVICE_NAME, 256, 60),
        (constants.DEVICE_EVENTS_SERVICE_NAME, 256, 30),
        (constants.DATA_KEYS_SERVICE_NAME, 512, 10),
        (constants.ROTATION_SERVICE_NAME, 512, 29),
        # under the sweep's one-minute period
        (constants.ROTATION_EVENTS_SERVICE_NAME, 512, 55),
        # long polls of up to 20 s, within API Gateway's 29 s
        (constants.VALIDATIONS_SERVICE_NAME, 512, 29),
    ],
)
def test_function_memory_and_timeout(
    resources: dict[str, dict], service: str, memory: int, timeout: int
) -> None:
    # Given the function of one service
    _, function = function_by_service(resources, service)

    # When reading its sizing
    # Then memory and timeout are as designed (the API's functions stay within API Gateway's
    # 29 s)
    assert function["Properties"]["MemorySize"] == memory
    assert function["Properties"]["Timeout"] == timeout


# The settings each function receives beyond the common ones (table, name prefix, Powertools).
ISSUER = "FLEETKEY_ISSUER"
# Every registry reader trusts a signing key only if its policy is the one built from the token
# role's ARN, and reads the stack's first key while the registry is empty.
KEY_TRUST = {
    "FLEETKEY_TOKEN_SIGNER_ROLE_ARN",
    "FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS",
    "FLEETKEY_TOKEN_KEY_ID",
}
# The lifecycle queue: who queues lifecycle work (admin: decommission; device_events) and who does
# it (converge). The data-key KMS key: who issues data keys (data_keys) and who hands the wrapped
# blob to a backend (admin).
LIFECYCLE_QUEUE = "FLEETKEY_LIFECYCLE_QUEUE_URL"
DATA_KEY = "FLEETKEY_DATA_KEY_ID"
QUIET = "FLEETKEY_RECOMMISSION_QUIET_SECONDS"
# Certificate rotation: both functions get the same settings (neither acts on a default the other
# does not share).
ROTATION_SETTINGS = {
    ISSUER,
    LIFECYCLE_QUEUE,
    "FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS",
    "FLEETKEY_ROTATION_COMMIT_SECONDS",
    "FLEETKEY_RENEWAL_RATE_PER_MINUTE",
}
EXTRA_SETTINGS = {
    constants.REGISTRATION_SERVICE_NAME: set(),
    # (and a recommission waits out the converge function's timeout after a teardown)
    constants.ADMIN_SERVICE_NAME: {ISSUER, LIFECYCLE_QUEUE, DATA_KEY, QUIET} | KEY_TRUST,
    constants.TOKEN_SERVICE_NAME: {ISSUER} | KEY_TRUST,
    constants.DISCOVERY_SERVICE_NAME: {ISSUER} | KEY_TRUST,
    constants.INTROSPECT_SERVICE_NAME: {ISSUER} | KEY_TRUST,
    constants.MAINTENANCE_SERVICE_NAME: KEY_TRUST,
    constants.CONVERGE_SERVICE_NAME: {LIFECYCLE_QUEUE},
    constants.DEVICE_EVENTS_SERVICE_NAME: {LIFECYCLE_QUEUE},
    # verifies the device's assertion (addressed to the issuer) against its certificate: no token
    # signing key is read
    constants.DATA_KEYS_SERVICE_NAME: {ISSUER, DATA_KEY},
    constants.ROTATION_SERVICE_NAME: ROTATION_SETTINGS,
    constants.ROTATION_EVENTS_SERVICE_NAME: ROTATION_SETTINGS,
    # stores and returns the token the token function issues: no signing key is read
    constants.VALIDATIONS_SERVICE_NAME: {ISSUER},
}


@pytest.mark.parametrize("service", SERVICES)
def test_function_environment_configures_settings_and_powertools(
    resources: dict[str, dict], service: str
) -> None:
    # Given the function of one service and the table
    table_id, _ = only(resources, "AWS::DynamoDB::Table")
    _, function = function_by_service(resources, service)

    # When reading its environment
    env = function["Properties"]["Environment"]["Variables"]

    # Then Settings.from_environ and Powertools find what they need, and nothing else is set
    common = {
        "FLEETKEY_TABLE": {"Ref": table_id},
        "FLEETKEY_NAME_PREFIX": constants.NAME_PREFIX,
        "FLEETKEY_STACK_NAME": constants.STACK_ID,
        "POWERTOOLS_SERVICE_NAME": service,
        "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
        "POWERTOOLS_LOG_LEVEL": "INFO",
    }
    assert {k: v for k, v in env.items() if k in common} == common
    assert set(env) - set(common) == EXTRA_SETTINGS[service]


@pytest.mark.parametrize(
    "service", sorted(s for s, extra in EXTRA_SETTINGS.items() if ISSUER in extra)
)
def test_issuer_is_the_api_stage_base_url(resources: dict[str, dict], service: str) -> None:
    # Given the REST API and the function of one service that knows the issuer
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    _, function = function_by_service(resources, service)

    # When reading FLEETKEY_ISSUER
    issuer = render(function["Properties"]["Environment"]["Variables"][ISSUER])

    # Then it is the stage's base URL, without a trailing slash (the RFC 8414 issuer, the
    # audience of device assertions), built from the API's id and the stage name
    assert issuer == (
        f"https://<{api_id}>.execute-api.<AWS::Region>.<AWS::URLSuffix>/{constants.API_STAGE_NAME}"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_function_logs_to_its_own_log_group_with_retention(
    resources: dict[str, dict], service: str
) -> None:
    # Given the function of one service
    _, function = function_by_service(resources, service)

    # When following its logging configuration
    log_group_id = function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
    log_group = resources[log_group_id]

    # Then it is an explicit log group with a retention
    assert log_group["Type"] == "AWS::Logs::LogGroup"
    assert log_group["Properties"]["RetentionInDays"] == 30


@pytest.mark.parametrize(
    "service", sorted(s for s, extra in EXTRA_SETTINGS.items() if LIFECYCLE_QUEUE in extra)
)
def test_lifecycle_queue_url_is_the_lifecycle_queue(
    resources: dict[str, dict], template_outputs: dict[str, dict], service: str
) -> None:
    # Given the function of one service that queues or does lifecycle work
    _, function = function_by_service(resources, service)

    # When reading FLEETKEY_LIFECYCLE_QUEUE_URL
    url = function["Properties"]["Environment"]["Variables"][LIFECYCLE_QUEUE]

    # Then it is the lifecycle queue's URL (the one the stack outputs)
    assert url == template_outputs["LifecycleQueueUrl"]["Value"]
    assert resources[url["Ref"]]["Type"] == "AWS::SQS::Queue"


@pytest.mark.parametrize(
    "service", sorted(s for s, extra in EXTRA_SETTINGS.items() if DATA_KEY in extra)
)
def test_data_key_id_is_the_data_key_kms_key(resources: dict[str, dict], service: str) -> None:
    # Given the function of one service that issues or hands out data keys
    _, function = function_by_service(resources, service)

    # When reading FLEETKEY_DATA_KEY_ID
    key = function["Properties"]["Environment"]["Variables"][DATA_KEY]

    # Then it is the data-key KMS key (not the table's, not a signing key)
    assert key == {"Ref": data_key_key_id(resources)}
    assert resources[key["Ref"]]["Properties"]["Description"] == constants.DATA_KEY_DESCRIPTION


def _invoke_config(resources: dict[str, dict], function_id: str) -> dict:
    [config] = [
        r["Properties"]
        for r in of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
        if r["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    return config


def test_only_the_iot_rule_functions_have_failure_destinations(
    resources: dict[str, dict],
) -> None:
    # Given every async invoke configuration
    configured = {
        r["Properties"]["FunctionName"]["Ref"]
        for r in of_type(resources, "AWS::Lambda::EventInvokeConfig").values()
    }

    # Then they are registration's, device_events' and rotation_events' (invoked asynchronously
    # by IoT rules; rotation_events also by the sweep's schedule)
    assert configured == {
        function_by_service(resources, constants.REGISTRATION_SERVICE_NAME)[0],
        function_by_service(resources, constants.DEVICE_EVENTS_SERVICE_NAME)[0],
        function_by_service(resources, constants.ROTATION_EVENTS_SERVICE_NAME)[0],
    }


@pytest.mark.parametrize(
    "service",
    [
        constants.REGISTRATION_SERVICE_NAME,
        constants.DEVICE_EVENTS_SERVICE_NAME,
        constants.ROTATION_EVENTS_SERVICE_NAME,
    ],
)
def test_async_failures_go_to_a_failure_queue_after_two_retries(
    resources: dict[str, dict], service: str
) -> None:
    # Given the function and its async invoke configuration
    function_id, _ = function_by_service(resources, service)
    props = _invoke_config(resources, function_id)

    # When following the on-failure destination
    queue_id = props["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]
    queue = resources[queue_id]

    # Then events that fail twice more land in an encrypted SQS queue
    assert props["FunctionName"] == {"Ref": function_id}
    assert props["MaximumRetryAttempts"] == 2
    assert queue["Type"] == "AWS::SQS::Queue"
    assert queue["Properties"]["SqsManagedSseEnabled"] is True


def test_failure_queues_refuse_requests_without_tls(resources: dict[str, dict]) -> None:
    # Given every queue of the stack
    queues = of_type(resources, "AWS::SQS::Queue")
    policies = of_type(resources, "AWS::SQS::QueuePolicy").values()

    # When looking for the queue policy that covers each one
    for queue_id in queues:
        statements = [
            s
            for p in policies
            if {"Ref": queue_id} in p["Properties"]["Queues"]
            for s in p["Properties"]["PolicyDocument"]["Statement"]
        ]

        # Then insecure transport is denied (enforce_ssl)
        assert any(
            s["Effect"] == "Deny" and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
            for s in statements
        ), render(statements)
