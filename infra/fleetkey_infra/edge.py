"""The API's edge: who may call the IAM routes, and how fast one client may call the public ones.

One definition, read by the CDK app (the REST API's resource policy and the operator roles in
`constructs/api.py`, the WAF web ACL in `constructs/waf.py`) and by the local API gateway
(`fleetkey_local.api_gateway`), so the local stack refuses what the deployed stack refuses. This
module does not import aws_cdk: the local stack imports it.

Who may call what:

- operators: `/v1/admin/*` (every admin route, `/v1/admin/pki` included); relying parties:
  `POST /v1/introspect` and the validations, `POST /v1/validations` and
  `GET /v1/validations/{validation_id}`. The resource policy denies each group of routes to every
  principal that is not of its audience.
- The operator roles the stack creates (`OPERATOR_ROLES`, named `<name prefix>-<role>`, trusting
  the account: principals of the account whose own policy lets them assume the role), each
  admitted as an operator and held to its job by method and path, in its identity policy AND by
  explicit Denies of the resource policy (a principal of the API's account is admitted if EITHER
  its identity policy or the resource policy allows it, so a broader identity policy attached
  later would otherwise widen it):
  - `fleet-admin`: every method on every admin route;
  - `release`: every method on `/v1/admin/firmware` and `/v1/admin/firmware/*`, nothing else on
    the API (the resource policy denies it every request but those);
  - `auditor`: `GET` on the admin routes (audit trails are GET routes); every other method on
    them is denied.

Configuration (CDK context: cdk.json's "context", or `cdk deploy -c key=value`):

- `operatorPrincipals`: the IAM principals admitted to `/v1/admin/*`. Each entry is `role/<name>`
  / `user/<name>` (a path may precede the name: `role/ops/fleetkey-admin`) or the full ARN of a
  role or user **of the stack's own account** (`arn:aws:iam::<the stack's account>:role/ops/
  fleetkey-admin`); `*` and `?` match as in IAM's `ArnLike` in the name. A principal of another
  account is refused at synthesis (or, for an environment-agnostic stack, by a CloudFormation rule
  at deployment): nothing in the API's resource policy allows one, so it could never be admitted.
  Default: `role/fleetkey-operator`.
  An empty list fails synthesis: an admin API that admits nobody is a misconfiguration, and one
  that admits everybody is the defect this closes.
  The operator roles the stack creates are admitted besides them.
- `relyingPartyPrincipals`: the same for `POST /v1/introspect` and the validations
  (`/v1/validations`, `/v1/validations/{validation_id}`). Default: `role/fleetkey-relying-party`.
  An empty list closes introspection and validations to every principal (relying parties can
  still verify tokens offline against the JWKS).
- `tokenRateLimit`, `discoveryRateLimit`: requests one client (source IP) may send to
  `/v1/token` + `/v1/challenge` + the device routes under `/v1/devices/` (the data key, certificate
  rotation and its commit), and to the public documents `/v1/pki/*` (the issuing CA and its CRL) +
  `/.well-known/*` (discovery, EST), per `rateLimitWindowSeconds` (one of
  AWS WAF's evaluation windows: 60, 120, 300, 600; default 60). Defaults: 60 and 300. A client over
  its limit is answered `429` with `Retry-After` until its rate falls back under it.

A list may also be given on the command line as JSON (`-c 'operatorPrincipals=["role/a"]'`) or
comma-separated (`-c operatorPrincipals=role/a,role/b`).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

CDK_JSON = Path(__file__).resolve().parents[2] / "cdk.json"

# Context keys
OPERATOR_PRINCIPALS_KEY = "operatorPrincipals"
RELYING_PARTY_PRINCIPALS_KEY = "relyingPartyPrincipals"
TOKEN_RATE_LIMIT_KEY = "tokenRateLimit"
DISCOVERY_RATE_LIMIT_KEY = "discoveryRateLimit"
RATE_LIMIT_WINDOW_KEY = "rateLimitWindowSeconds"
CONTEXT_KEYS = (
    OPERATOR_PRINCIPALS_KEY,
    RELYING_PARTY_PRINCIPALS_KEY,
    TOKEN_RATE_LIMIT_KEY,
    DISCOVERY_RATE_LIMIT_KEY,
    RATE_LIMIT_WINDOW_KEY,
)

# Defaults: roles the deployer creates (or names others in the context).
DEFAULT_OPERATOR_PRINCIPALS = ("role/fleetkey-operator",)
DEFAULT_RELYING_PARTY_PRINCIPALS = ("role/fleetkey-relying-party",)
# Per client (source IP) and window. A device fetching a token sends a challenge and a token
# request (and, at start-up, a data-key request); 60 a minute leaves room for a few dozen devices
# behind one NAT address. Discovery
# documents are cheap and cached by well-behaved clients.
DEFAULT_TOKEN_RATE_LIMIT = 60
DEFAULT_DISCOVERY_RATE_LIMIT = 300
DEFAULT_RATE_LIMIT_WINDOW_SECONDS = 60

# What AWS WAF's RateBasedStatement accepts: EvaluationWindowSec 60, 120, 300 or 600 (default
# 300); Limit at least 10 (AWS WAF developer guide, "Rate-based rule high-level settings").
WAF_EVALUATION_WINDOWS = (60, 120, 300, 600)
WAF_MIN_LIMIT = 10
WAF_MAX_LIMIT = 2_000_000_000

RATE_LIMITED_STATUS = 429
RATE_LIMITED_MESSAGE = "Too Many Requests"  # API Gateway's own throttling answer says the same

# The device-facing routes that authenticate with a client assertion, counted together per client:
# the token endpoint, its challenge, and the device routes (`/v1/devices/{device_id}/...`: the
# data key, certificate rotation and its commit). `/v1/devices/` is not part of any IAM route (the
# admin API's device routes are under `/v1/admin/devices/`), so a backend reading data keys is not
# counted with devices.
TOKEN_RATE_LIMITED_PATHS = ("/v1/token", "/v1/challenge", "/v1/devices/")
# The public documents, counted together per client: the issuing CA chain and its CRL, and
# everything under `/.well-known/` (JWKS, metadata, EST). EST's simplereenroll falls here too (one
# rule per path, and its path is under `/.well-known/`): it issues nothing to a client without a
# certificate of the mutual-TLS domain's truststore, and its method throttling is the token
# endpoint's.
DISCOVERY_RATE_LIMITED_PATHS = ("/v1/pki/", "/.well-known/")

# The API's one stage (`fleetkey_infra.constants.API_STAGE_NAME` is this).
API_STAGE_NAME = "prod"

# The IAM routes each audience guards, as API Gateway resource-policy paths.
ADMIN_POLICY_PATHS = ("/v1/admin/*",)
# The route itself, and anything under it (a trailing slash, a sub-path): API Gateway matches a
# resource-policy path literally, so `/v1/introspect` alone would not cover `/v1/introspect/`.
INTROSPECT_POLICY_PATHS = ("/v1/introspect", "/v1/introspect/*")
# Validation requests and their results (`POST /v1/validations`, `GET /v1/validations/{id}`).
VALIDATIONS_POLICY_PATHS = ("/v1/validations", "/v1/validations/*")
RELYING_PARTY_POLICY_PATHS = INTROSPECT_POLICY_PATHS + VALIDATIONS_POLICY_PATHS
# The firmware releases' admin routes (the admin function's `/v1/admin/firmware...`).
FIRMWARE_POLICY_PATHS = ("/v1/admin/firmware", "/v1/admin/firmware/*")
# Every method API Gateway authorizes: a request's ARN holds its own HTTP method, also on an ANY
# method (`execute-api:/<stage>/<METHOD>/<path>`).
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


class EdgeConfigError(ValueError):
    """The edge configuration cannot be deployed as given."""


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` requests per `window_seconds` from one client (source IP) to the paths
    that contain one of `path_fragments` (compared after URL-decoding, path normalization and
    lowercasing, as the WAF rule's text transformations do)."""

    name: str
    path_fragments: tuple[str, ...]
    limit: int
    window_seconds: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise EdgeConfigError(f"rate limit name must be lowercase letters/digits: {self.name}")
        if not self.path_fragments:
            raise EdgeConfigError(f"rate limit {self.name} covers no path")

    def covers(self, path: str) -> bool:
        normalized = normalize_path(path)
        return any(fragment in normalized for fragment in self.path_fragments)

    def check_for_waf(self) -> None:
        """AWS WAF's bounds (the local gateway accepts smaller limits, for tests)."""
        if self.window_seconds not in WAF_EVALUATION_WINDOWS:
            raise EdgeConfigError(
                f"{RATE_LIMIT_WINDOW_KEY} must be one of {WAF_EVALUATION_WINDOWS} (AWS WAF's "
                f"evaluation windows), not {self.window_seconds}"
            )
        if not WAF_MIN_LIMIT <= self.limit <= WAF_MAX_LIMIT:
            raise EdgeConfigError(
                f"the {self.name} rate limit must be between {WAF_MIN_LIMIT} and "
                f"{WAF_MAX_LIMIT} requests per window (AWS WAF's bounds), not {self.limit}"
            )


