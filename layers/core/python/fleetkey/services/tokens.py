"""Token vending: a device proves its identity with a JWT client assertion signed by its own key
(RFC 7523 §2.2 in an RFC 6749 §4.4 client-credentials grant) and receives a short-lived access
token (RFC 9068) signed by a KMS key, bound to its certificate (RFC 8705 `cnf`).

AWS calls per issued token: read the device, record the assertion's jti (and consume the
challenge) in one conditional write, sign with KMS = 3. Public keys of device certificates and of
signing keys are cached (they never change for an id); the signing-key registry for a minute.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections import OrderedDict
from typing import Mapping

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fleetkey.clock import Clock, utc_now
from fleetkey.crypto.jose import algorithms_for, b64url, sign_jwt
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.oauth import (
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    OAuthInvalidRequest,
    UnsupportedGrantType,
)
from fleetkey.domain.profiles import get_profile
from fleetkey.services.signing_keys import SigningKeys
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import ConditionFailed, Store

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = frozenset({"ES256", "ES384", "PS256", "RS256"})
MAX_ASSERTION_BYTES = 8 * 1024
MAX_ASSERTION_LIFETIME = 300
CLOCK_SKEW = 60
CHALLENGE_SECONDS = 120
ACCESS_TOKEN_TYPE = "at+jwt"
_CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")
_DEVICE_ID = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,128}")


class TokenService:
    def __init__(
        self, settings: Settings, store: Store, signing_keys: SigningKeys, clock: Clock = utc_now
    ) -> None:
        self._settings = settings
        self._store = store
        self._keys = signing_keys
        self._clock = clock
        self._public_keys: OrderedDict[str, object] = OrderedDict()

    # ---- challenge --------------------------------------------------------------------------

    def challenge(self) -> dict:
        """A single-use nonce for devices without a trusted clock (one conditional write)."""
        nonce = secrets.token_urlsafe(32)
        self._store.put_nonce(nonce, int(self._clock().timestamp()) + CHALLENGE_SECONDS)
        return {"nonce": nonce, "expires_in": CHALLENGE_SECONDS}

    # ---- token ------------------------------------------------------------------------------

    def issue(self, form: Mapping[str, str]) -> dict:
        """Issue an access token for a client-credentials request with a JWT client assertion.

        Raises:
            OAuthInvalidRequest, UnsupportedGrantType: the request is malformed.
            InvalidClient: the assertion does not authenticate an ACTIVE device by its current
                certificate (one answer for every such case).
            InvalidGrant: a replayed assertion, an unknown or used challenge, unattested firmware.
            InvalidScope: a scope or audience outside the device's profile.
        """
        if form.get("grant_type") != "client_credentials":
            if not form.get("grant_type"):
                raise OAuthInvalidRequest("grant_type is required")
            raise UnsupportedGrantType("only the client_credentials grant is supported")
        if form.get("client_assertion_type") != JWT_BEARER:
            raise OAuthInvalidRequest(f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion") or ""
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthInvalidRequest("client_assertion is required (at most 8 KiB)")

        header, unverified = self._peek(assertion)
        device_id = unverified.get("sub")
        if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
            raise InvalidClient("subject")
        device = self._store.get_device(device_id)
        if device is None:
            raise InvalidClient("unknown device")
        if device.state is not DeviceState.ACTIVE:
            raise InvalidClient("device not active")
        if header["kid"] != device.certificate_id or not device.certificate_public_key:
            raise InvalidClient("not the device's current certificate")
        if header["alg"] not in algorithms_for(device.certificate_key or ""):
            raise InvalidClient("algorithm does not match the certificate key")

        now = int(self._clock().timestamp())
        nonce = unverified.get("nonce")
        required = ["iss", "sub", "aud", "jti"] + ([] if nonce is not None else ["exp", "iat"])
        try:
            claims = jwt.decode(
                assertion,
                self._public_key(device.certificate_id, device.certificate_public_key),
                algorithms=[header["alg"]],
                audience=self._settings.issuer,
                issuer=device_id,
                leeway=CLOCK_SKEW,
                options={"require": required},
            )
        except (jwt.PyJWTError, TypeError, ValueError, OverflowError) as exc:
            raise InvalidClient(f"assertion: {type(exc).__name__}") from None
        if nonce is None and not 0 < claims["exp"] - claims["iat"] <= MAX_ASSERTION_LIFETIME:
            raise InvalidClient("assertion lifetime")
        if not isinstance(claims["jti"], str) or not _PRINTABLE.fullmatch(claims["jti"]):
            raise InvalidClient("jti")
        if nonce is not None and (not isinstance(nonce, str) or not _PRINTABLE.fullmatch(nonce)):
            raise InvalidClient("nonce")
        # With a nonce, iat/exp may be absent; an exp that is present is bounded all the same
        # (without one, exp - iat <= 5 min and pyjwt's iat check bound it).
        if (
            nonce is not None
            and "exp" in claims
            and claims["exp"] > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW
        ):
            raise InvalidClient("assertion lifetime")
        certificate_expiry = device.certificate_not_after_epoch()
        if certificate_expiry is not None and now >= certificate_expiry:
            raise InvalidClient("certificate expired")

        rules = get_profile(device.profile).token_rules
        scopes = self._granted(form.get("scope"), rules.scopes, "scope")
        audiences = self._granted(form.get("audience"), rules.audiences, "audience")
        firmware = self._attested_firmware(claims, rules)

        remember_until = int(claims.get("exp") or now + MAX_ASSERTION_LIFETIME) + CLOCK_SKEW
        try:
            self._store.use_assertion(device_id, claims["jti"], remember_until, now, nonce)
        except ConditionFailed as failure:
            if "jti" in failure.failed:
                raise InvalidGrant("the assertion was already used") from None
            raise InvalidGrant("the challenge is unknown, used or expired") from None

        lifetime = rules.lifetime_seconds
        if certificate_expiry is not None:
            lifetime = min(lifetime, certificate_expiry - now)
        key, signer = self._keys.current()
        token_claims = {
            "iss": self._settings.issuer,
            "sub": device_id,
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "exp": now + lifetime,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "client_id": device_id,
            "scope": " ".join(scopes),
            "cnf": {"x5t#S256": b64url(bytes.fromhex(device.certificate_id))},
            "device_profile": device.profile,
            **firmware,
        }
        return {
            "access_token": sign_jwt(signer, key.kid, token_claims, ACCESS_TOKEN_TYPE),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": token_claims["scope"],
        }

    @staticmethod
    def _peek(assertion: str) -> tuple[dict, dict]:
        """Header and claims before verification: only to find whose key to verify with."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except (jwt.PyJWTError, ValueError, RecursionError):  # e.g. JSON nested 1,500 deep
            raise InvalidClient("malformed assertion") from None
        if header.get("alg") not in ASSERTION_ALGORITHMS:
            raise InvalidClient("algorithm not allowed")
        if not isinstance(header.get("kid"), str) or not _CERTIFICATE_ID.fullmatch(header["kid"]):
            raise InvalidClient("kid")
        if claims.get("iss") != claims.get("sub"):
            raise InvalidClient("iss differs from sub")
        # NumericDate claims must be numbers (pyjwt would coerce strings and fail on others).
        for name in ("exp", "iat", "nbf"):
            if name in claims and type(claims[name]) is not int:
                raise InvalidClient(f"{name} is not an integer")
        return header, claims

    def _public_key(self, certificate_id: str, pem: str):
        key = self._public_keys.get(certificate_id)
        if key is None:
            key = self._public_keys[certificate_id] = load_pem_public_key(pem.encode())
            if len(self._public_keys) > 10_000:
                self._public_keys.popitem(last=False)
        return key

    @staticmethod
    def _granted(requested: str | None, allowed: frozenset[str], what: str) -> list[str]:
        wanted = sorted(set((requested or "").split())) or sorted(allowed)
        if not wanted or not set(wanted) <= allowed:
            raise InvalidScope(f"requested {what} is not allowed for this device")
        return wanted

    @staticmethod
    def _attested_firmware(claims: dict, rules) -> dict:
        measurement = claims.get("firmware_sha256")
        version = claims.get("firmware_version")
        firmware = {}
        if isinstance(version, str) and len(version) <= 64:
            firmware["firmware_version"] = version
        if rules.require_attestation:
            if not isinstance(measurement, str) or measurement not in rules.allowed_firmware:
                raise InvalidGrant("firmware measurement is not an allowed release")
            if "firmware_version" not in firmware:
                raise InvalidGrant("firmware_version is required")
            firmware["firmware_sha256"] = measurement
        elif isinstance(measurement, str) and _SHA256_HEX.fullmatch(measurement):
            firmware["firmware_sha256"] = measurement
        return firmware
