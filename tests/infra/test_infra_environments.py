"""Environments: a stage (`-c stage=<name>`) names a second stack that lives beside the first in
one account, what `cdk destroy` keeps says so, and a custom domain (`apiDomainName`,
`apiCertificateArn`) gives relying parties an issuer that survives replacing the API.

Each staged app is the real synthesis (`create_app`: cdk.json's context, cdk-nag), once per
module; the unstaged one is the session's (`synthesized`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Environment
from aws_cdk.assertions import Template
from cfnlint.api import lint
from cfnlint.config import ManualArgs

from fleetkey.domain.profiles import PROFILES, thing_type_names
from fleetkey.services.pki import issuing_ca_tags
from fleetkey.services.signing_keys import token_signing_tags
from fleetkey_infra import constants, edge
from fleetkey_infra.application import create_app
from fleetkey_infra.constructs.api_domain import ApiDomainConfig, ApiDomainConfigError
from fleetkey_infra.retained import OUTPUT_ID as RETAINED_OUTPUT
from fleetkey_infra.stack import FleetkeyStack
from fleetkey_infra.stage import RESERVED_STAGES, StageConfig, StageConfigError
from infra_template import function_by_service, of_type, only, render, role_of, role_statements

# As conftest's: templates, not asset bundles.
TEST_CONTEXT = {"aws:cdk:disable-asset-staging": True}
DEPLOY_GUIDE = constants.REPO_ROOT / "docs" / "deploy.md"
CERTIFICATE_ARN = (
    "arn:aws:acm:eu-west-1:111122223333:certificate/0a1b2c3d-0000-1111-2222-333344445555"
)
DOMAIN_CONTEXT = {
    constants.API_DOMAIN_NAME_CONTEXT_KEY: "id.fleet.example.com",
    constants.API_CERTIFICATE_ARN_CONTEXT_KEY: CERTIFICATE_ARN,
}
EST_CONTEXT = {
    constants.EST_DOMAIN_NAME_CONTEXT_KEY: "est.fleet.example.com",
    constants.EST_CERTIFICATE_ARN_CONTEXT_KEY: CERTIFICATE_ARN,
    constants.EST_TRUSTSTORE_URI_CONTEXT_KEY: "s3://fleet-truststore/est/truststore.pem",
}
# The unstaged functions' services; a stage's are `fleetkey-<stage>-<function>`.
SERVICES = (
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
)


@dataclass(frozen=True)
class Synthesis:
    stack_name: str
    template: dict[str, Any]
    report: dict[str, Any]
    template_text: str

    @property
    def resources(self) -> dict[str, dict]:
        return self.template["Resources"]

    @property
    def outputs(self) -> dict[str, dict]:
        return self.template["Outputs"]


def synthesize(outdir: Path, **context: Any) -> Synthesis:
    """The whole app (cdk.json's context, cdk-nag) with `context` on top."""
    app = create_app(outdir=str(outdir), context={**TEST_CONTEXT, **context})
    app.synth()  # cdk-nag runs here: an unacknowledged finding raises
    [stack] = [c for c in app.node.children if isinstance(c, FleetkeyStack)]
    template = Template.from_stack(stack).to_json()
    return Synthesis(
        stack_name=stack.stack_name,
        template=template,
        report=json.loads((outdir / "validation-report.json").read_text()),
        template_text=(outdir / stack.template_file).read_text(),
    )


@pytest.fixture(scope="module")
def unstaged(synthesized) -> Synthesis:
    return Synthesis(
        stack_name=synthesized.stack.stack_name,
        template=synthesized.template_json,
        report=synthesized.validation_report,
        template_text=synthesized.template_path.read_text(),
    )


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory) -> Synthesis:
    return synthesize(tmp_path_factory.mktemp("cdk.out.staging"), stage="staging")


@pytest.fixture(scope="module")
def dev_with_domain(tmp_path_factory: pytest.TempPathFactory) -> Synthesis:
    """Another stage, with the API's custom domain and EST's: every optional named resource."""
    return synthesize(
        tmp_path_factory.mktemp("cdk.out.dev"),
        stage="dev",
        registrationConcurrency="none",
        **DOMAIN_CONTEXT,
        **EST_CONTEXT,
    )


