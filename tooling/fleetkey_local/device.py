"""What a device does to get a token (sign a JWT client assertion with its own private key), to
answer a validate command (`validation_answer`) and to rotate its certificate (a new key of its
own, a CSR, an assertion by the current key bound to the CSR, then a commit proven with the new
key)."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from fleetkey_local.pki import PrivateKey

# The explicit type of a client authentication JWT (draft-ietf-oauth-rfc7523bis §4, RFC 8725 §3.11).
CLIENT_ASSERTION_TYPE = "client-authentication+jwt"


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
    extra_claims: dict[str, Any] | None = None,
    typ: str | None = CLIENT_ASSERTION_TYPE,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """RFC 7523 client assertion: iss = sub = device id, aud = the issuer (a string, its sole
    value, draft-ietf-oauth-rfc7523bis §4), kid = the AWS IoT certificate id of the device's
    current certificate, explicitly typed `client-authentication+jwt` (`typ=None` leaves the
    header without a type). `extra_claims` and `extra_headers` override, for tests."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": device_id,
        "sub": device_id,
        "aud": audience,
        "jti": uuid.uuid4().hex,
    }
    if nonce is not None:
        claims["nonce"] = nonce
    else:
        claims.update(iat=issued, exp=issued + lifetime)
    if firmware_version:
        claims["firmware_version"] = firmware_version
    if firmware_sha256:
        claims["firmware_sha256"] = firmware_sha256
    claims.update(extra_claims or {})
    # pyjwt drops a `typ` of None from the header it writes.
    headers = {"kid": certificate_id, "typ": typ, **(extra_headers or {})}
    return jwt.encode(claims, key, algorithm=algorithm or assertion_algorithm(key), headers=headers)


def token_request(
    assertion: str,
    scope: str | None = None,
    audience: str | None = None,
    client_id: str | None = None,
) -> dict[str, str]:
    """The form of a client-credentials token request authenticated by `assertion`; `client_id`
    is optional (RFC 7521 §4.2) and, when sent, must name the assertion's device."""
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    if scope:
        form["scope"] = scope
    if audience:
        form["audience"] = audience
    if client_id is not None:
        form["client_id"] = client_id
    return form


# ---- delegated validation -------------------------------------------------------------------

# A validation answer is sent at once: its assertion lives a minute.
VALIDATION_ANSWER_LIFETIME = 60


def validation_answer(
    key: PrivateKey,
    certificate_id: str,
    device_id: str,
    issuer: str,
    command: dict[str, Any],
    *,
    firmware_version: str | None = None,
    firmware_sha256: str | None = None,
    now: float | None = None,
    **options: Any,
) -> dict[str, str]:
    """The token request a device sends to answer a validate command (the payload it received
    on `fleetkey/<device_id>/commands/validate`): a client-credentials request whose assertion
    carries the command's `nonce` and `validation` = {id, purpose} beside `iat`/`exp` and the
    firmware measurement, asking for the command's `audience` (and no scope). `options` go to
    `client_assertion` (overrides, for tests)."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iat": issued,
        "exp": issued + VALIDATION_ANSWER_LIFETIME,
        "validation": {"id": command["validation_id"], "purpose": command["purpose"]},
        **(options.pop("extra_claims", None) or {}),
    }
    assertion = client_assertion(
        key,
        certificate_id,
        device_id,
        issuer,
        nonce=command["nonce"],
        firmware_version=firmware_version,
        firmware_sha256=firmware_sha256,
        extra_claims=claims,
        **options,
    )
    return token_request(assertion, audience=command["audience"])


# ---- certificate rotation -------------------------------------------------------------------


def rotation_csr(key: PrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    """The CSR a device sends to rotate: subject CN = its device id, signed by the new key, and
    nothing else requested (fleetkey decides the extensions of what it issues)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    algorithm = (
        hashes.SHA384()
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        else hashes.SHA256()
    )
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)


def csr_sha256(csr: x509.CertificateSigningRequest) -> str:
    """The `csr_sha256` claim: hex SHA-256 of the CSR's DER."""
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()


def rotation_request(csr: x509.CertificateSigningRequest, assertion: str) -> dict[str, str]:
    """The body of `POST /v1/devices/{device_id}/certificates`: the CSR (PEM) and the client
    assertion by the current key, which must carry `csr_sha256` (`rotation_assertion`)."""
    return {
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "client_assertion": assertion,
    }


def rotation_assertion(
    current_key: PrivateKey,
    current_certificate_id: str,
    device_id: str,
    audience: str,
    csr: x509.CertificateSigningRequest,
    **options: Any,
) -> str:
    """A /v1/token client assertion by the device's current key, bound to `csr` by the claim
    `csr_sha256`. `options` go to `client_assertion` (firmware claims, overrides for tests)."""
    extra = {"csr_sha256": csr_sha256(csr), **(options.pop("extra_claims", None) or {})}
    return client_assertion(
        current_key, current_certificate_id, device_id, audience, extra_claims=extra, **options
    )
