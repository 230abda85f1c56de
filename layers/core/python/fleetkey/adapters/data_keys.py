"""KMS-wrapped device data keys: the plaintext key exists only in memory, for the moment it is
sealed to the device; what is stored is KMS's blob, bound to the device's life by the encryption
context (KMS refuses to decrypt it under any other context)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code
from fleetkey.errors import FleetkeyError

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

DATA_KEY_BYTES = 32
CONTEXT_DEVICE_ID = "fleetkey:device_id"
CONTEXT_OWNER = "fleetkey:owner"
CONTEXT_EPOCH = "fleetkey:epoch"
NO_OWNER = "-"

# KMS's answers to "this blob does not decrypt under this key and context".
_UNREADABLE_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


class DataKeyUnreadable(FleetkeyError):
    """A stored data-key blob does not decrypt under the given KMS key and encryption context
    (another device, owner or epoch; another key; or not a KMS blob at all). Never the
    caller's input: the blob is fleetkey's own record, so this is a server-side fault."""

    code = "data_key_unreadable"
    status = 500


def encryption_context(device_id: str, owner: str | None, epoch: int) -> dict[str, str]:
    """The KMS encryption context of a device's data key: one per device life (a recommission
    increments the epoch, so no blob of an earlier life decrypts under the current context).
    No owner is "-" (KMS context values cannot be empty).

    Raises:
        ValueError: empty device id, or epoch not a non-negative integer.
    """
    if not device_id:
        raise ValueError("device_id must not be empty")
    if not _is_epoch(epoch):  # checked at run time too: it comes from JSON and DynamoDB
        raise ValueError("epoch must be a non-negative integer")
    return {
        CONTEXT_DEVICE_ID: device_id,
        CONTEXT_OWNER: owner or NO_OWNER,
        CONTEXT_EPOCH: str(epoch),
    }


def _is_epoch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class KmsDataKeys:
    """AES-256 data keys wrapped by one symmetric KMS key. `client` is a boto3 KMS client; None
    builds a real one."""

    def __init__(self, client: KMSClient | None = None, region: str | None = None) -> None:
        self._client: KMSClient = client or aws_client("kms", region)

    def generate(self, key_id: str, context: Mapping[str, str]) -> tuple[bytes, bytes]:
        """A fresh 256-bit data key: (plaintext, the KMS blob wrapping it under `context`).
        Keep the blob, use the plaintext and drop it.

        AWS calls: 1 (GenerateDataKey).

        Raises:
            botocore ClientError: any AWS failure (transient ones: see adapters.aws.is_transient).
        """
        response = self._client.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        plaintext: bytes = response["Plaintext"]
        blob: bytes = response["CiphertextBlob"]
        if len(plaintext) != DATA_KEY_BYTES:
            raise ValueError(f"KMS returned a {len(plaintext)}-byte data key for AES_256")
        return plaintext, blob

    def decrypt(self, key_id: str, blob: bytes, context: Mapping[str, str]) -> bytes:
        """The plaintext data key of `blob`, which must have been made by `key_id` under exactly
        `context` (KMS checks both; naming the key also keeps a forged blob from making KMS
        try another key).

        AWS calls: 1 (Decrypt).

        Raises:
            DataKeyUnreadable: KMS refuses the blob under this key and context, or it does not
                hold a 32-byte key.
            botocore ClientError: any other AWS failure (a disabled or deleted key, access
                denied, throttling).
        """
        try:
            response = self._client.decrypt(
                CiphertextBlob=blob, KeyId=key_id, EncryptionContext=dict(context)
            )
        except ClientError as exc:
            if error_code(exc) in _UNREADABLE_CODES:
                raise DataKeyUnreadable(
                    "the data key does not decrypt under this key and context",
                    details={"key_id": key_id, "kms_error": error_code(exc)},
                ) from None
            raise
        plaintext: bytes = response["Plaintext"]
        if len(plaintext) != DATA_KEY_BYTES:
            raise DataKeyUnreadable("the blob does not hold a data key", details={"key_id": key_id})
        return plaintext