# ---- physical names -----------------------------------------------------------------------------

# Names that are the account's (and Region's), not scoped to a parent resource: two stacks in one
# account must not share any. (type, property path; `*` is any list item.) The CloudWatch metric
# identities a stack owns count too: the REST API's name (`ApiName` of AWS/ApiGateway), the WAF
# metric names (`WebACL`, `Rule` of AWS/WAFV2), the functions' Powertools service (`service` of
# every metric they emit in the fleetkey namespace).
ACCOUNT_NAMES = {
    ("AWS::ApiGateway::DomainName", "DomainName"),
    ("AWS::ApiGateway::RestApi", "Name"),
    ("AWS::CloudWatch::Alarm", "AlarmName"),
    ("AWS::CloudWatch::CompositeAlarm", "AlarmName"),
    ("AWS::CloudWatch::Dashboard", "DashboardName"),
    ("AWS::DynamoDB::Table", "TableName"),
    ("AWS::Events::Rule", "Name"),
    ("AWS::IAM::ManagedPolicy", "ManagedPolicyName"),
    ("AWS::IAM::Role", "RoleName"),
    ("AWS::IoT::Policy", "PolicyName"),
    ("AWS::IoT::ThingType", "ThingTypeName"),
    ("AWS::IoT::TopicRule", "RuleName"),
    ("AWS::KMS::Alias", "AliasName"),
    ("AWS::Lambda::Function", "FunctionName"),
    ("AWS::Lambda::Function", "Environment.Variables.POWERTOOLS_SERVICE_NAME"),
    ("AWS::Lambda::LayerVersion", "LayerName"),
    ("AWS::Logs::LogGroup", "LogGroupName"),
    ("AWS::SNS::Topic", "TopicName"),
    ("AWS::SQS::Queue", "QueueName"),
    ("AWS::WAFv2::WebACL", "Name"),
    ("AWS::WAFv2::WebACL", "VisibilityConfig.MetricName"),
    ("AWS::WAFv2::WebACL", "Rules.*.VisibilityConfig.MetricName"),
}
# Names scoped to their parent (an API's stage, a table's indexes and attributes, a role's inline
# policies, a web ACL's rules, headers), labels (a topic's display name), or that name a metric the
# resource reads rather than owns (an alarm's metric and dimensions): the same in two stacks
# without meeting.
SCOPED_NAMES = {
    ("AWS::SNS::Topic", "DisplayName"),
    ("AWS::ApiGateway::Stage", "StageName"),
    ("AWS::CloudWatch::Alarm", "MetricName"),
    ("AWS::CloudWatch::Alarm", "Dimensions.*.Name"),
    ("AWS::CloudWatch::Alarm", "Metrics.*.MetricStat.Metric.MetricName"),
    ("AWS::CloudWatch::Alarm", "Metrics.*.MetricStat.Metric.Dimensions.*.Name"),
    ("AWS::DynamoDB::Table", "AttributeDefinitions.*.AttributeName"),
    ("AWS::DynamoDB::Table", "GlobalSecondaryIndexes.*.IndexName"),
    ("AWS::DynamoDB::Table", "GlobalSecondaryIndexes.*.KeySchema.*.AttributeName"),
    ("AWS::DynamoDB::Table", "KeySchema.*.AttributeName"),
    ("AWS::DynamoDB::Table", "TimeToLiveSpecification.AttributeName"),
    ("AWS::IAM::Policy", "PolicyName"),
    ("AWS::IAM::Role", "Policies.*.PolicyName"),
    ("AWS::Logs::MetricFilter", "FilterName"),
    # A metric filter's metric is the account's: its namespace, name and dimensions together
    # (`_metric_filter_names`), not its name alone.
    ("AWS::Logs::MetricFilter", "MetricTransformations.*.MetricName"),
    ("AWS::Logs::MetricFilter", "MetricTransformations.*.Dimensions.*.Key"),
    ("AWS::WAFv2::LoggingConfiguration", "RedactedFields.*.SingleHeader.Name"),
    ("AWS::WAFv2::WebACL", "Rules.*.Action.Block.CustomResponse.ResponseHeaders.*.Name"),
    ("AWS::WAFv2::WebACL", "Rules.*.Name"),
}
_INTRINSICS = {"Ref", "Fn::GetAtt", "Fn::Join", "Fn::Sub", "Fn::Select", "Fn::If"}