def normalize_path(path: str) -> str:
    """URL_DECODE, NORMALIZE_PATH, LOWERCASE: what the WAF rules apply before matching."""
    decoded = unquote(path)
    normalized = posixpath.normpath("/" + decoded.lstrip("/")) if decoded else "/"
    if decoded.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized.lower()


@dataclass(frozen=True)
class Audience:
    """The principals (IAM ARN patterns, `ArnLike`) admitted to the IAM routes under
    `policy_paths` (API Gateway resource-policy paths: `*` matches any characters). No
    principals: nobody is admitted."""

    name: str
    policy_paths: tuple[str, ...]
    principals: tuple[str, ...]

    def guards(self, path: str) -> bool:
        """Whether the Deny `execute-api:/*/*<policy path>` covers a request to `path`: its `*`
        match across `/` in AWS, so `<stage>/<METHOD>` and anything before the policy path."""
        return any(_glob("*" + p).fullmatch(path) is not None for p in self.policy_paths)

    def admits(self, principal_arn: str) -> bool:
        return any(arn_like(pattern, principal_arn) for pattern in self.principals)


@dataclass(frozen=True)
class OperatorRole:
    """A role the stack creates for people and pipelines, `<name prefix>-<name>`: allowed
    `methods` on `policy_paths` (resource-policy paths under `/v1/admin/`), and nothing else on
    the API."""

    name: str
    job: str
    methods: tuple[str, ...]
    policy_paths: tuple[str, ...]

    def __post_init__(self) -> None:
        if not set(self.methods) <= set(HTTP_METHODS) or not self.methods:
            raise EdgeConfigError(f"operator role {self.name}: methods must be of {HTTP_METHODS}")
        if not all(
            any(_glob(a).fullmatch(p) for a in ADMIN_POLICY_PATHS) for p in self.policy_paths
        ):
            raise EdgeConfigError(f"operator role {self.name}: paths must be admin routes")

    def role_name(self, prefix: str) -> str:
        return f"{prefix}-{self.name}"

    def arn(self, partition: str, account: str, prefix: str) -> str:
        return f"arn:{partition}:iam::{account}:role/{self.role_name(prefix)}"

    def invocations(self) -> tuple[str, ...]:
        """What its identity policy allows, as `<stage>/<METHOD><path>` (the part of an
        execute-api ARN after the API's id). The stage and every method are spelled out: a `*`
        in their place would also match a path that merely ends like one of `policy_paths`."""
        return tuple(
            f"{API_STAGE_NAME}/{method}{path}"
            for path in self.policy_paths
            for method in self.methods
        )

    def permits(self, method: str, path: str) -> bool:
        """Whether its scope holds the request (`path` as API Gateway puts it in the ARN)."""
        request = _request(API_STAGE_NAME, method, path)
        return any(_glob(allowed).fullmatch(request) for allowed in self.invocations())

    def deny(self, partition: str, account: str, prefix: str) -> RoleDeny | None:
        """The resource policy's explicit Deny that holds the role to its scope whatever identity
        policies it is given: everything but its invocations when its paths are narrower than
        the admin routes (no resource-policy path says "an admin route but these"); else the other
        methods on the admin routes; None for a role with every admin route."""
        principals = (self.arn(partition, account, prefix),)
        sid = "ScopeOf" + "".join(word.title() for word in self.name.split("-"))
        if set(self.policy_paths) != set(ADMIN_POLICY_PATHS):
            return RoleDeny(sid, principals, self.invocations(), outside=True)
        others = [m for m in HTTP_METHODS if m not in self.methods]
        if others:
            requests = tuple(f"*/{m}{path}" for path in ADMIN_POLICY_PATHS for m in others)
            return RoleDeny(sid, principals, requests)
        return None


