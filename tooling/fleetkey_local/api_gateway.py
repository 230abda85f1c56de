"""The local API gateway: fleetkey's HTTP API on 127.0.0.1, in front of the real handlers.

It plays API Gateway's part for the embedded stack: it routes each request by the same resources
and methods as the deployed REST API, authenticates IAM routes with SigV4 as API Gateway does
(known local credentials only), turns the request into the REST proxy event the deployed API
would send (`fleetkey_local.apigw.proxy_event`), invokes the function's handler, and turns the
proxy result back into an HTTP response. API Gateway's own answers keep their shape and status:
403 `Missing Authentication Token` for an unknown resource or method, 403 for a bad signature,
413 for a body over 10 MB (or an event over Lambda's 6 MB), 502 `Internal server error` when the
function fails.

The deployed API's edge (`fleetkey_infra.edge`) is enforced too: the REST API's resource policy
admits to `/v1/admin/*` only the operators and to `/v1/introspect` and `/v1/validations` only the
relying parties, and holds each operator role to its scope (the release role to the firmware
routes, the auditor to GET); any other signed caller gets API Gateway's 403
`AccessDeniedException` "... with an explicit deny". The local principals: the local operator
(the local stack's credentials, every admin route: the CLI's default), the local relying party,
and one assumed-role session per operator role (`local_operator_role`: access key and secret
`fleetkey-local-fleet-admin`, `-release`, `-auditor`). The WAF web ACL's per-client limits, when
the gateway is given them (`make serve` is), answer
a client (by its peer address; `X-Forwarded-For` is ignored, as WAF's IP aggregation ignores it)
over its limit `429` with `Retry-After` and `{"message": "Too Many Requests"}`, before routing. A
token bucket per client and limit stands in for WAF's sliding window: `limit` requests at once,
then `limit` per window.

Binary payloads follow the REST API's `binaryMediaTypes` (`BINARY_MEDIA_TYPES`): a request body
whose Content-Type is one of them reaches the function base64 (`isBase64Encoded`), other bodies as
text (one that is not UTF-8 goes base64 too, where API Gateway would mangle it); a proxy result
with `isBase64Encoded` is decoded to bytes when the request's first Accept media type is a binary
media type, and sent as its base64 text otherwise (`Accept: */*` included), as API Gateway does.
A request without an Accept header gets the bytes (AWS does not document that case).

`MutualTlsDomain` serves the same API over HTTPS with client certificates, as the EST custom domain
with mutual TLS does (the whole API mapped at its root: `fleetkey_infra.constructs.rotation`): the
client certificate that passed its truststore reaches the function in
`requestContext.identity.clientCert` (EST's simplereenroll authenticates the device by it). A
certificate the truststore does not trust ends the connection in the handshake, as there.

Differences from AWS, on purpose: URLs have no stage prefix (`http://127.0.0.1:8080/v1/...`, like
a custom domain); identity policies are not evaluated (every known local principal is as if its
own policy allowed `execute-api:Invoke`, so only the resource policy's Deny refuses one); stage
and method throttling are not emulated; each function runs one invocation at a time (one warm
instance), all of them in one process (Powertools' event and context, one per process in Lambda,
are one per thread here). On the mutual-TLS domain a client certificate may be left out (`make
serve`: RFC 7030 lets cacerts be anonymous; API Gateway's mutual TLS requires one, and anonymous
clients use the default endpoint), and the truststore is whatever `make serve` reads live (AWS
IoT's registered CAs and the issuing CA's chain), where the deployed one is an S3 object an
operator updates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import posixpath
import re
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

from fleetkey_infra.edge import (
    OPERATOR_ROLES,
    RATE_LIMITED_MESSAGE,
    RATE_LIMITED_STATUS,
    Audience,
    EdgeConfig,
    RateLimit,
    RoleDeny,
    operator_role_denies,
)
from fleetkey_local.apigw import ACCOUNT, STAGE, client_cert_context, proxy_event
from fleetkey_local.provision import NAME_PREFIX
from fleetkey_local.server import FAKE_CREDENTIALS
from fleetkey_local.stack import REGION

log = logging.getLogger(__name__)

AWS_IAM = "AWS_IAM"
NONE = "NONE"
SERVICE = "execute-api"
DEFAULT_PORT = 8080
DEFAULT_MUTUAL_TLS_PORT = 8443
TLS_HANDSHAKE_TIMEOUT = 10.0
# The REST API's binaryMediaTypes (infra/fleetkey_infra/constructs/api.py; the template test holds
# both to the same list): the CRL is DER.
BINARY_MEDIA_TYPES: tuple[str, ...] = ("application/pkix-crl",)
MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway's request payload limit (REST APIs)
MAX_EVENT_BYTES = 6 * 1024 * 1024  # Lambda's synchronous invocation payload limit
CLOCK_SKEW = timedelta(minutes=5)
# A client that keeps sending past the limit is read to this point (so it sees the 413) and then
# disconnected.
_DRAIN_LIMIT = 4 * MAX_BODY_BYTES
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


# A Lambda handler: (event, context) -> proxy result.
Handler = Callable[[dict[str, Any], object], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    """One method on one API Gateway resource: `method` is an HTTP method or ANY, `resource` a
    resource template (`/v1/devices/{device_id}/certificates`, `/v1/admin/{proxy+}`),
    `authorization` AWS_IAM or NONE."""

    method: str
    resource: str
    function: str
    authorization: str = NONE

    def __post_init__(self) -> None:
        if self.authorization not in (AWS_IAM, NONE):
            raise ValueError(f"authorization must be {AWS_IAM} or {NONE}")
        if self.method != "ANY" and self.method not in _METHODS:
            raise ValueError(f"unsupported method {self.method}")

    @property
    def segments(self) -> list[str]:
        return self.resource.strip("/").split("/") if self.resource != "/" else []

    def path_parameters(self, segments: list[str]) -> dict[str, str] | None:
        """The decoded path parameters if the (still encoded) path segments fit the resource."""
        params: dict[str, str] = {}
        template = self.segments
        for i, part in enumerate(template):
            if part.startswith("{") and part.endswith("+}"):  # greedy: the rest, at least one
                if i != len(template) - 1 or len(segments) <= i or not segments[i]:
                    return None
                params[part[1:-2]] = unquote("/".join(segments[i:]))
                return params
            if i >= len(segments):
                return None
            if part.startswith("{") and part.endswith("}"):
                if not segments[i]:
                    return None
                params[part[1:-1]] = unquote(segments[i])
            elif unquote(segments[i]) != part:
                return None
        return params if len(segments) == len(template) else None

    @property
    def specificity(self) -> tuple[int, ...]:
        """API Gateway prefers literal segments to variables, and variables to greedy ones."""
        return tuple(
            2 if p.endswith("+}") else 1 if p.startswith("{") else 0 for p in self.segments
        )


# The deployed API's routes (infra/fleetkey_infra/constructs/api.py; the integration test
# tests/integration/test_local_matches_template.py holds both to the same list).
ROUTES: tuple[Route, ...] = (
    # Device-facing, public: devices authenticate to the token endpoint with a signed assertion.
    Route("POST", "/v1/token", "token", NONE),
    Route("POST", "/v1/challenge", "token", NONE),
    Route("GET", "/.well-known/jwks.json", "discovery", NONE),
    Route("GET", "/.well-known/oauth-authorization-server", "discovery", NONE),
    # A device's data key, sealed to its certificate key: the client assertion (as for /v1/token)
    # authenticates the device. The per-client limits cover it as the edge's rate limits say.
    Route("POST", "/v1/devices/{device_id}/data-key", "data_keys", NONE),
    # Certificate rotation: a device asks for a certificate with a CSR and an assertion by its
    # current key, and may commit it with an assertion by the new key (connecting with it commits
    # too). The issuing CA's chain and CRL are public, as relying parties and devices fetch them.
    Route("POST", "/v1/devices/{device_id}/certificates", "rotation", NONE),
    Route("POST", "/v1/devices/{device_id}/certificates/{certificate_id}/commit", "rotation", NONE),
    Route("GET", "/v1/pki/ca", "rotation", NONE),
    Route("GET", "/v1/pki/crl", "rotation", NONE),
    # EST (RFC 7030) for stock clients: cacerts is anonymous; simplereenroll authenticates the
    # device by its TLS client certificate (a custom domain with mutual TLS: MutualTlsDomain).
    Route("GET", "/.well-known/est/cacerts", "rotation", NONE),
    Route("POST", "/.well-known/est/simplereenroll", "rotation", NONE),
    # Relying parties and operators: IAM (SigV4).
    Route("POST", "/v1/introspect", "introspect", AWS_IAM),
    # A relying party asks a device to prove itself now, then reads the result (long-polled).
    Route("POST", "/v1/validations", "validations", AWS_IAM),
    Route("GET", "/v1/validations/{validation_id}", "validations", AWS_IAM),
    Route("ANY", "/v1/admin/{proxy+}", "admin", AWS_IAM),
    # The issuing CA's administration: /v1/admin/pki itself (a greedy resource needs one more
    # segment) and below it, more specific than /v1/admin/{proxy+}, so they win.
    Route("ANY", "/v1/admin/pki", "rotation", AWS_IAM),
    Route("ANY", "/v1/admin/pki/{proxy+}", "rotation", AWS_IAM),
)


@dataclass(frozen=True)
class LocalPrincipal:
    """An IAM principal the local gateway knows, by its credentials. `arn` is the caller as API
    Gateway reports it (`requestContext.identity.userArn`: a user, or an assumed-role session);
    `role_arn` is a session's role, its `aws:PrincipalArn`, which the resource policy matches."""

    arn: str
    access_key: str
    secret_key: str
    session_token: str | None = None
    role_arn: str | None = None

    @property
    def principal_arn(self) -> str:
        """`aws:PrincipalArn`: a role session's role, else the principal itself."""
        return self.role_arn or self.arn


