"""Shapes of the AWS events fleetkey functions receive, as AWS documents them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

# The IoT rules that deliver AWS IoT's events to fleetkey (the CDK stack and the local IoT Core
# emulator both build them from these).
IOT_SQL_VERSION = "2016-03-23"
REGISTRATION_RULE_SQL = "SELECT * FROM '$aws/events/certificates/registered/+'"
PRESENCE_CONNECTED_RULE_SQL = "SELECT * FROM '$aws/events/presence/connected/+'"
# A device reports tampering on its own topic (its IoT policy lets it publish under its own thing
# name only), so the topic's second level is the device id. Only that is selected: with `*`, a
# payload field `device_id` could clash with the alias (AWS does not document which wins), and
# the function trusts nothing in the payload.
TAMPER_RULE_SQL = "SELECT topic(2) AS device_id FROM 'fleetkey/+/events/tamper'"

CertificateId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class CertificateRegisteredEvent(BaseModel):
    """`$aws/events/certificates/registered/<caCertificateId>`: AWS IoT auto-registered a device
    certificate issued by a registered CA and left it PENDING_ACTIVATION (just-in-time
    registration)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    certificateId: CertificateId
    caCertificateId: CertificateId
    timestamp: int
    certificateStatus: Literal["PENDING_ACTIVATION"]
    awsAccountId: Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]
    certificateRegistrationTimestamp: str | int | None = None
