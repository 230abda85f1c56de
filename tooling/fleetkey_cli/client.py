"""A client of fleetkey's admin API. Requests to a deployed stack are signed with SigV4 (the API
is IAM-authenticated); the embedded stack is reached in-process through the same API Gateway
event shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import quote, urlencode


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: dict


class AdminApiError(Exception):
    def __init__(self, response: ApiResponse) -> None:
        self.response = response
        body = response.body or {}
        super().__init__(f"{response.status} {body.get('error', '')}: {body.get('message', body)}")


class Transport(Protocol):
    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse: ...


class SigV4Transport:
    """HTTPS to a deployed admin API (`endpoint` is the stage URL), signed for execute-api."""

    def __init__(self, endpoint: str, region: str, timeout: float = 30.0) -> None:
        import botocore.session

        self._endpoint = endpoint.rstrip("/")
        self._region = region
        self._timeout = timeout
        self._credentials = botocore.session.get_session().get_credentials()

    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        url = self._endpoint + path
        request = AWSRequest(method=method, url=url, data=(body or "").encode(), headers=headers)
        if self._credentials is None:
            raise SystemExit("no AWS credentials found for signing admin API requests")
        SigV4Auth(self._credentials.get_frozen_credentials(), "execute-api", self._region).add_auth(
            request
        )
        prepared = urllib.request.Request(
            url, data=request.body or None, method=method, headers=dict(request.headers)
        )
        try:
            with urllib.request.urlopen(prepared, timeout=self._timeout) as response:
                return ApiResponse(response.status, json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except json.JSONDecodeError:
                payload = {"error": "http_error", "message": exc.reason}
            return ApiResponse(exc.code, payload)
        except (urllib.error.URLError, TimeoutError) as exc:
            return ApiResponse(0, {"error": "unreachable", "message": f"{url}: {exc}"})


class InProcessTransport:
    """Calls an admin handler directly with the event API Gateway would send it."""

    def __init__(self, handler: Callable, caller_arn: str, context: object) -> None:
        self._handler = handler
        self._caller = caller_arn
        self._context = context

    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse:
        from fleetkey_local.apigw import proxy_event

        event = proxy_event(method, path, body=body, headers=headers, caller_arn=self._caller)
        response = self._handler(event, self._context)
        return ApiResponse(response["statusCode"], json.loads(response.get("body") or "{}"))


class AdminClient:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _call(self, method: str, path: str, body=None, content_type="application/json") -> dict:
        if body is not None and not isinstance(body, str):
            body = json.dumps(body)
        headers = {"content-type": content_type} if body is not None else {}
        response = self._transport(method, "/v1/admin" + path, body, headers)
        if response.status >= 400 or response.status == 0:
            raise AdminApiError(response)
        return response.body

    def add_entry(self, entry: dict) -> dict:
        return self._call("POST", "/allowlist", entry)

    def import_manifest(self, text: str, fmt: str) -> dict:
        content_type = "text/csv" if fmt == "csv" else "application/json"
        return self._call(
            "POST", "/allowlist/import?" + urlencode({"format": fmt}), text, content_type
        )

    def device(self, device_id: str) -> dict:
        return self._call("GET", f"/devices/{quote(device_id, safe='')}")

    def audit(self, subject: str) -> dict:
        paths = {"device": "/devices/{}/audit", "certificate": "/certificates/{}/audit",
                 "ca": "/cas/{}/audit", "stream": "/audit-streams/{}"}
        kind, _, name = subject.partition(":")
        if kind not in paths or not name:
            kind, name = "device", subject  # device ids may themselves contain ':'
        return self._call("GET", paths[kind].format(quote(name, safe="")))

    def registration_code(self) -> str:
        return self._call("GET", "/cas/registration-code")["registration_code"]

    def register_ca(self, name: str, certificate_pem: str, verification_pem: str) -> dict:
        return self._call(
            "POST",
            "/cas",
            {"name": name, "certificate_pem": certificate_pem,
             "verification_certificate_pem": verification_pem},
        )

    def list_cas(self) -> list[dict]:
        return self._call("GET", "/cas")["cas"]

    def set_ca_enabled(self, name: str, enabled: bool) -> dict:
        return self._call("POST", f"/cas/{quote(name, safe='')}/{'enable' if enabled else 'disable'}")
