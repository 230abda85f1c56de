"""Public discovery: GET /.well-known/jwks.json (every key that can verify an unexpired token) and
GET /.well-known/oauth-authorization-server (RFC 8414 metadata). Reads only: the signing-key
registry, each key confirmed with KMS (public key, tags, key policy)."""

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.composition import from_environ
from fleetkey.domain.profiles import PROFILES
from fleetkey.init_phase import load_ahead
from fleetkey.observability import logger, metrics, tracer
from fleetkey.settings import Settings

if TYPE_CHECKING:
    from fleetkey.services.signing_keys import SigningKeys

# The services' modules are imported at the first request (or at init, ahead of requests).
load_ahead("fleetkey.services.signing_keys", "fleetkey.services.tokens")
app = APIGatewayRestResolver()
# With the function's own 60 s registry cache, still well under the signing-key publish lead
# (300 s): a cached JWKS always has a key before tokens signed with it appear.
JWKS_MAX_AGE = 180


@lru_cache(maxsize=1)
def context() -> tuple[Settings, "SigningKeys"]:
    built = from_environ()
    return built.settings, built.signing_keys


@app.get("/.well-known/jwks.json")
def jwks() -> Response[str]:
    return Response(
        status_code=200,
        content_type="application/jwk-set+json",
        # Powertools serializes dict bodies only for application/json.
        body=json.dumps(context()[1].jwks(), separators=(",", ":")),
        headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"},
    )


@app.get("/.well-known/oauth-authorization-server")
def metadata() -> Response[dict[str, Any]]:
    from fleetkey.services.tokens import ASSERTION_ALGORITHMS

    settings = context()[0]
    issuer = settings.issuer
    scopes = sorted({s for p in PROFILES.values() for s in p.token_rules.scopes})
    return Response(
        status_code=200,
        content_type=content_types.APPLICATION_JSON,
        body={
            "issuer": issuer,
            "token_endpoint": f"{issuer}/v1/token",
            "jwks_uri": f"{issuer}/.well-known/jwks.json",
            "introspection_endpoint": f"{issuer}/v1/introspect",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": sorted(ASSERTION_ALGORITHMS),
            "scopes_supported": scopes,
            "response_types_supported": ["token"],
            "introspection_endpoint_auth_methods_supported": ["aws_sigv4"],
            "fleetkey_challenge_endpoint": f"{issuer}/v1/challenge",
        },
        headers={"Cache-Control": "public, max-age=3600"},
    )


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context_: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context_)
