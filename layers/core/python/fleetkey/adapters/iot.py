"""AWS IoT registry adapter. Every call here is idempotent, so a retried registration converges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code

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
        self, thing_name: str, thing_type: str, attributes: dict[str, str], certificate_arn: str
    ) -> list[str]:
        """Create the thing for `certificate_arn`, or take over an existing one: bring it to the
        wanted type and attributes and detach every other certificate (any certificate attached
        to a device's thing may connect as that device). Returns the ARNs detached.

        AWS answers CreateThing with success when an identical thing exists (a retry of this
        registration: the attributes name this certificate) and ResourceAlreadyExists when it
        differs, so the take-over costs calls only when there is something to take over.
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

    def register_ca(self, ca_pem: str, verification_pem: str, ca_id: str) -> str:
        """Register a CA, inactive and without auto-registration (`set_ca_active` turns both on
        once fleetkey trusts it); returns its AWS IoT certificate id.

        `ca_id` is the id AWS IoT gives this CA (SHA-256 of its DER); registering the same CA
        again answers ResourceAlreadyExists, which makes a retried registration converge."""
        try:
            response = self._client.register_ca_certificate(
                caCertificate=ca_pem,
                verificationCertificate=verification_pem,
                setAsActive=False,
                allowAutoRegistration=False,
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            return ca_id
        return response["certificateId"]

    def set_ca_active(self, ca_id: str, active: bool) -> None:
        self._client.update_ca_certificate(
            certificateId=ca_id,
            newStatus="ACTIVE" if active else "INACTIVE",
            newAutoRegistrationStatus="ENABLE" if active else "DISABLE",
        )
