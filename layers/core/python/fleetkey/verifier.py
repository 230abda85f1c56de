"""Verifying fleetkey access tokens in an IoT application (a relying party), offline.

    from fleetkey.verifier import TokenVerifier, InvalidToken

    verifier = TokenVerifier("https://api.example.com/prod")   # the issuer; JWKS fetched and cached
    try:
        claims = verifier.verify(token, audience="urn:fleetkey:telemetry", scope="telemetry:write")
    except InvalidToken:
        ...  # 401
    device_id = claims["sub"]

Only pyjwt is needed. The JWKS is fetched once and cached; a token signed by a key the cache
does not know triggers one refetch (a new signing key is published before it signs).
"""

from __future__ import annotations

import jwt

ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]


class InvalidToken(Exception):
    """The token is not a currently valid fleetkey access token for this audience and scope."""


class TokenVerifier:
    def __init__(self, issuer: str, *, jwks_uri: str | None = None, cache_seconds: int = 300,
                 leeway_seconds: int = 30) -> None:
        self.issuer = issuer.rstrip("/")
        self._leeway = leeway_seconds
        self._jwks = jwt.PyJWKClient(
            jwks_uri or f"{self.issuer}/.well-known/jwks.json",
            cache_jwk_set=True,
            lifespan=cache_seconds,
            timeout=10,
        )

    def verify(self, token: str, audience: str, *, scope: str | None = None) -> dict:
        """Check signature (ES256, a key of the issuer's JWKS), typ (at+jwt), issuer, audience,
        expiry and, if given, that `scope` was granted. Returns the claims.

        Raises:
            InvalidToken: any check failed (the message says which, for logs; not for callers).
        """
        try:
            header = jwt.get_unverified_header(token)
            if str(header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
                raise InvalidToken("not an access token (typ)")
            key = self._jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
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
        if scope is not None and scope not in str(claims.get("scope", "")).split():
            raise InvalidToken(f"scope {scope!r} was not granted")
        return claims
