"""A device's MQTT connection to AWS IoT Core (or the local emulator): paho-mqtt over mutual TLS,
driven from the caller's thread (no background loop, so paho never reconnects by itself)."""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt

TIMEOUT = 10.0


class MqttDevice:
    """`outcome` is 'accepted', 'refused: <CONNACK reason or connection error>', or
    'disconnected (<reason>)' once an accepted connection was closed by the broker."""

    def __init__(
        self,
        client_id: str,
        certfile: Path,
        keyfile: Path,
        endpoint_ca: Path,
        address: tuple[str, int],
    ) -> None:
        self.client_id = client_id
        self.certfile, self.keyfile, self.endpoint_ca = certfile, keyfile, endpoint_ca
        self.address = address
        self.client: mqtt.Client | None = None
        self.outcome: str | None = None
        self.messages: list[mqtt.MQTTMessage] = []
        self.suback: list | None = None

    def connect(
        self, client_id: str | None = None, timeout: float = TIMEOUT, clean_session: bool = True
    ) -> str:
        self.close()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or self.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
        try:
            client.tls_set(
                ca_certs=str(self.endpoint_ca),
                certfile=str(self.certfile),
                keyfile=str(self.keyfile),
            )
        except ssl.SSLError as exc:  # the device's own TLS stack refuses its key (e.g. RSA-1024)
            self.outcome = f"refused: client TLS: {exc.reason}"
            return self.outcome
        self.outcome, self.client = None, client

        def on_connect(_c, _u, _flags, reason, _props):
            self.outcome = "accepted" if not reason.is_failure else f"refused: {reason}"

        def on_disconnect(_c, _u, _flags, reason, _props):
            if self.outcome is None:
                self.outcome = f"refused: connection closed ({reason})"
            elif self.outcome == "accepted":
                self.outcome = f"disconnected ({reason})"

        client.on_connect, client.on_disconnect = on_connect, on_disconnect
        client.on_message = lambda _c, _u, message: self.messages.append(message)
        client.on_subscribe = lambda _c, _u, _mid, codes, _props: setattr(self, "suback", codes)
        try:
            client.connect(*self.address, keepalive=30)
        except OSError as exc:  # e.g. the TLS handshake refused the client certificate
            self.outcome = f"refused: {type(exc).__name__}: {exc}"
            return self.outcome
        self.pump(lambda: self.outcome is not None, timeout)
        return self.outcome or "refused: no answer"

    def pump(self, until, timeout: float = TIMEOUT) -> bool:
        """Run the client's network loop until `until()` holds or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                return True
            rc = self.client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS and self.outcome is None:
                self.outcome = f"refused: connection lost ({mqtt.error_string(rc)})"
        return until()

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        """The SUBACK codes (0x80 for a refused filter)."""
        self.suback = None
        self.client.subscribe(topic_filter, qos)
        if not self.pump(lambda: self.suback is not None):
            raise TimeoutError("no SUBACK")
        return [code.value for code in self.suback]

    def publish(self, topic: str, payload: dict, qos: int = 1) -> None:
        info = self.client.publish(topic, json.dumps(payload), qos)
        self.pump(lambda: info.is_published() or self.outcome != "accepted", 5)

    def close(self) -> None:
        if self.client is not None:
            # closing a connection the broker may already have closed: any failure is moot
            with contextlib.suppress(Exception):
                self.client.disconnect()
                self.client.loop(0.05)
            self.client = None
