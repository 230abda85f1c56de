"""Sealing a data key to a device's certificate key: only that key, in that life, opens it."""

import base64
import struct

import pytest
from cryptography.hazmat.primitives import hashes, hmac, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from fleetkey.crypto.sealing import (
    SealedDataKey,
    SealedKeyUnreadable,
    SealingError,
    UnsupportedKeyType,
    context_info,
    open_data_key,
    seal_data_key,
)

DATA_KEY = bytes(range(32))
CONTEXT = {"device_id": "sensor-0001", "epoch": 3, "owner": "acme"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def keys():
    """One key of each supported kind, and a second key of the same kind (another device)."""
    return {
        name: (make(), make())
        for name, make in {
            "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "rsa2048": lambda: rsa.generate_private_key(65537, 2048),
            "rsa3072": lambda: rsa.generate_private_key(65537, 3072),
        }.items()
    }


ALGS = {
    "p256": "HPKE-P256-SHA256-A256GCM",
    "p384": "HPKE-P384-SHA384-A256GCM",
    "rsa2048": "RSA-OAEP-256",
    "rsa3072": "RSA-OAEP-256",
}
KINDS = list(ALGS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sealed_key_opens_with_the_device_key_and_context(keys, kind):
    device_key, _ = keys[kind]

    sealed = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT)
    public = sealed.to_public()

    assert sealed.alg == ALGS[kind]
    assert open_data_key(device_key, public, **CONTEXT) == DATA_KEY
    if kind.startswith("rsa"):
        assert set(public) == {"alg", "ciphertext"}
        assert len(_unb64url(public["ciphertext"])) == device_key.key_size // 8
    else:
        assert set(public) == {"alg", "enc", "ciphertext"}
        # SerializePublicKey (uncompressed point) and AES-256-GCM output: 32 bytes + 16 of tag
        assert len(_unb64url(public["enc"])) == {"p256": 65, "p384": 97}[kind]
        assert len(_unb64url(public["ciphertext"])) == 48
    assert "=" not in "".join(public.values())


@pytest.mark.parametrize("kind", KINDS)
def test_sealing_is_randomized(keys, kind):
    device_key, _ = keys[kind]
    first = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT)
    second = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT)
    assert first.ciphertext != second.ciphertext


@pytest.mark.parametrize("kind", KINDS)
def test_another_devices_key_does_not_open_it(keys, kind):
    device_key, other_key = keys[kind]
    sealed = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    with pytest.raises(SealedKeyUnreadable):
        open_data_key(other_key, sealed, **CONTEXT)


def test_a_key_of_another_kind_does_not_open_it(keys):
    sealed = seal_data_key(keys["p256"][0].public_key(), DATA_KEY, **CONTEXT).to_public()
    for kind in ("p384", "rsa2048"):
        with pytest.raises(SealedKeyUnreadable):
            open_data_key(keys[kind][0], sealed, **CONTEXT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "change",
    [
        {"device_id": "sensor-0002"},
        {"device_id": "Sensor-0001"},
        {"epoch": 4},
        {"epoch": 2},
        {"owner": "acme2"},
        {"owner": None},
        {"owner": ""},
    ],
)
def test_another_device_life_does_not_open_it(keys, kind, change):
    device_key, _ = keys[kind]
    sealed = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    with pytest.raises(SealedKeyUnreadable):
        open_data_key(device_key, sealed, **{**CONTEXT, **change})


def test_no_owner_and_an_empty_owner_are_different_lives(keys):
    device_key, _ = keys["p256"]
    sealed = seal_data_key(device_key.public_key(), DATA_KEY, device_id="d", epoch=1, owner=None)
    assert open_data_key(device_key, sealed.to_public(), device_id="d", epoch=1, owner=None)
    for owner in ("", "-"):
        with pytest.raises(SealedKeyUnreadable):
            open_data_key(device_key, sealed.to_public(), device_id="d", epoch=1, owner=owner)


