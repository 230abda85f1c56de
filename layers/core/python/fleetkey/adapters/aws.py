"""What the adapters share: client construction and the transient/permanent split of AWS errors.

Metrics: `KmsThrottles`, every KMS response that refused a request for throttling (each attempt,
the SDK's own retries included: a throttle its retry absorbed still means fleetkey reached a KMS
quota), emitted at once with the function's `service` dimension alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot_data import IoTDataPlaneClient
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_sqs import SQSClient

# Standard retry mode retries throttling and 5xx inside the SDK; what still fails reaches us.
CLIENT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 3}, connect_timeout=2, read_timeout=5
)

TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailureException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "TransactionInProgressException",
        "LimitExceededException",
        "KMSInternalException",
    }
)


def error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def is_transient(exc: BaseException) -> bool:
    """True for failures a later retry of the same request may not see."""
    if isinstance(exc, ClientError):
        return error_code(exc) in TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, HTTPClientError))


@overload
def client(
    service: Literal["dynamodb"], region: str | None = None, endpoint_url: str | None = None
) -> DynamoDBClient: ...
@overload
def client(
    service: Literal["iot"], region: str | None = None, endpoint_url: str | None = None
) -> IoTClient: ...
@overload
def client(
    service: Literal["iot-data"], region: str | None = None, endpoint_url: str | None = None
) -> IoTDataPlaneClient: ...
@overload
def client(
    service: Literal["kms"], region: str | None = None, endpoint_url: str | None = None
) -> KMSClient: ...
@overload
def client(
    service: Literal["sqs"], region: str | None = None, endpoint_url: str | None = None
) -> SQSClient: ...
def client(
    service: Literal["dynamodb", "iot", "iot-data", "kms", "sqs"],
    region: str | None = None,
    endpoint_url: str | None = None,
) -> DynamoDBClient | IoTClient | IoTDataPlaneClient | KMSClient | SQSClient:
    """A boto3 client for one of the services fleetkey calls, with fleetkey's retries and
    timeouts. `endpoint_url` None lets boto3 resolve it (AWS_ENDPOINT_URL, else AWS's own); the
    iot-data client needs the account's own endpoint (iot:DescribeEndpoint), see
    `fleetkey.adapters.iot_data`."""
    import boto3  # imported where a real client is first needed; tests inject their own

    made = boto3.client(
        service, region_name=region, endpoint_url=endpoint_url, config=CLIENT_CONFIG
    )
    if service == "kms":
        made.meta.events.register("response-received.kms", count_kms_throttle)
    return made


# The error codes KMS answers a request over its quota with (KMS: ThrottlingException).
KMS_THROTTLE_CODES = frozenset({"ThrottlingException", "Throttling"})
KMS_THROTTLE_METRIC = "KmsThrottles"


def count_kms_throttle(parsed_response: dict[str, Any] | None = None, **_: Any) -> None:
    """botocore's `response-received.kms` handler (once per attempt): a throttled response is
    counted as `KmsThrottles`. A metric of its own (Powertools `single_metric`), so that no
    dimension the invocation adds later (a refusal's `error`) lands on it."""
    error = (parsed_response or {}).get("Error") or {}
    if error.get("Code") not in KMS_THROTTLE_CODES:
        return
    from aws_lambda_powertools.metrics import MetricUnit, single_metric
    from aws_lambda_powertools.metrics.functions import is_metrics_disabled

    from fleetkey.observability import metrics

    if is_metrics_disabled():  # POWERTOOLS_METRICS_DISABLED, as for the other metrics
        return
    with single_metric(
        name=KMS_THROTTLE_METRIC, unit=MetricUnit.Count, value=1, namespace=metrics.namespace
    ):
        pass
