"""Device profiles: which IoT policy, thing type, key, token and certificate rules apply to a
device.

Profiles are code, not data: the CDK stack creates one IoT policy and one thing type per profile
from these same definitions, and the functions read them to decide what to attach. Adding a profile
is a reviewed change and a deployment, never a runtime write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetkey.errors import InvalidRequest

THING_VARIABLE = "${iot:Connection.Thing.ThingName}"
# Thing attributes fleetkey sets on every device's thing (and makes searchable on its thing type);
# it also records the registered certificate's id as `certificate_id`.
FLEETKEY_THING_ATTRIBUTES = ("serial_number", "profile", "manufacturer_ca")
RESERVED_THING_ATTRIBUTES = frozenset({*FLEETKEY_THING_ATTRIBUTES, "certificate_id"})


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """Which device public keys are acceptable."""

    ec_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1"})
    rsa_min_bits: int | None = 2048

    def allows(self, key_description: str) -> bool:
        """`key_description` is "ec:<curve>" or "rsa:<bits>"; any other kind is refused."""
        kind, _, param = key_description.partition(":")
        if kind == "ec":
            return param in self.ec_curves
        if kind == "rsa" and param.isdigit():
            return self.rsa_min_bits is not None and int(param) >= self.rsa_min_bits
        return False


@dataclass(frozen=True, slots=True)
class TokenRules:
    """Access-token rules: lifetime (never more than an hour), the scopes and audiences a device
    may ask for (all of them when it asks for none), and whether it must attest its firmware:
    its measurement (SHA-256 hex) and version a published release of the profile. Releases are
    data, published and revoked by operators (`POST /v1/admin/firmware`), not code."""

    lifetime_seconds: int = 900
    scopes: frozenset[str] = frozenset({"telemetry:write", "fleetkey:data-key"})
    audiences: frozenset[str] = frozenset({"urn:fleetkey:telemetry"})
    require_attestation: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.lifetime_seconds <= 3600:
            raise ValueError("token lifetime must be between 1 s and 1 hour")


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    description: str
    key_policy: KeyPolicy = KeyPolicy()
    token_rules: TokenRules = TokenRules()
    # Validity of certificates fleetkey issues on rotation.
    certificate_validity_days: int = 365
    # How long a certificate a rotation replaced stays in AWS IoT (INACTIVE, revoked) before it
    # is deleted: long enough to read what it did, short enough to leave nothing behind.
    retired_certificate_grace_days: int = 7
    # Ask a device to replace its factory certificate as soon as it is registered (its key may
    # have sat in a factory's test rig); off, it is renewed at two thirds of its lifetime.
    replace_factory: bool = True
    # JITR refuses (serial_mismatch) a factory certificate without a subject serialNumber. Off,
    # the serial is checked when present: the allow-list's binding is then the CN, the CA and,
    # when pinned, the public key.
    require_subject_serial: bool = False

    def iot_policy_name(self, prefix: str) -> str:
        return f"{prefix}-{self.name}"

    def thing_type_name(self, prefix: str) -> str:
        return f"{prefix}-{self.name}"

    def iot_policy_document(self, arn_prefix: str) -> dict[str, Any]:
        """The least-privilege AWS IoT policy for devices of this profile.

        `arn_prefix` is ``arn:<partition>:iot:<region>:<account>``. A device may connect only with
        its own thing name as client id and only while its certificate is attached to that thing;
        it may publish its events and telemetry and receive its commands, nothing else.
        """
        own = f"fleetkey/{THING_VARIABLE}"
        return {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "iot:Connect",
                    "Resource": f"{arn_prefix}:client/{THING_VARIABLE}",
                    "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Publish",
                    "Resource": [
                        f"{arn_prefix}:topic/{own}/events/*",
                        f"{arn_prefix}:topic/{own}/telemetry/*",
                    ],
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Subscribe",
                    "Resource": f"{arn_prefix}:topicfilter/{own}/commands/*",
                },
                {
                    "Effect": "Allow",
                    "Action": "iot:Receive",
                    "Resource": f"{arn_prefix}:topic/{own}/commands/*",
                },
            ],
        }


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="telemetry-sensor",
            description="Field monitors (oil-well, pipeline, environment) that publish telemetry.",
        ),
        DeviceProfile(
            name="infusion-pump",
            description="Connected medical devices: EC keys only, attested firmware, short tokens.",
            key_policy=KeyPolicy(rsa_min_bits=None),
            token_rules=TokenRules(
                lifetime_seconds=300,
                scopes=frozenset({"telemetry:write", "therapy:report", "fleetkey:data-key"}),
                audiences=frozenset({"urn:fleetkey:telemetry", "urn:fleetkey:therapy"}),
                require_attestation=True,
            ),
            certificate_validity_days=180,
            retired_certificate_grace_days=1,
            # A pump's factory certificate carries its hardware serial: a certificate without
            # one cannot be tied to the allow-list entry's serial, so it is refused.
            require_subject_serial=True,
        ),
    )
}


def thing_type_names(prefix: str) -> frozenset[str]:
    """The thing types of this deployment's profiles (`<prefix>-<profile>`): a thing of one of
    these types is fleetkey's; a thing of any other type (or none) belongs to someone else."""
    return frozenset(profile.thing_type_name(prefix) for profile in PROFILES.values())


def get_profile(name: str) -> DeviceProfile:
    """Raises InvalidRequest for a profile name that is not defined."""
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown device profile {name!r}", details={"profiles": sorted(PROFILES)}
        ) from None
