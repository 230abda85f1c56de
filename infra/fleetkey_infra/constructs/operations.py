"""What operators do with their own AWS credentials, outside the admin API: `fleetkey redrive`.

The redrive (tooling/fleetkey_cli/redrive.py, docs/runbook-redrive.md) reads the stack's
CloudFormation outputs, receives and deletes the failure queues' messages, sends the lifecycle
queue's dead letters back to it and invokes the functions that failed, all with the operator's
credentials. `RedrivePolicy` is that and nothing more, as a customer managed policy attached to
nothing: the deployer attaches it to the role, or the IAM Identity Center permission set, of the
people who redrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct

# Every AWS call of tooling/fleetkey_cli/redrive.py, by the IAM action that authorizes it (Service
# Authorization Reference), not a guess: tests/infra/test_infra_operator_redrive.py reads the
# module's boto3 calls and holds this policy to them, and records a redrive of every queue and
# checks each request against the synthesized policy.
# - describe_stacks (`--stack NAME`: the outputs that name the queues and functions);
STACK_ACTIONS = ("cloudformation:DescribeStacks",)
# - receive_message, delete_message once a message was re-delivered, and
#   change_message_visibility_batch (authorized as ChangeMessageVisibility) for what it leaves in
#   the queue, on the failure queues;
FAILURE_QUEUE_ACTIONS = (
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
)
# - send_message: the lifecycle queue's dead letters go back to the lifecycle queue;
LIFECYCLE_QUEUE_ACTIONS = ("sqs:SendMessage",)
# - invoke (InvocationType Event): the function that failed.
INVOKE_ACTIONS = ("lambda:InvokeFunction",)
# No iot:GetTopicRule: the rules' SQL is applied from fleetkey's own copy (fleetkey_local.rules,
# held to the deployed rules by tests/infra/test_infra_redrive.py).
#
# A queue encrypted with a customer managed key (none is: `dead_letter_queue` and the lifecycle
# queue use SQS-managed encryption) makes SQS ask the caller's principal for the key: Decrypt to
# receive, GenerateDataKey and Decrypt to send (SQS developer guide, "Configuring KMS
# permissions"), granted only through SQS.
RECEIVE_KEY_ACTIONS = ("kms:Decrypt",)
SEND_KEY_ACTIONS = ("kms:GenerateDataKey", "kms:Decrypt")
POLICY_SUFFIX = "redrive"


class RedrivePolicy(Construct):
    """The customer managed policy `<name prefix>-redrive` (`fleetkey-redrive`;
    `fleetkey-<stage>-redrive` for a stage): exactly what `fleetkey redrive` calls, on exactly
    this stack's resources, no wildcard:

    - `cloudformation:DescribeStacks` on this stack (its ARN, with its id);
    - `sqs:ReceiveMessage`, `sqs:DeleteMessage`, `sqs:ChangeMessageVisibility` on
      `failure_queues` (the nine queues of `fleetkey_cli.redrive.QUEUES`);
    - `sqs:SendMessage` on `lifecycle_queue` (where the lifecycle dead letters go back);
    - `lambda:InvokeFunction` on `functions` (those the failure queues re-deliver to);
    - the KMS grants SQS needs for a queue encrypted with a customer managed key, if any.

    Named, so that an IAM Identity Center permission set can refer to it by name in each account.

    Attributes: `policy` (iam.ManagedPolicy, attached to nothing).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name_prefix: str,
        failure_queues: Sequence[sqs.IQueue],
        lifecycle_queue: sqs.IQueue,
        functions: Sequence[lambda_.IFunction],
    ) -> None:
        super().__init__(scope, construct_id)
        self.policy = iam.ManagedPolicy(
            self,
            "Policy",
            managed_policy_name=f"{name_prefix}-{POLICY_SUFFIX}",
            description="fleetkey redrive: re-deliver what the failure queues hold to the "
            "functions that failed (docs/runbook-redrive.md)",
            statements=self._statements(failure_queues, lifecycle_queue, functions),
        )

    def _statements(
        self,
        failure_queues: Sequence[sqs.IQueue],
        lifecycle_queue: sqs.IQueue,
        functions: Sequence[lambda_.IFunction],
    ) -> list[iam.PolicyStatement]:
        statements = [
            iam.PolicyStatement(
                sid="ReadTheStackOutputs",
                actions=list(STACK_ACTIONS),
                resources=[Stack.of(self).stack_id],
            ),
            iam.PolicyStatement(
                sid="TakeFromTheFailureQueues",
                actions=list(FAILURE_QUEUE_ACTIONS),
                resources=_distinct(q.queue_arn for q in failure_queues),
            ),
            iam.PolicyStatement(
                sid="SendBackToTheLifecycleQueue",
                actions=list(LIFECYCLE_QUEUE_ACTIONS),
                resources=[lifecycle_queue.queue_arn],
            ),
            iam.PolicyStatement(
                sid="InvokeTheFunctionsThatFailed",
                actions=list(INVOKE_ACTIONS),
                resources=_distinct(f.function_arn for f in functions),
            ),
        ]
        receive_keys = _key_arns(failure_queues)
        if receive_keys:
            statements.append(
                self._key_statement("ReceiveThroughSqs", RECEIVE_KEY_ACTIONS, receive_keys)
            )
        send_keys = _key_arns([lifecycle_queue])
        if send_keys:
            statements.append(self._key_statement("SendThroughSqs", SEND_KEY_ACTIONS, send_keys))
        return statements

    def _key_statement(
        self, sid: str, actions: tuple[str, ...], key_arns: list[str]
    ) -> iam.PolicyStatement:
        stack = Stack.of(self)
        return iam.PolicyStatement(
            sid=sid,
            actions=list(actions),
            resources=key_arns,
            conditions={
                "StringEquals": {"kms:ViaService": f"sqs.{stack.region}.{stack.url_suffix}"}
            },
        )


def _distinct(values: Iterable[str]) -> list[str]:
    """In order, each once (a function several queues re-deliver to is one resource)."""
    return list(dict.fromkeys(values))


def _key_arns(queues: Sequence[sqs.IQueue]) -> list[str]:
    return _distinct(q.encryption_master_key.key_arn for q in queues if q.encryption_master_key)
