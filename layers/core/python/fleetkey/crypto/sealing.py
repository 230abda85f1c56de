"""Sealing a device's 32-byte data key to its certificate public key, so that only the holder of
the private key can read it. No custom cryptography: cryptography's HPKE and RSA-OAEP only.

Algorithms, chosen by the public key (anything else is refused with `UnsupportedKeyType`):

- EC P-256: HPKE (RFC 9180) base mode, DHKEM(P-256, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM
  (kem_id 0x0010, kdf_id 0x0001, aead_id 0x0002), alg "HPKE-P256-SHA256-A256GCM".
- EC P-384: HPKE base mode, DHKEM(P-384, HKDF-SHA384) + HKDF-SHA384 + AES-256-GCM
  (kem_id 0x0011, kdf_id 0x0002, aead_id 0x0002), alg "HPKE-P384-SHA384-A256GCM".
- RSA 2048-4096 bits: RSA-OAEP with SHA-256 and MGF1-SHA256, alg "RSA-OAEP-256".

HPKE is the single-shot form: one message at sequence number 0, empty AAD. `enc` is the
serialized ephemeral public key (RFC 9180 SerializePublicKey: the uncompressed SEC1 point, 65
bytes for P-256, 97 for P-384); `ciphertext` the AEAD output (32 bytes of key + 16 of tag).

The context binding, `context_info(device_id, epoch, owner)`, is the HPKE `info` and the OAEP
`label` (the same bytes for both):

    info = "fleetkey data key v1"            20 ASCII bytes
           0x00                              separator
           u16(len(device_id)) device_id     UTF-8, 1..256 bytes
           u64(epoch)                        unsigned, big-endian
           0x00                              owner absent (None), or
           0x01 u16(len(owner)) owner        owner present, UTF-8, 0..256 bytes

u16/u64 are big-endian unsigned integers (RFC 9180's I2OSP). Each field is length-prefixed or
fixed-size, so distinct (device_id, epoch, owner) triples never give the same bytes. The bounds
keep `info` under 1,024 bytes, the most OpenSSL's HPKE accepts (OSSL_HPKE_MAX_INFOLEN).

Wire form (`SealedDataKey.to_public()`): {"alg", "enc" (HPKE only), "ciphertext"}, binary values
as base64url without padding (RFC 7515 §2).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

DATA_KEY_BYTES = 32
INFO_PREFIX = b"fleetkey data key v1"
MAX_FIELD_BYTES = 256
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096

ALG_HPKE_P256 = "HPKE-P256-SHA256-A256GCM"
ALG_HPKE_P384 = "HPKE-P384-SHA384-A256GCM"
ALG_RSA_OAEP_256 = "RSA-OAEP-256"


@dataclass(frozen=True, slots=True)
class _HpkeSuite:
    suite: hpke.Suite
    curve: str
    enc_bytes: int  # Nenc: the uncompressed point


_HPKE: dict[str, _HpkeSuite] = {
    ALG_HPKE_P256: _HpkeSuite(
        hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM), "secp256r1", 65
    ),
    ALG_HPKE_P384: _HpkeSuite(
        hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM), "secp384r1", 97
    ),
}
_HPKE_BY_CURVE = {s.curve: alg for alg, s in _HPKE.items()}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class SealingError(ValueError):
    """Base of the errors of this module."""


class UnsupportedKeyType(SealingError):
    """The key is not EC P-256/P-384 nor RSA 2048-4096: no data key is sealed to (or opened
    with) it."""


class SealedKeyUnreadable(SealingError):
    """The sealed data key does not open with this private key and context. One error, one
    message, whatever failed (form, encoding, algorithm, key, context, tag), so a caller learns
    nothing about which step refused it."""

    def __init__(self) -> None:
        super().__init__("the sealed data key does not open with this key and context")


@dataclass(frozen=True, slots=True)
class SealedDataKey:
    """A data key sealed to one device key. `enc` is None for RSA-OAEP."""

    alg: str
    ciphertext: str
    enc: str | None = None

    def to_public(self) -> dict[str, str]:
        public = {"alg": self.alg}
        if self.enc is not None:
            public["enc"] = self.enc
        public["ciphertext"] = self.ciphertext
        return public


def context_info(device_id: str, epoch: int, owner: str | None) -> bytes:
    """The HPKE info / OAEP label binding a sealed key to one device life (module docstring).

    Raises:
        ValueError: a field out of its bounds (empty or over-long device id, over-long owner,
            epoch not an integer in 0..2^64-1).
    """
    # Checked at run time too: the values come from JSON and DynamoDB.
    if not _is_text(device_id) or not (owner is None or _is_text(owner)):
        raise ValueError("device_id and owner must be text")
    if not _is_epoch(epoch):
        raise ValueError("epoch must be an integer in 0..2^64-1")
    device = device_id.encode("utf-8")
    if not 1 <= len(device) <= MAX_FIELD_BYTES:
        raise ValueError(f"device_id must be 1..{MAX_FIELD_BYTES} UTF-8 bytes")
    info = (
        INFO_PREFIX + b"\x00" + struct.pack(">H", len(device)) + device + struct.pack(">Q", epoch)
    )
    if owner is None:
        return info + b"\x00"
    owned = owner.encode("utf-8")
    if len(owned) > MAX_FIELD_BYTES:
        raise ValueError(f"owner must be at most {MAX_FIELD_BYTES} UTF-8 bytes")
    return info + b"\x01" + struct.pack(">H", len(owned)) + owned


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_bytes(value: object) -> bool:
    return isinstance(value, bytes)


def _is_epoch(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


def _alg_for(key: PublicKeyTypes) -> str:
    """Raises:
    UnsupportedKeyType: not EC P-256/P-384 nor RSA 2048-4096.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _HPKE_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise UnsupportedKeyType(f"EC curve {key.curve.name} is not supported")
        return alg
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            raise UnsupportedKeyType(f"RSA keys of {key.key_size} bits are not supported")
        return ALG_RSA_OAEP_256
    raise UnsupportedKeyType(f"{type(key).__name__} keys are not supported")


