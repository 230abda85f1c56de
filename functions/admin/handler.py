"""Operator API under /v1/admin/ (IAM-authenticated by API Gateway): allow-list, manufacturer
CAs, devices and audit trails. Routing, parsing and error mapping only; the rules live in the core.
"""

import json
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError

from fleetkey.adapters.aws import error_code, is_transient
from fleetkey.adapters.iot import IotRegistry
from fleetkey.adapters.kms import KmsKeys
from fleetkey.domain.allowlist import parse_entry
from fleetkey.errors import FleetkeyError, InvalidRequest, TransientAwsError
from fleetkey.observability import logger, metrics, tracer
from fleetkey.services.allowlist import AllowlistService
from fleetkey.services.devices import DeviceService
from fleetkey.services.introspection import IntrospectionService
from fleetkey.services.signing_keys import KeyTrust, SigningKeys
from fleetkey.services.trust import ManufacturerCaService
from fleetkey.settings import Settings
from fleetkey.store.dynamodb import Store

app = APIGatewayRestResolver(strip_prefixes=["/v1/admin"])
# AWS errors that mean the caller's input was refused, not that fleetkey failed.
CALLER_ERROR_CODES = frozenset({"CertificateValidationException", "InvalidRequestException"})


class Services:
    def __init__(self, settings: Settings) -> None:
        store = Store(settings.table_name, region=settings.region)
        self.allowlist = AllowlistService(settings, store)
        self.devices = DeviceService(store)
        self.cas = ManufacturerCaService(store, IotRegistry(region=settings.region))
        self.signing_keys = SigningKeys(
            store, KmsKeys(region=settings.region), trust=KeyTrust.from_settings(settings)
        )
        self.introspection = IntrospectionService(settings, store, self.signing_keys)


@lru_cache(maxsize=1)
def services() -> Services:
    return Services(Settings.from_environ())


def _actor() -> str:
    """The IAM principal API Gateway authenticated (SigV4); recorded in audit records."""
    identity = app.current_event.request_context.identity
    return identity.user_arn or identity.caller or "unknown"


