"""JOSE pieces fleetkey builds itself because the signing key lives in KMS: JWK form and RFC 7638
thumbprint of a public key, and compact JWS signing through KMS. Verification is pyjwt's."""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetkey.adapters.kms import KmsSigner

_CURVES = {"secp256r1": ("P-256", 32, "ES256"), "secp384r1": ("P-384", 48, "ES384")}

# Which assertion algorithms a device key may use: never `none`, never HMAC, and only the
# algorithms of the key's own type.
DEVICE_ALGORITHMS = {
    "ec:secp256r1": ("ES256",),
    "ec:secp384r1": ("ES384",),
    "rsa": ("PS256", "RS256"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int, size: int | None = None) -> bytes:
    size = size or (value.bit_length() + 7) // 8
    return value.to_bytes(size, "big")


def public_jwk(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> dict:
    """The public key as a JWK (RFC 7517/7518), without kid/use/alg."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv, size, _ = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        return {"kty": "EC", "crv": crv, "x": b64url(_int_bytes(numbers.x, size)),
                "y": b64url(_int_bytes(numbers.y, size))}
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": b64url(_int_bytes(numbers.n)), "e": b64url(_int_bytes(numbers.e))}


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638: SHA-256 over the required members, lexicographically ordered, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def algorithms_for(key_description: str) -> tuple[str, ...]:
    """The JWS algorithms a device key ("ec:<curve>" or "rsa:<bits>") may sign with."""
    kind = key_description if key_description.startswith("ec:") else key_description.split(":")[0]
    return DEVICE_ALGORITHMS.get(kind, ())


def sign_jwt(signer: KmsSigner, kid: str, claims: dict, typ: str) -> str:
    """A compact JWS (ES256/ES384 from the KMS key's curve) over `claims`: one KMS Sign call."""
    _, _, alg = _CURVES[signer.public_key().curve.name]
    header = {"alg": alg, "typ": typ, "kid": kid}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    return signing_input + "." + b64url(signer.sign_raw(signing_input.encode()))
