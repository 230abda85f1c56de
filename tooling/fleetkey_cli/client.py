"""A client of fleetkey's admin API. Requests are signed with SigV4 for execute-api, as the API is
IAM-authenticated: a deployed stack's with the standard AWS credential chain, the local stack's
(`make serve`, http://127.0.0.1:8080) with its own local credentials when no others are
configured. Tests and the demo can also reach the admin handler in-process, through the same
API Gateway event shape.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlencode, urlsplit

# Where `make serve` puts the local API gateway (fleetkey_local.api_gateway.DEFAULT_PORT).
LOCAL_ENDPOINT = "http://127.0.0.1:8080"


def is_loopback(endpoint: str) -> bool:
    """True for an endpoint on this machine (127.0.0.0/8, ::1, localhost): the local stack."""
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configured_credentials(*, instance_metadata: bool = True):
    """The standard AWS credential chain's credentials, or None. Without `instance_metadata`
    the EC2/container metadata endpoints are not asked (they take seconds to time out on a
    machine that is not in AWS)."""
    import botocore.session

    session = botocore.session.get_session()
    if not instance_metadata:
        resolver = session.get_component("credential_provider")
        for name in ("iam-role", "container-role"):
            resolver.remove(name)
    return session.get_credentials()


def local_credentials():
    """The local stack's credentials (fleetkey_local.server.FAKE_CREDENTIALS): only the local
    API gateway accepts them."""
    from botocore.credentials import Credentials

    from fleetkey_local.server import FAKE_CREDENTIALS

    return Credentials(
        FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        FAKE_CREDENTIALS.get("AWS_SESSION_TOKEN"),
    )


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: dict


class AdminApiError(Exception):
    def __init__(self, response: ApiResponse) -> None:
        self.response = response
        body = response.body or {}
        # fleetkey's errors carry a code; API Gateway's own answers (403, 413, 502) only a message.
        code = f" {body['error']}" if body.get("error") else ""
        super().__init__(f"{response.status}{code}: {body.get('message', body)}")


class Transport(Protocol):
    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse: ...


class SigV4Transport:
    """HTTP(S) to an admin API signed for execute-api: `endpoint` is a deployed stage URL or the
    local gateway's URL. `credentials` (botocore credentials) default to the standard chain's."""

    def __init__(self, endpoint: str, region: str, timeout: float = 30.0, credentials=None) -> None:
        if urlsplit(endpoint).scheme not in ("http", "https"):
            raise SystemExit(f"the admin API endpoint must be an http(s) URL, not {endpoint!r}")
        self._endpoint = endpoint.rstrip("/")
        self._region = region
        self._timeout = timeout
        self._credentials = credentials if credentials is not None else configured_credentials()
        # Never send a request for this machine to a proxy ($HTTP_PROXY) elsewhere.
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(endpoint) else []
        self._opener = urllib.request.build_opener(*handlers)

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
        # the endpoint's scheme is http(s), checked in __init__
        prepared = urllib.request.Request(  # noqa: S310
            url, data=request.body or None, method=method, headers=dict(request.headers)
        )
        try:
            with self._opener.open(prepared, timeout=self._timeout) as response:
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
    """Calls an admin handler directly with the event API Gateway would send it.

    With `functions` (function name -> handler, e.g. {"admin": ..., "rotation": ...}) a request
    goes to the function the API's routes give it (`fleetkey_local.api_gateway.ROUTES`: the
    `/v1/admin/pki` routes are the rotation function's), with that route's resource and path
    parameters; `handler` is then unused."""

    def __init__(
        self,
        handler: Callable | None,
        caller_arn: str,
        context: object,
        functions: dict[str, Callable] | None = None,
    ) -> None:
        self._handler = handler
        self._caller = caller_arn
        self._context = context
        self._functions = functions

    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse:
        from fleetkey_local.apigw import ADMIN_RESOURCE, proxy_event

        handler, resource, parameters = self._handler, ADMIN_RESOURCE, None
        if self._functions is not None:
            from fleetkey_local.api_gateway import GatewayError, LocalApiGateway

            try:
                route, parameters = LocalApiGateway(functions=self._functions).resolve(
                    method, urlsplit(path).path
                )
            except GatewayError as error:  # no route: API Gateway's own answer
                return ApiResponse(error.status, {"message": error.message})
            handler, resource = self._functions[route.function], route.resource
        event = proxy_event(
            method,
            path,
            body=body,
            headers=headers,
            caller_arn=self._caller,
            resource=resource,
            path_parameters=parameters,
        )
        response = handler(event, self._context)
        return ApiResponse(response["statusCode"], json.loads(response.get("body") or "{}"))


def _segment(value: str) -> str:
    """One path segment, percent-encoded. ':' stays as it is (legal in a path segment): the admin
    API matches the path as sent, and device ids may contain ':'."""
    return quote(value, safe=":")


def _request(
    transport: Transport, method: str, path: str, body=None, content_type="application/json"
) -> dict:
    """One request to the API; its JSON answer. Raises AdminApiError for an error answer (or
    none: status 0)."""
    if body is not None and not isinstance(body, str):
        body = json.dumps(body)
    headers = {"content-type": content_type} if body is not None else {}
    response = transport(method, path, body, headers)
    if response.status >= 400 or response.status == 0:
        raise AdminApiError(response)
    return response.body


class AdminClient:
    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def transport(self) -> Transport:
        """The transport, for the API's other routes (`RelyingPartyClient`)."""
        return self._transport

    def _call(self, method: str, path: str, body=None, content_type="application/json") -> dict:
        return _request(self._transport, method, "/v1/admin" + path, body, content_type)

    def add_entry(self, entry: dict) -> dict:
        return self._call("POST", "/allowlist", entry)

    def import_manifest(self, text: str, fmt: str) -> dict:
        content_type = "text/csv" if fmt == "csv" else "application/json"
        return self._call(
            "POST", "/allowlist/import?" + urlencode({"format": fmt}), text, content_type
        )

    def device(self, device_id: str) -> dict:
        return self._call("GET", f"/devices/{_segment(device_id)}")

    def suspend(self, device_id: str, reason: str) -> dict:
        return self._call("POST", f"/devices/{_segment(device_id)}/suspend", {"reason": reason})

    def resume(self, device_id: str) -> dict:
        return self._call("POST", f"/devices/{_segment(device_id)}/resume", {})

    def decommission(self, device_id: str, reason: str) -> dict:
        """The device, DECOMMISSIONED, its teardown pending (the API answers 202)."""
        return self._call(
            "POST", f"/devices/{_segment(device_id)}/decommission", {"reason": reason}
        )

    def recommission(
        self, device_id: str, owner: str | None = None, profile: str | None = None
    ) -> dict:
        """Only the fields given are sent (one left out keeps its value); an empty one is sent,
        for the API to refuse."""
        fields = (("owner", owner), ("profile", profile))
        body = {name: value for name, value in fields if value is not None}
        return self._call("POST", f"/devices/{_segment(device_id)}/recommission", body)

    def data_key(self, device_id: str) -> dict:
        return self._call("GET", f"/devices/{_segment(device_id)}/data-key")

    def audit(self, subject: str) -> dict:
        paths = {
            "device": "/devices/{}/audit",
            "certificate": "/certificates/{}/audit",
            "ca": "/cas/{}/audit",
            "stream": "/audit-streams/{}",
        }
        kind, _, name = subject.partition(":")
        if kind not in paths or not name:
            kind, name = "device", subject  # device ids may themselves contain ':'
        return self._call("GET", paths[kind].format(_segment(name)))

    def registration_code(self) -> str:
        return self._call("GET", "/cas/registration-code")["registration_code"]

    def register_ca(self, name: str, certificate_pem: str, verification_pem: str) -> dict:
        return self._call(
            "POST",
            "/cas",
            {
                "name": name,
                "certificate_pem": certificate_pem,
                "verification_certificate_pem": verification_pem,
            },
        )

    def signing_keys(self) -> dict:
        return self._call("GET", "/signing-keys")

    def rotate_signing_key(self) -> dict:
        return self._call("POST", "/signing-keys/rotate")

    def retire_signing_keys(self) -> dict:
        return self._call("POST", "/signing-keys/retire")

    def revoke_token(self, jti: str) -> dict:
        return self._call("POST", "/tokens/revoke", {"jti": jti})

    # ---- fleetkey's issuing CA and certificate rotation ----------------------------------------

    def pki_init(
        self,
        key_spec: str | None = None,
        subject: str | None = None,
        validity_days: int | None = None,
    ) -> dict:
        """Creates the issuing CA: a KMS key and a self-signed CA certificate. Only the fields
        given are sent (the API's defaults: ECC_NIST_P256, "CN=fleetkey issuing CA", 3650)."""
        fields = (("key_spec", key_spec), ("subject", subject), ("validity_days", validity_days))
        return self._call("POST", "/pki/init", {k: v for k, v in fields if v is not None})

    def pki_csr(self, key_spec: str | None = None, subject: str | None = None) -> dict:
        """A CSR for a subordinate issuing CA (its key created in KMS): `{"csr_pem", "key_id"}`."""
        fields = (("key_spec", key_spec), ("subject", subject))
        return self._call("POST", "/pki/csr", {k: v for k, v in fields if v is not None})

    def pki_install(self, certificate_pem: str, chain_pem: str) -> dict:
        """Installs the CA certificate signed for the CSR, with its chain up to the root."""
        return self._call(
            "POST", "/pki/install", {"certificate_pem": certificate_pem, "chain_pem": chain_pem}
        )

    def pki(self) -> dict:
        return self._call("GET", "/pki")

    def rotation_status(self, device_id: str) -> dict:
        return self._call("GET", f"/devices/{_segment(device_id)}/rotation")

    def list_cas(self) -> list[dict]:
        return self._call("GET", "/cas")["cas"]

    def set_ca_enabled(self, name: str, enabled: bool) -> dict:
        return self._call("POST", f"/cas/{_segment(name)}/{'enable' if enabled else 'disable'}")

    # ---- firmware releases --------------------------------------------------------------------

    def publish_firmware(self, profile: str, version: str, sha256: str) -> dict:
        """The release (the API answers 201, or 200 when it was already published the same)."""
        return self._call(
            "POST", "/firmware", {"profile": profile, "version": version, "sha256": sha256}
        )

    def revoke_firmware(self, profile: str, sha256: str, reason: str | None = None) -> dict:
        body = {"reason": reason} if reason is not None else {}
        return self._call("POST", f"/firmware/{_segment(profile)}/{_segment(sha256)}/revoke", body)

    def firmware_release(self, profile: str, sha256: str) -> dict:
        return self._call("GET", f"/firmware/{_segment(profile)}/{_segment(sha256)}")

    def list_firmware(self, profile: str | None = None) -> list[dict]:
        query = "?" + urlencode({"profile": profile}) if profile is not None else ""
        return self._call("GET", "/firmware" + query)["releases"]