def seal_data_key(
    public_key: PublicKeyTypes,
    data_key: bytes,
    *,
    device_id: str,
    epoch: int,
    owner: str | None,
) -> SealedDataKey:
    """`data_key` encrypted to `public_key`, bound to (device_id, epoch, owner).

    Raises:
        UnsupportedKeyType: the key is not EC P-256/P-384 nor RSA 2048-4096.
        ValueError: `data_key` is not 32 bytes, or a context field is out of bounds.
    """
    alg = _alg_for(public_key)
    if not _is_bytes(data_key) or len(data_key) != DATA_KEY_BYTES:
        raise ValueError(f"a data key is {DATA_KEY_BYTES} bytes")
    info = context_info(device_id, epoch, owner)
    if isinstance(public_key, rsa.RSAPublicKey):
        return SealedDataKey(alg, _b64url(public_key.encrypt(data_key, _oaep(info))))
    if not isinstance(public_key, ec.EllipticCurvePublicKey):  # _alg_for refused it already
        raise UnsupportedKeyType(f"{type(public_key).__name__} keys are not supported")
    suite = _HPKE[alg]
    sealed = suite.suite.encrypt(data_key, public_key, info=info)
    return SealedDataKey(
        alg, ciphertext=_b64url(sealed[suite.enc_bytes :]), enc=_b64url(sealed[: suite.enc_bytes])
    )


def open_data_key(
    private_key: PrivateKeyTypes,
    sealed: Mapping[str, Any],
    *,
    device_id: str,
    epoch: int,
    owner: str | None,
) -> bytes:
    """The data key inside `sealed` (the form `SealedDataKey.to_public()` gives), for the device
    holding `private_key`; the context must be the one it was sealed with.

    Raises:
        UnsupportedKeyType: the private key is not EC P-256/P-384 nor RSA 2048-4096.
        SealedKeyUnreadable: anything else (see the class).
    """
    expected = _alg_for(private_key.public_key())
    try:
        data_key = _open(private_key, sealed, expected, context_info(device_id, epoch, owner))
    except Exception:  # noqa: BLE001 - one error whatever failed (see SealedKeyUnreadable)
        # The cause is dropped too, so it cannot tell through a traceback in a log.
        raise SealedKeyUnreadable() from None
    if len(data_key) != DATA_KEY_BYTES:
        raise SealedKeyUnreadable()
    return data_key


def _open(private_key: PrivateKeyTypes, sealed: object, alg: str, info: bytes) -> bytes:
    if not isinstance(sealed, Mapping) or sealed.get("alg") != alg:
        raise ValueError("alg")
    ciphertext = _b64url_decode(sealed.get("ciphertext"))
    if isinstance(private_key, rsa.RSAPrivateKey):
        if "enc" in sealed:
            raise ValueError("enc")
        return private_key.decrypt(ciphertext, _oaep(info))
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):  # _alg_for refused it already
        raise ValueError("key")
    suite = _HPKE[alg]
    enc = _b64url_decode(sealed.get("enc"))
    if len(enc) != suite.enc_bytes:
        raise ValueError("enc")
    return suite.suite.decrypt(enc + ciphertext, private_key, info=info)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: object) -> bytes:
    """base64url without padding, canonical spelling only.

    Raises:
        ValueError: not such text.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise ValueError("not base64url") from None
    if _b64url(data) != text:
        raise ValueError("non-canonical base64url")
    return data