def _leaves(value: Any, path: tuple[str, ...] = ()):
    """(path, value) for every leaf of a property tree; an intrinsic function is a leaf."""
    if isinstance(value, dict) and not set(value) & _INTRINSICS:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, (*path, "*"))
    else:
        yield path, value


def _resolve(value: Any, stack_name: str) -> str:
    """A name as it would be in the account: the stack's name substituted, a reference to one of
    the stack's resources as `<stack>:<logical id>` (a name CloudFormation generates, unique)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(_resolve(p, stack_name) for p in parts)
    if isinstance(value, dict) and "Ref" in value:
        pseudo = {"AWS::StackName": stack_name, "AWS::Region": "eu-west-1"}
        pseudo |= {"AWS::AccountId": "111122223333", "AWS::Partition": "aws"}
        pseudo |= {"AWS::URLSuffix": "amazonaws.com"}
        return pseudo.get(value["Ref"], f"{stack_name}:{value['Ref']}")
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return f"{stack_name}:{'.'.join(value['Fn::GetAtt'])}"
    raise AssertionError(f"a name this test cannot resolve: {value!r}")


def _is_reference(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) <= {"Ref", "Fn::GetAtt"}
        and ("Fn::GetAtt" in value or not str(value["Ref"]).startswith("AWS::"))
    )


def physical_names(synthesis: Synthesis) -> dict[str, str]:
    """Every account-wide name the template gives, resolved -> where (`<type> <path>`).

    Fails on a name property this test has not classified (a new resource type, a new property):
    decide whether it is the account's (ACCOUNT_NAMES) or scoped to its parent (SCOPED_NAMES)."""
    names: dict[str, str] = {f"stack {synthesis.stack_name}": "the stack"}
    for logical_id, resource in synthesis.resources.items():
        kind = resource["Type"]
        for path, value in _leaves(resource.get("Properties", {})):
            key = (kind, ".".join(path))
            named = [p for p in path if p != "*"]
            if key not in ACCOUNT_NAMES and not (named and named[-1].endswith("Name")):
                continue
            if _is_reference(value):
                continue  # a reference to a resource of the stack, not a name it gives
            assert key in ACCOUNT_NAMES or key in SCOPED_NAMES, (
                f"unclassified name {key} on {logical_id}: add it to ACCOUNT_NAMES or SCOPED_NAMES"
            )
            if key in ACCOUNT_NAMES:
                names[f"{kind} {_resolve(value, synthesis.stack_name)}"] = f"{logical_id} {key[1]}"
        if kind == "AWS::Logs::MetricFilter":
            for metric in _metric_filter_names(resource, synthesis.stack_name):
                names[f"metric {metric}"] = logical_id
    return names


def _metric_filter_names(resource: dict, stack_name: str) -> list[str]:
    """The metrics a metric filter publishes: `<namespace>/<name>` and its dimension keys."""
    return [
        f"{_resolve(t['MetricNamespace'], stack_name)}/{_resolve(t['MetricName'], stack_name)}"
        + "".join(sorted(f" {d['Key']}" for d in t.get("Dimensions", [])))
        for t in resource["Properties"]["MetricTransformations"]
    ]


@pytest.mark.parametrize(
    ("first", "second"), [("unstaged", "staging"), ("staging", "dev_with_domain")]
)
def test_two_stages_side_by_side_have_no_physical_name_in_common(
    request: pytest.FixtureRequest, first: str, second: str
) -> None:
    # Given two stacks synthesized side by side, each as `cdk deploy` would deploy it
    one, other = request.getfixturevalue(first), request.getfixturevalue(second)

    # When collecting every name each gives that is the account's (or a metric identity)
    ours, theirs = physical_names(one), physical_names(other)

    # Then both give names (IoT policies and thing types, roles, log group, metric names...) and
    # none of them is the other's: neither deployment fails on, nor counts into, the other
    assert len(ours) >= 20 and len(theirs) >= 20
    assert sorted(set(ours) & set(theirs)) == []


