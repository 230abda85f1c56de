"""KMS-wrapped data keys against moto: a blob decrypts only under its own key and context; the
device and a backend end up with the same key, and only they do."""

import base64

import boto3
import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fleetkey.adapters.data_keys import DataKeyUnreadable, KmsDataKeys, encryption_context
from fleetkey.crypto.sealing import SealedKeyUnreadable, seal_data_key
from fleetkey_local import moto_kms_patches
from fleetkey_local.data_keys import (
    EnvelopeUnreadable,
    backend_data_key,
    backend_decrypt_telemetry,
    decrypt_telemetry,
    device_open,
    encrypt_telemetry,
)
from fleetkey_local.instrument import AwsCallCounter

CONTEXT = encryption_context("sensor-0001", "acme", 3)


@pytest.fixture
def kms(moto):
    moto_kms_patches.apply()
    return boto3.client("kms", region_name="eu-west-1")


@pytest.fixture
def key_id(kms):
    return kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"][
        "KeyId"
    ]


def test_the_encryption_context_has_exactly_the_contracts_keys():
    assert encryption_context("sensor-0001", "acme", 3) == {
        "fleetkey:device_id": "sensor-0001",
        "fleetkey:owner": "acme",
        "fleetkey:epoch": "3",
    }
    assert encryption_context("sensor-0001", None, 1)["fleetkey:owner"] == "-"
    for epoch in (-1, True, "1"):
        with pytest.raises(ValueError):
            encryption_context("sensor-0001", None, epoch)
    with pytest.raises(ValueError):
        encryption_context("", None, 1)


def test_a_generated_key_decrypts_under_the_same_context_in_one_call_each(kms, key_id):
    counter = AwsCallCounter().watch(kms)
    data_keys = KmsDataKeys(client=kms)

    plaintext, blob = data_keys.generate(key_id, CONTEXT)
    assert len(plaintext) == 32 and plaintext not in blob

    assert data_keys.decrypt(key_id, blob, dict(CONTEXT)) == plaintext
    assert counter.calls == ["kms.GenerateDataKey", "kms.Decrypt"]


def test_the_key_may_be_named_by_arn_or_alias(kms, key_id):
    arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName="alias/fleetkey-data-keys", TargetKeyId=key_id)
    data_keys = KmsDataKeys(client=kms)
    plaintext, blob = data_keys.generate(arn, CONTEXT)
    assert data_keys.decrypt("alias/fleetkey-data-keys", blob, CONTEXT) == plaintext
    assert data_keys.decrypt(key_id, blob, CONTEXT) == plaintext


@pytest.mark.parametrize(
    "context",
    [
        encryption_context("sensor-0002", "acme", 3),
        encryption_context("sensor-0001", "acme", 4),
        encryption_context("sensor-0001", "acme", 2),
        encryption_context("sensor-0001", None, 3),
        encryption_context("sensor-0001", "acme-2", 3),
        {},
        {k: v for k, v in CONTEXT.items() if k != "fleetkey:owner"},
        {**CONTEXT, "extra": "x"},
    ],
)
def test_another_context_does_not_decrypt(kms, key_id, context):
    data_keys = KmsDataKeys(client=kms)
    _, blob = data_keys.generate(key_id, CONTEXT)
    with pytest.raises(DataKeyUnreadable) as refused:
        data_keys.decrypt(key_id, blob, context)
    assert refused.value.code == "data_key_unreadable"


def test_a_blob_of_another_key_does_not_decrypt(kms, key_id):
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    data_keys = KmsDataKeys(client=kms)
    _, blob = data_keys.generate(other, CONTEXT)
    with pytest.raises(DataKeyUnreadable) as refused:
        data_keys.decrypt(key_id, blob, CONTEXT)
    assert refused.value.details["kms_error"] == "IncorrectKeyException"


@pytest.mark.parametrize("blob", [b"x" * 10, b"\x00" * 200])
def test_garbage_does_not_decrypt(kms, key_id, blob):
    with pytest.raises(DataKeyUnreadable):
        KmsDataKeys(client=kms).decrypt(key_id, blob, CONTEXT)


def test_a_tampered_blob_does_not_decrypt(kms, key_id):
    data_keys = KmsDataKeys(client=kms)
    _, blob = data_keys.generate(key_id, CONTEXT)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(DataKeyUnreadable):
        data_keys.decrypt(key_id, tampered, CONTEXT)


def test_a_disabled_or_deleted_key_is_an_aws_failure_not_an_unreadable_blob(kms, key_id):
    # As AWS answers (moto, unpatched, goes on encrypting and decrypting with such keys).
    data_keys = KmsDataKeys(client=kms)
    _, blob = data_keys.generate(key_id, CONTEXT)

    kms.disable_key(KeyId=key_id)
    for call in (
        lambda: data_keys.generate(key_id, CONTEXT),
        lambda: data_keys.decrypt(key_id, blob, CONTEXT),
    ):
        with pytest.raises(ClientError) as failed:
            call()
        assert failed.value.response["Error"]["Code"] == "DisabledException"

    kms.enable_key(KeyId=key_id)
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(ClientError) as failed:
        data_keys.decrypt(key_id, blob, CONTEXT)
    assert failed.value.response["Error"]["Code"] == "KMSInvalidStateException"


