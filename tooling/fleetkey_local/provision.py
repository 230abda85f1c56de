"""Create fleetkey's resources on an AWS endpoint (moto here) from the same definitions the CDK
stack uses: the table layout (with its `due` index) from fleetkey.store.schema, IoT policies and
thing types from the device profiles, the token signing key, the data-key wrapping key, and the
lifecycle queues (`fleetkey_local.queues.provision_lifecycle_queues`); and the data the local
stack starts with: the demo fleet's firmware release (`publish_demo_firmware`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.profiles import FLEETKEY_THING_ATTRIBUTES, PROFILES
from fleetkey.services.signing_keys import KEY_DESCRIPTION, KeyTrust
from fleetkey.store import schema

if TYPE_CHECKING:
    from fleetkey.composition import Components
    from fleetkey.domain.firmware import FirmwareRelease

NAME_PREFIX = "fleetkey"
# The demo fleet's pump firmware: profile, version, and the SHA-256 of the image (of
# b"fleetkey-demo-pump-firmware-2.4.1"), which `fleetkey_local.fleet`'s pumps attest. Released
# when the local stack starts, as the release role does on a deployed stack (`fleetkey firmware
# publish`).
DEMO_FIRMWARE = (
    "infusion-pump",
    "2.4.1",
    "7981a0c2a8f3203495d07847ee27eb5eb31d68545fd04cd4a76842099d64054f",
)


def create_table(dynamodb, table_name: str) -> None:
    try:
        dynamodb.create_table(
            TableName=table_name,
            KeySchema=[
                {"AttributeName": schema.PARTITION_KEY, "KeyType": "HASH"},
                {"AttributeName": schema.SORT_KEY, "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": schema.PARTITION_KEY, "AttributeType": "S"},
                {"AttributeName": schema.SORT_KEY, "AttributeType": "S"},
                *(
                    {"AttributeName": name, "AttributeType": kind}
                    for partition, sort in schema.SPARSE_INDEXES.values()
                    for name, kind in ((partition, "S"), (sort, "N"))
                ),
            ],
            # The rotation sweep's sparse indexes: devices with something due, by shard and time.
            GlobalSecondaryIndexes=[
                {
                    "IndexName": name,
                    "KeySchema": [
                        {"AttributeName": partition, "KeyType": "HASH"},
                        {"AttributeName": sort, "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "KEYS_ONLY"},
                }
                for name, (partition, sort) in schema.SPARSE_INDEXES.items()
            ],
            BillingMode="PAY_PER_REQUEST",
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceInUseException":
            raise
        return
    dynamodb.update_time_to_live(
        TableName=table_name,
        TimeToLiveSpecification={"Enabled": True, "AttributeName": schema.TTL_ATTRIBUTE},
    )


def create_iot_profiles(iot, region: str, account: str, prefix: str = NAME_PREFIX) -> None:
    arn_prefix = f"arn:aws:iot:{region}:{account}"
    for profile in PROFILES.values():
        try:
            iot.create_thing_type(
                thingTypeName=profile.thing_type_name(prefix),
                thingTypeProperties={
                    "thingTypeDescription": profile.description,
                    "searchableAttributes": list(FLEETKEY_THING_ATTRIBUTES),
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceAlreadyExistsException":
                raise
        try:
            iot.create_policy(
                policyName=profile.iot_policy_name(prefix),
                policyDocument=json.dumps(profile.iot_policy_document(arn_prefix)),
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceAlreadyExistsException":
                raise


def create_token_key(kms: Any, trust: KeyTrust | None = None) -> str:
    """The first access-token signing key (ECC_NIST_P256, SIGN_VERIFY), as the stack creates it:
    tagged for the (local) stack, with the key policy fleetkey writes (the same document the CDK
    stack gives its first key and rotation gives new ones), so that it confirms like any key."""
    trust = trust or KeyTrust.local()
    return KmsKeys(client=kms).create_signing_key(
        KEY_DESCRIPTION, dict(trust.tags), trust.policy_json()
    )


# The data-key wrapping key's description: the CDK stack's (fleetkey_infra.constants.
# DATA_KEY_DESCRIPTION; not imported: the infra constants import aws_cdk).
DATA_KEY_KEY_DESCRIPTION = "fleetkey: wraps the devices' data keys (GenerateDataKey, AES_256)"


def create_data_key_key(kms: Any, description: str = DATA_KEY_KEY_DESCRIPTION) -> str:
    """The stack's data-key wrapping key: symmetric (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT), KMS's
    own material, single-Region, yearly rotation on (KMS keeps the old material, so older
    wrapped keys still decrypt); its key id. AWS calls: 2."""
    key_id: str = kms.create_key(
        KeySpec="SYMMETRIC_DEFAULT",
        KeyUsage="ENCRYPT_DECRYPT",
        Origin="AWS_KMS",
        MultiRegion=False,
        Description=description,
    )["KeyMetadata"]["KeyId"]
    kms.enable_key_rotation(KeyId=key_id)
    return key_id


def provisioned_environment(
    *, lifecycle_queue_url: str | None, data_key_kms_key_id: str | None
) -> dict[str, str]:
    """The settings a deployed stack passes its functions from resources it creates, for the
    locally loaded functions' environment (`fleetkey.settings.Settings.from_environ` reads
    them)."""
    environment = {}
    if lifecycle_queue_url:
        environment["FLEETKEY_LIFECYCLE_QUEUE_URL"] = lifecycle_queue_url
    if data_key_kms_key_id:
        environment["FLEETKEY_DATA_KEY_ID"] = data_key_kms_key_id
    return environment


def provision(session_clients, table_name: str, region: str, account: str) -> None:
    """`session_clients(service)` returns a boto3 client for the service."""
    create_table(session_clients("dynamodb"), table_name)
    create_iot_profiles(session_clients("iot"), region, account)


def publish_demo_firmware(components: Components, actor: str = "provisioning") -> FirmwareRelease:
    """Publish the demo fleet's firmware release through the firmware service (one more publish
    of it, on a stack that has it, changes nothing). AWS calls: 2 (the audit stream's head, the
    release's transaction)."""
    profile, version, sha256 = DEMO_FIRMWARE
    return components.firmware.publish(profile, version, sha256, actor=actor).release