LOCAL_OPERATOR_ARN = f"arn:aws:iam::{ACCOUNT}:user/fleetkey-local-operator"
LOCAL_RELYING_PARTY_ARN = f"arn:aws:iam::{ACCOUNT}:user/fleetkey-local-relying-party"
LOCAL_RELYING_PARTY_KEY = "fleetkey-local-relying-party"  # access key and secret


def local_operator() -> LocalPrincipal:
    """The local stack's credentials (`fleetkey_local.server.FAKE_CREDENTIALS`), whose requests
    are the local operator's."""
    return LocalPrincipal(
        arn=LOCAL_OPERATOR_ARN,
        access_key=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        session_token=FAKE_CREDENTIALS.get("AWS_SESSION_TOKEN"),
    )


def local_relying_party() -> LocalPrincipal:
    """A second local identity: a relying party, admitted to introspection and not an operator
    (API Gateway's 403 on the admin routes)."""
    return LocalPrincipal(
        arn=LOCAL_RELYING_PARTY_ARN,
        access_key=LOCAL_RELYING_PARTY_KEY,
        secret_key=LOCAL_RELYING_PARTY_KEY,
    )


# The operator roles' sessions: the roles are named as the stack names them (the local stack's
# name prefix), the session as the local stack.
LOCAL_ROLE_SESSION = "fleetkey-local"
OPERATOR_ROLE_NAMES = tuple(role.name for role in OPERATOR_ROLES)


