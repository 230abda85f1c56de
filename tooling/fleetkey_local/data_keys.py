"""Both ends of a device data key, for the demo and the tests.

- The device opens the sealed key it was given (only its private key can) and encrypts telemetry
  under it: AES-256-GCM, a random 96-bit nonce, its device id as the associated data.
- A backend reads the KMS-wrapped blob (GET /v1/admin/devices/{id}/data-key), decrypts it with
  its own kms:Decrypt under the encryption context it rebuilt itself, and decrypts the telemetry.

Telemetry envelope (JSON-able; binary values base64url without padding):
    {"v": 1, "alg": "A256GCM", "device_id": ..., "epoch": ..., "nonce": ..., "ciphertext": ...}
`ciphertext` is AES-GCM's output (the encrypted payload followed by the 16-byte tag); the
associated data is the UTF-8 device id. `device_id` and `epoch` say which key to use; the
reader checks them against what it expects and never takes the device id to authenticate from
the envelope itself.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleetkey.adapters.data_keys import KmsDataKeys, encryption_context
from fleetkey.crypto.sealing import open_data_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ENVELOPE_VERSION = 1
ENVELOPE_ALG = "A256GCM"
NONCE_BYTES = 12


class EnvelopeUnreadable(ValueError):
    """The telemetry envelope does not decrypt for this device under this key (one error for
    every cause)."""

    def __init__(self) -> None:
        super().__init__("the telemetry envelope does not decrypt for this device and key")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise ValueError("non-canonical base64url")
    return data


# -- the device ---------------------------------------------------------------------------------


def device_open(
    private_key: PrivateKeyTypes,
    sealed: Mapping[str, Any],
    *,
    device_id: str,
    epoch: int,
    owner: str | None,
) -> bytes:
    """The data key a device was sent (the `to_public()` form of a SealedDataKey).

    Raises:
        SealedKeyUnreadable: not sealed to this key and context.
    """
    return open_data_key(private_key, sealed, device_id=device_id, epoch=epoch, owner=owner)


def encrypt_telemetry(
    data_key: bytes, payload: bytes, *, device_id: str, epoch: int
) -> dict[str, Any]:
    """`payload` encrypted under the device's data key, as an envelope (module docstring)."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, payload, device_id.encode("utf-8"))
    return {
        "v": ENVELOPE_VERSION,
        "alg": ENVELOPE_ALG,
        "device_id": device_id,
        "epoch": epoch,
        "nonce": _b64url(nonce),
        "ciphertext": _b64url(ciphertext),
    }


# -- a backend ----------------------------------------------------------------------------------


def decrypt_telemetry(
    data_key: bytes, envelope: Mapping[str, Any], *, device_id: str, epoch: int | None = None
) -> bytes:
    """The payload of `envelope`, which must come from `device_id` (and `epoch`, when given).

    Raises:
        EnvelopeUnreadable: another device or epoch, another key, or altered in any way.
    """
    try:
        if (
            envelope.get("v") != ENVELOPE_VERSION
            or envelope.get("alg") != ENVELOPE_ALG
            or envelope.get("device_id") != device_id
            or (epoch is not None and envelope.get("epoch") != epoch)
        ):
            raise ValueError("header")
        nonce = _b64url_decode(envelope.get("nonce"))
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce")
        ciphertext = _b64url_decode(envelope.get("ciphertext"))
        return AESGCM(data_key).decrypt(nonce, ciphertext, device_id.encode("utf-8"))
    except (ValueError, TypeError, AttributeError, binascii.Error, InvalidTag):
        raise EnvelopeUnreadable() from None


def backend_data_key(kms_client: Any, grant: Mapping[str, Any]) -> bytes:
    """The plaintext data key from the admin route's answer ({device_id, owner, epoch, key_id,
    ciphertext_blob (base64), encryption_context}), decrypted with the backend's own KMS client.
    The context is rebuilt from device_id, owner and epoch and must equal the one sent, so the
    backend knows whose key it holds.

    Raises:
        ValueError: the answer's context is not the one of its device, owner and epoch.
        DataKeyUnreadable: KMS refuses the blob under that key and context.
    """
    context = encryption_context(grant["device_id"], grant.get("owner"), grant["epoch"])
    if dict(grant["encryption_context"]) != context:
        raise ValueError("the encryption context is not the one of this device life")
    blob = base64.b64decode(grant["ciphertext_blob"], validate=True)
    return KmsDataKeys(client=kms_client).decrypt(grant["key_id"], blob, context)


def backend_decrypt_telemetry(
    kms_client: Any, grant: Mapping[str, Any], envelope: Mapping[str, Any]
) -> bytes:
    """A backend's whole path: the data key from KMS, then the payload of the device's envelope.

    Raises:
        ValueError, DataKeyUnreadable: see backend_data_key.
        EnvelopeUnreadable: see decrypt_telemetry.
    """
    data_key = backend_data_key(kms_client, grant)
    return decrypt_telemetry(data_key, envelope, device_id=grant["device_id"], epoch=grant["epoch"])
