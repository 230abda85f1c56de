"""JOSE pieces fleetkey builds itself: JWK form, RFC 7638 thumbprints, KMS-style JWS signing."""

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from jwcrypto import jwk as jwcrypto_jwk

from fleetkey.crypto.jose import algorithms_for, b64url, jwk_thumbprint, public_jwk, sign_jwt

# RFC 7638 §3.1: the RSA key of RFC 7517 Appendix A.1 and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPe"
    "bWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368"
    "QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2"
    "NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def _b64int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def test_rfc7638_rsa_example_thumbprint():
    # Given the RSA public key of RFC 7638 §3.1
    key = rsa.RSAPublicNumbers(e=65537, n=_b64int(RFC7638_N)).public_key()

    # When it is put in JWK form and thumbprinted
    jwk = public_jwk(key)

    # Then the JWK is exactly the RFC's members and the thumbprint is the RFC's
    assert jwk == {"kty": "RSA", "n": RFC7638_N, "e": "AQAB"}
    assert jwk_thumbprint(jwk) == RFC7638_THUMBPRINT
    # and optional members (kid, alg, use) do not change it
    assert (
        jwk_thumbprint({**jwk, "kid": "2011-04-29", "alg": "RS256", "use": "sig"})
        == RFC7638_THUMBPRINT
    )


def _p256_key_with_short_x() -> ec.EllipticCurvePrivateKey:
    """A P-256 key whose x coordinate has a leading zero byte (must still encode as 32 bytes)."""
    scalar = 1
    while True:
        key = ec.derive_private_key(scalar, ec.SECP256R1())
        if key.public_key().public_numbers().x < 1 << 248:
            return key
        scalar += 1


@pytest.mark.parametrize("curve,size", [(ec.SECP256R1(), 32), (ec.SECP384R1(), 48)])
def test_ec_jwk_and_thumbprint_match_an_independent_library(curve, size):
    # Given an EC public key
    key = ec.generate_private_key(curve).public_key()

    # When fleetkey builds its JWK and thumbprint
    jwk = public_jwk(key)

    # Then coordinates are fixed-size, and jwcrypto and pyjwt agree with both
    assert set(jwk) == {"kty", "crv", "x", "y"}
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == size
    assert jwk_thumbprint(jwk) == jwcrypto_jwk.JWK.from_pyca(key).thumbprint()
    reference = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    assert {k: reference[k] for k in jwk} == jwk


def test_ec_coordinates_keep_leading_zero_bytes():
    # Given a P-256 key whose x coordinate is shorter than 32 bytes as an integer
    key = _p256_key_with_short_x().public_key()

    # When it is put in JWK form
    jwk = public_jwk(key)

    # Then x is still 32 bytes (RFC 7518 §6.2.1.2) and the thumbprint matches jwcrypto's
    raw_x = base64.urlsafe_b64decode(jwk["x"] + "==")
    assert len(raw_x) == 32 and raw_x[0] == 0
    assert jwk_thumbprint(jwk) == jwcrypto_jwk.JWK.from_pyca(key).thumbprint()