def local_operator_role(name: str) -> LocalPrincipal:
    """A session of the operator role `name` (`fleet-admin`, `release`, `auditor`), signing with
    access key and secret `fleetkey-local-<name>` (no session token: SigV4 does not need one)."""
    [role] = [r for r in OPERATOR_ROLES if r.name == name]
    role_name = role.role_name(NAME_PREFIX)
    key = f"fleetkey-local-{name}"
    return LocalPrincipal(
        arn=f"arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{LOCAL_ROLE_SESSION}",
        access_key=key,
        secret_key=key,
        role_arn=role.arn("aws", ACCOUNT, NAME_PREFIX),
    )


def local_principals() -> list[LocalPrincipal]:
    """Every identity the local gateway knows: the local operator, the local relying party, and
    a session of each operator role."""
    return [
        local_operator(),
        local_relying_party(),
        *(local_operator_role(name) for name in OPERATOR_ROLE_NAMES),
    ]


# The local stack's edge configuration: the deployed one's rules, naming the local principals.
# The local operator may also introspect and validate (README's curl example signs with one
# credential, and the CLI's `validate` signs as the local operator by default).
LOCAL_EDGE = EdgeConfig(
    operator_principals=(LOCAL_OPERATOR_ARN,),
    relying_party_principals=(LOCAL_OPERATOR_ARN, LOCAL_RELYING_PARTY_ARN),
)
LOCAL_EDGE.check_account(ACCOUNT)  # as synthesis refuses principals of another account
# The operator roles are operators, each held to its scope, as the stack's resource policy says.
LOCAL_AUDIENCES = LOCAL_EDGE.audiences("aws", ACCOUNT, NAME_PREFIX)
LOCAL_ROLE_DENIES = operator_role_denies("aws", ACCOUNT, NAME_PREFIX)


class _PerThread:
    """A Powertools router attribute kept per thread (and asyncio task) instead of per process:
    the local gateway runs every function in one process, where a request to one function would
    otherwise read another's event. Unset, it raises AttributeError, as the class attribute."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._value: ContextVar[Any] = ContextVar(f"powertools_router_{name}")

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        try:
            return self._value.get()
        except LookupError:
            raise AttributeError(self.name) from None

    def __set__(self, instance: object, value: Any) -> None:
        self._value.set(value)


# BaseRouter's attributes that hold the invocation being resolved (Powertools 3.37: `resolve`
# sets both on the class; `Router` reads them through its resolver or the class). The rest of a
# resolver's request state (`context`, `processed_stack_frames`) is its own, and each resolver
# serves one function, which the gateway runs one invocation at a time.
_ROUTER_INVOCATION_STATE = ("current_event", "lambda_context")
_router_state_lock = threading.Lock()


def isolate_router_state() -> None:
    """Give each thread of this process its own Powertools router event and context (idempotent;
    local only: in Lambda a process runs one invocation at a time). The descriptors in BaseRouter
    serve reads and writes through a resolver or router; its metaclass gets the same ones, as
    `resolve` assigns on the class (`BaseRouter.current_event = ...`), which would otherwise
    replace them."""
    from aws_lambda_powertools.event_handler.api_gateway import BaseRouter

    with _router_state_lock:
        if isinstance(vars(BaseRouter).get(_ROUTER_INVOCATION_STATE[0]), _PerThread):
            return
        slots = {name: _PerThread(name) for name in _ROUTER_INVOCATION_STATE}
        for name, slot in slots.items():
            setattr(BaseRouter, name, slot)
        base_meta = type(BaseRouter)
        per_thread = type(f"PerThread{base_meta.__name__}", (base_meta,), dict(slots))
        BaseRouter.__class__ = per_thread  # type: ignore[method-assign]


class GatewayError(Exception):
    """An answer API Gateway (or the WAF in front of it) gives itself, before or instead of the
    integration."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = tuple(headers)


