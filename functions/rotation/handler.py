"""Certificate rotation and fleetkey's PKI, over API Gateway:

- device-facing (public, throttled like /v1/token): `POST /v1/devices/{id}/certificates` (a CSR
  and a client assertion by the current key), `POST .../certificates/{certificate_id}/commit`
  (an assertion by the new key); errors are RFC 6749 §5.2-style JSON;
- EST (RFC 7030, RFC 8951) for stock clients: `GET /.well-known/est/cacerts`,
  `POST /.well-known/est/simplereenroll` (the device authenticated by its current certificate
  in mutual TLS: API Gateway puts it in `requestContext.identity.clientCert`, from the TLS
  handshake only);
- public PKI: `GET /v1/pki/ca` (the chain, PEM), `GET /v1/pki/crl` (DER);
- operators (IAM): `/v1/admin/pki/*`, the issuing CA's set-up (fleetkey.api.admin.pki).

This function's role is one of the two that may sign with the issuing CA's KMS key.

Metrics: `RotationsRequested`, `RotationsCommitted`, `RotationsRefused` (dimension `error`),
`CrlsPublished`.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from fleetkey.api.device import NO_STORE, handle_device_errors, json_body, no_store_json
from fleetkey.composition import Components, from_environ
from fleetkey.errors import EstRefused
from fleetkey.init_phase import ahead_of_requests, load_ahead
from fleetkey.observability import logger, metrics, tracer

MAX_BODY_BYTES = 24 * 1024
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
# The CA chain changes only when the CA is replaced; the CRL at most every few minutes.
CA_CACHE = {"Cache-Control": "public, max-age=300"}
CRL_CACHE = {"Cache-Control": "public, max-age=60"}


@lru_cache(maxsize=1)
def components() -> Components:
    """This function's services (its own clients and caches), built at the first call."""
    return from_environ()


@lru_cache(maxsize=1)
def admin() -> APIGatewayRestResolver:
    """The operators' PKI routes (`/v1/admin/pki/*`), built at the first such request: the
    device-facing routes need neither their models nor pydantic (docs/cold-start.md)."""
    from fleetkey.api.admin import PKI_ROUTERS
    from fleetkey.api.admin.resolver import admin_resolver

    return admin_resolver(PKI_ROUTERS)


# The services' modules (rotation, PKI) are imported at the first request that uses them, the
# PKI's admin routes at the first `/v1/admin/pki/*` request; both at init ahead of requests.
load_ahead("fleetkey.services.rotation", "fleetkey.services.pki")
if ahead_of_requests():
    admin()
app = APIGatewayRestResolver()
handle_device_errors(app, refused_metric="RotationsRefused", what="rotation")


@app.exception_handler(EstRefused)
def _est_refused(exc: EstRefused) -> Response[str]:
    """EST answers errors as text (RFC 7030 §4.2.3); counted like the JSON route's."""
    metrics.add_dimension(name="error", value=f"est_{exc.status}")
    metrics.add_metric(name="RotationsRefused", unit=MetricUnit.Count, value=1)
    logger.warning("EST request refused", extra={"status": exc.status, "reason": exc.message})
    return Response(
        status_code=exc.status, content_type="text/plain", body=exc.message, headers=NO_STORE
    )


@app.post("/v1/devices/<device_id>/certificates")
def request_rotation(device_id: str) -> Response[dict[str, Any]]:
    status, body = components().rotation.request(unquote(device_id), json_body(app, MAX_BODY_BYTES))
    return no_store_json(status, body)


@app.post("/v1/devices/<device_id>/certificates/<certificate_id>/commit")
def commit_rotation(device_id: str, certificate_id: str) -> Response[dict[str, Any]]:
    body = components().rotation.commit(
        unquote(device_id), unquote(certificate_id), json_body(app, MAX_BODY_BYTES)
    )
    return no_store_json(200, body)


@app.get("/v1/pki/ca")
def ca_chain() -> Response[str]:
    return Response(
        status_code=200,
        content_type="application/pem-certificate-chain",
        body=components().pki.chain_pem(),
        headers=CA_CACHE,
    )


@app.get("/v1/pki/crl")
def crl() -> Response[bytes]:
    return Response(
        status_code=200,
        content_type="application/pkix-crl",
        body=components().pki.crl_der(),
        headers=CRL_CACHE,
    )


@app.get("/.well-known/est/cacerts")
def est_cacerts() -> Response[str]:
    der = components().pki.cacerts_pkcs7()
    return Response(
        status_code=200,
        content_type=PKCS7_CERTS_ONLY,
        body=base64.b64encode(der).decode(),
        headers={**CA_CACHE, "Content-Transfer-Encoding": "base64"},
    )


@app.post("/.well-known/est/simplereenroll")
def est_simplereenroll() -> Response[str]:
    event = app.current_event
    # Set by API Gateway from the mutual TLS handshake alone (never from a header).
    context = event.raw_event.get("requestContext")
    identity = context.get("identity") if isinstance(context, dict) else None
    client_cert = identity.get("clientCert") if isinstance(identity, dict) else None
    client_certificate = client_cert.get("clientCertPem") if isinstance(client_cert, dict) else None
    media = (event.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != "application/pkcs10":
        raise EstRefused("the body must be application/pkcs10 (base64 DER)", 415)
    try:
        text = event.decoded_body or ""
        if len(text) > MAX_BODY_BYTES:
            raise EstRefused("the request is too large", 413)
        csr_der = base64.b64decode("".join(text.split()), validate=True)
    except (ValueError, binascii.Error):
        raise EstRefused("the body must be a base64 DER PKCS#10 request") from None
    issued = components().rotation.reenroll(client_certificate, csr_der)
    return Response(
        status_code=200,
        content_type=PKCS7_CERTS_ONLY,
        body=base64.b64encode(issued).decode(),
        headers={**NO_STORE, "Content-Transfer-Encoding": "base64"},
    )


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    path = event.get("path")
    if isinstance(path, str) and path.startswith("/v1/admin/"):
        return admin().resolve(event, context)
    return app.resolve(event, context)
