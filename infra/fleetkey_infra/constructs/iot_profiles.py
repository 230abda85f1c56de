"""One AWS IoT policy and one thing type per device profile, from the profiles in the core."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Aws, RemovalPolicy
from aws_cdk import aws_iot as iot
from constructs import Construct

from fleetkey.domain.profiles import PROFILES, DeviceProfile
from fleetkey_infra import constants


def iot_arn_prefix() -> str:
    """``arn:<partition>:iot:<region>:<account>`` of the deploying stack, as tokens."""
    return f"arn:{Aws.PARTITION}:iot:{Aws.REGION}:{Aws.ACCOUNT_ID}"


class IotResources(Construct):
    """Attributes: `policies` and `thing_types`, dicts keyed by profile name."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name_prefix: str = constants.NAME_PREFIX,
        profiles: Mapping[str, DeviceProfile] = PROFILES,
    ) -> None:
        super().__init__(scope, construct_id)
        self.name_prefix = name_prefix
        self.policies: dict[str, iot.CfnPolicy] = {}
        self.thing_types: dict[str, iot.CfnThingType] = {}
        for name, profile in profiles.items():
            self.policies[name] = self._build_policy(profile)
            self.thing_types[name] = self._build_thing_type(profile)

    @property
    def policy_arns(self) -> list[str]:
        return [policy.attr_arn for policy in self.policies.values()]

    def _build_policy(self, profile: DeviceProfile) -> iot.CfnPolicy:
        # The document holds IoT policy variables (${iot:Connection.Thing.ThingName}); CDK renders
        # the ARN tokens with Fn::Join, which leaves them alone (Fn::Sub would try to resolve them).
        policy = iot.CfnPolicy(
            self,
            f"Policy-{profile.name}",
            policy_name=profile.iot_policy_name(self.name_prefix),
            policy_document=profile.iot_policy_document(iot_arn_prefix()),
        )
        # Certificates in the field stay attached to the policy; CloudFormation could not delete
        # it anyway, and a failed delete would leave the stack stuck.
        policy.apply_removal_policy(RemovalPolicy.RETAIN)
        return policy

    def _build_thing_type(self, profile: DeviceProfile) -> iot.CfnThingType:
        thing_type = iot.CfnThingType(
            self,
            f"ThingType-{profile.name}",
            thing_type_name=profile.thing_type_name(self.name_prefix),
            thing_type_properties=iot.CfnThingType.ThingTypePropertiesProperty(
                thing_type_description=profile.description,
                searchable_attributes=list(constants.THING_SEARCHABLE_ATTRIBUTES),
            ),
        )
        # Things of this type outlive the stack; AWS IoT refuses to delete a type still in use.
        thing_type.apply_removal_policy(RemovalPolicy.RETAIN)
        return thing_type
