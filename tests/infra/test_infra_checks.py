"""cdk-nag and cfn-lint over the synthesized app, and the guard on the layer build."""

from pathlib import Path

import pytest
from aws_cdk import App
from aws_cdk import aws_sqs as sqs
from cfnlint.api import lint
from cfnlint.config import ManualArgs

from fleetkey_infra import constants, edge
from fleetkey_infra.constructs.layer import LayerNotBuiltError
from fleetkey_infra.stack import FleetkeyStack
from infra_template import IOT_ARN_PREFIX, KMS_KEYS

# Every acknowledged cdk-nag finding, and where: a new one is a reviewed change of this list.
API = "Fleetkey/Api/Api"
PUBLIC_METHODS = [
    f"{API}/Default/v1/token/POST",
    f"{API}/Default/v1/challenge/POST",
    f"{API}/Default/v1/devices/{{device_id}}/data-key/POST",
    f"{API}/Default/.well-known/jwks.json/GET",
    f"{API}/Default/.well-known/oauth-authorization-server/GET",
    f"{API}/Default/v1/devices/{{device_id}}/certificates/POST",
    f"{API}/Default/v1/devices/{{device_id}}/certificates/{{certificate_id}}/commit/POST",
    f"{API}/Default/v1/pki/ca/GET",
    f"{API}/Default/v1/pki/crl/GET",
    f"{API}/Default/.well-known/est/cacerts/GET",
    f"{API}/Default/.well-known/est/simplereenroll/POST",
]
IAM_METHODS = [
    f"{API}/Default/v1/admin/{{proxy+}}/ANY",
    f"{API}/Default/v1/introspect/POST",
    f"{API}/Default/v1/admin/pki/ANY",
    f"{API}/Default/v1/admin/pki/{{proxy+}}/ANY",
    f"{API}/Default/v1/validations/POST",
    f"{API}/Default/v1/validations/{{validation_id}}/GET",
]
FUNCTIONS = [
    "Registration",
    "Admin",
    "Token",
    "Discovery",
    "Introspect",
    "Maintenance",
    "Converge",
    "DeviceEvents",
    "DataKeys",
    "Rotation",
    "RotationEvents",
    "Validations",
]
EXPECTED_ACKNOWLEDGEMENTS = {
    # X-Ray (every function), CA registration and CreateKey (admin, rotation), RegisterCertificate
    # (rotation, rotation_events), DescribeEndpoint (admin, converge, device_events,
    # rotation_events): no resource-level permissions
    *(("AwsSolutions-IAM5[Resource::*]", f"Fleetkey/Functions/{f}Role") for f in FUNCTIONS),
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:cert/*]",
        "Fleetkey/Functions/RegistrationRole",
    ),
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:thing/*]",
        "Fleetkey/Functions/RegistrationRole",
    ),
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:cacert/*]",
        "Fleetkey/Functions/AdminRole",
    ),
    # Suspend / resume (admin, device_events) and teardown (converge): certificates and MQTT
    # clients of devices chosen at run time
    *(
        (f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:{kind}/*]", f"Fleetkey/Functions/{f}Role")
        for f in ("Admin", "DeviceEvents", "Converge")
        for kind in ("cert", "client")
    ),
    (f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:thing/*]", "Fleetkey/Functions/ConvergeRole"),
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:topic/fleetkey/*/commands/reset]",
        "Fleetkey/Functions/ConvergeRole",
    ),
    # Token signing keys created by rotation: by tag (aws:ResourceTag / aws:RequestTag)
    (f"AwsSolutions-IAM5[Resource::{KMS_KEYS}]", "Fleetkey/Functions/AdminRole"),
    (f"AwsSolutions-IAM5[Resource::{KMS_KEYS}]", "Fleetkey/Functions/TokenRole"),
    (f"AwsSolutions-IAM5[Resource::{KMS_KEYS}]", "Fleetkey/Functions/MaintenanceRole"),
    (f"AwsSolutions-IAM5[Resource::{KMS_KEYS}]", "Fleetkey/Functions/DiscoveryRole"),
    (f"AwsSolutions-IAM5[Resource::{KMS_KEYS}]", "Fleetkey/Functions/IntrospectRole"),
    # Certificate rotation: the issuing CA's keys (created at run time, by tag), the certificates
    # it issues and retires, the renewal command topic
    *(
        (f"AwsSolutions-IAM5[Resource::{resource}]", f"Fleetkey/Functions/{f}Role")
        for f in ("Rotation", "RotationEvents")
        for resource in (KMS_KEYS, f"{IOT_ARN_PREFIX}:cert/*")
    ),
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:topic/fleetkey/*/commands/rotate]",
        "Fleetkey/Functions/RotationEventsRole",
    ),
    # Validations: the validate command to the device a relying party names
    (
        f"AwsSolutions-IAM5[Resource::{IOT_ARN_PREFIX}:topic/fleetkey/*/commands/validate]",
        "Fleetkey/Functions/ValidationsRole",
    ),
    *(("AwsSolutions-L1", f"Fleetkey/Functions/{f}") for f in FUNCTIONS),
    # (nor is the registration retry queue's: RegistrationFailures)
    ("AwsSolutions-SQS3", "Fleetkey/Functions/DeviceEventFailures"),
    ("AwsSolutions-SQS3", "Fleetkey/RegistrationRule/Errors"),
    ("AwsSolutions-SQS3", "Fleetkey/TamperRule/Errors"),
    # (the lifecycle queue's dead-letter queue is not a finding: cdk-nag sees the redrive)
    ("AwsSolutions-SQS3", "Fleetkey/Schedules/MaintenanceDeadLetters"),
    ("AwsSolutions-SQS3", "Fleetkey/Functions/RotationEventFailures"),
    ("AwsSolutions-SQS3", "Fleetkey/PresenceRule/Errors"),
    ("AwsSolutions-SQS3", "Fleetkey/Schedules/RotationSweepDeadLetters"),
    (
        "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
        "AmazonAPIGatewayPushToCloudWatchLogs]",
        API,
    ),
    # IAM-authorized methods: SigV4 instead of Cognito
    *(("AwsSolutions-COG4", m) for m in IAM_METHODS),
    # Public device-facing methods: the client authenticates with a signed JWT assertion
    # (RFC 7523); discovery documents are public (RFC 8414, RFC 7517)
    *(("AwsSolutions-APIG4", m) for m in PUBLIC_METHODS),
    *(("AwsSolutions-COG4", m) for m in PUBLIC_METHODS),
}

