"""Validation requests and their results (VALIDATION#<id>): written pending by the validations
function, decided once by the token function (in the transaction that records the answering
assertion) or refused by it, read by the relying party that asked. Kept until `expires_at`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import error_code
from fleetkey.domain.validation import (
    RESULT_RETENTION_SECONDS,
    RefusalReason,
    Validation,
    ValidationAnswer,
    ValidationStatus,
)
from fleetkey.ports import ValidationUnanswerable, Write
from fleetkey.store import schema
from fleetkey.store.table import Action, Table, ser

# The validation record's attribute names, every one through a placeholder (`status`, `token`
# and others are DynamoDB reserved words).
_NAMES = {
    "#status": "status",
    "#device": "device_id",
    "#nonce": "nonce",
    "#purpose": "purpose",
    "#audience": "audience",
    "#answer_by": "answer_by",
    "#attest": "require_attestation",
    "#token": "token",
    "#reason": "reason",
    "#decided": "decided_at",
    "#epoch": "epoch",
    "#created": "created_at",
}


def _validation_from_item(item: Mapping[str, Any]) -> Validation:
    reason = item.get("reason")
    decided = item.get("decided_at")
    return Validation(
        validation_id=str(item["validation_id"]),
        device_id=str(item["device_id"]),
        purpose=str(item["purpose"]),
        audience=str(item["audience"]),
        requester=str(item["requester"]),
        require_attestation=bool(item["require_attestation"]),
        nonce=str(item["nonce"]),
        created_at=int(item["created_at"]),
        answer_by=int(item["answer_by"]),
        status=ValidationStatus(item["status"]),
        reason=RefusalReason(reason) if reason else None,
        token=item.get("token"),
        decided_at=int(decided) if decided is not None else None,
        epoch=int(item.get("epoch") or 1),
    )


class DynamoValidations:
    def __init__(self, table: Table) -> None:
        self._table = table

    def create(self, validation: Validation) -> None:
        """Record a new validation (pending, or already refused). AWS calls: 1 (PutItem,
        conditional on a new id)."""
        item = {
            **schema.validation_key(validation.validation_id),
            "validation_id": validation.validation_id,
            "device_id": validation.device_id,
            "purpose": validation.purpose,
            "audience": validation.audience,
            "requester": validation.requester,
            "require_attestation": validation.require_attestation,
            "nonce": validation.nonce,
            "created_at": validation.created_at,
            "answer_by": validation.answer_by,
            "status": validation.status.value,
            "reason": validation.reason.value if validation.reason else None,
            "decided_at": validation.decided_at,
            "epoch": validation.epoch,
            schema.TTL_ATTRIBUTE: validation.answer_by + RESULT_RETENTION_SECONDS,
        }
        self._table.client.put_item(
            TableName=self._table.name,
            Item=ser(item),
            ConditionExpression="attribute_not_exists(pk)",
        )

    def get(self, validation_id: str, now: int) -> Validation | None:
        """The validation, None when unknown or past its retention (TTL lags).
        AWS calls: 1 (GetItem, strongly consistent)."""
        item = self._table.get(schema.validation_key(validation_id))
        if not item or int(item[schema.TTL_ATTRIBUTE]) < now:
            return None
        return _validation_from_item(item)

    def answer(
        self,
        device_id: str,
        answer: ValidationAnswer,
        *,
        epoch: int,
        tokens_not_before: int | None,
        attested: bool,
        token: str,
        now: int,
    ) -> Write:
        """The write that decides a validation `validated` with `token`, for the transaction that
        records the answering assertion: only while it is pending and before its deadline, for
        the device it names in the life (`epoch`) it was asked in, with its nonce, purpose and
        audience, asked since the device's `tokens_not_before` (an answer to a validation asked
        before a suspension may have been signed before it), and attested when it asks for
        attestation. The device's epoch and tokens_not_before are checked against its item in
        the same transaction. A failed condition refuses with `ValidationUnanswerable` holding
        the record as it was."""
        condition = (
            "#status = :pending AND #device = :device AND #nonce = :nonce"
            " AND #purpose = :purpose AND #audience = :audience AND #answer_by > :now"
            " AND #epoch = :epoch"
        )
        values: dict[str, Any] = {
            ":pending": ValidationStatus.PENDING.value,
            ":device": device_id,
            ":nonce": answer.nonce,
            ":purpose": answer.purpose,
            ":audience": answer.audience,
            ":now": now,
            ":validated": ValidationStatus.VALIDATED.value,
            ":token": token,
            ":epoch": epoch,
        }
        names = {k: _NAMES[k] for k in ("#status", "#device", "#nonce", "#purpose", "#audience")}
        names.update({k: _NAMES[k] for k in ("#answer_by", "#token", "#decided", "#epoch")})
        if tokens_not_before is not None:
            condition += " AND #created >= :not_before"
            values[":not_before"] = tokens_not_before
            names["#created"] = _NAMES["#created"]
        if not attested:
            condition += " AND #attest = :false"
            values[":false"] = False
            names["#attest"] = _NAMES["#attest"]
        return Action(
            "validation",
            {
                "Update": {
                    "TableName": self._table.name,
                    "Key": ser(schema.validation_key(answer.validation_id)),
                    "UpdateExpression": "SET #status = :validated, #token = :token,"
                    " #decided = :now",
                    "ConditionExpression": condition,
                    "ExpressionAttributeNames": names,
                    "ExpressionAttributeValues": ser(values),
                    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                }
            },
            refusal=lambda items: ValidationUnanswerable(
                "the validation cannot take this answer", items.get("validation")
            ),
        )

    def refuse(
        self, device_id: str, answer: ValidationAnswer, reason: RefusalReason, now: int
    ) -> bool:
        """Decide a validation `refused` for `reason`, only while it is pending and before its
        deadline, for the device it names and with its nonce (an answer that does not know the
        nonce cannot end someone's validation). False when those do not hold.

        AWS calls: 1 (UpdateItem, conditional).
        """
        try:
            self._table.client.update_item(
                TableName=self._table.name,
                Key=ser(schema.validation_key(answer.validation_id)),
                UpdateExpression="SET #status = :refused, #reason = :reason, #decided = :now",
                ConditionExpression="#status = :pending AND #device = :device"
                " AND #nonce = :nonce AND #answer_by > :now",
                ExpressionAttributeNames={
                    k: _NAMES[k]
                    for k in ("#status", "#device", "#nonce", "#answer_by", "#reason", "#decided")
                },
                ExpressionAttributeValues=ser(
                    {
                        ":refused": ValidationStatus.REFUSED.value,
                        ":pending": ValidationStatus.PENDING.value,
                        ":reason": reason.value,
                        ":device": device_id,
                        ":nonce": answer.nonce,
                        ":now": now,
                    }
                ),
            )
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise
        return True