def test_the_name_check_sees_a_shared_name_and_an_unclassified_one() -> None:
    # Given two templates that give the same role name and publish the same log metric (a metric
    # filter's namespace, name and dimensions), under different stack names
    def template(stack_name: str, extra: dict | None = None) -> Synthesis:
        resources = {
            "Role": {"Type": "AWS::IAM::Role", "Properties": {"RoleName": "ops"}},
            "Filter": {
                "Type": "AWS::Logs::MetricFilter",
                "Properties": {
                    "MetricTransformations": [
                        {"MetricNamespace": "fleetkey", "MetricName": "Throttled"}
                    ]
                },
            },
            "Logs": {
                "Type": "AWS::Logs::LogGroup",
                "Properties": {"LogGroupName": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}]]}},
            },
            **(extra or {}),
        }
        return Synthesis(stack_name, {"Resources": resources, "Outputs": {}}, {}, "")

    # When collecting their names
    shared = set(physical_names(template("A"))) & set(physical_names(template("B")))

    # Then the shared ones are found (a name made from the stack's name is not shared), and a
    # name property of no known kind fails the check rather than pass unseen
    assert shared == {"AWS::IAM::Role ops", "metric fleetkey/Throttled"}
    unknown = {"Thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "pump-1"}}}
    with pytest.raises(AssertionError, match="unclassified name"):
        physical_names(template("C", unknown))


def test_without_a_stage_every_name_is_todays(unstaged: Synthesis) -> None:
    # Given the stack synthesized with cdk.json's context (no stage)
    resources = unstaged.resources

    # Then the names are the ones fleetkey always had
    assert unstaged.stack_name == constants.STACK_ID == "Fleetkey"
    assert _values(resources, "AWS::IoT::Policy", "PolicyName") == {
        "fleetkey-infusion-pump",
        "fleetkey-telemetry-sensor",
    }
    assert _values(resources, "AWS::IoT::ThingType", "ThingTypeName") == thing_type_names(
        "fleetkey"
    )
    assert _values(resources, "AWS::IAM::Role", "RoleName") == {
        "fleetkey-fleet-admin",
        "fleetkey-release",
        "fleetkey-auditor",
    }
    assert _values(resources, "AWS::Logs::LogGroup", "LogGroupName") == {
        "aws-waf-logs-Fleetkey-api"
    }
    assert _values(resources, "AWS::KMS::Alias", "AliasName") == {"alias/Fleetkey/data-keys"}
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["Name"] == "Api"
    _, web_acl = only(resources, "AWS::WAFv2::WebACL")
    assert web_acl["Properties"]["VisibilityConfig"]["MetricName"] == "fleetkey-api"
    assert {_env(f)["POWERTOOLS_SERVICE_NAME"] for f in _functions(resources)} == set(SERVICES)
    assert {_env(f)["FLEETKEY_NAME_PREFIX"] for f in _functions(resources)} == {"fleetkey"}
    # and nothing is tagged with a stage
    for resource in resources.values():
        tags = resource.get("Properties", {}).get("Tags")
        if isinstance(tags, list):
            assert constants.STAGE_TAG not in {t.get("Key") for t in tags}
    assert unstaged.outputs["NamePrefix"]["Value"] == "fleetkey"


def test_a_stage_prefixes_every_named_resource(staging: Synthesis) -> None:
    # Given the stack synthesized with -c stage=staging
    resources = staging.resources
    prefix = "fleetkey-staging"

    # Then the stack, the AWS IoT policies and thing types, the operator roles, the WAF log group,
    # the data-key alias, the REST API and the metric names carry the stage
    assert staging.stack_name == "Fleetkey-staging"
    assert _values(resources, "AWS::IoT::Policy", "PolicyName") == {
        profile.iot_policy_name(prefix) for profile in PROFILES.values()
    }
    assert _values(resources, "AWS::IoT::ThingType", "ThingTypeName") == thing_type_names(prefix)
    assert _values(resources, "AWS::IAM::Role", "RoleName") == {
        role.role_name(prefix) for role in edge.OPERATOR_ROLES
    }
    assert _values(resources, "AWS::Logs::LogGroup", "LogGroupName") == {
        "aws-waf-logs-Fleetkey-staging-api"
    }
    assert _values(resources, "AWS::KMS::Alias", "AliasName") == {
        "alias/Fleetkey-staging/data-keys"
    }
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["Name"] == "fleetkey-staging-api"
    _, web_acl = only(resources, "AWS::WAFv2::WebACL")
    metric_names = [web_acl["Properties"]["VisibilityConfig"]["MetricName"]] + [
        rule["VisibilityConfig"]["MetricName"] for rule in web_acl["Properties"]["Rules"]
    ]
    assert all(name.startswith("fleetkey-staging-api") for name in metric_names)
    # and every function runs with the stage's prefix (what it attaches and owns in AWS IoT is
    # what the stack created) and emits its metrics as the stage's service
    functions = _functions(resources)
    assert {_env(f)["FLEETKEY_NAME_PREFIX"] for f in functions} == {prefix}
    assert {_env(f)["FLEETKEY_STACK_NAME"] for f in functions} == {"Fleetkey-staging"}
    assert {_env(f)["POWERTOOLS_SERVICE_NAME"] for f in functions} == {
        service.replace("fleetkey-", f"{prefix}-", 1) for service in SERVICES
    }
    assert staging.outputs["NamePrefix"]["Value"] == prefix


def test_every_taggable_resource_of_a_stage_says_which(staging: Synthesis) -> None:
    # Given the staged stack
    # Then each resource that takes tags carries the project's and the stage's (they stay on
    # what the stack retains)
    tagged = {
        lid: r["Properties"]["Tags"]
        for lid, r in staging.resources.items()
        if isinstance(r.get("Properties", {}).get("Tags"), list)
    }
    assert len(tagged) > 20
    for logical_id, tags in tagged.items():
        assert {"Key": "stage", "Value": "staging"} in tags, logical_id
        assert {"Key": "project", "Value": "fleetkey"} in tags, logical_id


def test_a_stages_roles_reach_only_its_own_keys(staging: Synthesis) -> None:
    # Given the staged stack's token key and its roles' KMS statements on key/*
    resources = staging.resources
    _, token_key = only(
        {
            lid: r
            for lid, r in of_type(resources, "AWS::KMS::Key").items()
            if r["Properties"].get("KeySpec") == constants.TOKEN_KEY_SPEC
        },
        "AWS::KMS::Key",
    )
    tag_values = set()
    for function in _functions(resources):
        for statement in role_statements(resources, role_of(function)):
            for operator in ("StringEquals", "StringEqualsIfExists"):
                for key, value in statement.get("Condition", {}).get(operator, {}).items():
                    if key.endswith("/fleetkey:purpose"):
                        tag_values.add(value)

    # Then the first key is tagged as the stage's stack's, and every tag condition names it: the
    # unstaged stack's keys (token-signing:Fleetkey) are out of reach, and the reverse
    assert {"Key": "fleetkey:purpose", "Value": "token-signing:Fleetkey-staging"} in token_key[
        "Properties"
    ]["Tags"]
    assert tag_values == {
        *token_signing_tags("Fleetkey-staging").values(),
        *issuing_ca_tags("Fleetkey-staging").values(),
    }


def test_the_operator_roles_of_a_stage_are_the_ones_its_api_admits(staging: Synthesis) -> None:
    # Given the staged stack's API resource policy
    _, api = only(staging.resources, "AWS::ApiGateway::RestApi")
    statements = {s["Sid"]: render(s) for s in api["Properties"]["Policy"]["Statement"]}

    # Then the operators it admits are the stage's roles (not the unstaged stack's), and the
    # scoped Denies hold the stage's roles
    admitted = statements["OnlyConfiguredOperators"]["Condition"]["ArnNotLike"]["aws:PrincipalArn"]
    for role in edge.OPERATOR_ROLES:
        assert any(arn.endswith(f":role/fleetkey-staging-{role.name}") for arn in admitted)
        assert not any(arn.endswith(f":role/fleetkey-{role.name}") for arn in admitted)
    scoped = statements["ScopeOfAuditor"]["Condition"]["ArnLike"]["aws:PrincipalArn"]
    assert [arn.rsplit(":", 1)[1] for arn in scoped] == ["role/fleetkey-staging-auditor"]


def test_a_stage_is_as_clean_for_cdk_nag_and_cfn_lint_as_the_unstaged_stack(
    unstaged: Synthesis, staging: Synthesis, dev_with_domain: Synthesis
) -> None:
    # Given the cdk-nag reports of the unstaged and the staged syntheses
    def acknowledged(synthesis: Synthesis) -> set[tuple[str, str]]:
        [nag] = [r for r in synthesis.report["pluginReports"] if r["pluginName"] == "AwsSolutions"]
        assert nag["conclusion"] == "success" and nag["violations"] == []
        return {
            (v["ruleName"], v["acknowledgedAt"].replace(f"{synthesis.stack_name}/", "<stack>/", 1))
            for v in nag["suppressedViolations"]
        }

    # Then a stage acknowledges exactly what the unstaged stack does, nothing is open, and the
    # custom domains add no finding
    assert acknowledged(staging) == acknowledged(unstaged)
    assert acknowledged(dev_with_domain) == acknowledged(unstaged)
    # and cfn-lint finds nothing in either staged template (W3005: see test_infra_checks)
    for synthesis in (staging, dev_with_domain):
        matches = lint(
            synthesis.template_text,
            config=ManualArgs(regions=["eu-west-1", "us-east-1"], ignore_checks=["W3005"]),
        )
        assert [f"{m.rule.id} {m.message}" for m in matches if m.rule.id[0] in "EW"] == []


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("Staging", "lowercase letters and digits"),
        ("2nd", "starting with a letter"),
        ("blue-green", "lowercase letters and digits"),
        ("a" * 21, "1 to 20"),
        ("fleet", "would give one of its names to the unstaged stack"),
        ("infusion", "would give one of its names"),
        (3, "must be a string"),
    ],
)
def test_a_stage_that_cannot_name_a_deployment_fails_synthesis(
    value: object, complaint: str, tmp_path: Path
) -> None:
    # Given a stage value that is empty (an unset shell variable: -c stage=$STAGE), or that would
    # make a name ambiguous or invalid
    # When synthesizing / Then it fails, saying why, before anything is named
    with pytest.raises(StageConfigError, match=re.escape(complaint)):
        create_app(outdir=str(tmp_path), context={**TEST_CONTEXT, "stage": value})