def _missing_token() -> GatewayError:
    return GatewayError(403, "Missing Authentication Token", "MissingAuthenticationTokenException")


class _Headers:
    """Request headers as received: case-insensitive names, every value of a repeated header."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._values: dict[str, list[str]] = {}
        for name, value in self.pairs:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str) -> str | None:
        values = self._values.get(name.lower())
        return values[-1] if values else None

    def get_all(self, name: str) -> list[str]:
        return self._values.get(name.lower(), [])


class _SignedRequest(SigV4Auth):
    """botocore's SigV4 computation, over exactly the headers the client signed (botocore would
    add `host` and skip some headers it never signs itself)."""

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name, value in request.headers.items():
            headers[name.lower()] = value
        return headers


_AUTHORIZATION = re.compile(r"^AWS4-HMAC-SHA256\s+(?P<params>.*)$", re.DOTALL)


class SigV4Verifier:
    """Authenticates requests signed with AWS Signature Version 4 for `execute-api`, as API
    Gateway does for methods with IAM authorization, against a fixed set of principals."""

    def __init__(
        self,
        principals: Iterable[LocalPrincipal],
        region: str = REGION,
        service: str = SERVICE,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._principals = {p.access_key: p for p in principals}
        self._region = region
        self._service = service
        self._clock = clock

    def authenticate(
        self, method: str, target: str, headers: _Headers, body: bytes
    ) -> LocalPrincipal:
        """The principal that signed the request. Raises GatewayError (403) otherwise."""
        authorization = headers.get("authorization")
        if not authorization:
            raise _missing_token()
        match = _AUTHORIZATION.match(authorization.strip())
        if not match:
            raise GatewayError(
                403,
                f"Authorization header requires the AWS4-HMAC-SHA256 algorithm. "
                f"Authorization={authorization}",
                "IncompleteSignatureException",
            )
        params = {}
        for part in re.split(r"\s*,\s*", match["params"].strip()):
            name, _, value = part.partition("=")
            params[name.strip()] = value.strip()
        amz_date = headers.get("x-amz-date") or ""
        problems = [
            f"Authorization header requires '{name}' parameter."
            for name in ("Credential", "Signature", "SignedHeaders")
            if not params.get(name)
        ]
        if not amz_date:
            problems.append("Authorization header requires existence of a 'X-Amz-Date' header.")
        if problems:
            raise GatewayError(
                403,
                " ".join(problems) + f" Authorization={authorization}",
                "IncompleteSignatureException",
            )
        scope = params["Credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise GatewayError(
                403,
                f"Credential should be scoped to a valid region. Credential={params['Credential']}",
                "IncompleteSignatureException",
            )
        access_key, scope_date, scope_region, scope_service, _ = scope
        principal = self._principals.get(access_key)
        if principal is None:
            raise GatewayError(
                403,
                "The security token included in the request is invalid.",
                "UnrecognizedClientException",
            )
        self._check_date(amz_date)
        if scope_date != amz_date[:8]:
            raise GatewayError(
                403,
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                f"from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.",
                "InvalidSignatureException",
            )
        if scope_region != self._region:
            raise GatewayError(
                403,
                f"Credential should be scoped to a valid region. Expected '{self._region}'.",
                "InvalidSignatureException",
            )
        if scope_service != self._service:
            raise GatewayError(
                403,
                f"Credential should be scoped to correct service: '{self._service}'.",
                "InvalidSignatureException",
            )
        token = headers.get("x-amz-security-token")
        if token is not None and not (
            principal.session_token
            and hmac.compare_digest(token.encode(), principal.session_token.encode())
        ):
            raise GatewayError(
                403,
                "The security token included in the request is invalid.",
                "UnrecognizedClientException",
            )
        expected, canonical, string_to_sign = self._signature(
            principal, method, target, headers, body, params["SignedHeaders"], amz_date
        )
        if not hmac.compare_digest(expected.encode(), params["Signature"].encode()):
            raise GatewayError(
                403,
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method. Consult the service "
                "documentation for details.\n\nThe Canonical String for this request should "
                f"have been\n'{canonical}'\n\nThe String-to-Sign should have been\n"
                f"'{string_to_sign}'\n",
                "InvalidSignatureException",
            )
        return principal

    def _check_date(self, amz_date: str) -> None:
        try:
            signed_at = datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        except ValueError:
            raise GatewayError(
                403,
                f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'.",
                "IncompleteSignatureException",
            ) from None
        now = self._clock()

        def stamp(moment: datetime) -> str:
            return moment.strftime(SIGV4_TIMESTAMP)

        if signed_at < now - CLOCK_SKEW:
            raise GatewayError(
                403,
                f"Signature expired: {amz_date} is now earlier than {stamp(now - CLOCK_SKEW)} "
                f"({stamp(now)} - 5 min.)",
                "InvalidSignatureException",
            )
        if signed_at > now + CLOCK_SKEW:
            raise GatewayError(
                403,
                f"Signature not yet current: {amz_date} is still later than "
                f"{stamp(now + CLOCK_SKEW)} ({stamp(now)} + 5 min.)",
                "InvalidSignatureException",
            )

    def _signature(
        self,
        principal: LocalPrincipal,
        method: str,
        target: str,
        headers: _Headers,
        body: bytes,
        signed_headers: str,
        amz_date: str,
    ) -> tuple[str, str, str]:
        """Recompute the signature of the request as received, at the request's own X-Amz-Date
        (SigV4Auth.add_auth would sign at the current time)."""
        signed = {}
        for name in signed_headers.split(";"):
            values = headers.get_all(name)
            if values:
                signed[name.lower()] = ",".join(values)
        # A client may sign a body hash instead of the body; it must be this body's hash.
        declared_hash = headers.get("x-amz-content-sha256")
        if declared_hash is not None and declared_hash != hashlib.sha256(body).hexdigest():
            signed["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
        host = headers.get("host") or "localhost"
        request = AWSRequest(method=method, url=f"http://{host}{target}", data=body, headers=signed)
        request.context["timestamp"] = amz_date
        signer = _SignedRequest(
            Credentials(principal.access_key, principal.secret_key, principal.session_token),
            self._service,
            self._region,
        )
        canonical = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical)
        return signer.signature(string_to_sign, request), canonical, string_to_sign


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _gateway_response(error: GatewayError, request_id: str) -> HttpResponse:
    headers = [("Content-Type", "application/json"), ("x-amzn-RequestId", request_id)]
    if error.error_type:
        headers.append(("x-amzn-ErrorType", error.error_type))
    headers.extend(error.headers)
    return HttpResponse(error.status, headers, json.dumps({"message": error.message}).encode())


class RateLimiter:
    """Per-client limits, as the WAF web ACL applies them: for each limit covering the request's
    path, a token bucket per client address holding `limit` requests, refilled at `limit` per
    `window_seconds`. Thread-safe."""

    _PRUNE_AT = 10_000  # buckets; full ones are forgotten beyond this

    def __init__(
        self, limits: Iterable[RateLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = tuple(limits)
        for limit in self.limits:
            if limit.limit < 1 or limit.window_seconds < 1:
                raise ValueError(f"rate limit {limit.name}: limit and window must be positive")
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, at)
        self._lock = threading.Lock()

    def retry_after(self, path: str, client: str) -> int | None:
        """None if the request may pass (and it is counted), else the seconds to wait."""
        covering = [limit for limit in self.limits if limit.covers(path)]
        if not covering:
            return None
        with self._lock:
            now = self._clock()
            waits = []
            for limit in covering:
                rate = limit.limit / limit.window_seconds
                tokens, at = self._buckets.get((limit.name, client), (float(limit.limit), now))
                tokens = min(float(limit.limit), tokens + (now - at) * rate)
                if tokens >= 1:
                    self._buckets[(limit.name, client)] = (tokens - 1, now)
                else:
                    self._buckets[(limit.name, client)] = (tokens, now)
                    waits.append(max(1, math.ceil((1 - tokens) / rate)))
            if len(self._buckets) > self._PRUNE_AT:
                self._prune(now)
            return max(waits) if waits else None

    def _prune(self, now: float) -> None:
        by_name = {limit.name: limit for limit in self.limits}
        for key, (tokens, at) in list(self._buckets.items()):
            limit = by_name[key[0]]
            if tokens + (now - at) * limit.limit / limit.window_seconds >= limit.limit:
                del self._buckets[key]


def _rate_limited(retry_after: int) -> GatewayError:
    return GatewayError(
        RATE_LIMITED_STATUS, RATE_LIMITED_MESSAGE, headers=[("Retry-After", str(retry_after))]
    )


def _explicit_deny(principal: LocalPrincipal, method: str, path: str, region: str) -> GatewayError:
    """API Gateway's answer when the resource policy denies an authenticated caller."""
    resource = f"arn:aws:execute-api:{region}:********{ACCOUNT[-4:]}:local/{STAGE}/{method}{path}"
    return GatewayError(
        403,
        f"User: {principal.arn} is not authorized to perform: execute-api:Invoke on resource: "
        f"{resource} with an explicit deny",
        "AccessDeniedException",
    )


