"""JOSE pieces fleetkey builds itself because the signing key lives in KMS: JWK form and RFC 7638
thumbprint of a public key, compact JWS signing through KMS, and the strict parsing every JWS
meets before pyjwt verifies its signature.

Why a parser of our own in front of pyjwt: pyjwt accepts what RFC 7515 and RFC 8725 ask a careful
recipient to refuse (a `crit` header it does not understand, duplicate member names, UTF-16 JSON,
non-canonical base64url, NaN and 4,000-digit numbers) and some of its failures are plain
`TypeError`s. `parse_compact_jws` refuses all of it with one typed error, `MalformedJws`, so each
caller turns it into its own refusal (invalid_client, inactive, InvalidToken), never a 5xx.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec, rsa

if TYPE_CHECKING:  # only the type: the relying-party paths need no KMS adapter at import
    from fleetkey.adapters.kms import KmsSigner

_CURVES = {"secp256r1": ("P-256", 32, "ES256"), "secp384r1": ("P-384", 48, "ES384")}

# Which assertion algorithms a device key may use: never `none`, never HMAC, and only the
# algorithms of the key's own type.
DEVICE_ALGORITHMS = {
    "ec:secp256r1": ("ES256",),
    "ec:secp384r1": ("ES384",),
    "rsa": ("PS256", "RS256"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int, size: int | None = None) -> bytes:
    size = size or (value.bit_length() + 7) // 8
    return value.to_bytes(size, "big")


def public_jwk(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> dict[str, Any]:
    """The public key as a JWK (RFC 7517/7518), without kid/use/alg."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv, size, _ = _CURVES[key.curve.name]
        point = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(_int_bytes(point.x, size)),
            "y": b64url(_int_bytes(point.y, size)),
        }
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": b64url(_int_bytes(numbers.n)), "e": b64url(_int_bytes(numbers.e))}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, lexicographically ordered, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def algorithms_for(key_description: str) -> tuple[str, ...]:
    """The JWS algorithms a device key ("ec:<curve>" or "rsa:<bits>") may sign with."""
    kind = key_description if key_description.startswith("ec:") else key_description.split(":")[0]
    return DEVICE_ALGORITHMS.get(kind, ())


def sign_jwt(signer: KmsSigner, kid: str, claims: Mapping[str, Any], typ: str) -> str:
    """A compact JWS (ES256/ES384 from the KMS key's curve) over `claims`: one KMS Sign call."""
    _, _, alg = _CURVES[signer.public_key().curve.name]
    header = {"alg": alg, "typ": typ, "kid": kid}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    return signing_input + "." + b64url(signer.sign_raw(signing_input.encode()))


# ---- strict parsing of a compact JWS (RFC 7515 §7.1, RFC 8725 §3) --------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_MAX_INTEGER_DIGITS = 20  # NumericDate and every integer fleetkey reads fit in 64 bits
# Header parameters that change how a JWS must be processed (RFC 7515 §4.1.11 `crit`, RFC 7797
# `b64`) or that belong to JWE (RFC 7516 §4.1.3 `zip`: compression, which RFC 8725 §3.6 advises
# against, and which a JWS parser could be led to inflate): fleetkey implements none of them, so
# a JWS that carries one is refused.
_EXTENSION_HEADERS = ("crit", "b64", "zip")


class MalformedJws(ValueError):
    """The text is not a compact JWS fleetkey accepts (the message says why, for logs only)."""


@dataclass(frozen=True, slots=True)
class UnverifiedJws:
    """A compact JWS taken apart, its signature not yet verified: nothing in it is trusted."""

    header: dict[str, Any]
    claims: dict[str, Any]


def _b64url_decode(segment: str) -> bytes:
    """base64url without padding, canonical only (one encoding per value, RFC 7515 §2).

    Raises:
        MalformedJws: characters outside the alphabet, an impossible length, or stray bits.
    """
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise MalformedJws("not base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url(data) != segment:  # non-zero trailing bits: another spelling of the same bytes
        raise MalformedJws("non-canonical base64url")
    return data


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):  # RFC 7515 §4, RFC 7519 §4: refuse, do not pick one
        raise MalformedJws("duplicate member name")
    return members


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:
        raise MalformedJws("integer out of range")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # e.g. 1e400
        raise MalformedJws("number out of range")
    return value