@pytest.mark.parametrize(
    "kind,member",
    [(k, "ciphertext") for k in KINDS] + [(k, "enc") for k in KINDS if not k.startswith("rsa")],
)
def test_any_flipped_byte_is_refused(keys, kind, member):
    device_key, _ = keys[kind]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    raw = _unb64url(public[member])

    for index in range(len(raw)):
        for mask in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[index] ^= mask
            with pytest.raises(SealedKeyUnreadable):
                open_data_key(device_key, {**public, member: _b64url(bytes(flipped))}, **CONTEXT)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: {k: v for k, v in p.items() if k != "alg"},
        lambda p: {k: v for k, v in p.items() if k != "enc"},
        lambda p: {k: v for k, v in p.items() if k != "ciphertext"},
        lambda p: {**p, "alg": "HPKE-P384-SHA384-A256GCM"},
        lambda p: {**p, "alg": "RSA-OAEP-256"},
        lambda p: {**p, "alg": None},
        lambda p: {**p, "enc": p["enc"] + "="},
        lambda p: {**p, "ciphertext": p["ciphertext"] + "A"},
        lambda p: {**p, "ciphertext": p["ciphertext"][:-1]},
        lambda p: {**p, "ciphertext": 42},
        lambda p: {**p, "enc": _b64url(_unb64url(p["enc"])[:-1])},
        lambda p: {**p, "enc": _b64url(_unb64url(p["enc"]) + b"\x00")},
        lambda p: {**p, "ciphertext": p["ciphertext"].replace("-", "+").replace("_", "/") + "+"},
        lambda p: [p],
        lambda p: None,
    ],
)
def test_malformed_sealed_keys_are_refused_with_one_error(keys, mangle):
    device_key, _ = keys["p256"]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    with pytest.raises(SealedKeyUnreadable) as refused:
        open_data_key(device_key, mangle(public), **CONTEXT)
    assert str(refused.value) == str(SealedKeyUnreadable())
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_non_canonical_base64url_is_refused(keys):
    device_key, _ = keys["p256"]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    # 48 bytes encode to 64 characters exactly; padding or a stray character spells them otherwise
    assert open_data_key(device_key, public, **CONTEXT) == DATA_KEY
    for spelling in (public["ciphertext"] + "==", " " + public["ciphertext"]):
        with pytest.raises(SealedKeyUnreadable):
            open_data_key(device_key, {**public, "ciphertext": spelling}, **CONTEXT)
    # 65 bytes in 87 characters: the last one carries 2 unused bits, which must be zero
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    enc = public["enc"]
    last = alphabet.index(enc[-1])
    assert len(enc) == 87 and last % 4 == 0
    assert _unb64url(enc[:-1] + alphabet[last + 1]) == _unb64url(enc)  # the same bytes
    with pytest.raises(SealedKeyUnreadable):
        open_data_key(device_key, {**public, "enc": enc[:-1] + alphabet[last + 1]}, **CONTEXT)


def test_an_rsa_sealed_key_with_an_enc_member_is_refused(keys):
    device_key, _ = keys["rsa2048"]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    with pytest.raises(SealedKeyUnreadable):
        open_data_key(device_key, {**public, "enc": ""}, **CONTEXT)


