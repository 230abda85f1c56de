"""Token introspection (RFC 7662) for relying parties that check online: a token is active when
its signature, issuer and lifetime hold, its device is still ACTIVE with the certificate the token
is bound to, and its jti was not revoked."""

from __future__ import annotations

import jwt

from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.jose import b64url
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.services.signing_keys import MAX_TOKEN_LIFETIME_SECONDS, SigningKeys
from fleetkey.services.tokens import ACCESS_TOKEN_TYPE, CLOCK_SKEW
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import Store

INACTIVE = {"active": False}
MAX_TOKEN_BYTES = 8 * 1024


class IntrospectionService:
    def __init__(
        self, settings: Settings, store: Store, signing_keys: SigningKeys, clock: Clock = utc_now
    ) -> None:
        self._settings = settings
        self._store = store
        self._keys = signing_keys
        self._clock = clock

    def introspect(self, token: str) -> dict:
        """RFC 7662 response: {"active": false} for anything not currently valid, never an error."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            return INACTIVE
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, RecursionError):
            return INACTIVE
        kid = header.get("kid")
        key = self._keys.verification_key(kid) if isinstance(kid, str) else None
        if key is None or header.get("typ") != ACCESS_TOKEN_TYPE:
            return INACTIVE
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                issuer=self._settings.issuer,
                options={"verify_aud": False, "require": ["exp", "iat", "sub", "jti", "cnf"]},
            )
        except (jwt.PyJWTError, ValueError, RecursionError, TypeError):
            return INACTIVE
        device = self._store.get_device(claims["sub"])
        bound = claims.get("cnf", {}).get("x5t#S256")
        if (
            device is None
            or device.state is not DeviceState.ACTIVE
            or device.certificate_id is None
            or b64url(bytes.fromhex(device.certificate_id)) != bound
        ):
            return INACTIVE
        if self._store.is_token_revoked(claims["jti"], int(self._clock().timestamp())):
            return INACTIVE
        return {"active": True, "token_type": "Bearer", **claims}

    def revoke(self, token_jti: str, *, actor: str) -> int:
        """Revoke an access token by its jti, for as long as any token can live, and audit it in
        the `stream:token-revocations` chain. Returns when the revocation lapses (epoch s)."""
        now = int(self._clock().timestamp())
        until = now + MAX_TOKEN_LIFETIME_SECONDS + CLOCK_SKEW
        self._store.revoke_token(token_jti, until)
        self._store.append_to_stream(
            "token-revocations", action="token_revoked", actor=actor,
            details={"jti": token_jti, "until": until}, at=timestamp(self._clock()),
        )
        return until