def _no_constant(name: str) -> NoReturn:
    raise MalformedJws(f"{name} is not JSON")


def _json_object(segment: str, what: str) -> dict[str, Any]:
    """A base64url segment holding one UTF-8 JSON object (RFC 7515 §5.2 steps 2-4).

    Raises:
        MalformedJws: bad base64url, not UTF-8, not JSON, not an object, duplicate names,
            NaN/Infinity, out-of-range numbers, nesting too deep for the parser, or a string
            that is not Unicode scalar text (a lone surrogate).
    """
    try:
        text = _b64url_decode(segment).decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_unique_members,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except MalformedJws as exc:
        raise MalformedJws(f"{what}: {exc}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError; deep nesting
        raise MalformedJws(f"{what}: not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise MalformedJws(f"{what}: not a JSON object")
    _require_scalar_text(value, what)
    return value


def _require_scalar_text(value: dict[str, Any], what: str) -> None:
    """Every string in `value`, member names included, is Unicode scalar text (RFC 8259 §8.2).

    The bytes were valid UTF-8, but a `\\u` escape can still spell a lone surrogate ("\\ud800"),
    which json accepts and which no UTF-8 encoder can write back: it would reach a token, a log
    line or a relying party as a string that breaks whoever encodes it next. A walk with its own
    stack, not recursion: json already bounded the depth, this must not add a RecursionError.

    Raises:
        MalformedJws: a string does not round-trip through UTF-8.
    """
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedJws(f"{what}: a string is not Unicode text") from None
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def parse_compact_jws(token: str, *, max_bytes: int) -> UnverifiedJws:
    """Take a compact JWS apart, strictly, before any key is looked up or signature verified.

    Refused: more than `max_bytes`, not three base64url segments, a header or payload that is not
    a canonical UTF-8 JSON object with unique member names and only Unicode scalar text in its
    strings (no lone surrogate spelled by a `\\u` escape), an `alg` that is not a string, and any
    header that asks for an extension (`crit`, RFC 7515 §4.1.11: fleetkey understands none; `b64`,
    RFC 7797) or for JWE compression (`zip`). CPU only, no AWS call.

    Raises:
        MalformedJws: the token is refused (the message is for logs, never for the caller).
    """
    if not token or len(token) > max_bytes:
        raise MalformedJws("empty or too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedJws("not a compact JWS")
    header = _json_object(parts[0], "header")
    claims = _json_object(parts[1], "payload")
    _b64url_decode(parts[2])
    if not isinstance(header.get("alg"), str):
        raise MalformedJws("alg is not a string")
    for name in _EXTENSION_HEADERS:
        if name in header:
            raise MalformedJws(f"{name} header (an extension fleetkey does not implement)")
    return UnverifiedJws(header=header, claims=claims)


def media_type(typ: object) -> str | None:
    """A `typ` header as the media type it names (RFC 7515 §4.1.9: case-insensitive, with
    "application/" implied when there is no '/'); None when it is not a string."""
    if not isinstance(typ, str):
        return None
    typ = typ.lower()
    return typ if "/" in typ else f"application/{typ}"


# ---- stand-in verification keys ----------------------------------------------------------------


@lru_cache(maxsize=1)
def stand_in_keys() -> dict[str, ec.EllipticCurvePublicKey | rsa.RSAPublicKey]:
    """One public key per device algorithm, made once per process (well under a millisecond):
    a fresh EC key whose private half is dropped at once, and an RSA-2048 modulus drawn at random
    (nobody knows its factors). Verifying an assertion against one of these when there is no
    device key to use costs what verifying against a device key costs; whatever the outcome, the
    caller refuses.
    """
    rsa_key = rsa.RSAPublicNumbers(65537, secrets.randbits(2048) | (1 << 2047) | 1).public_key()
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "ES384": ec.generate_private_key(ec.SECP384R1()).public_key(),
        "PS256": rsa_key,
        "RS256": rsa_key,
    }
