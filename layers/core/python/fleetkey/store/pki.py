"""fleetkey's issuing CA (the head item of STREAM#issuing-ca, with its audit chain), its
revocations and CRL, and the public keys it has certified:

    pk                  sk                          what
    STREAM#issuing-ca   HEAD                        the issuing CA (key, certificate, chain)
    PKI#REVOKED         <not_after>#<serial hex>    a revoked certificate, until it expires
    PKI#CRL             CRL                         the latest CRL's number and dates, and the
                                                    revocation counter
    PKI#CRL             DER#<number>#<k>            the latest CRL's DER, in chunks
    KEY#<spki sha256>   KEY                         a public key fleetkey certified, and for whom

Revocations are read by a Query from now on (sort keys start with the expiry), so the CRL holds
what has not yet expired and its cost follows that, never the number of certificates issued.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fleetkey.domain.audit import AuditRecord, ChainHead
from fleetkey.domain.pki import IssuingCa, IssuingCaStatus, PublishedCrl, Revocation
from fleetkey.errors import Conflict, FleetkeyError
from fleetkey.ports import StaleRecord, Write
from fleetkey.store import schema
from fleetkey.store.table import Action, ConditionFailed, Table, de, plain, ser

CA_STREAM = "issuing-ca"
REVOKED_PK = "PKI#REVOKED"
CRL_KEY = {schema.PARTITION_KEY: "PKI#CRL", schema.SORT_KEY: "CRL"}


# A CRL is stored in chunks (an item holds at most 400 KB), all written in one transaction
# (at most 4 MB): about 75,000 revoked certificates.
CRL_CHUNK_BYTES = 350_000
MAX_CRL_BYTES = 3_500_000


class CrlTooLarge(FleetkeyError):
    """The CRL outgrew what one transaction stores (an alarm: revocations pile up)."""

    code = "crl_too_large"


def _chunk_prefix(number: int) -> str:
    return f"DER#{number:012d}#"


def _chunk_key(number: int, index: int) -> dict[str, str]:
    return {
        schema.PARTITION_KEY: CRL_KEY[schema.PARTITION_KEY],
        schema.SORT_KEY: f"{_chunk_prefix(number)}{index:03d}",
    }


class KeyCertified(Conflict):
    """fleetkey has certified this public key before (for this device or another)."""


def _key_claim_key(fingerprint: str) -> dict[str, str]:
    return {schema.PARTITION_KEY: f"KEY#{fingerprint}", schema.SORT_KEY: "KEY"}


def _ca_from_item(item: dict[str, Any]) -> IssuingCa:
    item = plain(item)
    return IssuingCa(
        key_id=item["key_id"],
        key_spec=item["key_spec"],
        subject=item["subject"],
        status=IssuingCaStatus(item["ca_status"]),
        audit_head=ChainHead(int(item["audit_seq"]), item["audit_hash"]),
        certificate_pem=item.get("certificate_pem"),
        chain_pem=tuple(item.get("chain_pem") or ()),
        iot_ca_id=item.get("iot_ca_id"),
        self_signed=bool(item.get("self_signed", True)),
        created_at=item.get("created_at"),
    )


class DynamoPkiStore:
    def __init__(self, table: Table) -> None:
        self._table = table

    # ---- the CA ------------------------------------------------------------------------------

    def get_ca(self) -> IssuingCa | None:
        """AWS calls: 1 (GetItem)."""
        item = self._table.get(schema.stream_head_key(CA_STREAM))
        return _ca_from_item(item) if item and "key_id" in item else None

    def put_ca(self, ca: IssuingCa, record: AuditRecord, *, previous: ChainHead) -> IssuingCa:
        """Write the CA with the audit record of the change, conditional on the CA being as read
        (`previous`: ChainHead() for none yet). AWS calls: 1 (TransactWriteItems).

        Raises:
            StaleRecord: it changed since it was read.
        """
        item = {
            **schema.stream_head_key(CA_STREAM),
            "key_id": ca.key_id,
            "key_spec": ca.key_spec,
            "subject": ca.subject,
            "ca_status": ca.status.value,
            "certificate_pem": ca.certificate_pem,
            "chain_pem": list(ca.chain_pem),
            "iot_ca_id": ca.iot_ca_id,
            "self_signed": ca.self_signed,
            "created_at": ca.created_at,
            "audit_seq": record.seq,
            "audit_hash": record.hash,
        }
        condition = "attribute_not_exists(pk)" if previous.seq == 0 else "audit_seq = :prev"
        put: dict[str, Any] = {
            "TableName": self._table.name,
            "Item": ser(item),
            "ConditionExpression": condition,
        }
        if previous.seq:
            put["ExpressionAttributeValues"] = ser({":prev": previous.seq})
        self._table.transact_or_refuse(
            [
                Action(
                    "ca",
                    {"Put": put},
                    refusal=lambda _items: StaleRecord("the issuing CA changed since read"),
                ),
                self._table.audit_put(record),
            ]
        )
        return replace(ca, audit_head=ChainHead(record.seq, record.hash))

    # ---- revocations and the CRL --------------------------------------------------------------

    def revocations(self, entries: Sequence[Revocation]) -> list[Write]:
        """The writes that record revocations, for the device change's transaction: each entry,
        and the revocation counter raised by their number (the CRL is out of date until it covers
        them). None for no entries."""
        if not entries:
            return []
        writes: list[Write] = [
            Action(
                f"revocation:{entry.serial}",
                {
                    "Put": {
                        "TableName": self._table.name,
                        "Item": ser(
                            {
                                schema.PARTITION_KEY: REVOKED_PK,
                                schema.SORT_KEY: f"{entry.not_after}#{entry.serial}",
                                "serial": entry.serial,
                                "certificate_id": entry.certificate_id,
                                "device_id": entry.device_id,
                                "not_after": entry.not_after,
                                "revoked_at": entry.revoked_at,
                                "reason": entry.reason,
                            }
                        ),
                    }
                },
            )
            for entry in entries
        ]
        writes.append(
            Action(
                "revocation_counter",
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": ser(CRL_KEY),
                        "UpdateExpression": "ADD revocations :count",
                        "ExpressionAttributeValues": ser({":count": len(entries)}),
                    }
                },
            )
        )
        return writes

    def revocations_after(self, moment: str) -> list[Revocation]:
        """Every revocation of a certificate that expires after `moment` (ISO 8601).
        AWS calls: 1 Query per page."""
        kwargs: dict[str, Any] = {
            "TableName": self._table.name,
            "KeyConditionExpression": "pk = :pk AND sk > :from",
            "ExpressionAttributeValues": ser({":pk": REVOKED_PK, ":from": moment}),
            "ConsistentRead": True,
        }
        entries: list[Revocation] = []
        while True:
            response = self._table.client.query(**kwargs)
            for raw in response.get("Items", []):
                item = de(raw)
                entries.append(
                    Revocation(
                        serial=item["serial"],
                        certificate_id=item["certificate_id"],
                        device_id=item["device_id"],
                        not_after=item["not_after"],
                        revoked_at=item["revoked_at"],
                        reason=item["reason"],
                    )
                )
            if "LastEvaluatedKey" not in response:
                return entries
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def crl(self) -> tuple[PublishedCrl | None, int]:
        """The latest CRL's description (None before the first) and the number of revocations
        recorded. AWS calls: 1 (GetItem)."""
        item = self._table.get(CRL_KEY)
        if not item:
            return None, 0
        item = plain(item)
        revocations = int(item.get("revocations") or 0)
        if "crl_number" not in item:
            return None, revocations
        return (
            PublishedCrl(
                number=int(item["crl_number"]),
                this_update=item["this_update"],
                next_update=item["next_update"],
                covers=int(item["covers"]),
                chunks=int(item["chunks"]),
            ),
            revocations,
        )

    def crl_der(self, crl: PublishedCrl) -> bytes | None:
        """The DER of `crl`, from its chunks; None when a newer CRL replaced it meanwhile (its
        chunks are gone: read the description again). AWS calls: 1 Query (+ pages)."""
        kwargs: dict[str, Any] = {
            "TableName": self._table.name,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": ser(
                {":pk": CRL_KEY[schema.PARTITION_KEY], ":prefix": _chunk_prefix(crl.number)}
            ),
            "ConsistentRead": True,
        }
        chunks: list[bytes] = []
        while True:
            response = self._table.client.query(**kwargs)
            chunks.extend(bytes(de(item)["der"]) for item in response.get("Items", []))
            if "LastEvaluatedKey" not in response:
                break
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return b"".join(chunks) if len(chunks) == crl.chunks else None

    def publish_crl(self, crl: PublishedCrl, der: bytes, *, previous: PublishedCrl | None) -> bool:
        """Store `crl` (its DER in chunks under its number, the description pointing at them,
        the previous CRL's chunks deleted) in one transaction, unless another CRL was stored
        since `previous` was read (CRL numbers only grow). True when stored.

        AWS calls: 1 (TransactWriteItems).

        Raises:
            CrlTooLarge: the DER does not fit one transaction (4 MB).
        """
        pieces = [der[i : i + CRL_CHUNK_BYTES] for i in range(0, len(der), CRL_CHUNK_BYTES)]
        if len(der) > MAX_CRL_BYTES:
            raise CrlTooLarge(f"the CRL is {len(der)} bytes; at most {MAX_CRL_BYTES} are stored")
        condition = (
            "attribute_not_exists(crl_number)" if previous is None else "crl_number = :previous"
        )
        values: dict[str, Any] = {
            ":number": crl.number,
            ":this": crl.this_update,
            ":next": crl.next_update,
            ":covers": crl.covers,
            ":chunks": len(pieces),
        }
        if previous is not None:
            values[":previous"] = previous.number
        actions: list[Action] = [
            Action(
                "crl",
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": ser(CRL_KEY),
                        "UpdateExpression": "SET crl_number = :number, this_update = :this, "
                        "next_update = :next, covers = :covers, chunks = :chunks",
                        "ConditionExpression": condition,
                        "ExpressionAttributeValues": ser(values),
                    }
                },
            ),
            *(
                Action(
                    f"chunk:{index}",
                    {
                        "Put": {
                            "TableName": self._table.name,
                            "Item": ser({**_chunk_key(crl.number, index), "der": piece}),
                        }
                    },
                )
                for index, piece in enumerate(pieces)
            ),
            *(
                Action(
                    f"old:{index}",
                    {
                        "Delete": {
                            "TableName": self._table.name,
                            "Key": ser(_chunk_key(number, index)),
                        }
                    },
                )
                for number, chunks in ([(previous.number, previous.chunks)] if previous else [])
                for index in range(chunks)
            ),
        ]
        try:
            self._table.transact(actions)
        except ConditionFailed:
            return False
        return True

    # ---- certified keys -----------------------------------------------------------------------

    def key_claim(self, fingerprint: str, device_id: str, certificate_id: str) -> Write:
        """The claim that fleetkey certifies this public key once, for the transaction that
        records the rotation (refusal: KeyCertified)."""
        return Action(
            "key_claim",
            {
                "Put": {
                    "TableName": self._table.name,
                    "Item": ser(
                        {
                            **_key_claim_key(fingerprint),
                            "device_id": device_id,
                            "certificate_id": certificate_id,
                        }
                    ),
                    "ConditionExpression": "attribute_not_exists(pk)",
                }
            },
            refusal=lambda _items: KeyCertified("this public key was certified before"),
        )