@dataclass(frozen=True)
class RoleDeny:
    """An explicit Deny of the API's resource policy for `principals` (ArnLike on
    `aws:PrincipalArn`): of the `requests` (`<stage>/<METHOD><path>` patterns, `*` wildcards), or
    with `outside`, of every request but them (a `NotResource` statement)."""

    sid: str
    principals: tuple[str, ...]
    requests: tuple[str, ...]
    outside: bool = False

    def resources(self, partition: str, region: str, account: str) -> list[str]:
        """`requests` as resource-policy resources: `execute-api:/<stage>/<METHOD><path>`, which
        API Gateway expands to the API's ARN; for a NotResource (`outside`) full ARNs of any API
        of the account (`...:*/<stage>/<METHOD><path>`), since API Gateway documents that
        expansion for `Resource` only, and a NotResource entry left unexpanded would match no
        request (the release role would be refused its own routes)."""
        if self.outside:
            prefix = f"arn:{partition}:execute-api:{region}:{account}:*/"
            return [prefix + request for request in self.requests]
        return [f"execute-api:/{request}" for request in self.requests]

    def refuses(self, principal_arn: str, method: str, path: str) -> bool:
        if not any(arn_like(p, principal_arn) for p in self.principals):
            return False
        request = _request(API_STAGE_NAME, method, path)
        hit = any(_glob(pattern).fullmatch(request) for pattern in self.requests)
        return hit != self.outside


