"""Key generation dominates test time; CAs are made once per session and reused."""

from functools import cache

from fleetkey_local.pki import CertificateAuthority


@cache
def ca(name: str, key_kind: str = "ec:secp384r1") -> CertificateAuthority:
    return CertificateAuthority.create(name, key_kind=key_kind)