class LocalApiGateway:
    """fleetkey's API on `http://127.0.0.1:<port>` (port 0 picks a free one; see `url`).

    `binary_media_types` are the REST API's binaryMediaTypes (default `BINARY_MEDIA_TYPES`).
    `functions` maps a route's function name to its handler; by default each is loaded from
    functions/<name>/handler.py when the gateway starts. `principals` are the IAM identities
    SigV4 requests may be signed as (default `local_principals()`: the local operator, with the
    local credentials, the local relying party and the operator roles' sessions). `audiences` are
    the resource policy's admitted principals per IAM route group (default `LOCAL_AUDIENCES`: the
    local operator and the operator roles on the admin routes, the local operator and relying
    party on introspection and validations); `role_denies` its Denies holding the operator roles
    to their scopes (default `LOCAL_ROLE_DENIES`). `rate_limits` are the per-client limits
    (default none: the demo sends a whole fleet from one address; `make serve` passes the
    configured ones).
    The handlers read their settings from the process environment (`fleetkey_local.server.
    local_aws()` sets it).
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        *,
        host: str = "127.0.0.1",
        routes: Iterable[Route] = ROUTES,
        region: str = REGION,
        principals: Iterable[LocalPrincipal] | None = None,
        audiences: Iterable[Audience] = LOCAL_AUDIENCES,
        role_denies: Iterable[RoleDeny] = LOCAL_ROLE_DENIES,
        rate_limits: Iterable[RateLimit] = (),
        binary_media_types: Iterable[str] = BINARY_MEDIA_TYPES,
        functions: Mapping[str, Handler] | None = None,
    ) -> None:
        self._address = (host, port)
        self.routes = tuple(routes)
        self.binary_media_types = tuple(t.lower() for t in binary_media_types)
        self.region = region
        self._verifier = SigV4Verifier(
            principals if principals is not None else local_principals(), region
        )
        self.audiences = tuple(audiences)
        self.role_denies = tuple(role_denies)
        self.rate_limiter = RateLimiter(rate_limits)
        self._handlers: dict[str, Handler] = dict(functions or {})
        # One warm instance per function: Lambda runs one invocation at a time per instance, and
        # a function's resolver keeps its request's routing state. Functions run at once (the
        # validations long poll waits for a device's token request); Powertools' event and
        # context, one per process, are kept per thread (`isolate_router_state`).
        self._locks: dict[str, threading.Lock] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the gateway is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def start(self) -> LocalApiGateway:
        from fleetkey_local.functions import load_function

        isolate_router_state()
        for route in self.routes:
            if route.function not in self._handlers:
                self._handlers[route.function] = load_function(route.function).handler
            self._locks.setdefault(route.function, threading.Lock())
        server = _Server(self._address, _RequestHandler)
        server.gateway = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fleetkey-local-api-gateway",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalApiGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- one request -------------------------------------------------------------------------

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for a request and its path parameters, API Gateway's way: the most specific
        matching resource, then the method on it (or ANY). Raises GatewayError (403)."""
        segments = path.strip("/").split("/") if path.strip("/") else []
        candidates = []
        for route in self.routes:
            params = route.path_parameters(segments)
            if params is not None:
                candidates.append((route.specificity, route, params))
        if not candidates:
            raise _missing_token()
        best = min(c[0] for c in candidates)
        on_resource = [(r, p) for s, r, p in candidates if s == best]
        for route, params in on_resource:
            if route.method == method:
                return route, params
        for route, params in on_resource:
            if route.method == "ANY":
                return route, params
        raise _missing_token()

    def handle(
        self,
        method: str,
        target: str,
        header_pairs: Iterable[tuple[str, str]],
        body: bytes,
        source_ip: str = "127.0.0.1",
        client_certificate: bytes | None = None,
    ) -> HttpResponse:
        """One request, as API Gateway serves it; `client_certificate` is the DER certificate a
        client presented on a custom domain with mutual TLS (already checked against the
        domain's truststore)."""
        request_id = str(uuid.uuid4())
        headers = _Headers(header_pairs)
        parts = urlsplit(target)  # origin-form ("/v1/...?a=b"), or absolute-form from a proxy
        path = parts.path or "/"
        target = path + (f"?{parts.query}" if parts.query else "")
        try:
            # The web ACL sees the request before API Gateway routes or authenticates it.
            retry_after = self.rate_limiter.retry_after(path, source_ip)
            if retry_after is not None:
                raise _rate_limited(retry_after)
            route, params = self.resolve(method, path)
            principal = None
            if route.authorization == AWS_IAM:
                principal = self._verifier.authenticate(method, target, headers, body)
                self._authorize(principal, method, route, path)
            event = proxy_event(
                method,
                target,
                body=self._event_body(body, headers.get("content-type")),
                headers=headers.pairs,
                caller_arn=principal.arn if principal else None,
                access_key=principal.access_key if principal else None,
                resource=route.resource,
                path_parameters=params,
                source_ip=source_ip,
                request_id=request_id,
                domain_name=(headers.get("host") or "localhost").split(":", 1)[0],
                client_cert=(
                    client_cert_context(client_certificate) if client_certificate else None
                ),
            )
            if len(json.dumps(event)) > MAX_EVENT_BYTES:
                raise GatewayError(413, "Request Too Long")
            binary = self._accepts_binary(headers.get("accept"))
            return self._invoke(route, event, request_id, binary)
        except GatewayError as error:
            return _gateway_response(error, request_id)

    def _authorize(self, principal: LocalPrincipal, method: str, route: Route, path: str) -> None:
        """The resource policy: an explicit Deny for a caller outside the route's audience, or
        for an operator role outside its scope. The route's resource is checked as well as the
        path, so an encoded path (`/v1/%61dmin/...`) that reaches a guarded route is guarded too;
        a scope holds a request only if it holds every reading of its path (as sent, decoded,
        and with dot segments resolved)."""
        caller = principal.principal_arn
        for audience in self.audiences:
            guarded = audience.guards(route.resource) or audience.guards(unquote(path))
            if guarded and not audience.admits(caller):
                raise _explicit_deny(principal, method, path, self.region)
        readings = _path_readings(path)
        for deny in self.role_denies:
            if any(deny.refuses(caller, method, reading) for reading in readings):
                raise _explicit_deny(principal, method, path, self.region)

    def _event_body(self, body: bytes, content_type: str | None) -> str | bytes | None:
        """The body as the function receives it: base64 (`bytes` here) for a binary media type,
        else text; a body that is not UTF-8 goes base64 anyway (JSON cannot carry it)."""
        if not body:
            return None
        if _media_type_matches(content_type, self.binary_media_types):
            return body
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return body

    def _accepts_binary(self, accept: str | None) -> bool:
        """Whether a base64 proxy result goes out decoded: API Gateway honours only the first
        Accept media type. Without an Accept header the local gateway decodes."""
        if accept is None:
            return True
        return _media_type_matches(accept.split(",", 1)[0], self.binary_media_types)

    def _invoke(
        self, route: Route, event: dict[str, Any], request_id: str, binary: bool = True
    ) -> HttpResponse:
        from fleetkey_local.functions import LambdaContext

        name = route.function
        context = LambdaContext(
            function_name=f"fleetkey-{name}",
            invoked_function_arn=f"arn:aws:lambda:{self.region}:{ACCOUNT}:function:fleetkey-{name}",
            aws_request_id=str(uuid.uuid4()),
        )
        try:
            with self._locks[name]:
                result = self._handlers[name](event, context)
            return _integration_response(result, request_id, binary)
        except Exception:  # noqa: BLE001 - API Gateway shows any function error as a bare 502
            print(
                f"fleetkey-local api gateway: {name} failed on "
                f"{event['httpMethod']} {event['path']}",
                file=sys.stderr,
            )
            traceback.print_exc(file=sys.stderr)
            raise GatewayError(502, "Internal server error") from None


