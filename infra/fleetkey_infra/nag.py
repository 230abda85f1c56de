"""cdk-nag acknowledgements, written next to the resource that causes the finding.

cdk-nag 3 reports through CDK's policy-validation framework. An acknowledgement qualified with
the pack's namespace (``AwsSolutions::<rule id>``) is matched by CDK itself, so the finding stays
in ``cdk.out/policy-validation-report.json`` as acknowledged, with its reason, instead of
disappearing. Findings with several instances are acknowledged one by one
(``AwsSolutions-IAM5[Resource::<arn>]``); there is no prefix match.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct

PACK_NAMESPACE = "AwsSolutions"


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    """Acknowledge `rule_id` (e.g. ``AwsSolutions-L1``) on `scope` and everything below it."""
    Validations.of(scope).acknowledge(
        Acknowledgment(id=f"{PACK_NAMESPACE}::{rule_id}", reason=reason)
    )


def wildcard_resource(rule_resource: str) -> str:
    """The IAM5 finding id of one wildcard resource, as cdk-nag renders it."""
    return f"AwsSolutions-IAM5[Resource::{rule_resource}]"
