"""AWS IoT registry adapter. Every call here is idempotent, so a retried registration converges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code
from fleetkey.errors import Conflict

if TYPE_CHECKING:
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot.type_defs import AttributePayloadTypeDef


@dataclass(frozen=True, slots=True)
class IotCertificate:
    """A certificate as AWS IoT describes it. `ca_certificate_id` is the registered CA AWS IoT
    says issued it (None for a certificate registered without a CA)."""

    certificate_id: str
    arn: str
    status: str
    pem: str
    ca_certificate_id: str | None = None


class ThingConflict(Conflict):
    """A thing with the device's name exists in AWS IoT and is not fleetkey's (its thing type
    is none of this deployment's profile thing types). Permanent until an operator resolves the
    name clash: nothing in AWS IoT was changed."""

    def __init__(self, thing_name: str, thing_type: str | None) -> None:
        super().__init__(
            f"a thing named {thing_name!r} exists in AWS IoT and is not fleetkey's",
            details={"thing_name": thing_name, "thing_type": thing_type},
        )
        self.thing_name = thing_name
        self.thing_type = thing_type


class IotRegistry:
    """`client` is a boto3 IoT client; None builds a real one."""

    def __init__(self, client: IoTClient | None = None, region: str | None = None) -> None:
        self._client: IoTClient = client or aws_client("iot", region)

    def describe_certificate(self, certificate_id: str) -> IotCertificate | None:
        """The certificate as AWS IoT has it, None when AWS IoT has no such certificate.

        AWS calls: 1 (DescribeCertificate).

        Raises:
            botocore ClientError: any other AWS failure.
        """
        try:
            description = self._client.describe_certificate(certificateId=certificate_id)[
                "certificateDescription"
            ]
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                return None
            raise
        return IotCertificate(
            certificate_id=description["certificateId"],
            arn=description["certificateArn"],
            status=description["status"],
            pem=description["certificatePem"],
            ca_certificate_id=description.get("caCertificateId") or None,
        )

    def ensure_thing(
        self,
        thing_name: str,
        thing_type: str,
        attributes: dict[str, str],
        certificate_arn: str,
        *,
        owned_thing_types: frozenset[str],
    ) -> list[str]:
        """Create the thing for `certificate_arn`, or take over an existing one of fleetkey's:
        bring it to the wanted type and attributes and detach every other certificate (any
        certificate attached to a device's thing may connect as that device). Returns the ARNs
        detached.

        AWS answers CreateThing with success when an identical thing exists (a retry of this
        registration: the attributes name this certificate) and ResourceAlreadyExists when it
        differs, so the take-over costs calls only when there is something to take over. A thing
        is fleetkey's when its type is one of `owned_thing_types` (this deployment's profile
        thing types, `<name_prefix>-<profile>`); any other thing of that name belongs to someone
        else in the account and is left exactly as it is.

        AWS calls: 1 (CreateThing); a take-over 4 + one per page of principals + one per
        certificate detached (DescribeThing, ListThingPrincipals, DetachThingPrincipal...,
        UpdateThing); a refused take-over 2 (CreateThing, DescribeThing).

        Raises:
            ThingConflict: the existing thing is not fleetkey's (nothing changed).
            botocore ClientError: any other AWS failure.
        """
        payload: AttributePayloadTypeDef = {"attributes": attributes, "merge": False}
        try:
            self._client.create_thing(
                thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
            )
            return []
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
        # Read only on this path, so the happy path stays one call. A thing created by another
        # team (or by hand) may share the device's name; detaching its certificates would cut
        # their devices off and hand the thing to ours.
        existing_type = self._client.describe_thing(thingName=thing_name).get("thingTypeName")
        if existing_type not in owned_thing_types:
            raise ThingConflict(thing_name, existing_type)
        stale = [
            arn
            for page in self._client.get_paginator("list_thing_principals").paginate(
                thingName=thing_name
            )
            for arn in page.get("principals", [])
            if arn != certificate_arn
        ]
        for arn in stale:
            self._client.detach_thing_principal(thingName=thing_name, principal=arn)
        self._client.update_thing(
            thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
        )
        return stale

    def attach_policy(self, policy_name: str, certificate_arn: str) -> None:
        self._client.attach_policy(policyName=policy_name, target=certificate_arn)

    def attach_exclusively(self, thing_name: str, certificate_arn: str) -> None:
        """Attach the certificate to the thing; EXCLUSIVE_THING forbids attaching it elsewhere."""
        self._client.attach_thing_principal(
            thingName=thing_name, principal=certificate_arn, thingPrincipalType="EXCLUSIVE_THING"
        )

    def activate_certificate(self, certificate_id: str) -> None:
        self._client.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")

    def revoke_certificate(self, certificate_id: str) -> None:
        self._client.update_certificate(certificateId=certificate_id, newStatus="REVOKED")

    def registration_code(self) -> str:
        return self._client.get_registration_code()["registrationCode"]

    def describe_ca(self, ca_id: str) -> bool:
        """Whether AWS IoT has a CA certificate with id `ca_id` (in any status).

        AWS calls: 1 (DescribeCACertificate).

        Raises:
            botocore ClientError: any AWS failure but "no such CA".
        """
        try:
            self._client.describe_ca_certificate(certificateId=ca_id)
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                return False
            raise
        return True

    def register_ca(self, ca_pem: str, verification_pem: str, ca_id: str) -> bool:
        """Register a CA, inactive and without auto-registration (`set_ca_active` turns both on
        once fleetkey trusts it). Returns True when this call registered it, False when AWS IoT
        already had it (ResourceAlreadyExists: nothing changed). Whether a CA already there may
        be adopted is the caller's decision (`ManufacturerCaService`): this adapter cannot tell
        fleetkey's earlier attempt from another team's CA.

        `ca_id` is the id AWS IoT gives this CA (SHA-256 of its DER).

        AWS calls: 1 (RegisterCACertificate).

        Raises:
            botocore ClientError: any AWS failure but ResourceAlreadyExists.
        """
        try:
            self._client.register_ca_certificate(
                caCertificate=ca_pem,
                verificationCertificate=verification_pem,
                setAsActive=False,
                allowAutoRegistration=False,
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            return False
        return True

    def set_ca_active(self, ca_id: str, active: bool) -> None:
        self._client.update_ca_certificate(
            certificateId=ca_id,
            newStatus="ACTIVE" if active else "INACTIVE",
            newAutoRegistrationStatus="ENABLE" if active else "DISABLE",
        )
