"""Token signing keys (KMS): list, rotate, retire."""

from __future__ import annotations

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.api.models import RetiredKeysView, RotatedKeyView, SigningKeyListView

router = new_router()
TAGS = ["signing keys"]


def _actor() -> str:
    return caller(router.current_event)


@router.get(
    "/signing-keys",
    summary="List token signing keys",
    operation_id="listSigningKeys",
    tags=TAGS,
    responses=responses(200, "The signing keys, in the order they became active"),
)
def list_signing_keys() -> SigningKeyListView:
    keys = components().signing_keys.keys()
    return SigningKeyListView.model_validate(
        {
            "keys": [
                {
                    "kid": k.kid,
                    "key_id": k.key_id,
                    "active_from": k.active_from,
                    "retire_after": k.retire_after,
                }
                for k in keys
            ]
        }
    )


@router.post(
    "/signing-keys/rotate",
    summary="Rotate the token signing key",
    description="Creates a KMS key; it signs tokens once relying parties have had time to see it "
    "in the JWKS.",
    operation_id="rotateSigningKey",
    tags=TAGS,
    status_code=201,
    responses=responses(201, "The new key", 409),
)
def rotate_signing_key() -> RotatedKeyView:
    key = components().signing_keys.rotate(actor=_actor())
    return RotatedKeyView(kid=key.kid, key_id=key.key_id, active_from=key.active_from)


@router.post(
    "/signing-keys/retire",
    summary="Retire signing keys past their retirement time",
    operation_id="retireSigningKeys",
    tags=TAGS,
    responses=responses(200, "The retired keys"),
)
def retire_signing_keys() -> RetiredKeysView:
    return RetiredKeysView(retired=components().signing_keys.retire_expired(actor=_actor()))
