"""Create fleetkey's resources on an AWS endpoint (moto here) from the same definitions the CDK
stack uses: the table layout from fleetkey.store.schema, IoT policies and thing types from the
device profiles."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.profiles import FLEETKEY_THING_ATTRIBUTES, PROFILES
from fleetkey.services.signing_keys import KEY_DESCRIPTION, KeyTrust
from fleetkey.store import schema

NAME_PREFIX = "fleetkey"


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


def provision(session_clients, table_name: str, region: str, account: str) -> None:
    """`session_clients(service)` returns a boto3 client for the service."""
    create_table(session_clients("dynamodb"), table_name)
    create_iot_profiles(session_clients("iot"), region, account)