def _request(stage: str, method: str, path: str) -> str:
    return f"{stage}/{method.upper()}{path}"


@dataclass(frozen=True)
class EdgeConfig:
    operator_principals: tuple[str, ...]
    relying_party_principals: tuple[str, ...]
    token_rate_limit: int = DEFAULT_TOKEN_RATE_LIMIT
    discovery_rate_limit: int = DEFAULT_DISCOVERY_RATE_LIMIT
    rate_limit_window_seconds: int = DEFAULT_RATE_LIMIT_WINDOW_SECONDS

    def __post_init__(self) -> None:
        if not self.operator_principals:
            raise EdgeConfigError(
                f"{OPERATOR_PRINCIPALS_KEY} is empty: the admin API would admit nobody. Name the "
                "IAM roles (or users) of your operators, e.g. "
                f"-c '{OPERATOR_PRINCIPALS_KEY}=[\"role/fleetkey-operator\"]'"
            )
        for entry in (*self.operator_principals, *self.relying_party_principals):
            check_principal(entry)
        for rate_limit in self.rate_limits():
            rate_limit.check_for_waf()

    @classmethod
    def from_context(cls, get: Callable[[str], object]) -> EdgeConfig:
        """From CDK context (`node.try_get_context`, or a dict's `get`): absent keys take the
        defaults."""
        return cls(
            operator_principals=_principals(
                get(OPERATOR_PRINCIPALS_KEY), OPERATOR_PRINCIPALS_KEY, DEFAULT_OPERATOR_PRINCIPALS
            ),
            relying_party_principals=_principals(
                get(RELYING_PARTY_PRINCIPALS_KEY),
                RELYING_PARTY_PRINCIPALS_KEY,
                DEFAULT_RELYING_PARTY_PRINCIPALS,
            ),
            token_rate_limit=_integer(
                get(TOKEN_RATE_LIMIT_KEY), TOKEN_RATE_LIMIT_KEY, DEFAULT_TOKEN_RATE_LIMIT
            ),
            discovery_rate_limit=_integer(
                get(DISCOVERY_RATE_LIMIT_KEY),
                DISCOVERY_RATE_LIMIT_KEY,
                DEFAULT_DISCOVERY_RATE_LIMIT,
            ),
            rate_limit_window_seconds=_integer(
                get(RATE_LIMIT_WINDOW_KEY), RATE_LIMIT_WINDOW_KEY, DEFAULT_RATE_LIMIT_WINDOW_SECONDS
            ),
        )

    @classmethod
    def from_cdk_json(cls, path: Path = CDK_JSON) -> EdgeConfig:
        """What `cdk synth` reads, without the CDK (for the local stack)."""
        context = json.loads(path.read_text()).get("context", {}) if path.exists() else {}
        return cls.from_context(context.get)

    def rate_limits(self) -> tuple[RateLimit, ...]:
        """Stricter on the token endpoint (each request costs DynamoDB writes and a KMS Sign), the
        data-key endpoint (DynamoDB writes and a KMS call) and rotation (KMS, AWS IoT, DynamoDB)
        than on the public documents."""
        window = self.rate_limit_window_seconds
        return (
            RateLimit("token", TOKEN_RATE_LIMITED_PATHS, self.token_rate_limit, window),
            RateLimit("discovery", DISCOVERY_RATE_LIMITED_PATHS, self.discovery_rate_limit, window),
        )

    def named_accounts(self) -> frozenset[str]:
        """The accounts the full-ARN entries name (`role/<name>` entries are the stack's)."""
        return frozenset(
            entry.split(":")[4]
            for entry in (*self.operator_principals, *self.relying_party_principals)
            if entry.startswith("arn:")
        )

    def check_account(self, account: str) -> None:
        """Every principal must be of `account` (the stack's): the resource policy allows no
        principal of another account, so one could never be admitted.

        Raises:
            EdgeConfigError: an entry names another account.
        """
        others = sorted(a for a in self.named_accounts() if a != account)
        if others:
            raise EdgeConfigError(
                f"{OPERATOR_PRINCIPALS_KEY}/{RELYING_PARTY_PRINCIPALS_KEY} name principals of "
                f"account(s) {', '.join(others)}, not the stack's ({account}): nothing allows a "
                "principal of another account to call the IAM routes, so it could never be "
                "admitted. Name roles of the stack's account (role/<name>)."
            )

    def audiences(
        self, partition: str, account: str, name_prefix: str | None = None
    ) -> tuple[Audience, ...]:
        """The IAM routes' audiences, with `role/<name>` entries made ARNs in `account`; with
        `name_prefix` (the stack's), the operator roles it creates are operators too."""
        roles = operator_role_arns(partition, account, name_prefix) if name_prefix else ()
        return (
            Audience(
                "operators",
                ADMIN_POLICY_PATHS,
                (*resolve_principals(self.operator_principals, partition, account), *roles),
            ),
            Audience(
                "relying parties",
                RELYING_PARTY_POLICY_PATHS,
                resolve_principals(self.relying_party_principals, partition, account),
            ),
        )


