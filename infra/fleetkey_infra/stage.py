"""The deployment's stage: what lets two fleetkey stacks live side by side in one account.

Configuration (CDK context: `cdk deploy -c stage=<name>`): `stage`, absent by default. Without it
every name is today's: the stack `Fleetkey`, the name prefix `fleetkey`. With it:

- the stack is `Fleetkey-<stage>` (CloudFormation stack names are unique per account and Region),
  which also names what the stack name names: the token signing keys' and the issuing CA keys'
  tag value (`fleetkey:purpose=token-signing:Fleetkey-<stage>`: each stack's roles reach only its
  own keys), the data-key alias (`alias/Fleetkey-<stage>/data-keys`), the WAF log group
  (`aws-waf-logs-Fleetkey-<stage>-api`) and the names CloudFormation generates from the stack's
  name (functions, roles, queues, log groups, the table: `Fleetkey-<stage>-...`; the IoT rules'
  and the web ACL's generated names are unique either way);
- the name prefix is `fleetkey-<stage>`: the AWS IoT policies and thing types
  (`fleetkey-<stage>-<profile>`: the functions get the same prefix, FLEETKEY_NAME_PREFIX, so what
  they attach and take over is their stage's), the operator roles (`fleetkey-<stage>-fleet-admin`,
  `-release`, `-auditor`), the REST API (`fleetkey-<stage>-api`: API Gateway's `ApiName` metric
  dimension), the WAF metrics (`fleetkey-<stage>-api...`: the web ACL's and rules' metric
  dimensions) and the functions' Powertools service (`fleetkey-<stage>-<function>`: the `service`
  dimension of every metric they emit in the `fleetkey` namespace, and the service in their logs
  and traces), so no metric of one stage is counted in another's;
- every taggable resource is tagged `stage=<stage>` (it stays on what the stack retains).

A stage is 1 to 20 lowercase letters and digits, starting with a letter: no hyphen, so that
`fleetkey-<stage>-<suffix>` can be read back one way only (two stages never make the same name),
and none of the first words of the suffixes the names end with (`fleet`, as in `fleet-admin`;
`infusion`, `telemetry`), which would make one of its names equal to an unstaged stack's
(`fleetkey-fleet-admin`).

AWS IoT's registry and topics are the account's, not the stack's: things are named by device id
and devices publish under `fleetkey/<device id>/`, whatever the stage. Two stages in one account
must not share device ids (a stage never takes over a thing of another stage's thing type:
registration reports a thing conflict), and every IoT rule of each stage sees every stage's
certificate registrations, connections and tamper reports (each function acts only on what its
own table knows). docs/deploy.md says what this means for operators.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fleetkey.domain.profiles import PROFILES
from fleetkey_infra import constants
from fleetkey_infra.edge import OPERATOR_ROLES

_STAGE = re.compile(r"^[a-z][a-z0-9]{0,19}$")


class StageConfigError(ValueError):
    """The `stage` context value cannot name a deployment."""


def _reserved_words() -> frozenset[str]:
    """First words of the hyphenated suffixes after the name prefix (operator roles, profiles):
    a stage spelled like one would make `fleetkey-<stage>-<rest>` equal an unstaged name."""
    suffixes = [role.name for role in OPERATOR_ROLES] + list(PROFILES)
    return frozenset(suffix.split("-")[0] for suffix in suffixes if "-" in suffix)


RESERVED_STAGES = _reserved_words()


@dataclass(frozen=True)
class StageConfig:
    """`stage` None: the unstaged deployment, today's names."""

    stage: str | None = None

    def __post_init__(self) -> None:
        if self.stage is None:
            return
        if not _STAGE.match(self.stage):
            raise StageConfigError(
                f"{constants.STAGE_CONTEXT_KEY} must be 1 to 20 lowercase letters and digits, "
                f"starting with a letter (it prefixes AWS IoT, IAM and CloudWatch names), not "
                f"{self.stage!r}"
            )
        if self.stage in RESERVED_STAGES:
            raise StageConfigError(
                f"{constants.STAGE_CONTEXT_KEY} {self.stage!r} would give one of its names to the "
                f"unstaged stack (e.g. fleetkey-{self.stage}-...); choose another "
                f"(reserved: {', '.join(sorted(RESERVED_STAGES))})"
            )

    @classmethod
    def from_context(cls, get: Callable[[str], object]) -> StageConfig:
        """From CDK context (`node.try_get_context`, or a dict's `get`).

        Raises:
            StageConfigError: a stage that is not a string, is empty (`-c stage=` from an unset
                shell variable would otherwise deploy the unstaged stack), or not a valid name.
        """
        value = get(constants.STAGE_CONTEXT_KEY)
        if value is None:
            return cls()
        if not isinstance(value, str):
            raise StageConfigError(f"{constants.STAGE_CONTEXT_KEY} must be a string, not {value!r}")
        if not value.strip():
            raise StageConfigError(
                f"{constants.STAGE_CONTEXT_KEY} is empty: give a stage name, or leave "
                f"{constants.STAGE_CONTEXT_KEY} out for the unstaged stack "
                f"({constants.STACK_ID})"
            )
        return cls(value.strip())

    @property
    def stack_id(self) -> str:
        """The stack's construct id, which CDK makes its CloudFormation stack name."""
        return f"{constants.STACK_ID}-{self.stage}" if self.stage else constants.STACK_ID

    @property
    def name_prefix(self) -> str:
        return f"{constants.NAME_PREFIX}-{self.stage}" if self.stage else constants.NAME_PREFIX

    @property
    def rest_api_name(self) -> str | None:
        """The REST API's name (API Gateway's `ApiName` metric dimension); None: CDK's default
        (the construct id, `Api`), as the unstaged stack has always had."""
        return f"{self.name_prefix}-api" if self.stage else None
