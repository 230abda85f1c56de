"""What `cdk destroy` leaves in the account: the stack says so in an output, `RetainedResources`.

Every resource whose DeletionPolicy is Retain (the table, the KMS keys, the log groups, the AWS
IoT policies and thing types, API Gateway's account-level CloudWatch role, and whatever a later
construct retains) outlives the stack. The output lists each as `<construct path>
<CloudFormation type>: <its Ref>` (a name, or an id), read at synthesis so that it holds every
resource of the finished stack, whatever the order the constructs were added in. Read it before
tearing a stack down (`cdk deploy --outputs-file`, or the CloudFormation console): once the stack
is deleted its outputs are gone, and the retained resources carry the stack's tags (`project`,
`stage`) and nothing else of it.

docs/deploy.md says why each is kept and what to do with it. A retained resource with a fixed name
(the AWS IoT policies and thing types, the WAF log group `aws-waf-logs-<stack>-api`) must be
deleted before the same stage is deployed again, or CloudFormation cannot create it anew.
"""

from __future__ import annotations

import jsii
from aws_cdk import CfnDeletionPolicy, CfnOutput, CfnResource, Fn, IStableStringProducer, Lazy
from aws_cdk import Stack as CdkStack

OUTPUT_ID = "RetainedResources"
RETAINED_POLICIES = (CfnDeletionPolicy.RETAIN, CfnDeletionPolicy.RETAIN_EXCEPT_ON_CREATE)
DESCRIPTION = (
    "Kept by cdk destroy (DeletionPolicy Retain): <construct path> <type>: <name or id>. "
    "Delete them once nothing needs them; the AWS IoT policies, thing types and the WAF log group "
    "before deploying this stage again (docs/deploy.md)."
)


def retained_resources(stack: CdkStack) -> list[CfnResource]:
    """The stack's resources that CloudFormation keeps when the stack is deleted, in tree order."""
    return [
        node
        for node in stack.node.find_all()
        if isinstance(node, CfnResource)
        and node.cfn_options.deletion_policy in RETAINED_POLICIES
        and CdkStack.of(node) is stack
    ]


def _label(stack: CdkStack, resource: CfnResource) -> str:
    path = resource.node.path.removeprefix(f"{stack.node.path}/").removesuffix("/Resource")
    return f"{path} {resource.cfn_resource_type}: "


@jsii.implements(IStableStringProducer)
class _RetainedList:
    def __init__(self, stack: CdkStack) -> None:
        self._stack = stack

    def produce(self) -> str:
        parts: list[str] = []
        for resource in retained_resources(self._stack):
            parts += [", "] if parts else []
            parts += [_label(self._stack, resource), resource.ref]
        return Fn.join("", parts) if parts else "none"


def add_retained_resources_output(stack: CdkStack) -> CfnOutput:
    """The `RetainedResources` output, its value produced at synthesis."""
    return CfnOutput(
        stack,
        OUTPUT_ID,
        value=Lazy.string(_RetainedList(stack)),
        description=DESCRIPTION,
    )