# ---- principals ------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(role|user)/[\w+=,.@/*?-]+$")
_ARN = re.compile(r"^arn:[a-z-]+:iam::\d{12}:(role|user)/[\w+=,.@/*?-]+$")


def check_principal(entry: str) -> None:
    if not (_RELATIVE.match(entry) or _ARN.match(entry)):
        raise EdgeConfigError(
            f"{entry!r} is not an IAM role or user: give its ARN "
            "(arn:aws:iam::<the stack's account>:role/<name>, no wildcard in partition or "
            "account) or role/<name> / user/<name> in the stack's account. A role session's "
            "aws:PrincipalArn is its role's ARN, so name the role, not an sts assumed-role ARN."
        )
    name = entry.split(":")[-1].split("/", 1)[1]
    if not name.strip("*?/"):
        raise EdgeConfigError(f"{entry!r} matches every role or user: name the principals")


def resolve_principals(entries: Sequence[str], partition: str, account: str) -> tuple[str, ...]:
    return tuple(
        entry if entry.startswith("arn:") else f"arn:{partition}:iam::{account}:{entry}"
        for entry in entries
    )


def arn_like(pattern: str, arn: str) -> bool:
    """IAM's ArnLike: each of the six colon-separated parts matched on its own, case-sensitively,
    with `*` and `?` wildcards."""
    patterns, parts = pattern.split(":", 5), arn.split(":", 5)
    if len(patterns) != 6 or len(parts) != 6:
        return False
    return all(_glob(p).fullmatch(v) is not None for p, v in zip(patterns, parts, strict=True))


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
        re.DOTALL,
    )


# ---- operator roles ---------------------------------------------------------------------------

# The roles the stack creates, one per job (their names follow the stack's name prefix).
OPERATOR_ROLES = (
    OperatorRole(
        "fleet-admin",
        "every admin route: allow-list, devices, manufacturer CAs, signing keys, the issuing CA "
        "(PKI), firmware releases, audit trails",
        HTTP_METHODS,
        ADMIN_POLICY_PATHS,
    ),
    OperatorRole(
        "release",
        "firmware releases only: publish, revoke, list and read them (no device, no CA)",
        HTTP_METHODS,
        FIRMWARE_POLICY_PATHS,
    ),
    OperatorRole(
        "auditor",
        "read-only: every admin GET route, audit trails included; no change of any kind",
        ("GET",),
        ADMIN_POLICY_PATHS,
    ),
)


def operator_role_arns(partition: str, account: str, prefix: str) -> tuple[str, ...]:
    return tuple(role.arn(partition, account, prefix) for role in OPERATOR_ROLES)


def operator_role_denies(partition: str, account: str, prefix: str) -> tuple[RoleDeny, ...]:
    """The resource policy's Denies holding each operator role to its scope."""
    denies = (role.deny(partition, account, prefix) for role in OPERATOR_ROLES)
    return tuple(deny for deny in denies if deny is not None)


# ---- context values --------------------------------------------------------------------------


def _principals(value: object, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise EdgeConfigError(f"{key}: not a JSON list ({error})") from None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EdgeConfigError(f"{key} must be a list of IAM ARNs or role/<name> entries")
    return tuple(value)


def _integer(value: object, key: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise EdgeConfigError(f"{key} must be a whole number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise EdgeConfigError(f"{key} must be a whole number, not {value!r}")
