"""The single-table layout, shared by the store, the CDK stack and the local stack.

    pk                  sk              what
    DEVICE#<device_id>  DEVICE          the device: allow-list entry, lifecycle state, audit head
    DEVICE#<device_id>  AUDIT#<seq>     the device's audit chain, one record per change
    CERT#<cert_id>      CERT            a certificate fleetkey decided on, and to which device
    CERT#<cert_id>      AUDIT#<seq>     the audit chain of a certificate refused on its own merits
    CA                  <ca_name>       a manufacturer CA (trust anchor); one partition, one Query
    CA#<ca_name>        AUDIT#<seq>     the audit chain of a manufacturer CA
    CAID#<iot_ca_id>    CAID            which name a CA is registered under (one name per CA)
    STREAM#<name>       HEAD            head of a chain of events with no other subject
    STREAM#<name>       AUDIT#<seq>     e.g. malformed registration events
    STREAM#signing-keys HEAD            the token signing keys (the registry is its head item)
    JTI#<device>#<jti>  JTI             a client assertion already used (until it expires)
    NONCE#<nonce>       NONCE           a challenge not yet used (until it expires)
    REVOKED#<jti>       REVOKED         a revoked access token (until it expires)
    DATAKEY#<device_id> EPOCH#<epoch>   a device's data key, KMS-wrapped (one per life)
    STREAM#issuing-ca   HEAD            the issuing CA (its KMS key, certificate and chain)
    PKI#REVOKED         <not_after>#<serial>  a certificate fleetkey issued and revoked
    PKI#CRL             CRL             the latest CRL and the count of revocations
    KEY#<spki sha256>   KEY             a public key fleetkey certified (never certified again)
    VALIDATION#<id>     VALIDATION      a relying party's validation request and its result
    FIRMWARE#<profile>  RELEASE#<sha256>  a firmware release of a profile (published or revoked)
    STREAM#firmware-releases AUDIT#<seq>  the audit trail of firmware releases

Two sparse global secondary indexes (KEYS_ONLY), written by the device repository with every
change, which the rotation sweep queries (never a Scan):
- `due`: partition `due_shard` ("DUE#0".."DUE#7"), sort `due_at` (epoch seconds): devices with a
  rotation's deadline or a retired certificate's deletion due;
- `renewal`: partition `renewal_shard`, sort `renew_at`: ACTIVE devices whose current
  certificate is next to be renewed (read at the renewal rate, so a backlog of renewals never
  delays a rollback).

Items that only matter until a moment carry `expires_at` (epoch seconds, the table's TTL
attribute); code checks it too, since TTL deletion lags by up to days.
"""

# An item's primary key, {PARTITION_KEY: ..., SORT_KEY: ...}, as Python values (not yet serialized).
Key = dict[str, str]

PARTITION_KEY = "pk"
SORT_KEY = "sk"
TTL_ATTRIBUTE = "expires_at"
DUE_INDEX = "due"
DUE_PARTITION_KEY = "due_shard"
DUE_SORT_KEY = "due_at"
RENEWAL_INDEX = "renewal"
RENEWAL_PARTITION_KEY = "renewal_shard"
RENEWAL_SORT_KEY = "renew_at"
# index name -> (partition key, sort key); both keys only, both sparse.
SPARSE_INDEXES = {
    DUE_INDEX: (DUE_PARTITION_KEY, DUE_SORT_KEY),
    RENEWAL_INDEX: (RENEWAL_PARTITION_KEY, RENEWAL_SORT_KEY),
}

DEVICE_SK = "DEVICE"
STREAM_HEAD_SK = "HEAD"
CERT_SK = "CERT"
CA_PK = "CA"
AUDIT_PREFIX = "AUDIT#"


def device_key(device_id: str) -> Key:
    return {PARTITION_KEY: f"DEVICE#{device_id}", SORT_KEY: DEVICE_SK}


def certificate_key(certificate_id: str) -> Key:
    return {PARTITION_KEY: f"CERT#{certificate_id}", SORT_KEY: CERT_SK}


def ca_key(ca_name: str) -> Key:
    return {PARTITION_KEY: CA_PK, SORT_KEY: ca_name}


def ca_id_key(iot_ca_id: str) -> Key:
    return {PARTITION_KEY: f"CAID#{iot_ca_id}", SORT_KEY: "CAID"}


def assertion_key(device_id: str, jti: str) -> Key:
    return {PARTITION_KEY: f"JTI#{device_id}#{jti}", SORT_KEY: "JTI"}


def nonce_key(nonce: str) -> Key:
    return {PARTITION_KEY: f"NONCE#{nonce}", SORT_KEY: "NONCE"}


def validation_key(validation_id: str) -> Key:
    return {PARTITION_KEY: f"VALIDATION#{validation_id}", SORT_KEY: "VALIDATION"}


def firmware_partition(profile: str) -> str:
    return f"FIRMWARE#{profile}"


def firmware_key(profile: str, sha256: str) -> Key:
    return {PARTITION_KEY: firmware_partition(profile), SORT_KEY: f"RELEASE#{sha256}"}


def revoked_token_key(jti: str) -> Key:
    return {PARTITION_KEY: f"REVOKED#{jti}", SORT_KEY: "REVOKED"}


def data_key_partition(device_id: str) -> str:
    return f"DATAKEY#{device_id}"


def data_key_key(device_id: str, epoch: int) -> Key:
    return {PARTITION_KEY: data_key_partition(device_id), SORT_KEY: f"EPOCH#{epoch:010d}"}


def audit_key(subject: str, seq: int) -> Key:
    return {PARTITION_KEY: subject_partition(subject), SORT_KEY: f"{AUDIT_PREFIX}{seq:010d}"}


def subject_partition(subject: str) -> str:
    """Audit subjects are 'device:<id>', 'certificate:<id>', 'ca:<name>' or 'stream:<name>'."""
    kind, _, name = subject.partition(":")
    prefix = {"device": "DEVICE", "certificate": "CERT", "ca": "CA", "stream": "STREAM"}[kind]
    return f"{prefix}#{name}"


def device_subject(device_id: str) -> str:
    return f"device:{device_id}"


def certificate_subject(certificate_id: str) -> str:
    return f"certificate:{certificate_id}"


def ca_subject(ca_name: str) -> str:
    return f"ca:{ca_name}"


def stream_head_key(stream: str) -> Key:
    return {PARTITION_KEY: f"STREAM#{stream}", SORT_KEY: STREAM_HEAD_SK}