def test_a_sealed_value_that_is_not_32_bytes_is_refused(keys):
    # Right suite, key and info, but 31 bytes inside: not a data key.
    device_key, _ = keys["p256"]
    suite = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    sealed = suite.encrypt(
        DATA_KEY[:31], device_key.public_key(), info=context_info("sensor-0001", 3, "acme")
    )
    public = {
        "alg": "HPKE-P256-SHA256-A256GCM",
        "enc": _b64url(sealed[:65]),
        "ciphertext": _b64url(sealed[65:]),
    }
    with pytest.raises(SealedKeyUnreadable):
        open_data_key(device_key, public, **CONTEXT)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ed25519.Ed25519PrivateKey.generate(),
        lambda: x25519.X25519PrivateKey.generate(),
        lambda: rsa.generate_private_key(65537, 1024),  # noqa: S505 - refused
        lambda: dsa.generate_private_key(2048),
    ],
    ids=["p521", "secp256k1", "ed25519", "x25519", "rsa1024", "dsa"],
)
def test_unsupported_key_types_are_refused(make):
    key = make()
    with pytest.raises(UnsupportedKeyType):
        seal_data_key(key.public_key(), DATA_KEY, **CONTEXT)
    with pytest.raises(UnsupportedKeyType):
        open_data_key(key, {"alg": "RSA-OAEP-256", "ciphertext": ""}, **CONTEXT)
    assert issubclass(UnsupportedKeyType, SealingError) and issubclass(SealingError, ValueError)


@pytest.mark.parametrize(
    "bits,supported", [(2047, False), (2048, True), (4096, True), (4097, False)]
)
def test_rsa_keys_of_2048_to_4096_bits_only(bits, supported):
    # A public key needs no primes: an odd modulus of the size is enough, and generating an
    # 8192-bit key would take seconds.
    public_key = rsa.RSAPublicNumbers(65537, (1 << (bits - 1)) | 1).public_key()
    if supported:
        assert seal_data_key(public_key, DATA_KEY, **CONTEXT).alg == "RSA-OAEP-256"
    else:
        with pytest.raises(UnsupportedKeyType):
            seal_data_key(public_key, DATA_KEY, **CONTEXT)


@pytest.mark.parametrize("data_key", [b"", DATA_KEY[:31], DATA_KEY + b"\x00", bytearray(DATA_KEY)])
def test_only_32_byte_data_keys_are_sealed(keys, data_key):
    with pytest.raises(ValueError):
        seal_data_key(keys["p256"][0].public_key(), data_key, **CONTEXT)


@pytest.mark.parametrize(
    "context",
    [
        {"device_id": "", "epoch": 1, "owner": None},
        {"device_id": "d" * 257, "epoch": 1, "owner": None},
        {"device_id": "d", "epoch": -1, "owner": None},
        {"device_id": "d", "epoch": 2**64, "owner": None},
        {"device_id": "d", "epoch": True, "owner": None},
        {"device_id": "d", "epoch": "1", "owner": None},
        {"device_id": "d", "epoch": 1, "owner": "o" * 257},
        {"device_id": b"d", "epoch": 1, "owner": None},
    ],
)
def test_contexts_out_of_bounds_are_refused(keys, context):
    with pytest.raises(ValueError):
        seal_data_key(keys["p256"][0].public_key(), DATA_KEY, **context)


def test_the_context_encoding_is_the_documented_one():
    # What a relying implementation in another language rebuilds.
    prefix = b"fleetkey data key v1\x00"
    assert context_info("dev-1", 2, "acme") == (
        prefix + b"\x00\x05dev-1" + b"\x00\x00\x00\x00\x00\x00\x00\x02" + b"\x01\x00\x04acme"
    )
    assert (
        context_info("dev-1", 2, None) == prefix + b"\x00\x05dev-1" + struct.pack(">Q", 2) + b"\x00"
    )
    assert (
        context_info("dev-1", 2, "")
        == prefix + b"\x00\x05dev-1" + struct.pack(">Q", 2) + b"\x01\x00\x00"
    )
    assert (
        context_info("é", 0, "ü")
        == prefix + b"\x00\x02\xc3\xa9" + bytes(8) + b"\x01\x00\x02\xc3\xbc"
    )
    longest = context_info("d" * 256, 2**64 - 1, "o" * 256)
    assert len(longest) <= 1024  # OpenSSL's HPKE refuses a longer info


