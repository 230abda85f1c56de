"""Used client assertions (JTI#), challenges (NONCE#) and revoked tokens (REVOKED#): the
`TokenRecords` port. Each lives until its `expires_at`, which the code checks (TTL lags)."""

from __future__ import annotations

from collections.abc import Sequence

from fleetkey.ports import AssertionReplayed, ChallengeUnusable, Write
from fleetkey.store import schema
from fleetkey.store.table import Action, ConditionFailed, Table, ser


class DynamoTokenRecords:
    def __init__(self, table: Table) -> None:
        self._table = table

    def use_assertion(
        self,
        device_id: str,
        jti: str,
        expires_at: int,
        now: int,
        nonce: str | None = None,
        *,
        with_writes: Sequence[Write] = (),
        then: Sequence[Write] = (),
    ) -> None:
        """Record a client assertion's jti as used (and consume its challenge nonce), in one
        conditional write with `with_writes` (the device's eligibility check, whose refusal
        comes first) and `then` (what the grant writes besides: a firmware release check, a
        validation's result). A jti may be reused only once its earlier assertion has expired.

        AWS calls: 1 (TransactWriteItems).

        Raises:
            AssertionReplayed, ChallengeUnusable, or the refusal of a failed `with_writes` write.
        """
        actions: list[Write] = [
            *with_writes,
            Action(
                "jti",
                {
                    "Put": {
                        "TableName": self._table.name,
                        "Item": ser(
                            {
                                **schema.assertion_key(device_id, jti),
                                schema.TTL_ATTRIBUTE: expires_at,
                            }
                        ),
                        "ConditionExpression": "attribute_not_exists(pk) OR #exp < :now",
                        "ExpressionAttributeNames": {"#exp": schema.TTL_ATTRIBUTE},
                        "ExpressionAttributeValues": ser({":now": now}),
                    }
                },
                refusal=lambda _items: AssertionReplayed("the assertion was already used"),
            ),
        ]
        if nonce is not None:
            actions.append(
                Action(
                    "nonce",
                    {
                        "Delete": {
                            "TableName": self._table.name,
                            "Key": ser(schema.nonce_key(nonce)),
                            "ConditionExpression": "attribute_exists(pk) AND #exp >= :now",
                            "ExpressionAttributeNames": {"#exp": schema.TTL_ATTRIBUTE},
                            "ExpressionAttributeValues": ser({":now": now}),
                        }
                    },
                    refusal=lambda _items: ChallengeUnusable(
                        "the challenge is unknown, used or expired"
                    ),
                )
            )
        actions.extend(then)
        try:
            self._table.transact_or_refuse(actions)
        except ConditionFailed as failure:  # every action names its refusal: not expected
            raise AssertionReplayed(str(failure)) from None

    def put_nonce(self, nonce: str, expires_at: int) -> None:
        """AWS calls: 1 (PutItem, conditional on a new nonce)."""
        self._table.client.put_item(
            TableName=self._table.name,
            Item=ser({**schema.nonce_key(nonce), schema.TTL_ATTRIBUTE: expires_at}),
            ConditionExpression="attribute_not_exists(pk)",
        )

    def revoke(self, jti: str, expires_at: int) -> None:
        self._table.client.put_item(
            TableName=self._table.name,
            Item=ser({**schema.revoked_token_key(jti), schema.TTL_ATTRIBUTE: expires_at}),
        )

    def is_revoked(self, jti: str, now: int) -> bool:
        item = self._table.get(schema.revoked_token_key(jti))
        if not item:
            return False
        return int(item[schema.TTL_ATTRIBUTE]) >= now