def test_the_reserved_stages_are_the_first_words_of_the_names_suffixes() -> None:
    # A stage `fleet` would name its fleet-admin role fleetkey-fleet-fleet-admin, and the unstaged
    # fleet-admin role is fleetkey-fleet-admin: such first words are refused, nothing else
    assert {"fleet", "infusion", "telemetry"} == RESERVED_STAGES
    assert StageConfig("prod").name_prefix == "fleetkey-prod"
    assert StageConfig("dev2").stack_id == "Fleetkey-dev2"
    assert StageConfig().stack_id == "Fleetkey" and StageConfig().rest_api_name is None


# ---- what cdk destroy keeps ----------------------------------------------------------------------


def _retained(synthesis: Synthesis) -> dict[str, dict]:
    return {lid: r for lid, r in synthesis.resources.items() if r.get("DeletionPolicy") == "Retain"}


@pytest.mark.parametrize("which", ["unstaged", "staging", "dev_with_domain"])
def test_every_retained_resource_says_so_in_an_output(
    request: pytest.FixtureRequest, which: str
) -> None:
    # Given a synthesized stack and the resources CloudFormation keeps when it is deleted
    synthesis: Synthesis = request.getfixturevalue(which)
    retained = _retained(synthesis)

    # When reading the RetainedResources output
    output = synthesis.outputs[RETAINED_OUTPUT]
    separator, parts = output["Value"]["Fn::Join"]
    listed = [p["Ref"] for p in parts if isinstance(p, dict)]
    labels = "".join(p for p in parts if isinstance(p, str))

    # Then it names each of them, once, with its type, and nothing else; and says what to do
    assert separator == ""
    assert sorted(listed) == sorted(retained)
    for resource in retained.values():
        assert f" {resource['Type']}: " in labels
    assert "cdk destroy" in output["Description"] and "docs/deploy.md" in output["Description"]
    assert len(output["Description"]) <= 1024  # CloudFormation's limit for a description


