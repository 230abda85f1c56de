"""AWS IoT Core's per-API rate limits, emulated for the local stack (off by default).

AWS IoT throttles each control-plane API per account and Region: a request over the API's rate is
refused with `ThrottlingException` ("The rate exceeds the limit", HTTP 400 in the API reference),
and the AWS SDKs retry it. moto never throttles, so a local run says nothing about what a fleet
onboarding at once meets in AWS. `IotRateLimits` puts one token bucket per API in front of moto:
`install(client_or_session)` registers a botocore `before-send.iot` hook, so each HTTP attempt of
an AWS IoT call takes a token of its API's bucket or is answered, without reaching the endpoint,
with the response AWS IoT gives over the rate. botocore's retries (fleetkey's clients: standard
mode, 3 attempts, `fleetkey.adapters.aws.CLIENT_CONFIG`), fleetkey's transient/permanent split
(`fleetkey.adapters.aws.is_transient`) and Lambda's retries then see what they would see in AWS.

Only what is installed is limited, and nothing is by default:
  * `EmbeddedStack(make_client, iot_limits=limits)` limits the services' IoT client (never the
    harness's, which plays AWS IoT itself and checks results);
  * `limits.install(default_session())` limits the clients the locally loaded functions build
    (`fleetkey.adapters.aws.client` uses boto3's default session): install it before their first
    invocation, since a client copies its session's hooks when it is created.

One `IotRateLimits` is one account in one Region: share it between every client that should
draw on the same quotas. The buckets hold `burst_seconds` (default 1) of the rate, full at the
start: AWS documents the rates, not the bursts, so a second's worth is an assumption.

The rates (transactions per second) of the AWS IoT APIs fleetkey calls, and of AWS IoT's own
just-in-time registration of device certificates (`JITR`: not an API call; the emulation of AWS
IoT asks `admit(JITR)` before it auto-registers a certificate). The AWS General Reference page
"AWS IoT Core endpoints and quotas" (https://docs.aws.amazon.com/general/latest/gr/iot-core.html,
section "AWS IoT Core API throttling limits"; Service Quotas service code `iot`/`iotcore`) is
the authority; its table could not be read from here, so each value is the newest found in a
public copy of it (`SOURCES`), oldest copies last:
  dg-2019: the AWS IoT Developer Guide's throttling table before it moved to the General
           Reference (github.com/awsdocs/aws-iot-docs, developerguide/limits-iot.md at
           b946d0b5991d0fcc6363060da7fd2bab221d281d, 2019-11-25),
  sq-2024: Service Quotas defaults, service code `iotcore` (github.com/gruntwork-io/
           terraform-aws-utilities, docs/quotas.md at 3dd9fcba32ce9d83b631e9648a827a838a460e0f,
           2024-02-10),
  gr-2025: AWS's IoT builder tools' table of the General Reference defaults "last checked on
           6/13/2025" (github.com/aws-iot-builder-tools/thingpress, doc/aws-api-limits.md at
           494be84aa3a7f34043df33e90e70512f72214167).
Several thing-registry rates were raised between 2019 and 2024 (CreateThing and
AttachThingPrincipal 15 -> 100); values whose newest source is dg-2019 may have been raised too.
All are adjustable quotas: an account may have others (Service Quotas console).
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.awsrequest import AWSResponse

# AWS IoT's own registration of an unknown device certificate on first connect (JITR): the
# Developer Guide's "Maximum number of device certificates that can be registered per second".
JITR = "JustInTimeRegistration"
THROTTLING = "ThrottlingException"
THROTTLING_MESSAGE = "Rate exceeded"
# Where a refused request points, so that nothing serves it (`IotRateLimits._before_send`).
REFUSED_URL = "https://throttled.fleetkey.invalid/"

SOURCES: dict[str, str] = {
    "dg-2019": "github.com/awsdocs/aws-iot-docs developerguide/limits-iot.md @ b946d0b "
    "(2019-11-25): AWS IoT Throttling Limits, Security and Identity Limits",
    "sq-2024": "github.com/gruntwork-io/terraform-aws-utilities docs/quotas.md @ 3dd9fcb "
    "(2024-02-10): Service Quotas defaults, service code iotcore",
    "gr-2025": "github.com/aws-iot-builder-tools/thingpress doc/aws-api-limits.md @ 494be84: "
    "General Reference defaults, last checked 2025-06-13",
}


@dataclass(frozen=True, slots=True)
class ApiRate:
    """An API's documented rate: `per_second` from the newest `sources` (newest first);
    `earlier` is the rate an older source gave, when it differs."""

    operation: str
    per_second: float
    sources: tuple[str, ...]
    quota_code: str | None = None
    earlier: float | None = None


DOCUMENTED_RATES: tuple[ApiRate, ...] = (
    # just-in-time registration: DescribeCertificate, CreateThing, AttachPolicy,
    # AttachThingPrincipal, UpdateCertificate (fleetkey.services.registration)
    ApiRate("DescribeCertificate", 10, ("gr-2025", "dg-2019"), "L-FC864907"),
    ApiRate("UpdateCertificate", 10, ("dg-2019",), "L-77B523DC"),
    ApiRate("AttachPolicy", 15, ("gr-2025", "dg-2019"), "L-CA7D4E3E"),
    ApiRate("CreateThing", 100, ("gr-2025", "sq-2024"), "L-64CBACAC", earlier=15),
    ApiRate("AttachThingPrincipal", 100, ("gr-2025", "sq-2024"), "L-F64D1AA6", earlier=15),
    ApiRate(JITR, 15, ("dg-2019",)),
    # taking over a thing, teardown, suspension (fleetkey.adapters.iot)
    ApiRate("DescribeThing", 350, ("gr-2025", "sq-2024", "dg-2019"), "L-0EF0F5EE"),
    ApiRate("UpdateThing", 100, ("sq-2024",), "L-211F680E", earlier=10),
    ApiRate("ListThingPrincipals", 20, ("sq-2024",), "L-FC3EF4D9", earlier=10),
    ApiRate("DetachThingPrincipal", 100, ("sq-2024",), "L-B5EE4A16", earlier=15),
    ApiRate("DeleteThing", 100, ("sq-2024",), "L-889800F7", earlier=15),
    ApiRate("ListPrincipalThings", 10, ("sq-2024", "dg-2019"), "L-C481616A"),
    ApiRate("ListAttachedPolicies", 15, ("dg-2019",)),
    ApiRate("DetachPolicy", 15, ("dg-2019",)),
    ApiRate("DeleteCertificate", 10, ("dg-2019",)),
    # rotation and the manufacturer CAs (fleetkey.adapters.iot)
    ApiRate("RegisterCertificate", 10, ("dg-2019",)),
    ApiRate("RegisterCACertificate", 10, ("dg-2019",)),
    ApiRate("UpdateCACertificate", 10, ("dg-2019",)),
    ApiRate("DescribeCACertificate", 10, ("dg-2019",)),
    ApiRate("GetRegistrationCode", 10, ("dg-2019",)),
)
DOCUMENTED: dict[str, ApiRate] = {rate.operation: rate for rate in DOCUMENTED_RATES}


def binding_rate(
    calls_per_unit: Mapping[str, float], rates: Mapping[str, float]
) -> tuple[float, list[str]]:
    """The most units of work per second the rates allow when each unit makes `calls_per_unit`
    calls of each API, and the APIs that bind it (an API without a rate does not limit).
    (inf, []) when none is limited."""
    best, binding = float("inf"), []
    for operation, calls in calls_per_unit.items():
        if calls <= 0 or operation not in rates:
            continue
        allowed = rates[operation] / calls
        if allowed < best - 1e-9:
            best, binding = allowed, [operation]
        elif abs(allowed - best) <= 1e-9:
            binding.append(operation)
    return best, binding


class TokenBucket:
    """`rate` tokens a second, at most `capacity` held (full at the start); thread-safe."""

    def __init__(
        self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a bucket needs a positive rate and room for one token")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._at = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One token if there is one (True), else False and nothing taken."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1 - 1e-9:  # a whole token, give or take float rounding
                self._tokens -= 1
                return True
            return False


class _Body(io.BytesIO):
    """What botocore reads a response body from (`AWSResponse.raw.stream()`)."""

    def stream(self, **_: object) -> Iterator[bytes]:
        chunk = self.read()
        while chunk:
            yield chunk
            chunk = self.read()


def throttling_response(url: str) -> AWSResponse:
    """AWS IoT's answer to a request over its API's rate (rest-json error: the code in the
    x-amzn-ErrorType header, the message in the body)."""
    body = b'{"message":"' + THROTTLING_MESSAGE.encode() + b'"}'
    headers = {
        "x-amzn-ErrorType": f"{THROTTLING}:",
        "x-amzn-RequestId": str(uuid.uuid4()),
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    # A plain dict of headers (botocore wraps it in its own mapping).
    return AWSResponse(url, 400, headers, _Body(body))  # type: ignore[arg-type]


class IotRateLimits:
    """One account's AWS IoT rate limits: a token bucket per operation in `rates` (requests per
    second); operations not in `rates` are not limited."""

    def __init__(
        self,
        rates: Mapping[str, float],
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rates = dict(rates)
        self.burst_seconds = burst_seconds
        self._buckets = {
            operation: TokenBucket(rate, max(1.0, rate * burst_seconds), clock)
            for operation, rate in self.rates.items()
        }
        self._lock = threading.Lock()
        self._allowed: dict[str, int] = {}
        self._throttled: dict[str, int] = {}
        self._hook_id = f"fleetkey-iot-limits-{uuid.uuid4()}"

    @classmethod
    def documented(
        cls,
        *,
        scale: float = 1.0,
        overrides: Mapping[str, float] | None = None,
        jitr: bool = True,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> IotRateLimits:
        """The documented rates (`DOCUMENTED_RATES`), each times `scale` (an account with raised
        quotas, or a faster test), then `overrides`; without AWS IoT's JITR limit if not
        `jitr`."""
        rates = {r.operation: r.per_second * scale for r in DOCUMENTED_RATES}
        rates.update(overrides or {})
        if not jitr:
            rates.pop(JITR, None)
        return cls(rates, burst_seconds=burst_seconds, clock=clock)

    # ---- admission ------------------------------------------------------------------------------

    def admit(self, operation: str) -> bool:
        """Take a token of `operation`'s bucket: True when the request may proceed (always, and
        uncounted, for an operation without a limit), False when AWS IoT would throttle it."""
        bucket = self._buckets.get(operation)
        if bucket is None:
            return True
        allowed = bucket.take()
        with self._lock:
            counts = self._allowed if allowed else self._throttled
            counts[operation] = counts.get(operation, 0) + 1
        return allowed

    def _before_send(self, request: Any, event_name: str = "", **_: object) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        if self.admit(operation):
            return None  # sent to the endpoint
        response = throttling_response(request.url)
        # botocore calls every before-send handler and keeps the first response (this one runs
        # first): a refused request must not reach a later one either, such as moto's in-process
        # mock (`mock_aws`), which would carry it out. Each attempt is a new request object.
        request.url = REFUSED_URL
        return response

    # ---- installation ---------------------------------------------------------------------------

    def install(self, target: Any) -> Any:
        """Limit the AWS IoT calls of `target`: a boto3 client (its own calls) or a boto3
        session (the clients it creates from now on). Installing twice is one installation."""
        _events(target).register_first(
            "before-send.iot", self._before_send, unique_id=self._hook_id
        )
        return target

    def uninstall(self, target: Any) -> None:
        _events(target).unregister("before-send.iot", unique_id=self._hook_id)

    # ---- observation ----------------------------------------------------------------------------

    def statistics(self) -> dict[str, dict[str, int]]:
        """Per limited operation seen: requests allowed and throttled (HTTP attempts, retries
        included)."""
        with self._lock:
            operations = sorted(set(self._allowed) | set(self._throttled))
            return {
                op: {"allowed": self._allowed.get(op, 0), "throttled": self._throttled.get(op, 0)}
                for op in operations
            }

    def reset_statistics(self) -> None:
        with self._lock:
            self._allowed.clear()
            self._throttled.clear()


def _events(target: Any) -> Any:
    """The event emitter of a boto3 client (`meta.events`) or session (`events`)."""
    meta = getattr(target, "meta", None)
    if meta is not None and hasattr(meta, "events"):
        return meta.events
    return target.events


def default_session() -> Any:
    """boto3's default session (what `boto3.client` and the functions' clients use), created if
    there is none yet."""
    import boto3

    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    return boto3.DEFAULT_SESSION
