"""What the adapters share: client construction and the transient/permanent split of AWS errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_kms import KMSClient

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
def client(service: Literal["dynamodb"], region: str | None = None) -> DynamoDBClient: ...
@overload
def client(service: Literal["iot"], region: str | None = None) -> IoTClient: ...
@overload
def client(service: Literal["kms"], region: str | None = None) -> KMSClient: ...
def client(
    service: Literal["dynamodb", "iot", "kms"], region: str | None = None
) -> DynamoDBClient | IoTClient | KMSClient:
    """A boto3 client for one of the services fleetkey calls, with fleetkey's retries and
    timeouts."""
    import boto3  # imported where a real client is first needed; tests inject their own

    return boto3.client(service, region_name=region, config=CLIENT_CONFIG)
