"""Where moto 5.2.1's KMS encryption departs from AWS in ways device data keys depend on.

What moto already does as AWS does (checked, not patched): Decrypt under an encryption context
other than the one of Encrypt/GenerateDataKey (different, missing or extra pairs) fails with
InvalidCiphertextException, as does a blob that is not one of its own.

Patched, each naming the AWS behaviour it restores:

1. Decrypt with a KeyId other than the key that made the blob: AWS answers
   IncorrectKeyException; moto AccessDeniedException (which a caller must not read as "the blob
   is unreadable": a real AccessDenied is a missing grant).
2. Encrypt, GenerateDataKey, ReEncrypt and Decrypt with a disabled key: AWS answers
   DisabledException; moto encrypts and decrypts as if enabled.
3. The same with a key pending deletion: AWS answers KMSInvalidStateException; moto goes on.
4. The same with a key whose KeyUsage is not ENCRYPT_DECRYPT: AWS answers
   InvalidKeyUsageException; moto encrypts with a signing key.
5. Decrypt of bytes that are no ciphertext at all: AWS answers InvalidCiphertextException; moto
   reads a key id from the first 36 bytes of anything long enough and, finding no such key,
   answers AccessDeniedException. The patch answers InvalidCiphertextException when those bytes
   are not a key id; a well-formed id of a key that is not in the account keeps moto's
   AccessDeniedException (what AWS says of a key the caller may not use).

`apply()` is idempotent; `fleetkey_local.moto_patches.apply()` is meant to call it.
"""

from __future__ import annotations

import re
from typing import Any

_applied = False
# moto's key ids (uuid4) in its blob's 36-byte field (a multi-Region "mrk-" id arrives cut to 36)
_KEY_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f-]{32}"
)


def apply() -> None:
    global _applied
    if _applied:
        return
    _patch_kms()
    _applied = True


def _patch_kms() -> None:
    from moto.core.exceptions import JsonRESTError
    from moto.kms.exceptions import InvalidCiphertextException, InvalidKeyUsageException
    from moto.kms.models import KmsBackend
    from moto.kms.utils import _deserialize_ciphertext_blob

    class IncorrectKeyException(JsonRESTError):
        code = 400

        def __init__(self) -> None:
            super().__init__(
                "IncorrectKeyException",
                "The key ID in the request does not identify a CMK that can perform this "
                "operation.",
            )

    class DisabledException(JsonRESTError):
        code = 400

        def __init__(self, arn: str) -> None:
            super().__init__("DisabledException", f"{arn} is disabled.")

    class KMSInvalidStateException(JsonRESTError):
        code = 400

        def __init__(self, arn: str) -> None:
            super().__init__("KMSInvalidStateException", f"{arn} is pending deletion.")

    def check_usable(key: Any) -> None:
        if key.key_state == "Disabled":
            raise DisabledException(key.arn)
        if key.key_state == "PendingDeletion":
            raise KMSInvalidStateException(key.arn)
        if (key.key_usage or "ENCRYPT_DECRYPT") != "ENCRYPT_DECRYPT":  # None: CreateKey's default
            raise InvalidKeyUsageException()

    original_encrypt = KmsBackend.encrypt
    original_decrypt = KmsBackend.decrypt

    # GenerateDataKey and ReEncrypt go through these two methods.
    def encrypt(
        self: KmsBackend, key_id: str, plaintext: bytes, encryption_context: dict[str, str]
    ) -> tuple[bytes, str]:
        key = self.keys.get(self.any_id_to_key_id(key_id))
        if key is not None:  # an unknown key: moto's own NotFoundException
            check_usable(key)
        return original_encrypt(self, key_id, plaintext, encryption_context)

    def decrypt(
        self: KmsBackend,
        ciphertext_blob: bytes,
        encryption_context: dict[str, str],
        key_id: str | None = None,
    ) -> tuple[bytes, str]:
        try:
            blob_key_id = _deserialize_ciphertext_blob(ciphertext_blob).key_id
        except Exception:  # noqa: BLE001 - too short or not text: moto's InvalidCiphertextException
            blob_key_id = None
        if blob_key_id is not None and not _KEY_ID.fullmatch(blob_key_id):
            raise InvalidCiphertextException()
        blob_key = self.keys.get(blob_key_id) if blob_key_id is not None else None
        if blob_key is not None:
            if key_id is not None and self.any_id_to_key_id(key_id) != blob_key.id:
                raise IncorrectKeyException()
            check_usable(blob_key)
        return original_decrypt(self, ciphertext_blob, encryption_context, key_id)

    KmsBackend.encrypt = encrypt  # type: ignore[method-assign]
    KmsBackend.decrypt = decrypt  # type: ignore[method-assign]
