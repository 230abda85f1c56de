"""Token introspection (RFC 7662) for relying parties that check online: a token is active when
its signature, issuer and lifetime hold, its device is still ACTIVE and holds the certificate the
token is bound to, the token was issued after the device's last suspension or decommission (its
`tokens_not_before`: a resumed device's earlier tokens stay inactive), and its jti was not
revoked. The token is parsed strictly first (a `crit` header,
duplicate member names or odd encodings make it inactive) and its `typ` must be `at+jwt`."""

from __future__ import annotations

from typing import Any

import jwt

from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.jose import MalformedJws, b64url, media_type, parse_compact_jws
from fleetkey.domain.firmware import FIRMWARE_VERSION
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import CertificateRole
from fleetkey.ports import AuditLog, DeviceRepository, TokenRecords
from fleetkey.services.signing_keys import MAX_TOKEN_LIFETIME_SECONDS, SigningKeys
from fleetkey.services.tokens import ACCESS_TOKEN_TYPE, CLOCK_SKEW
from fleetkey.settings import Settings

INACTIVE: dict[str, Any] = {"active": False}
MAX_TOKEN_BYTES = 8 * 1024


class IntrospectionService:
    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        records: TokenRecords,
        audit: AuditLog,
        signing_keys: SigningKeys,
        clock: Clock = utc_now,
    ) -> None:
        self._settings = settings
        self._devices = devices
        self._records = records
        self._audit = audit
        self._keys = signing_keys
        self._clock = clock

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 response: {"active": false} for anything not currently valid, never an error.

        AWS calls: none for a token refused on its form or type; a signing-key registry read when
        the cached one is over a minute old; for a token whose signature holds, one device read
        and one revocation read.
        """
        try:
            header = parse_compact_jws(token, max_bytes=MAX_TOKEN_BYTES).header
        except MalformedJws:
            return dict(INACTIVE)
        if media_type(header.get("typ")) != f"application/{ACCESS_TOKEN_TYPE}":
            return dict(INACTIVE)
        kid = header.get("kid")
        key = self._keys.verification_key(kid) if isinstance(kid, str) else None
        if key is None:
            return dict(INACTIVE)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                issuer=self._settings.issuer,
                options={"verify_aud": False, "require": ["exp", "iat", "sub", "jti", "cnf"]},
            )
        except (jwt.PyJWTError, ValueError, RecursionError, TypeError, OverflowError):
            return dict(INACTIVE)
        cnf = claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
            return dict(INACTIVE)
        # Echoed to the caller: a firmware_version fleetkey would not issue today (a token signed
        # before the rule, up to an hour old) is not passed on.
        version = claims.get("firmware_version")
        if version is not None and (
            not isinstance(version, str) or not FIRMWARE_VERSION.fullmatch(version)
        ):
            return dict(INACTIVE)
        device = self._devices.credential(claims["sub"])
        if (
            device is None
            or device.state is not DeviceState.ACTIVE
            # A token is good while its certificate is the device's current one: a rotation's
            # commit retires the certificate it was bound to.
            or not any(
                b64url(bytes.fromhex(c.certificate_id)) == bound
                for c in device.certificates
                if c.role is CertificateRole.CURRENT
            )
        ):
            return dict(INACTIVE)
        # Issued before the device was last suspended or decommissioned (iat is whole seconds;
        # `tokens_not_before` is the second after the change).
        if device.tokens_not_before is not None and claims["iat"] < device.tokens_not_before:
            return dict(INACTIVE)
        if self._records.is_revoked(claims["jti"], int(self._clock().timestamp())):
            return dict(INACTIVE)
        return {"active": True, "token_type": "Bearer", **claims}

    def revoke(self, token_jti: str, *, actor: str) -> int:
        """Revoke an access token by its jti, for as long as any token can live, and audit it in
        the `stream:token-revocations` chain. Returns when the revocation lapses (epoch s)."""
        now = int(self._clock().timestamp())
        until = now + MAX_TOKEN_LIFETIME_SECONDS + CLOCK_SKEW
        self._records.revoke(token_jti, until)
        self._audit.append_to_stream(
            "token-revocations",
            action="token_revoked",
            actor=actor,
            details={"jti": token_jti, "until": until},
            at=timestamp(self._clock()),
        )
        return until