# cfn-lint warnings accepted, with the reason:
# - W3005: CDK adds an explicit DependsOn from each function to its role (and the role's default
#   policy, which is what matters: the policy must exist before the function is invoked); the
#   role half is redundant with the GetAtt and harmless.
ACCEPTED_CFN_LINT_WARNINGS = ["W3005"]
CFN_LINT_REGIONS = ["eu-west-1", "us-east-1"]


def operator_role_acknowledgements(api_id: str) -> set[tuple[str, str]]:
    """The operator roles' wildcard paths (`.../<api id>/prod/GET/v1/admin/*`): ids chosen at run
    time under each role's routes."""
    return {
        (
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:execute-api:<AWS::Region>:"
            f"<AWS::AccountId>:<{api_id}>/{invocation}]",
            f"{API.rsplit('/', 1)[0]}/OperatorRoles/"
            + "".join(word.title() for word in role.name.split("-")),
        )
        for role in edge.OPERATOR_ROLES
        for invocation in role.invocations()
        if "*" in invocation
    }


def test_cdk_nag_passes_with_only_the_reviewed_acknowledgements(synthesized) -> None:
    # Given the validation report of the synthesis (cdk-nag AwsSolutions ran in it)
    report = synthesized.validation_report
    [api_id] = [
        lid
        for lid, r in synthesized.template_json["Resources"].items()
        if r["Type"] == "AWS::ApiGateway::RestApi"
    ]
    [nag] = [r for r in report["pluginReports"] if r["pluginName"] == "AwsSolutions"]

    # When collecting its open and acknowledged findings
    acknowledged = {(v["ruleName"], v["acknowledgedAt"]) for v in nag["suppressedViolations"]}

    # Then nothing is open, and every acknowledgement is a reviewed one with a real reason
    assert nag["conclusion"] == "success"
    assert nag["violations"] == []
    assert acknowledged == EXPECTED_ACKNOWLEDGEMENTS | operator_role_acknowledgements(api_id)
    for violation in nag["suppressedViolations"]:
        assert len(violation["reason"]) >= 60, violation["ruleName"]


def test_an_unacknowledged_finding_fails_synthesis(app_factory, tmp_path: Path) -> None:
    # Given the fleetkey app with a queue that breaks AwsSolutions-SQS3 and nobody acknowledged
    app = app_factory(tmp_path)
    sqs.Queue(app.node.find_child(constants.STACK_ID), "Unreviewed", enforce_ssl=True)

    # When synthesizing
    # Then cdk-nag stops it, naming the rule and the resource
    with pytest.raises(RuntimeError, match="ValidationFailed") as failure:
        app.synth()
    assert "AwsSolutions-SQS3" in str(failure.value)
    assert "Fleetkey/Unreviewed/Resource" in str(failure.value)


def test_cfn_lint_finds_no_errors(synthesized) -> None:
    # Given the synthesized template
    template_text = synthesized.template_path.read_text()

    # When linting it for the regions fleetkey deploys to
    matches = lint(
        template_text,
        config=ManualArgs(regions=CFN_LINT_REGIONS, ignore_checks=ACCEPTED_CFN_LINT_WARNINGS),
    )

    # Then there is no error, and no warning beyond the accepted ones
    findings = [
        f"{m.rule.id} {m.message} (line {m.linenumber})"
        for m in matches
        if m.rule.id.startswith(("E", "W"))
    ]
    assert findings == []


def test_missing_layer_build_is_a_clear_error(tmp_path: Path) -> None:
    # Given a layer directory that `make layer` has not produced
    missing = tmp_path / "layer"

    # When building the stack against it
    # Then synthesis stops with an error that says what to run
    with pytest.raises(LayerNotBuiltError, match="make layer"):
        FleetkeyStack(App(outdir=str(tmp_path / "out")), "Fleetkey", layer_dir=missing)