class RelyingPartyClient:
    """What an application (a relying party) calls: validations (IAM-signed, like the admin
    API; a result is readable only by the principal that asked for it) and the public
    discovery documents its offline verification needs."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def request_validation(
        self,
        device_id: str,
        purpose: str,
        audience: str,
        *,
        require_attestation: bool = False,
        expires_in: int | None = None,
    ) -> dict:
        """`{"validation_id", "expires_at", ...}`: the device was sent a validate command
        (unless it is not ACTIVE: then the validation is refused already)."""
        body: dict = {
            "device_id": device_id,
            "purpose": purpose,
            "audience": audience,
            "require_attestation": require_attestation,
        }
        if expires_in is not None:
            body["expires_in"] = expires_in
        return _request(self._transport, "POST", "/v1/validations", body)

    def validation(self, validation_id: str, wait: int = 0) -> dict:
        """The validation as of now; while it is pending, the API holds the answer up to
        `wait` seconds (0-20) for a change."""
        query = "?" + urlencode({"wait": wait}) if wait else ""
        return _request(self._transport, "GET", f"/v1/validations/{_segment(validation_id)}{query}")

    def jwks(self) -> dict:
        return _request(self._transport, "GET", "/.well-known/jwks.json")

    def metadata(self) -> dict:
        """The authorization server's metadata (RFC 8414): its `issuer`, among others."""
        return _request(self._transport, "GET", "/.well-known/oauth-authorization-server")
