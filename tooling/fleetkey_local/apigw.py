"""API Gateway REST proxy events, shaped as the deployed API sends them to a function.

What API Gateway does and this reproduces (checked against AWS's documented input format and the
sample events/admin-import-manifest-csv.json): `path` is the request path without the stage, still
percent-encoded; `resource` is the matched resource template; `pathParameters` hold the decoded
values of its variables (`{"proxy": "allowlist/import"}`); query parameters are decoded, the last
value in `queryStringParameters` and all of them in `multiValueQueryStringParameters`; headers
keep the client's spelling, the last value in `headers` and all of them in `multiValueHeaders`; a
binary body is base64 with `isBase64Encoded` true; the stage appears only in `requestContext`. On a
custom domain with mutual TLS, the client's certificate is in `requestContext.identity.clientCert`
(`client_cert_context`).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

ADMIN_RESOURCE = "/v1/admin/{proxy+}"
STAGE = "prod"
ACCOUNT = "123456789012"


def proxy_event(
    method: str,
    url_path: str,
    *,
    body: str | bytes | None = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    caller_arn: str | None = None,
    resource: str = ADMIN_RESOURCE,
    path_parameters: dict[str, str] | None = None,
    stage: str = STAGE,
    account: str = ACCOUNT,
    access_key: str | None = None,
    source_ip: str = "127.0.0.1",
    request_id: str | None = None,
    domain_name: str | None = None,
    client_cert: dict[str, Any] | None = None,
) -> dict:
    """The event API Gateway (REST, Lambda proxy integration) builds for one request.

    `url_path` is the path and query as sent (percent-encoded). `headers` is a mapping, or the
    (name, value) pairs as received when a header may repeat. `caller_arn` is the IAM principal
    API Gateway authenticated with SigV4; None means the request was not IAM-authenticated (only
    possible on routes without IAM authorization). `path_parameters` default to `{"proxy": ...}`
    for a `{proxy+}` resource. A `bytes` body is binary: it is sent base64-encoded. `client_cert`
    is the mutual-TLS client certificate's context (`client_cert_context`), on a custom domain
    with mutual TLS only.
    """
    parts = urlsplit(url_path)
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    multi_headers: dict[str, list[str]] = {}
    for name, value in pairs:
        multi_headers.setdefault(name, []).append(value)
    single_headers = {name: values[-1] for name, values in multi_headers.items()}
    multi_query: dict[str, list[str]] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        multi_query.setdefault(key, []).append(value)
    is_base64 = isinstance(body, bytes)
    if is_base64:
        body = base64.b64encode(body).decode()
    if path_parameters is None:
        path_parameters = _proxy_parameter(resource, parts.path)
    user_agent = next(
        (v for k, v in single_headers.items() if k.lower() == "user-agent"), "fleetkey-local"
    )
    principal_id = caller_arn.rsplit("/", 1)[-1] if caller_arn else None
    identity: dict[str, Any] = {
        "cognitoIdentityPoolId": None,
        "cognitoIdentityId": None,
        "cognitoAuthenticationType": None,
        "cognitoAuthenticationProvider": None,
        "apiKey": None,
        "apiKeyId": None,
        "principalOrgId": None,
        "accessKey": access_key if caller_arn else None,
        "accountId": account if caller_arn else None,
        "caller": principal_id,
        "userArn": caller_arn,
        "user": principal_id,
        "sourceIp": source_ip,
        "userAgent": user_agent,
    }
    if client_cert is not None:
        identity["clientCert"] = client_cert
    now = time.time()
    return {
        "resource": resource,
        "path": parts.path,
        "httpMethod": method.upper(),
        "headers": single_headers,
        "multiValueHeaders": multi_headers,
        "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": path_parameters or None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "local",
            "resourcePath": resource,
            "httpMethod": method.upper(),
            "extendedRequestId": f"local-{uuid.uuid4().hex[:12]}",
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "requestTimeEpoch": int(now * 1000),
            "path": f"/{stage}{parts.path}",
            "accountId": account,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": (domain_name or "local").split(".", 1)[0],
            "domainName": domain_name or "local",
            "requestId": request_id or str(uuid.uuid4()),
            "identity": identity,
            "apiId": "local",
        },
        "body": body,
        "isBase64Encoded": is_base64,
    }


def _proxy_parameter(resource: str, path: str) -> dict[str, str] | None:
    """`{"proxy": <rest of the path, decoded>}` for a resource ending in `{proxy+}`."""
    prefix, brace, variable = resource.partition("{")
    if not brace or not variable.endswith("+}") or not path.startswith(prefix):
        return None
    return {variable[:-2]: unquote(path[len(prefix) :])}


def client_cert_context(certificate_der: bytes) -> dict[str, Any]:
    """`requestContext.identity.clientCert` for a client certificate that passed API Gateway's
    mutual-TLS truststore: its PEM, its subject and issuer (RDNs in certificate order, as in AWS's
    documented sample `C=US,ST=Washington,...,CN=My Client`), its serial number (decimal) and
    its validity in OpenSSL's text form (`May 28 12:30:02 2019 GMT`). Only `clientCertPem` is
    authoritative: a function reads the certificate from it, not from the text fields.

    Raises:
        ValueError: `certificate_der` is not a DER certificate.
    """
    certificate = x509.load_der_x509_certificate(certificate_der)
    return {
        "clientCertPem": certificate.public_bytes(serialization.Encoding.PEM).decode(),
        "subjectDN": _distinguished_name(certificate.subject),
        "issuerDN": _distinguished_name(certificate.issuer),
        "serialNumber": str(certificate.serial_number),
        "validity": {
            "notBefore": _openssl_time(certificate.not_valid_before_utc),
            "notAfter": _openssl_time(certificate.not_valid_after_utc),
        },
    }


def _distinguished_name(name: x509.Name) -> str:
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _openssl_time(moment: datetime) -> str:
    """OpenSSL's ASN1_TIME_print form: `Aug  5 09:36:04 2021 GMT` (the day padded with a space;
    English month names whatever the locale)."""
    return f"{_MONTHS[moment.month - 1]} {moment.day:2d} {moment:%H:%M:%S} {moment.year} GMT"
