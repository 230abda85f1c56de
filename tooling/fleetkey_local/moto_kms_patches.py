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

Signing (Sign, Verify), patched the same way:

6. `MessageType=DIGEST`: AWS signs (and verifies) the given message as the hash itself, which
   is how a message over 4,096 bytes (a CRL, a certificate with many extensions) is signed; moto
   reads MessageType and ignores it, so it hashes the digest again and its signature verifies
   over SHA-256(digest), never over the digest. The patch signs and verifies DIGEST messages
   prehashed (ECDSA and RSA alike, with the padding moto uses for RAW), and answers
   ValidationException ("Digest is invalid length for algorithm ...") when the digest's length
   is not the signing algorithm's hash size, as AWS does. As in AWS, the message type of Verify
   need not be Sign's: a RAW signature verifies as DIGEST of the message's hash and back.
7. MessageType outside AWS's enum (RAW, DIGEST, EXTERNAL_MU): AWS answers ValidationException;
   moto signs as RAW. EXTERNAL_MU (ML-DSA keys only, which moto lacks) is refused likewise.
8. A Message over 4,096 bytes: AWS answers ValidationException (the API's length constraint,
   whatever the message type); moto signs any length.

`apply()` is idempotent; `fleetkey_local.moto_patches.apply()` is meant to call it (so both the
in-process `mock_aws` of the tests that call it and the local stack's `ThreadedMotoServer`,
which runs in the same process, get every patch).
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
    _patch_kms_signing()
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


# The API's length constraint on Sign/Verify's Message, whatever its type.
MAX_MESSAGE_BYTES = 4096
_MESSAGE_TYPES = ("RAW", "DIGEST", "EXTERNAL_MU")


class _Digest(bytes):
    """A Message sent with MessageType=DIGEST: moto's request parsing marks it so, and the
    patched key classes, which moto hands the message untouched, sign it prehashed."""


def _patch_kms_signing() -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from moto.kms.exceptions import ValidationException
    from moto.kms.responses import KmsResponse
    from moto.kms.utils import ECDSAPrivateKey, RSAPrivateKey, validate_signing_algorithm

    def check_message(response: KmsResponse) -> None:
        message_type = response._get_param("MessageType") or "RAW"
        if message_type not in _MESSAGE_TYPES:
            raise ValidationException(
                f"1 validation error detected: Value '{message_type}' at 'messageType' failed "
                f"to satisfy constraint: Member must satisfy enum value set: "
                f"[{', '.join(_MESSAGE_TYPES)}]"
            )
        if message_type == "EXTERNAL_MU":
            raise ValidationException("MessageType EXTERNAL_MU is supported for ML_DSA keys only.")
        message = response._get_param("Message")
        if isinstance(message, bytes) and len(message) > MAX_MESSAGE_BYTES:
            raise ValidationException(
                "1 validation error detected: Value at 'message' failed to satisfy constraint: "
                f"Member must have length less than or equal to {MAX_MESSAGE_BYTES}"
            )

    original_get_param = KmsResponse._get_param

    def get_param(self: KmsResponse, param_name: str, if_none: Any = None) -> Any:
        value = original_get_param(self, param_name, if_none)
        if (
            param_name == "Message"
            and isinstance(value, bytes)
            and original_get_param(self, "MessageType") == "DIGEST"
        ):
            return _Digest(value)
        return value

    KmsResponse._get_param = get_param  # type: ignore[method-assign]

    for name in ("sign", "verify"):
        original_response = getattr(KmsResponse, name)

        def response(self: KmsResponse, __original: Any = original_response) -> str:
            check_message(self)
            return __original(self)  # type: ignore[no-any-return]

        setattr(KmsResponse, name, response)

    def check_digest(digest: _Digest, algorithm: Any, signing_algorithm: str) -> bytes:
        if len(digest) != algorithm.digest_size:
            raise ValidationException(
                f"Digest is invalid length for algorithm {signing_algorithm}."
            )
        return bytes(digest)

    original_ecdsa_sign = ECDSAPrivateKey.sign
    original_ecdsa_verify = ECDSAPrivateKey.verify

    def ecdsa_sign(self: ECDSAPrivateKey, message: bytes, signing_algorithm: str) -> bytes:
        if not isinstance(message, _Digest):
            return original_ecdsa_sign(self, message, signing_algorithm)
        validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
        algorithm = self._ECDSAPrivateKey__hash_algorithm(signing_algorithm)  # type: ignore[attr-defined]
        digest = check_digest(message, algorithm, signing_algorithm)
        return self.private_key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))

    def ecdsa_verify(
        self: ECDSAPrivateKey, message: bytes, signature: bytes, signing_algorithm: str
    ) -> bool:
        if not isinstance(message, _Digest):
            return original_ecdsa_verify(self, message, signature, signing_algorithm)
        validate_signing_algorithm(signing_algorithm, self.valid_signing_algorithms)
        algorithm = self._ECDSAPrivateKey__hash_algorithm(signing_algorithm)  # type: ignore[attr-defined]
        digest = check_digest(message, algorithm, signing_algorithm)
        try:
            self.private_key.public_key().verify(
                signature, digest, ec.ECDSA(utils.Prehashed(algorithm))
            )
        except InvalidSignature:
            return False
        return True

    ECDSAPrivateKey.sign = ecdsa_sign  # type: ignore[method-assign]
    ECDSAPrivateKey.verify = ecdsa_verify  # type: ignore[method-assign]

    original_rsa_sign = RSAPrivateKey.sign
    original_rsa_verify = RSAPrivateKey.verify

    def rsa_sign(self: RSAPrivateKey, message: bytes, signing_algorithm: str) -> bytes:
        if not isinstance(message, _Digest):
            return original_rsa_sign(self, message, signing_algorithm)
        validate_signing_algorithm(signing_algorithm, _rsa_algorithms())
        pad, algorithm = self._RSAPrivateKey__padding_and_hash_algorithm(signing_algorithm)  # type: ignore[attr-defined]
        digest = check_digest(message, algorithm, signing_algorithm)
        return self.private_key.sign(digest, pad, utils.Prehashed(algorithm))

    def rsa_verify(
        self: RSAPrivateKey, message: bytes, signature: bytes, signing_algorithm: str
    ) -> bool:
        if not isinstance(message, _Digest):
            return original_rsa_verify(self, message, signature, signing_algorithm)
        validate_signing_algorithm(signing_algorithm, _rsa_algorithms())
        pad, algorithm = self._RSAPrivateKey__padding_and_hash_algorithm(signing_algorithm)  # type: ignore[attr-defined]
        digest = check_digest(message, algorithm, signing_algorithm)
        try:
            self.private_key.public_key().verify(signature, digest, pad, utils.Prehashed(algorithm))
        except InvalidSignature:
            return False
        return True

    RSAPrivateKey.sign = rsa_sign  # type: ignore[method-assign]
    RSAPrivateKey.verify = rsa_verify  # type: ignore[method-assign]


def _rsa_algorithms() -> list[str]:
    from moto.kms.utils import SigningAlgorithm

    return SigningAlgorithm.rsa_signing_algorithms()