def test_the_retained_resources_are_the_documented_ones(
    unstaged: Synthesis, dev_with_domain: Synthesis
) -> None:
    # Given what the stacks retain, and the deploy guide
    guide = DEPLOY_GUIDE.read_text()
    kinds = {r["Type"] for s in (unstaged, dev_with_domain) for r in _retained(s).values()}
    named = {
        (r["Type"], _name_of(r))
        for r in _retained(dev_with_domain).values()
        if _name_of(r) is not None
    }

    # Then each kind of retained resource is in the guide's teardown, and the ones with a fixed
    # name (which block deploying the same stage again until deleted) are exactly these
    assert kinds == {
        "AWS::ApiGateway::Account",
        "AWS::DynamoDB::Table",
        "AWS::IAM::Role",
        "AWS::IoT::Policy",
        "AWS::IoT::ThingType",
        "AWS::KMS::Key",
        "AWS::Logs::LogGroup",
    }
    for kind in kinds:
        assert f"`{kind}`" in guide, kind
    assert named == {
        ("AWS::IoT::Policy", "fleetkey-dev-infusion-pump"),
        ("AWS::IoT::Policy", "fleetkey-dev-telemetry-sensor"),
        ("AWS::IoT::ThingType", "fleetkey-dev-infusion-pump"),
        ("AWS::IoT::ThingType", "fleetkey-dev-telemetry-sensor"),
        ("AWS::Logs::LogGroup", "aws-waf-logs-Fleetkey-dev-api"),
    }
    for fixed in ("fleetkey-<stage>-<profile>", "aws-waf-logs-Fleetkey-<stage>-api"):
        assert fixed in guide


