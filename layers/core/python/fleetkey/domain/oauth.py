"""OAuth 2.0 token endpoint errors (RFC 6749 §5.2). The description never says which check
failed for a device, so an unknown device and a bad signature look the same. A client assertion
refused on its own content, whatever device it names, may say which rule it broke where the
endpoint answers so (`InvalidClient.rule`, `/v1/token`): that tells nothing about any device."""

from __future__ import annotations

import re

from fleetkey.errors import FleetkeyError

# The characters RFC 6749 §5.2 allows in error_description (%x20-21 / %x23-5B / %x5D-7E).
_DESCRIPTION_UNSAFE = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


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

    def __init__(self, reason: str, *, proven: bool = False, rule: str | None = None) -> None:
        # `reason` is for logs and metrics only; the caller reads the same sentence, unless the
        # endpoint explains `rule`.
        super().__init__("client authentication failed")
        self.reason = reason
        # The assertion's signature verified under the device's own key: the device itself sent
        # what was refused (never said to the caller).
        self.proven = proven
        # A refusal on the request alone (an assertion rule, draft-ietf-oauth-rfc7523bis §4, that
        # no device could make acceptable): the setting the client needs, safe to answer.
        self.rule = rule

    def to_body(self, *, explain: bool = False) -> dict[str, str]:
        """The RFC 6749 §5.2 body: the one sentence for every refusal, or with `explain` the
        broken rule of a refusal that has one (in the characters §5.2 allows)."""
        body = super().to_body()
        if explain and self.rule is not None:
            body["error_description"] = _DESCRIPTION_UNSAFE.sub("?", self.rule)
        return body


class InvalidGrant(OAuthError):
    code = "invalid_grant"


class InvalidScope(OAuthError):
    code = "invalid_scope"