def test_a_signing_key_makes_no_data_keys(kms):
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    with pytest.raises(ClientError) as failed:
        KmsDataKeys(client=kms).generate(signing["KeyId"], CONTEXT)
    assert failed.value.response["Error"]["Code"] == "InvalidKeyUsageException"


def test_the_patch_is_idempotent(kms, key_id):
    moto_kms_patches.apply()
    moto_kms_patches.apply()
    data_keys = KmsDataKeys(client=kms)
    plaintext, blob = data_keys.generate(key_id, CONTEXT)
    assert data_keys.decrypt(key_id, blob, CONTEXT) == plaintext


# -- the two ends -------------------------------------------------------------------------------


def _grant(kms, key_id, blob, device_id="sensor-0001", owner="acme", epoch=3):
    """What GET /v1/admin/devices/{id}/data-key answers."""
    return {
        "device_id": device_id,
        "owner": owner,
        "epoch": epoch,
        "key_id": kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"],
        "ciphertext_blob": base64.b64encode(blob).decode(),
        "encryption_context": encryption_context(device_id, owner, epoch),
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "rsa2048"],
)
def test_device_and_backend_share_the_key_and_read_the_telemetry(kms, key_id, make):
    # Given a data key, wrapped by KMS and sealed to the device's certificate key
    device_key = make()
    plaintext, blob = KmsDataKeys(client=kms).generate(key_id, CONTEXT)
    sealed = seal_data_key(
        device_key.public_key(), plaintext, device_id="sensor-0001", epoch=3, owner="acme"
    ).to_public()

    # When the device opens it and encrypts telemetry
    data_key = device_open(device_key, sealed, device_id="sensor-0001", epoch=3, owner="acme")
    envelope = encrypt_telemetry(data_key, b'{"temp": 21.5}', device_id="sensor-0001", epoch=3)

    # Then a backend with kms:Decrypt reads it
    backend_kms = boto3.client("kms", region_name="eu-west-1")
    grant = _grant(kms, key_id, blob)
    assert backend_decrypt_telemetry(backend_kms, grant, envelope) == b'{"temp": 21.5}'
    assert set(envelope) == {"v", "alg", "device_id", "epoch", "nonce", "ciphertext"}
    # And a device key of another device cannot open the sealed key
    with pytest.raises(SealedKeyUnreadable):
        device_open(make(), sealed, device_id="sensor-0001", epoch=3, owner="acme")


def test_the_backend_refuses_an_envelope_of_another_device_or_altered(kms, key_id):
    plaintext, blob = KmsDataKeys(client=kms).generate(key_id, CONTEXT)
    envelope = encrypt_telemetry(plaintext, b"reading", device_id="sensor-0001", epoch=3)
    grant = _grant(kms, key_id, blob)
    assert backend_decrypt_telemetry(kms, grant, envelope) == b"reading"

    # Relabelled as another device's (the AAD is the reader's device id, not the envelope's)
    with pytest.raises(EnvelopeUnreadable):
        decrypt_telemetry(
            plaintext, {**envelope, "device_id": "sensor-0002"}, device_id="sensor-0002"
        )
    with pytest.raises(EnvelopeUnreadable):
        backend_decrypt_telemetry(kms, grant, {**envelope, "device_id": "sensor-0002"})
    with pytest.raises(EnvelopeUnreadable):
        backend_decrypt_telemetry(kms, grant, {**envelope, "epoch": 2})
    ciphertext = base64.urlsafe_b64decode(envelope["ciphertext"] + "==")
    for index in range(len(ciphertext)):
        flipped = bytearray(ciphertext)
        flipped[index] ^= 1
        mangled = base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode()
        with pytest.raises(EnvelopeUnreadable):
            decrypt_telemetry(
                plaintext, {**envelope, "ciphertext": mangled}, device_id="sensor-0001"
            )
    for mangle in (
        {"nonce": "AAAA"},
        {"nonce": None},
        {"v": 2},
        {"alg": "A128GCM"},
        {"ciphertext": "*"},
    ):
        with pytest.raises(EnvelopeUnreadable):
            decrypt_telemetry(plaintext, {**envelope, **mangle}, device_id="sensor-0001")


def test_the_backend_refuses_a_grant_whose_context_is_not_its_device_life(kms, key_id):
    _, blob = KmsDataKeys(client=kms).generate(key_id, CONTEXT)
    grant = _grant(kms, key_id, blob)
    with pytest.raises(ValueError):
        backend_data_key(kms, {**grant, "encryption_context": encryption_context("x", "acme", 3)})
    # A consistent grant for another life: KMS refuses the blob
    with pytest.raises(DataKeyUnreadable):
        backend_data_key(
            kms,
            {
                **grant,
                "epoch": 4,
                "encryption_context": encryption_context("sensor-0001", "acme", 4),
            },
        )
