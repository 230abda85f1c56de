"""OAuth 2.0 token endpoint errors (RFC 6749 §5.2). The description never says which check
failed for a client, so an unknown device and a bad signature look the same."""

from __future__ import annotations

from fleetkey.errors import FleetkeyError


class OAuthError(FleetkeyError):
    code = "invalid_request"
    status = 400

    def to_body(self) -> dict[str, str]:
        return {"error": self.code, "error_description": self.message}


class OAuthInvalidRequest(OAuthError):
    code = "invalid_request"


class UnsupportedGrantType(OAuthError):
    code = "unsupported_grant_type"


class InvalidClient(OAuthError):
    code = "invalid_client"
    status = 401

    def __init__(self, reason: str, *, proven: bool = False) -> None:
        # `reason` is for logs and metrics only; the caller always reads the same sentence.
        super().__init__("client authentication failed")
        self.reason = reason
        # The assertion's signature verified under the device's own key: the device itself sent
        # what was refused (never said to the caller).
        self.proven = proven


class InvalidGrant(OAuthError):
    code = "invalid_grant"


class InvalidScope(OAuthError):
    code = "invalid_scope"
