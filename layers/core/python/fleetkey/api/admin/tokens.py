"""Access tokens: revocation by jti."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Body

from fleetkey.api.common import caller, components, new_router, responses
from fleetkey.api.models import RevokedTokenView, RevokeTokenRequest

router = new_router()
TAGS = ["tokens"]


@router.post(
    "/tokens/revoke",
    summary="Revoke an access token",
    description="Introspection answers inactive for it from now on, for as long as any token "
    "can live.",
    operation_id="revokeToken",
    tags=TAGS,
    responses=responses(200, "The revocation"),
)
def revoke_token(request: Annotated[RevokeTokenRequest, Body()]) -> RevokedTokenView:
    until = components().introspection.revoke(request.jti, actor=caller(router.current_event))
    return RevokedTokenView(revoked=request.jti, until=until)
