"""AWS IoT registry adapter. Every call here is idempotent, so a retried registration converges."""

from __future__ import annotations

from dataclasses import dataclass

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code


@dataclass(frozen=True, slots=True)
class IotCertificate:
    certificate_id: str
    arn: str
    status: str
    pem: str


class IotRegistry:
    """`client` is a boto3 IoT client; None builds a real one."""

    def __init__(self, client=None, region: str | None = None) -> None:
        self._client = client or aws_client("iot", region)

    def describe_certificate(self, certificate_id: str) -> IotCertificate | None:
        """None when AWS IoT has no such certificate."""
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
        )

    def ensure_thing(self, thing_name: str, thing_type: str, attributes: dict[str, str]) -> None:
        """Create the thing, or bring an existing one to the wanted type and attributes."""
        payload = {"attributes": attributes, "merge": False}
        try:
            self._client.create_thing(
                thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            # AWS answers this only when the existing thing differs from the request.
            self._client.update_thing(
                thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
            )

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
