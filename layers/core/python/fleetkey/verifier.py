"""Verifying fleetkey access tokens in an IoT application (a relying party), offline.

    from fleetkey.verifier import TokenVerifier, InvalidToken

    verifier = TokenVerifier("https://api.example.com/prod")   # the issuer; JWKS fetched and cached
    try:
        claims = verifier.verify(token, audience="urn:fleetkey:telemetry", scope="telemetry:write")
    except InvalidToken:
        ...  # 401
    device_id = claims["sub"]

Only pyjwt (2.10.1 or later) and this package's JOSE parser are needed. The JWKS is fetched once
and cached; a token whose key the cache does not know triggers a refetch at most once a minute (a
new signing key is published minutes before it signs), so tokens with made-up key ids cannot make
the verifier hammer the issuer.

Before any key is looked up the token is parsed strictly (`parse_compact_jws`): a `crit` header
(RFC 7515 §4.1.11: this verifier understands no extension), a `zip` header, duplicate member
names, non-UTF-8 or non-canonical encodings, strings that are not Unicode text (a lone surrogate
spelled by a `\\u` escape) are refused, and its `typ` must be `at+jwt` (RFC 9068 §2.1, RFC 8725
§3.11: a client assertion or an ID token signed by some other key is never taken for an access
token).
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from typing import Any

import jwt

from fleetkey.crypto.jose import MalformedJws, media_type, parse_compact_jws

ACCESS_TOKEN_TYPE = "application/at+jwt"  # RFC 9068 §2.1, compared as a media type
MAX_TOKEN_BYTES = 8 * 1024
_KID = re.compile(r"[A-Za-z0-9_-]{43}")  # an RFC 7638 SHA-256 thumbprint, base64url
REFRESH_INTERVAL_SECONDS = 60
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]


class InvalidToken(Exception):
    """The token is not a currently valid fleetkey access token for this audience and scope."""


class TokenVerifier:
    def __init__(
        self,
        issuer: str,
        *,
        jwks_uri: str | None = None,
        cache_seconds: int = 300,
        leeway_seconds: int = 30,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self._leeway = leeway_seconds
        self._jwks = jwt.PyJWKClient(
            jwks_uri or f"{self.issuer}/.well-known/jwks.json",
            cache_jwk_set=True,
            lifespan=cache_seconds,
            timeout=10,
        )
        self._lock = threading.Lock()
        self._refreshed_at = float("-inf")

    def _key(self, kid: str) -> jwt.PyJWK:
        """The verification key for `kid`: from the cached JWKS, refetched for an unknown kid at
        most once per REFRESH_INTERVAL_SECONDS."""
        for key in self._jwks.get_jwk_set().keys:
            if key.key_id == kid:
                return key
        with self._lock:
            if time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_SECONDS:
                raise InvalidToken("unknown signing key")
            self._refreshed_at = time.monotonic()
        for key in self._jwks.get_jwk_set(refresh=True).keys:
            if key.key_id == kid:
                return key
        raise InvalidToken("unknown signing key")

    def verify(
        self,
        token: str,
        audience: str,
        *,
        scope: str | None = None,
        client_certificate_der: bytes | None = None,
    ) -> dict[str, Any]:
        """Check the form (strict JOSE parsing, no `crit`), typ (at+jwt), signature (ES256, a key
        of the issuer's JWKS), issuer, audience, expiry and, if given, that `scope` was granted and
        that the token is bound to the client certificate the caller presented over mutual TLS
        (RFC 8705 `cnf.x5t#S256`). Returns the claims. No network call but the JWKS fetch
        (cached; at most one refetch a minute).

        Raises:
            InvalidToken: any check failed (the message says which, for logs; not for callers).
        """
        try:
            header = parse_compact_jws(token, max_bytes=MAX_TOKEN_BYTES).header
        except MalformedJws as exc:
            raise InvalidToken(f"malformed token: {exc}") from None
        if media_type(header.get("typ")) != ACCESS_TOKEN_TYPE:
            raise InvalidToken("not an access token (typ)")
        try:
            kid = header.get("kid")
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise InvalidToken("missing or malformed kid")
            key = self._key(kid)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["ES256"],
                audience=audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except (jwt.PyJWTError, jwt.PyJWKClientError) as exc:
            raise InvalidToken(str(exc)) from None
        except (ValueError, TypeError, OverflowError, RecursionError):  # hostile content
            raise InvalidToken("malformed token") from None
        if scope is not None and scope not in str(claims.get("scope", "")).split():
            raise InvalidToken(f"scope {scope!r} was not granted")
        if client_certificate_der is not None:
            thumbprint = base64.urlsafe_b64encode(hashlib.sha256(client_certificate_der).digest())
            cnf = claims.get("cnf")
            bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
            if not isinstance(bound, str) or bound != thumbprint.rstrip(b"=").decode():
                raise InvalidToken("token is not bound to the presented certificate")
        return claims