class FakeKmsSigner:
    """What sign_jwt needs from a KmsSigner: public_key() and sign_raw() (r||s), and a count."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._key = private_key
        self.calls = 0

    def public_key(self):
        return self._key.public_key()

    def sign_raw(self, message: bytes) -> bytes:
        self.calls += 1
        digest = hashes.SHA256() if self._key.curve.key_size == 256 else hashes.SHA384()
        size = (self._key.curve.key_size + 7) // 8
        r, s = utils.decode_dss_signature(self._key.sign(message, ec.ECDSA(digest)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


@pytest.mark.parametrize("curve,alg", [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384")])
def test_sign_jwt_with_a_kms_style_signer_verifies_with_pyjwt(curve, alg):
    # Given a signer that only exposes its public key and raw signatures, as KMS does
    signer = FakeKmsSigner(ec.generate_private_key(curve))
    kid = jwk_thumbprint(public_jwk(signer.public_key()))
    claims = {"iss": "https://issuer.example", "sub": "dev-1", "scope": "a b", "n": 1}

    # When a JWT is signed with it
    token = sign_jwt(signer, kid, claims, "at+jwt")

    # Then one signature was made, the header is as specified and pyjwt verifies it
    assert signer.calls == 1
    assert jwt.get_unverified_header(token) == {"alg": alg, "typ": "at+jwt", "kid": kid}
    decoded = jwt.decode(
        token, signer.public_key(), algorithms=[alg], options={"verify_aud": False}
    )
    assert decoded == claims


def test_sign_jwt_signature_is_not_accepted_by_another_key():
    # Given a token signed by one key
    signer = FakeKmsSigner(ec.generate_private_key(ec.SECP256R1()))
    token = sign_jwt(signer, "kid", {"sub": "x"}, "at+jwt")
    # When it is verified with another key, Then it is refused
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            token, ec.generate_private_key(ec.SECP256R1()).public_key(), algorithms=["ES256"]
        )


def test_b64url_has_no_padding():
    assert b64url(b"\xff\xfe") == "__4"
    assert b64url(b"") == ""


@pytest.mark.parametrize(
    "description,expected",
    [
        ("ec:secp256r1", ("ES256",)),
        ("ec:secp384r1", ("ES384",)),
        ("rsa:2048", ("PS256", "RS256")),
        ("rsa:4096", ("PS256", "RS256")),
        ("ec:secp256k1", ()),
        ("ec:secp521r1", ()),
        ("ec", ()),
        ("hmac:256", ()),
        ("none", ()),
        ("", ()),
    ],
)
def test_algorithms_for_a_device_key(description, expected):
    # Given a device key description, When asked which algorithms it may use,
    # Then only its own family's asymmetric algorithms (never none, never HMAC)
    assert algorithms_for(description) == expected


# ---- strict parsing (RFC 7515 §5.2, §4.1.11; RFC 8725 §3) ---------------------------------------

from fleetkey.crypto.jose import (  # noqa: E402 - grouped with the tests that use them
    MalformedJws,
    media_type,
    parse_compact_jws,
    stand_in_keys,
)


def _jws(header: bytes | str, payload: bytes | str = b"{}", signature: str = "AA") -> str:
    part = lambda p: p if isinstance(p, str) else b64url(p)  # noqa: E731
    return f"{part(header)}.{part(payload)}.{signature}"


def test_a_well_formed_jws_is_taken_apart():
    # Given a compact JWS with an object header and payload
    token = _jws(b'{"alg":"ES256","kid":"k","typ":"JWT"}', b'{"sub":"d","exp":1700000000}')
    # When it is parsed, Then header and claims come back as they were written
    parsed = parse_compact_jws(token, max_bytes=8192)
    assert parsed.header == {"alg": "ES256", "kid": "k", "typ": "JWT"}
    assert parsed.claims == {"sub": "d", "exp": 1700000000}


@pytest.mark.parametrize(
    "token",
    [
        _jws(b'{"alg":"ES256","crit":["exp"]}'),
        _jws(b'{"alg":"ES256","crit":[]}'),
        _jws(b'{"alg":"ES256","b64":false,"crit":["b64"]}'),
        _jws(b'{"alg":"ES256","b64":true}'),
        _jws(b'{"alg":"ES256","alg":"none"}'),
        _jws(b'{"alg":"ES256"}', b'{"sub":"a","sub":"b"}'),
        _jws(b'{"alg":["ES256"]}'),
        _jws(b'{"alg":null}'),
        _jws(b"{}"),
        _jws(b'["ES256"]'),
        _jws(b'{"alg":"ES256"}', b'"a string"'),
        _jws(b'{"alg":"ES256"}', b'{"n":' + b"1" * 21 + b"}"),
        _jws(b'{"alg":"ES256"}', b'{"n":1e400}'),
        _jws(b'{"alg":"ES256"}', b'{"n":NaN}'),
        _jws(b'{"alg":"ES256"}', b'{"n":-Infinity}'),
        _jws(b"[" * 5000 + b"]" * 5000),
        _jws('{"alg":"ES256"}'.encode("utf-16")),
        _jws(b'{"alg":"\xff"}'),
        _jws("eyJhbGciOiJFUzI1NiJ9="),  # padded
        _jws(b'{"alg":"ES256"}', "e31"),  # "{}" with non-zero trailing bits: non-canonical
        _jws("e+J/"),  # base64, not base64url
        _jws(b'{"alg":"ES256"}', signature="A"),  # impossible length
        _jws(b'{"alg":"ES256"}') + ".AA",
        "eyJhbGciOiJFUzI1NiJ9.e30",
        "",
        "a" * 9000,
    ],
    ids=[
        "crit",
        "crit-empty",
        "b64-false",
        "b64-true",
        "duplicate-header-member",
        "duplicate-claim",
        "alg-list",
        "alg-null",
        "alg-missing",
        "header-array",
        "payload-string",
        "21-digit-integer",
        "float-overflow",
        "nan",
        "infinity",
        "nested-5000",
        "utf-16",
        "not-utf-8",
        "padded",
        "non-canonical-base64",
        "standard-base64",
        "impossible-length",
        "four-segments",
        "two-segments",
        "empty",
        "too-large",
    ],
)
def test_what_rfc_7515_and_8725_ask_to_refuse_is_malformed(token):
    # Given a token broken in one way, When parsed, Then one typed error (never another exception)
    with pytest.raises(MalformedJws):
        parse_compact_jws(token, max_bytes=8192)


@pytest.mark.parametrize(
    "typ,expected",
    [
        ("at+jwt", "application/at+jwt"),
        ("AT+JWT", "application/at+jwt"),
        ("application/at+jwt", "application/at+jwt"),
        ("JWT", "application/jwt"),
        ("client-authentication+jwt", "application/client-authentication+jwt"),
        (None, None),
        (["at+jwt"], None),
        (1, None),
    ],
)
def test_media_type_reads_typ_as_rfc_7515_says(typ, expected):
    # Given a typ header value, When read as a media type,
    # Then case-insensitive with "application/" implied, and None for what is not a string
    assert media_type(typ) == expected


def test_stand_in_keys_fit_every_assertion_algorithm_and_are_made_once():
    # Given the stand-in keys of this process
    keys = stand_in_keys()
    # Then there is one per device algorithm, of that algorithm's kind, made once per process
    assert set(keys) == {"ES256", "ES384", "PS256", "RS256"}
    assert keys["ES256"].curve.name == "secp256r1" and keys["ES384"].curve.name == "secp384r1"
    assert isinstance(keys["PS256"], rsa.RSAPublicKey) and keys["PS256"].key_size == 2048
    assert stand_in_keys() is keys
    # and a signature by some key never verifies under one (nobody holds their private halves)
    signer = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode({"sub": "x"}, signer, algorithm="ES256")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, keys["ES256"], algorithms=["ES256"])


@pytest.mark.parametrize(
    "header,payload",
    [
        (b'{"alg":"ES256"}', b'{"firmware_version":"\\ud800"}'),
        (b'{"alg":"ES256"}', b'{"v":"1.0\\udfff"}'),
        (b'{"alg":"ES256"}', b'{"\\udc00":"name is a lone low surrogate"}'),
        (b'{"alg":"ES256"}', b'{"aud":["ok","\\ud83d"]}'),
        (b'{"alg":"ES256"}', b'{"a":{"b":[{"c":"\\ude00\\ud83d"}]}}'),  # reversed pair
        (b'{"alg":"ES256","kid":"\\ud800"}', b"{}"),
    ],
    ids=["claim", "trailing", "member-name", "in-array", "nested-reversed-pair", "header"],
)
def test_a_lone_surrogate_spelled_by_an_escape_is_malformed(header, payload):
    # Given valid UTF-8 JSON whose \u escapes spell a string that is not Unicode scalar text
    token = _jws(header, payload)
    # When parsed, Then refused: no UTF-8 encoder could write that string back out
    with pytest.raises(MalformedJws):
        parse_compact_jws(token, max_bytes=8192)


def test_escaped_text_that_is_unicode_is_still_accepted():
    # Given escapes that spell real characters: a surrogate pair, a BMP character, an escaped NUL
    token = _jws(b'{"alg":"ES256"}', b'{"e":"\\ud83d\\ude00","b":"\\u00e9","z":"\\u0000"}')
    # When parsed, Then taken apart as written (refusing control characters is each claim's rule)
    assert parse_compact_jws(token, max_bytes=8192).claims == {"e": "😀", "b": "é", "z": "\x00"}


@pytest.mark.parametrize("zip_value", ['"DEF"', "null", '""'])
def test_a_zip_header_is_malformed(zip_value):
    # Given a JWS header asking for JWE compression (RFC 7516 §4.1.3; RFC 8725 §3.6 advises against)
    token = _jws(b'{"alg":"ES256","zip":' + zip_value.encode() + b"}")
    # When parsed, Then refused: fleetkey inflates nothing
    with pytest.raises(MalformedJws):
        parse_compact_jws(token, max_bytes=8192)
