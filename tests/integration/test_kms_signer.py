"""The KMS signing adapter against moto: the key stays in KMS, signatures verify locally."""

import boto3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from fleetkey.adapters.kms import KmsSigner
from fleetkey_local.instrument import AwsCallCounter


@pytest.mark.parametrize(
    "spec,size,digest",
    [("ECC_NIST_P256", 32, hashes.SHA256()), ("ECC_NIST_P384", 48, hashes.SHA384())],
)
def test_signatures_verify_and_the_public_key_is_fetched_once(moto, spec, size, digest):
    # Given a KMS signing key
    kms = boto3.client("kms", region_name="eu-west-1")
    key_id = kms.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    counter = AwsCallCounter().watch(kms)
    signer = KmsSigner(key_id, client=kms)
    message = b"header.payload"

    # When it signs twice, once DER and once as JWS r||s
    der = signer.sign_der(message)
    raw = signer.sign_raw(message)

    # Then both verify with the public key, which KMS was asked for only once
    public = signer.public_key()
    public.verify(der, message, ec.ECDSA(digest))
    assert len(raw) == 2 * size
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    public.verify(utils.encode_dss_signature(r, s), message, ec.ECDSA(digest))
    assert counter.calls.count("kms.GetPublicKey") == 1
    assert counter.calls.count("kms.Sign") == 2


def test_a_non_ec_key_is_refused(moto):
    kms = boto3.client("kms", region_name="eu-west-1")
    key_id = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    with pytest.raises(ValueError):
        KmsSigner(key_id, client=kms).public_key()
