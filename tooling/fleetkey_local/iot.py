"""What AWS IoT Core does when a device with an unknown certificate connects (just-in-time
registration), for an endpoint where it does not happen by itself (moto never runs IoT rules).

The device presents its certificate and its manufacturer CA's certificate. If that CA is
registered and active, AWS IoT registers the device certificate PENDING_ACTIVATION, refuses the
connection, and publishes the certificate-registered event, which the IoT rule delivers to the
registration function.
"""

from __future__ import annotations

import hashlib
import time

from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import serialization


def certificate_id(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def certificate_registered_event(certificate_id: str, ca_certificate_id: str, account: str) -> dict:
    """The event AWS IoT publishes on $aws/events/certificates/registered/<caCertificateId>."""
    now_ms = int(time.time() * 1000)
    return {
        "certificateId": certificate_id,
        "caCertificateId": ca_certificate_id,
        "timestamp": now_ms,
        "certificateStatus": "PENDING_ACTIVATION",
        "awsAccountId": account,
        "certificateRegistrationTimestamp": str(now_ms),
    }


def auto_register(iot, device_pem: str, ca_pem: str, account: str) -> dict | None:
    """Emulate AWS IoT meeting `device_pem` for the first time.

    Returns the certificate-registered event, or None when AWS IoT would publish none: the CA is
    not registered, not active or without auto-registration, or the certificate is already
    registered (known certificates are not auto-registered again; they connect or are refused by
    their status). The certificate is registered with its CA, so DescribeCertificate reports the
    CA's id as `caCertificateId`, as AWS IoT does.
    """
    ca_id = certificate_id(ca_pem)
    try:
        ca = iot.describe_ca_certificate(certificateId=ca_id)["certificateDescription"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return None
        raise
    if ca.get("status") != "ACTIVE" or ca.get("autoRegistrationStatus") != "ENABLE":
        return None
    try:
        registered = iot.register_certificate(
            certificatePem=device_pem, caCertificatePem=ca_pem, status="PENDING_ACTIVATION"
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceAlreadyExistsException":
            return None
        raise
    return certificate_registered_event(registered["certificateId"], ca_id, account)


def connect_refusal(iot, certificate_id: str, client_id: str) -> str | None:
    """Why AWS IoT would refuse an MQTT connection with a known certificate and this client id,
    or None when it would accept it: the certificate must be ACTIVE, attached to a thing whose
    name is the client id (the profile policies allow client/${iot:Connection.Thing.ThingName}
    only while the thing is attached), and have a policy attached."""
    description = iot.describe_certificate(certificateId=certificate_id)["certificateDescription"]
    if description["status"] != "ACTIVE":
        return f"certificate is {description['status']}"
    arn = description["certificateArn"]
    try:
        principals = iot.list_thing_principals(thingName=client_id)["principals"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            return "no thing named after the client id"
        raise
    if arn not in principals:
        return "certificate is not attached to the client id's thing"
    if not iot.list_attached_policies(target=arn)["policies"]:
        return "no policy attached"
    return None