def _name_of(resource: dict) -> str | None:
    for key in ("PolicyName", "ThingTypeName", "LogGroupName", "RoleName", "TableName"):
        value = resource["Properties"].get(key)
        if value is not None:
            return _resolve(value, "Fleetkey-dev")
    return None


# ---- the API's custom domain -------------------------------------------------------------------


def test_without_a_custom_domain_the_issuer_is_the_stages_url(unstaged: Synthesis) -> None:
    # Given the stack without apiDomainName
    resources = unstaged.resources
    _, token = function_by_service(resources, constants.TOKEN_SERVICE_NAME)

    # Then there is no domain, and the issuer is the execute-api URL (the API's id in it)
    assert of_type(resources, "AWS::ApiGateway::DomainName") == {}
    issuer = render(_env(token)["FLEETKEY_ISSUER"])
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    assert issuer.startswith(f"https://<{api_id}>.execute-api.")
    assert "ApiDomainTarget" not in unstaged.outputs


def test_a_custom_domain_makes_an_issuer_that_survives_replacing_the_api(
    dev_with_domain: Synthesis,
) -> None:
    # Given the stack with apiDomainName and apiCertificateArn (and EST's domain beside it)
    resources = dev_with_domain.resources
    domains = {
        r["Properties"]["DomainName"]: lid
        for lid, r in of_type(resources, "AWS::ApiGateway::DomainName").items()
    }
    mappings = {
        m["Properties"]["DomainName"]["Ref"]: m["Properties"]
        for m in of_type(resources, "AWS::ApiGateway::BasePathMapping").values()
    }
    api_id, _ = only(resources, "AWS::ApiGateway::RestApi")
    stage_id, _ = only(resources, "AWS::ApiGateway::Stage")

    # Then the API's domain is a regional TLS 1.2 domain without mutual TLS, with the given
    # certificate, mapping the whole API's stage at its root
    domain = resources[domains["id.fleet.example.com"]]["Properties"]
    assert domain["EndpointConfiguration"] == {"Types": ["REGIONAL"]}
    assert domain["SecurityPolicy"] == "TLS_1_2"
    assert domain["RegionalCertificateArn"] == CERTIFICATE_ARN
    assert "MutualTlsAuthentication" not in domain
    mapping = mappings[domains["id.fleet.example.com"]]
    assert mapping["RestApiId"] == {"Ref": api_id} and mapping["Stage"] == {"Ref": stage_id}
    assert "BasePath" not in mapping
    # and EST keeps its own mutual-TLS domain
    assert "MutualTlsAuthentication" in resources[domains["est.fleet.example.com"]]["Properties"]
    # and every function that knows the issuer knows https://<domain>, which names no resource of
    # the stack: a replaced REST API (another id) leaves it, the tokens' iss, the assertions'
    # audience and the CRL distribution point unchanged
    issuers = {
        json.dumps(_env(f)["FLEETKEY_ISSUER"])
        for f in _functions(resources)
        if "FLEETKEY_ISSUER" in _env(f)
    }
    assert issuers == {'"https://id.fleet.example.com"'}
    assert dev_with_domain.outputs["Issuer"]["Value"] == "https://id.fleet.example.com"
    assert dev_with_domain.outputs["ApiDomainTarget"]["Value"] == {
        "Fn::GetAtt": [domains["id.fleet.example.com"], "RegionalDomainName"]
    }
    assert "ApiDomainHostedZoneId" in dev_with_domain.outputs