def test_the_context_encoding_is_unambiguous():
    triples = [
        ("ab", 1, "c"),
        ("a", 1, "bc"),
        ("a", 1, None),
        ("a", 1, ""),
        ("a", 1, "-"),
        ("a\x00", 1, None),
        ("a", 256, None),
        ("a", 1, "\x00"),
        ("a\x00\x00\x00\x00\x00\x00\x00\x00\x01", 1, None),
    ]
    assert len({context_info(*t) for t in triples}) == len(triples)


# -- interoperability: the sealed form is plain RFC 9180, readable without fleetkey -------------


def _labeled_extract(h, suite_id, salt, label, ikm):
    mac = hmac.HMAC(salt or bytes(h.digest_size), h)
    mac.update(b"HPKE-v1" + suite_id + label + ikm)
    return mac.finalize()


def _labeled_expand(h, suite_id, prk, label, info, length):
    labeled = struct.pack(">H", length) + b"HPKE-v1" + suite_id + label + info
    return HKDFExpand(h, length, labeled).derive(prk)


def _rfc9180_open(private_key, enc, ciphertext, info, kem_id, kdf_id, h):
    """RFC 9180 §4.1 DHKEM Decap, §5.1 KeySchedule (mode_base), §5.2 Open at sequence 0, written
    from the RFC with primitives only: a second implementation to read fleetkey's output."""
    kem_suite = b"KEM" + struct.pack(">H", kem_id)
    dh = private_key.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, enc)
    )
    pk_rm = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    eae_prk = _labeled_extract(h, kem_suite, b"", b"eae_prk", dh)
    shared_secret = _labeled_expand(
        h, kem_suite, eae_prk, b"shared_secret", enc + pk_rm, h.digest_size
    )

    suite_id = b"HPKE" + struct.pack(">HHH", kem_id, kdf_id, 0x0002)  # AES-256-GCM
    psk_id_hash = _labeled_extract(h, suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(h, suite_id, b"", b"info_hash", info)
    context = b"\x00" + psk_id_hash + info_hash
    secret = _labeled_extract(h, suite_id, shared_secret, b"secret", b"")
    key = _labeled_expand(h, suite_id, secret, b"key", context, 32)
    base_nonce = _labeled_expand(h, suite_id, secret, b"base_nonce", context, 12)
    return AESGCM(key).decrypt(base_nonce, ciphertext, b"")


@pytest.mark.parametrize(
    "kind,kem_id,kdf_id,h",
    [("p256", 0x0010, 0x0001, hashes.SHA256()), ("p384", 0x0011, 0x0002, hashes.SHA384())],
)
def test_an_independent_rfc9180_implementation_opens_it(keys, kind, kem_id, kdf_id, h):
    device_key, _ = keys[kind]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    info = context_info(CONTEXT["device_id"], CONTEXT["epoch"], CONTEXT["owner"])

    opened = _rfc9180_open(
        device_key,
        _unb64url(public["enc"]),
        _unb64url(public["ciphertext"]),
        info,
        kem_id,
        kdf_id,
        h,
    )
    assert opened == DATA_KEY


def test_rsa_oaep_uses_sha256_and_the_context_as_label(keys):
    from cryptography.hazmat.primitives.asymmetric import padding

    device_key, _ = keys["rsa2048"]
    public = seal_data_key(device_key.public_key(), DATA_KEY, **CONTEXT).to_public()
    label = context_info(CONTEXT["device_id"], CONTEXT["epoch"], CONTEXT["owner"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)
    assert device_key.decrypt(_unb64url(public["ciphertext"]), oaep) == DATA_KEY


def test_the_sealed_key_is_a_frozen_value():
    sealed = SealedDataKey("RSA-OAEP-256", "AAAA")
    with pytest.raises(AttributeError):
        sealed.alg = "x"  # type: ignore[misc]
    assert sealed.to_public() == {"alg": "RSA-OAEP-256", "ciphertext": "AAAA"}
