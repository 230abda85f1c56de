"""AWS IoT data plane adapter: commands to a device and closing its MQTT connection.

The iot-data endpoint is the account's own (`<prefix>-ats.iot.<region>.amazonaws.com`): boto3's
default `data-ats.iot.<region>.amazonaws.com` answers with a certificate for another name. It is
the configured `endpoint_url` (settings `iot_data_endpoint`), else what iot:DescribeEndpoint
(iot:Data-ATS) says, asked once per process and region.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any, Final

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot_data import IoTDataPlaneClient

COMMANDS: Final = frozenset({"reset", "rotate", "validate"})
COMMAND_TOPIC: Final = "fleetkey/{device_id}/commands/{command}"
# Characters that would make a device id change the topic's shape (levels, wildcards) or that
# AWS IoT refuses in a client id ($ starts the reserved topics).
_UNSAFE_ID_CHARACTERS: Final = frozenset("/+#$\x00")

_endpoints: dict[str | None, str] = {}
_endpoints_lock = threading.Lock()


def data_endpoint(region: str | None, iot_client: IoTClient | None = None) -> str:
    """The account's iot-data endpoint URL in `region` (None: the default region), from
    iot:DescribeEndpoint(endpointType="iot:Data-ATS"), cached for the process.

    AWS calls: 1 (DescribeEndpoint) the first time per region, 0 afterwards.
    """
    with _endpoints_lock:
        cached = _endpoints.get(region)
        if cached is not None:
            return cached
        iot = iot_client or aws_client("iot", region)
        address = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
        url = f"https://{address}"
        _endpoints[region] = url
        return url


def forget_data_endpoints() -> None:
    """Drop the cached endpoints (tests, and the local stack when its endpoint changes)."""
    with _endpoints_lock:
        _endpoints.clear()


def _check_device_id(device_id: str) -> None:
    if not device_id or _UNSAFE_ID_CHARACTERS.intersection(device_id):
        raise ValueError(f"not a device id usable in an MQTT topic or client id: {device_id!r}")


class DeviceChannel:
    """Commands to devices and their connections, through AWS IoT's data plane.

    `client` is a boto3 iot-data client; None builds one on first use, for `endpoint_url` or,
    without it, the endpoint iot:DescribeEndpoint gives (through `iot_client`, None: a real
    one). Nothing is called at construction, so a cold start that never commands a device
    never pays for it.
    """

    def __init__(
        self,
        client: IoTDataPlaneClient | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        iot_client: IoTClient | None = None,
    ) -> None:
        self._client = client
        self._endpoint_url = endpoint_url
        self._region = region
        self._iot_client = iot_client
        self._lock = threading.Lock()

    def _data(self) -> IoTDataPlaneClient:
        with self._lock:
            if self._client is None:
                endpoint = self._endpoint_url or data_endpoint(self._region, self._iot_client)
                self._client = aws_client("iot-data", self._region, endpoint_url=endpoint)
            return self._client

    def send_command(self, device_id: str, command: str, payload: Mapping[str, Any]) -> None:
        """Publish `payload` (JSON) on fleetkey/{device_id}/commands/{command} with QoS 1, so
        AWS IoT delivers it to a connected subscriber until acknowledged (and queues it for a
        persistent session). Fire and forget: nothing says the device acted on it.

        AWS calls: 1 (Publish); + 1 (DescribeEndpoint) on the process's first use without a
        configured endpoint.

        Raises:
            ValueError: an unknown command, or a device id that would change the topic.
            botocore ClientError: any AWS failure.
        """
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; expected one of {sorted(COMMANDS)}")
        _check_device_id(device_id)
        self._data().publish(
            topic=COMMAND_TOPIC.format(device_id=device_id, command=command),
            qos=1,
            payload=json.dumps(payload, separators=(",", ":"), sort_keys=True).encode(),
        )

    def disconnect(self, device_id: str) -> bool:
        """Close the device's MQTT connection at once (client id = device id). True when a
        connection was closed, False when none was open (ResourceNotFoundException).

        A certificate moved out of ACTIVE stops new connections, but AWS IoT closes the open
        ones only "within a few minutes"; DeleteConnection closes it now. It is called for a
        suspension or a decommission, so:
        - cleanSession=True: the persistent session (subscriptions, queued QoS 1 messages) is
          discarded. Left in place, messages queued for the device in its old standing would be
          delivered when it next connects with the same client id, e.g. a stale reset after a
          recommission. A resumed device subscribes again on connecting.
        - preventWillMessage=True: the Last Will is the device's own message, and a device cut
          off for cause (tamper, decommission) no longer speaks with fleetkey's trust; the
          disconnection is still announced by AWS IoT's presence event
          (disconnectReason API_INITIATED_DISCONNECT).

        AWS calls: 1 (DeleteConnection); + 1 (DescribeEndpoint) on the process's first use
        without a configured endpoint.

        Raises:
            ValueError: a device id AWS IoT cannot have as a client id.
            botocore ClientError: any AWS failure but "not connected".
        """
        _check_device_id(device_id)
        try:
            self._data().delete_connection(
                clientId=device_id, cleanSession=True, preventWillMessage=True
            )
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":
                return False
            raise
        return True
