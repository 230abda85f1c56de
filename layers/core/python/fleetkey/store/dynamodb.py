"""The DynamoDB adapters of the ports, over one table (see `schema` for its layout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleetkey.store.audit_log import DynamoAuditLog
from fleetkey.store.certificates import DynamoCertificateDecisions
from fleetkey.store.data_keys import DynamoDataKeyRecords
from fleetkey.store.devices import DynamoDeviceRepository
from fleetkey.store.firmware import DynamoFirmwareReleases
from fleetkey.store.pki import DynamoPkiStore
from fleetkey.store.signing_key_registry import DynamoSigningKeyRegistry
from fleetkey.store.table import Table
from fleetkey.store.token_records import DynamoTokenRecords
from fleetkey.store.trust_anchors import DynamoTrustAnchorStore
from fleetkey.store.validations import DynamoValidations

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


class DynamoStore:
    """Every aggregate's adapter over the fleetkey table. `client` is a boto3 DynamoDB client;
    None builds a real one (at the first call)."""

    def __init__(
        self, table_name: str, client: DynamoDBClient | None = None, region: str | None = None
    ) -> None:
        self.table = Table(table_name, client=client, region=region)
        self.devices = DynamoDeviceRepository(self.table)
        self.certificates = DynamoCertificateDecisions(self.table, self.devices)
        self.anchors = DynamoTrustAnchorStore(self.table)
        self.audit = DynamoAuditLog(self.table)
        self.token_records = DynamoTokenRecords(self.table)
        self.signing_keys = DynamoSigningKeyRegistry(self.table)
        self.data_keys = DynamoDataKeyRecords(self.table)
        self.pki = DynamoPkiStore(self.table)
        self.firmware = DynamoFirmwareReleases(self.table)
        self.validations = DynamoValidations(self.table)