@pytest.mark.parametrize(
    ("context", "complaint"),
    [
        ({constants.API_DOMAIN_NAME_CONTEXT_KEY: "id.fleet.example.com"}, "missing"),
        ({constants.API_CERTIFICATE_ARN_CONTEXT_KEY: CERTIFICATE_ARN}, "missing"),
        ({**DOMAIN_CONTEXT, constants.API_DOMAIN_NAME_CONTEXT_KEY: "https://x.com"}, "DNS name"),
        ({**DOMAIN_CONTEXT, constants.API_CERTIFICATE_ARN_CONTEXT_KEY: "cert-1"}, "ACM"),
        ({**DOMAIN_CONTEXT, constants.API_DOMAIN_NAME_CONTEXT_KEY: 7}, "must be a string"),
        (
            {**DOMAIN_CONTEXT, constants.EST_DOMAIN_NAME_CONTEXT_KEY: "ID.fleet.example.com"},
            "EST's mutual-TLS domain",
        ),
    ],
)
def test_a_custom_domain_given_in_part_or_malformed_is_refused(
    context: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ApiDomainConfigError, match=re.escape(complaint)):
        ApiDomainConfig.from_context(context.get)


def test_a_custom_domain_needs_a_certificate_of_the_stacks_region(tmp_path: Path) -> None:
    # Given a stack in us-east-1 and a certificate of eu-west-1
    app = App(outdir=str(tmp_path), context={**TEST_CONTEXT, **DOMAIN_CONTEXT})

    # When building it / Then it is refused: a regional endpoint takes its own Region's
    with pytest.raises(ApiDomainConfigError, match="needs one of us-east-1"):
        FleetkeyStack(app, "Fleetkey", env=Environment(account="111122223333", region="us-east-1"))


# ---- helpers -----------------------------------------------------------------------------------


def _functions(resources: dict[str, dict]) -> list[dict]:
    return list(of_type(resources, "AWS::Lambda::Function").values())


def _env(function: dict) -> dict[str, Any]:
    return function["Properties"]["Environment"]["Variables"]


def _values(resources: dict[str, dict], kind: str, key: str) -> set[str]:
    """The `key` property of every `kind` resource that sets it (others get generated names)."""
    return {
        r["Properties"][key] for r in of_type(resources, kind).values() if key in r["Properties"]
    }


def test_a_stage_may_reserve_no_registration_concurrency(dev_with_domain: Synthesis) -> None:
    # Given a stage for an account whose concurrency quota leaves nothing to reserve
    # (`-c registrationConcurrency=none`)
    [registration] = [
        r["Properties"]
        for r in dev_with_domain.resources.values()
        if r["Type"] == "AWS::Lambda::Function"
        and r["Properties"]["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"]
        == "fleetkey-dev-registration"
    ]

    # Then its registration function reserves none (the unstaged default reserves 5), and its
    # throttles alarm (then they are the account's concurrency exhausted, not the reservation)
    assert "ReservedConcurrentExecutions" not in registration
    alarms = {
        r["Properties"]["AlarmName"]: r["Properties"]
        for r in dev_with_domain.resources.values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    throttles = alarms[f"{dev_with_domain.stack_name}-RegistrationThrottles"]
    assert (throttles["MetricName"], throttles["Threshold"]) == ("Throttles", 1)
    assert f"{dev_with_domain.stack_name}-RegistrationBacklog" in alarms