def _path_readings(path: str) -> set[str]:
    """A request path as sent, decoded, and decoded with `.` and `..` segments resolved."""
    decoded = unquote(path)
    resolved = posixpath.normpath(decoded)
    if decoded.endswith("/") and resolved != "/":
        resolved += "/"
    return {path, decoded, resolved}


def _media_type_matches(value: str | None, patterns: Sequence[str]) -> bool:
    """Whether a media type (parameters ignored) is one of `patterns` (binaryMediaTypes entries,
    which may hold wildcards: `image/*`, `*/*`). A wildcard in the value itself matches only a
    pattern spelled the same way."""
    if not value:
        return False
    kind, _, subtype = value.split(";", 1)[0].strip().lower().partition("/")
    for pattern in patterns:
        want_kind, _, want_subtype = pattern.partition("/")
        if want_kind in ("*", kind) and want_subtype in ("*", subtype):
            return True
    return False


def _integration_response(result: object, request_id: str, binary: bool = True) -> HttpResponse:
    """The HTTP response for a proxy integration result; a malformed one is API Gateway's 502.
    A base64 result (`isBase64Encoded`) goes out decoded when `binary`, else as its text."""
    if not isinstance(result, dict):
        raise ValueError(f"malformed Lambda proxy response: {type(result).__name__}")
    status = int(result["statusCode"])
    if not 100 <= status <= 599:
        raise ValueError(f"malformed Lambda proxy response: statusCode {status}")
    # API Gateway merges both header maps; for a name in both, multiValueHeaders wins.
    multi = {k: [str(v) for v in vs] for k, vs in (result.get("multiValueHeaders") or {}).items()}
    merged: dict[str, list[str]] = {
        k: [str(v)] for k, v in (result.get("headers") or {}).items() if k not in multi
    }
    merged.update(multi)
    body = result.get("body") or ""
    if not isinstance(body, str):
        raise ValueError("malformed Lambda proxy response: body is not a string")
    try:
        encoded = result.get("isBase64Encoded")
        data = base64.b64decode(body, validate=True) if encoded and binary else body.encode()
    except binascii.Error:
        raise ValueError("malformed Lambda proxy response: body is not base64") from None
    headers = [(k, v) for k, vs in merged.items() for v in vs]
    if not any(k.lower() == "content-type" for k, _ in headers):
        headers.append(("Content-Type", "application/json"))
    headers.append(("x-amzn-RequestId", request_id))
    return HttpResponse(status, headers, data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    gateway: LocalApiGateway


class MutualTlsDomain:
    """The gateway's API on `https://127.0.0.1:<port>` with client certificates, as a custom
    domain name with mutual TLS (port 0 picks a free one; see `url`).

    `tls_context()` gives the TLS server context for each new connection (server certificate,
    truststore, whether a client certificate is required); it is called in the connection's own
    thread, so it may read a truststore that changes. A handshake that fails (no certificate when
    one is required, one the truststore does not trust) ends the connection before any HTTP, as
    API Gateway ends it; `refusals` counts them by reason. Requests then go through the gateway's
    own routing, authorization and functions (`LocalApiGateway.handle`), with the client
    certificate.
    """

    def __init__(
        self,
        gateway: LocalApiGateway,
        tls_context: Callable[[], ssl.SSLContext],
        port: int = DEFAULT_MUTUAL_TLS_PORT,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.gateway = gateway
        self._tls_context = tls_context
        self._address = (host, port)
        self.refusals: dict[str, int] = {}
        self._refusals_lock = threading.Lock()
        self._server: _TlsServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the mutual TLS domain is not started")
        host, port = self._server.server_address[:2]
        return f"https://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def start(self) -> MutualTlsDomain:
        server = _TlsServer(self._address, _RequestHandler)
        server.gateway = self.gateway
        server.domain = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="fleetkey-local-mutual-tls",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> MutualTlsDomain:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handshake(self, connection: socket.socket) -> ssl.SSLSocket | None:
        """The connection upgraded to TLS under the current truststore, or None (counted) when
        the handshake fails."""
        try:
            tls = self._tls_context().wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        except Exception as exc:  # noqa: BLE001 - no truststore to check a client against: closed
            self._refused("truststore_unavailable", exc)
            return None
        try:
            tls.settimeout(TLS_HANDSHAKE_TIMEOUT)
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self._refused(_handshake_refusal(exc), exc)
            tls.close()
            return None
        return tls

    def _refused(self, reason: str, exc: BaseException) -> None:
        with self._refusals_lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
        log.info("TLS handshake refused (%s): %s", reason, exc)


def _handshake_refusal(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return "untrusted_certificate"
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text:
        return "no_client_certificate"
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    return "handshake_failed"


class _TlsServer(_Server):
    """Accepts TCP and does the TLS handshake in the connection's thread (not the accepting
    one), so a slow client delays no other."""

    domain: MutualTlsDomain

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.domain._handshake(request)
        if tls is None:
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            self.shutdown_request(tls)


class _BodyTooLarge(Exception):
    pass


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fleetkey-local-apigw"
    timeout = 60  # an idle keep-alive connection or a stalled upload is dropped after this
    server: _Server

    def handle_expect_100(self) -> bool:
        # Refuse an announced oversized body before the client sends it.
        length = self._declared_length()
        if length is not None and length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(_gateway_response(GatewayError(413, "Request Too Long"), str(uuid.uuid4())))
            return False
        return super().handle_expect_100()

    def _declared_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except _BodyTooLarge:
            self.close_connection = True
            self._send(_gateway_response(GatewayError(413, "Request Too Long"), str(uuid.uuid4())))
            return
        except ValueError:
            self.close_connection = True
            self.send_error(400, "Bad Request")
            return
        response = self.server.gateway.handle(
            self.command,
            self.path,
            self.headers.items(),
            body,
            self.client_address[0],
            client_certificate=self._client_certificate(),
        )
        self._send(response)

    def _client_certificate(self) -> bytes | None:
        """The DER certificate the client presented over mutual TLS, if any."""
        if isinstance(self.connection, ssl.SSLSocket):
            return self.connection.getpeercert(binary_form=True)
        return None

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        value = self.headers.get("Content-Length")
        if value is None:
            return b""
        length = int(value)  # ValueError: 400
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > MAX_BODY_BYTES:
            self._discard(length)
            raise _BodyTooLarge
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                break
            total += size
            if total > MAX_BODY_BYTES:
                self._discard(size + 2)
                raise _BodyTooLarge
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # CRLF after the chunk
        return b"".join(chunks)

    def _discard(self, length: int) -> None:
        """Read what the client sends anyway (up to a bound), so it receives the 413 instead of
        a reset connection."""
        remaining = min(length, _DRAIN_LIMIT)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _send(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)
