"""What a device does to get a token: sign a JWT client assertion with its own private key."""

from __future__ import annotations

import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetkey_local.pki import PrivateKey


def assertion_algorithm(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "PS256"
    raise ValueError("unsupported device key")


def client_assertion(
    key: PrivateKey,
    certificate_id: str,
    device_id: str,
    audience: str,
    *,
    nonce: str | None = None,
    lifetime: int = 300,
    now: float | None = None,
    firmware_version: str | None = None,
    firmware_sha256: str | None = None,
    algorithm: str | None = None,
    extra_claims: dict | None = None,
) -> str:
    """RFC 7523 client assertion: iss = sub = device id, aud = the issuer, kid = the AWS IoT
    certificate id of the device's current certificate."""
    issued = int(now if now is not None else time.time())
    claims = {"iss": device_id, "sub": device_id, "aud": audience, "jti": uuid.uuid4().hex}
    if nonce is not None:
        claims["nonce"] = nonce
    else:
        claims.update(iat=issued, exp=issued + lifetime)
    if firmware_version:
        claims["firmware_version"] = firmware_version
    if firmware_sha256:
        claims["firmware_sha256"] = firmware_sha256
    claims.update(extra_claims or {})
    return jwt.encode(
        claims, key, algorithm=algorithm or assertion_algorithm(key), headers={"kid": certificate_id}
    )


def token_request(assertion: str, scope: str | None = None, audience: str | None = None) -> dict:
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    if scope:
        form["scope"] = scope
    if audience:
        form["audience"] = audience
    return form
