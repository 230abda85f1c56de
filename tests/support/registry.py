"""Writing the signing-key registry as someone with table access only would: no KMS check."""

from __future__ import annotations

from typing import Any

from fleetkey.crypto.jose import jwk_thumbprint, public_jwk
from fleetkey_local.stack import EmbeddedStack


def write_registry_entry(
    stack: EmbeddedStack, key_id: str, public_key: Any, *, actor: str = "intruder"
) -> str:
    """Append an entry for `key_id` (with `public_key`, active now) to the registry, audited as
    a rotation would be. Returns the entry's kid."""
    head, items = stack.store.signing_keys.get()
    jwk = public_jwk(public_key)
    kid = jwk_thumbprint(jwk)
    entry = {
        "key_id": key_id,
        "kid": kid,
        "jwk": {**jwk, "kid": kid, "use": "sig", "alg": "ES256"},
        "active_from": 0,
        "retire_after": None,
    }
    record = head.next_record(
        subject="stream:signing-keys",
        at="2026-01-01T00:00:00Z",
        action="signing_key_rotated",
        actor=actor,
        details={},
    )
    stack.store.signing_keys.put(head, [*items, entry], record)
    return kid