def _json_body() -> dict[str, Any]:
    try:
        body = json.loads(app.current_event.decoded_body or "")
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurd numbers or nesting
        raise InvalidRequest("request body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _created(payload: dict[str, Any]) -> Response[dict[str, Any]]:
    return Response(status_code=201, content_type=content_types.APPLICATION_JSON, body=payload)


@app.exception_handler(ClientError)
@app.exception_handler(BotoCoreError)
def _aws_error(exc: Exception) -> Response[Any]:
    """AWS failures that are not the caller's fault: 503 when a retry may succeed, 400 when AWS
    refused what the caller sent (e.g. a CA certificate AWS IoT will not register).

    Certificates never reach here unparsed: the services turn every parse failure of a
    certificate into InvalidCertificate (400) before any AWS call.

    Raises:
        the AWS error itself when it is neither (a 502: fleetkey's fault, logged by Lambda).
    """
    if is_transient(exc):
        return _error_response(TransientAwsError("AWS is unavailable; retry the request"))
    if isinstance(exc, ClientError) and error_code(exc) in CALLER_ERROR_CODES:
        return _error_response(InvalidRequest(f"AWS refused the request: {error_code(exc)}"))
    raise exc


@app.exception_handler(FleetkeyError)
def _fleetkey_error(exc: FleetkeyError) -> Response[Any]:
    return _error_response(exc)


def _error_response(exc: FleetkeyError) -> Response[Any]:
    """The JSON error body and status of a typed error; a 5xx is logged with its stack."""
    if exc.status >= 500:
        logger.exception("request failed", extra={"code": exc.code})
    body: dict[str, Any] = {"error": exc.code, "message": exc.message}
    if exc.details:
        body["details"] = exc.details
    return Response(status_code=exc.status, content_type=content_types.APPLICATION_JSON, body=body)


# ---- allow-list -------------------------------------------------------------------------------


@app.post("/allowlist")
def add_allowlist_entry() -> Response[dict[str, Any]]:
    device = services().allowlist.add(parse_entry(_json_body()), actor=_actor())
    return _created(device.to_public())


@app.post("/allowlist/import")
def import_manifest() -> dict[str, Any]:
    params = app.current_event.query_string_parameters or {}
    content_type = (app.current_event.headers.get("content-type") or "").lower()
    fmt = params.get("format") or ("csv" if "csv" in content_type else "json")
    try:
        text = app.current_event.decoded_body or ""
    except UnicodeDecodeError:
        raise InvalidRequest("manifest must be UTF-8 text") from None
    report = services().allowlist.import_manifest(text, fmt, actor=_actor())
    metrics.add_metric(name="AllowlistRowsImported", unit=MetricUnit.Count, value=report.imported)
    metrics.add_metric(
        name="AllowlistRowsRejected", unit=MetricUnit.Count, value=len(report.rejected)
    )
    return report.to_public()


# ---- devices and audit ------------------------------------------------------------------------


@app.get("/devices/<device_id>")
def get_device(device_id: str) -> dict[str, Any]:
    device_id = unquote(device_id)
    return services().devices.get(device_id).to_public()


def _audit(subject: str) -> dict[str, Any]:
    records, verification = services().devices.audit(subject)
    return {
        "subject": subject,
        "verified": True,
        "records": [
            {
                "seq": r.seq,
                "at": r.at,
                "action": r.action,
                "actor": r.actor,
                "details": r.details,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            }
            for r in records
        ],
        "head": {"seq": verification.head.seq, "hash": verification.head.hash},
    }


@app.get("/devices/<device_id>/audit")
def device_audit(device_id: str) -> dict[str, Any]:
    device_id = unquote(device_id)
    return _audit(f"device:{device_id}")


@app.get("/certificates/<certificate_id>/audit")
def certificate_audit(certificate_id: str) -> dict[str, Any]:
    certificate_id = unquote(certificate_id)
    return _audit(f"certificate:{certificate_id}")


@app.get("/cas/<name>/audit")
def ca_audit(name: str) -> dict[str, Any]:
    name = unquote(name)
    return _audit(f"ca:{name}")


@app.get("/audit-streams/<name>")
def stream_audit(name: str) -> dict[str, Any]:
    name = unquote(name)
    return _audit(f"stream:{name}")


# ---- manufacturer CAs -------------------------------------------------------------------------


@app.get("/cas")
def list_cas() -> dict[str, Any]:
    return {"cas": [ca.to_public() for ca in services().cas.list()]}


@app.get("/cas/registration-code")
def registration_code() -> dict[str, Any]:
    return {"registration_code": services().cas.registration_code()}


@app.post("/cas")
def register_ca() -> Response[dict[str, Any]]:
    body = _json_body()
    fields = ("name", "certificate_pem", "verification_certificate_pem")
    if not all(isinstance(body.get(f), str) for f in fields):
        raise InvalidRequest(f"body must have string fields {', '.join(fields)}")
    ca = services().cas.register(
        body["name"], body["certificate_pem"], body["verification_certificate_pem"], actor=_actor()
    )
    return _created(ca.to_public())


@app.get("/cas/<name>")
def get_ca(name: str) -> dict[str, Any]:
    name = unquote(name)
    return services().cas.get(name).to_public()


@app.post("/cas/<name>/disable")
def disable_ca(name: str) -> dict[str, Any]:
    name = unquote(name)
    return services().cas.set_enabled(name, False, actor=_actor()).to_public()


@app.post("/cas/<name>/enable")
def enable_ca(name: str) -> dict[str, Any]:
    name = unquote(name)
    return services().cas.set_enabled(name, True, actor=_actor()).to_public()


# ---- token signing keys and revocation -------------------------------------------------------


def _signing_keys_view() -> dict[str, Any]:
    return {
        "keys": [
            {
                "kid": k.kid,
                "key_id": k.key_id,
                "active_from": k.active_from,
                "retire_after": k.retire_after,
            }
            for k in services().signing_keys.keys()  # noqa: SIM118 (SigningKeys.keys, not a dict)
        ]
    }


@app.get("/signing-keys")
def list_signing_keys() -> dict[str, Any]:
    return _signing_keys_view()


@app.post("/signing-keys/rotate")
def rotate_signing_key() -> Response[dict[str, Any]]:
    key = services().signing_keys.rotate(actor=_actor())
    return _created({"kid": key.kid, "key_id": key.key_id, "active_from": key.active_from})


@app.post("/signing-keys/retire")
def retire_signing_keys() -> dict[str, Any]:
    return {"retired": services().signing_keys.retire_expired(actor=_actor())}


@app.post("/tokens/revoke")
def revoke_token() -> dict[str, Any]:
    jti = _json_body().get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 128 or not jti.isprintable():
        raise InvalidRequest('body must be {"jti": <the token\'s jti>}')
    until = services().introspection.revoke(jti, actor=_actor())
    return {"revoked": jti, "until": until}


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True
)
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
