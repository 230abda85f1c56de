"""API Gateway REST proxy events, shaped as the deployed API sends them to a function."""

from __future__ import annotations

import base64
import time
import uuid
from urllib.parse import parse_qsl, urlsplit

ADMIN_RESOURCE = "/v1/admin/{proxy+}"


def proxy_event(
    method: str,
    url_path: str,
    *,
    body: str | bytes | None = None,
    headers: dict[str, str] | None = None,
    caller_arn: str | None = None,
    resource: str = ADMIN_RESOURCE,
    stage: str = "prod",
    account: str = "123456789012",
) -> dict:
    """The event API Gateway (REST, Lambda proxy integration) builds for one request.

    `caller_arn` is the IAM principal API Gateway authenticated with SigV4; None means the
    request was not IAM-authenticated (only possible on routes without IAM authorization).
    """
    parts = urlsplit(url_path)
    query = parse_qsl(parts.query, keep_blank_values=True)
    headers = dict(headers or {})
    multi_query: dict[str, list[str]] = {}
    for key, value in query:
        multi_query.setdefault(key, []).append(value)
    is_base64 = isinstance(body, bytes)
    if is_base64:
        body = base64.b64encode(body).decode()
    prefix = resource.split("{", 1)[0]
    proxy = parts.path[len(prefix) :] if parts.path.startswith(prefix) else None
    return {
        "resource": resource,
        "path": parts.path,
        "httpMethod": method.upper(),
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": {"proxy": proxy} if proxy is not None else None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "local",
            "resourcePath": resource,
            "httpMethod": method.upper(),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime()),
            "requestTimeEpoch": int(time.time() * 1000),
            "path": f"/{stage}{parts.path}",
            "accountId": account,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "requestId": str(uuid.uuid4()),
            "identity": {
                "accountId": account if caller_arn else None,
                "caller": caller_arn.rsplit("/", 1)[-1] if caller_arn else None,
                "userArn": caller_arn,
                "user": caller_arn.rsplit("/", 1)[-1] if caller_arn else None,
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("user-agent", "fleetkey-local"),
            },
            "apiId": "local",
        },
        "body": body,
        "isBase64Encoded": is_base64,
    }
