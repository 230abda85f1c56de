"""A local AWS IoT Core: an MQTT 3.1.1 broker over mutual TLS that applies AWS IoT's rules, so any
MQTT client (paho-mqtt, device firmware) connects to it as a device would connect to AWS IoT.

It is amqtt's broker, run on an asyncio loop in a background thread, with an authentication plugin
and a topic-checking plugin that play AWS IoT's part, reading the AWS IoT registry of the moto
backend in the same process (`iot_backends[account][region]`: certificates, CAs, things, policies).

What a connection goes through:

1. TLS. The server certificate (for 127.0.0.1 and localhost) is issued by a local endpoint CA,
   written to the state directory (`endpoint_ca_path`): devices trust it as they trust the Amazon
   Root CA. A client certificate is required, and it must chain to a CA certificate registered in
   AWS IoT, whatever the CA's status (AWS IoT refuses new registrations under an INACTIVE CA, not
   the device certificates already registered under it; those are decided at CONNECT by their
   own status). Each connection is accepted as plain TCP and upgraded with `loop.start_tls`
   under the current trust store, rebuilt whenever the registered CAs change, so a CA registered
   a moment ago is trusted on the next connection and a certificate from an unregistered CA fails
   the handshake (no MQTT at all; counted as `tls_untrusted_certificate`).
2. CONNECT (the authentication plugin, before amqtt touches any session of that client id):
   - an unknown certificate from a registered ACTIVE CA is registered PENDING_ACTIVATION
     (`fleetkey_local.iot.auto_register`), the certificate-registered event goes to the rules,
     and the connection is refused: just-in-time registration;
   - a known certificate must be ACTIVE, and its policies must allow `iot:Connect` on
     `client/<clientId>` (thing variables resolved when the certificate is attached to the thing
     named by the client id);
   - refused connections get CONNACK 0x05 (not authorized) and are closed. AWS IoT closes the
     connection without a CONNACK (after the TLS handshake for certificate problems); a client
     sees a refusal either way. Accepted: the presence `connected` event goes to the rules.
3. Messages (the topic plugin): SUBSCRIBE is checked as `iot:Subscribe` on `topicfilter/<filter>`
   (refused: SUBACK 0x80), every delivery as `iot:Receive` on `topic/<topic>` (refused: not
   delivered), PUBLISH as `iot:Publish` on `topic/<topic>`; a denied publish disconnects the client,
   as AWS IoT does. QoS is at most 1 (a QoS 2 subscription is granted QoS 1; a QoS 2 publish
   disconnects). Allowed publishes also go to the rules engine (`fleetkey_local.rules`).

`publish()` / `publish_command()` are iot-data Publish and `disconnect()` is iot-data
DeleteConnection; while an emulator runs, moto's iot-data Publish and DeleteConnection (boto3
`iot-data` against the local endpoint) are forwarded to it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetkey_local import iot as iot_emulation
from fleetkey_local.iot_policy import (
    ConnectionContext,
    PolicyError,
    arn_prefix,
    client_resource,
    evaluate,
    parse_document,
    topic_filter_resource,
    topic_resource,
)
from fleetkey_local.rules import RULES, Invocation, Rule, RulesEngine
from fleetkey_local.stack import ACCOUNT, REGION, client_factory

logger = logging.getLogger("fleetkey_local.iot_core")

ENDPOINT_CA_FILE = "iot-endpoint-ca.pem"
ENDPOINT_CA_KEY_FILE = "iot-endpoint-ca.key"
SERVER_CERT_FILE = "iot-server.pem"
SERVER_KEY_FILE = "iot-server.key"
COMMANDS = ("rotate", "reset", "validate")
SESSION_KEY = "fleetkey.iot.connection"
TLS_HANDSHAKE_TIMEOUT = 10.0
TLS_SHUTDOWN_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 5.0

# Running emulators by id: the plugins, which amqtt builds from a configuration of plain values,
# find theirs here; moto's iot-data Publish is forwarded to those of its account and region.
_EMULATORS: dict[str, IotCoreEmulator] = {}
_bridge_lock = threading.Lock()


def _snapshot(mapping: dict) -> list:
    """The items of a moto backend dict that moto's server threads may be changing."""
    for _ in range(10):
        try:
            return list(mapping.items())
        except RuntimeError:  # changed size during iteration
            continue
    return list(dict(mapping).items())


def registry_backend(account: str = ACCOUNT, region: str = REGION):
    """The AWS IoT registry of moto's backend in this process (certificates, CAs, things,
    policies), read directly: what AWS IoT's own connection handling sees."""
    from moto.iot.models import iot_backends

    return iot_backends[account][region]


# ---- the endpoint's PKI -----------------------------------------------------------------------


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_endpoint_pki(
    state_dir: Path,
    hosts: Sequence[str],
    server_files: tuple[str, str] = (SERVER_CERT_FILE, SERVER_KEY_FILE),
) -> tuple[Path, Path, Path]:
    """The endpoint CA (created once per state directory and kept, so devices keep trusting it)
    and a fresh server certificate for `hosts`, written to `server_files` (certificate, key) in
    the state directory: each local TLS endpoint has its own. Returns (CA, server certificate,
    server key)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ca_path, ca_key_path = state_dir / ENDPOINT_CA_FILE, state_dir / ENDPOINT_CA_KEY_FILE
    now = datetime.now(UTC)
    if ca_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleetkey local"),
                x509.NameAttribute(NameOID.COMMON_NAME, "fleetkey local IoT endpoint CA"),
            ]
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, _key_pem(ca_key), private=True)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))

    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in hosts:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            general: x509.GeneralName = x509.DNSName(host)
        else:
            if address.is_unspecified:
                continue
            general = x509.IPAddress(address)
        if general not in names:
            names.append(general)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_path, server_key_path = state_dir / server_files[0], state_dir / server_files[1]
    _write(server_key_path, _key_pem(server_key), private=True)
    _write(server_path, server_cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, server_path, server_key_path


class TrustStore:
    """A TLS server context whose client certificates must chain to a CA certificate registered in
    AWS IoT (and, when given, to one of `extra_anchors()`: PEM texts, e.g. fleetkey's issuing CA
    chain for the EST listener). Rebuilt when the registered CAs or the extra anchors change
    (checked on every connection: a dict read, and whatever `extra_anchors` reads).
    `verify_mode` is CERT_REQUIRED (AWS IoT) or CERT_OPTIONAL (a certificate, if presented, must
    be trusted)."""

    def __init__(
        self,
        backend,
        certfile: Path,
        keyfile: Path,
        *,
        extra_anchors: Callable[[], Iterable[str]] | None = None,
        verify_mode: ssl.VerifyMode = ssl.CERT_REQUIRED,
    ) -> None:
        self._backend = backend
        self._certfile, self._keyfile = certfile, keyfile
        self._extra_anchors = extra_anchors
        self._verify_mode = verify_mode
        self._key: tuple[frozenset[str], frozenset[str]] | None = None
        self._context: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self.rebuilds = 0

    def context(self) -> ssl.SSLContext:
        registered = _snapshot(self._backend().ca_certificates)
        cas = {ca_id: ca.certificate_pem for ca_id, ca in registered}
        extra = frozenset(self._extra_anchors() if self._extra_anchors is not None else ())
        key = (frozenset(cas), extra)
        with self._lock:
            if self._context is None or key != self._key:
                self._context = self._build(cas, extra)
                self._key = key
                self.rebuilds += 1
            return self._context

    def _build(self, cas: dict[str, str], extra: frozenset[str]) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._certfile, self._keyfile)
        context.verify_mode = self._verify_mode
        # A registered CA is a trust anchor even when it is not self-signed (an intermediate, or
        # fleetkey's issuing CA under a customer's root), as AWS IoT treats it.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        anchors = [(f"registered CA {ca_id}", pem) for ca_id, pem in cas.items()]
        anchors += [("trust anchor", pem) for pem in sorted(extra)]
        for name, pem in anchors:
            try:
                context.load_verify_locations(cadata=pem)
            except (ssl.SSLError, ValueError) as exc:  # moto stores whatever it was given
                logger.warning("%s is not a usable certificate: %s", name, exc)
        return context


def _tls_refusal_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "").lower()
        if "expired" in message:
            return "tls_certificate_expired"
        if "not yet valid" in message:
            return "tls_certificate_not_yet_valid"
        return "tls_untrusted_certificate"
    if isinstance(exc, ssl.SSLError):
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(exc):
            return "tls_no_client_certificate"
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return "tls_untrusted_certificate"
        return "tls_handshake_failed"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "tls_handshake_timeout"
    return "tls_connection_lost"


# ---- connections -------------------------------------------------------------------------------


@dataclass
class Connection:
    """An accepted MQTT connection, as AWS IoT sees it (kept in the amqtt session)."""

    client_id: str
    certificate_id: str
    certificate_arn: str
    context: ConnectionContext
    policies: tuple
    remote_address: str | None
    session_identifier: str = field(default_factory=lambda: str(uuid.uuid4()))
    loaded_at: float = field(default_factory=time.monotonic)
    disconnect_reason: str | None = None


@dataclass(frozen=True)
class ConnectDecision:
    allowed: bool
    reason: str
    connection: Connection | None = None


async def _drop(handler) -> None:
    """Disconnect a client from the server's side, as AWS IoT does: close its TCP connection.

    amqtt stops a protocol handler by cancelling its reader and waiting for it; on Python 3.11
    `asyncio.wait_for` swallows that cancellation when a packet arrives at the same moment, and
    the reader (and the stop) never end. A closed transport ends the reader in any case."""
    stream_writer = getattr(getattr(handler, "writer", None), "_writer", None)
    transport = getattr(stream_writer, "transport", None)
    if handler.session is not None:
        await handler.handle_connection_closed()
    if transport is not None:
        transport.abort()


class _TlsAcceptor(asyncio.Protocol):
    """Holds a new TCP connection (not reading) until the broker upgrades it to TLS."""

    def __init__(self, broker: _IotBroker, listener_name: str) -> None:
        self._broker = broker
        self._listener_name = listener_name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # nothing may be read before the TLS protocol takes over
        task = asyncio.get_running_loop().create_task(
            self._broker.accept_tls(transport, self._listener_name)
        )
        self._broker.handshakes.add(task)
        task.add_done_callback(self._broker.handshakes.discard)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        pass


class _IotBroker(Broker):
    """amqtt's broker with AWS IoT's connection semantics where amqtt's differ (see the module
    docstring); the authentication and topic decisions are the plugins'."""

    def __init__(self, emulator: IotCoreEmulator, config: dict, loop) -> None:
        self.emulator = emulator
        self.handshakes: set[asyncio.Task] = set()
        # the loop holds tasks weakly: these are kept until they are done
        self.broadcasts: set[asyncio.Task] = set()
        self.stopping = False
        super().__init__(config, loop=loop, plugin_namespace=f"fleetkey.iot_core.{emulator.id}")

    # TLS: accept TCP, then upgrade with the current trust store (and see why a handshake failed,
    # which asyncio's ssl= server would only log at debug level).
    async def _create_server_instance(
        self, listener_name, listener_type, address, port, ssl_context
    ):
        return await self._loop.create_server(
            lambda: _TlsAcceptor(self, listener_name), address, port, reuse_address=True
        )

    async def accept_tls(self, transport: asyncio.Transport, listener_name: str) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        reader = asyncio.StreamReader(limit=2**16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(
            reader, lambda r, w: self.stream_connected(r, w, listener_name), loop=loop
        )
        try:
            context = self.emulator.trust.context()  # a dict read; a rebuild when CAs changed
            tls_transport = await loop.start_tls(
                transport,
                protocol,
                context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
                # closing a connection waits this long at most for the client's close_notify
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            )
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as exc:  # noqa: BLE001 - the handshake failed: no MQTT on this connection
            self.emulator._count_refusal(_tls_refusal_reason(exc))
            logger.info("TLS handshake from %s refused: %s", peer, exc)
            transport.abort()
            return
        protocol.connection_made(tls_transport)

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        """amqtt 0.12.1's, with the CONNECT authorized first: amqtt drops the existing session of
        the client id (clean session) before it authenticates, so a refused connection with a
        victim's client id would wipe the victim's subscriptions. AWS IoT decides first and then
        disconnects the client already connected with that id (DUPLICATE_CLIENTID)."""
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except AMQTTError as exc:
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        if not await self._authenticate(session, None):
            try:
                await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
                await asyncio.wait_for(writer.close(), 5)
            except (TimeoutError, OSError):  # the client hung up first
                pass
            raise MQTTError(f"connection of {session.client_id!r} refused")
        connection: Connection = session.attributes[SESSION_KEY]

        existing = self._sessions.get(session.client_id) if session.client_id else None
        if existing is not None and existing[0].transitions.is_connected():
            previous = existing[0].attributes.get(SESSION_KEY)
            if isinstance(previous, Connection):
                previous.disconnect_reason = "DUPLICATE_CLIENTID"
            await _drop(existing[1])
            # Let the previous connection's message loop finish its disconnection first (a
            # persistent session object is reused below).
            for _ in range(500):
                if not existing[0].transitions.is_connected():
                    break
                await asyncio.sleep(0.01)

        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            # amqtt reuses the stored session without its new clean_session flag: a persistent
            # session stored as clean would then be swept away (with the live connection's
            # handler) by amqtt's session monitor.
            old, _ = self._sessions[session.client_id]
            for name in (
                "clean_session",
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
                "ssl_object",
                "remote_address",
                "remote_port",
            ):
                setattr(old, name, getattr(session, name))
            old.attributes[SESSION_KEY] = connection
            session = old
            session.parent = 1
        else:
            session.parent = 0

        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        self.emulator._connected(connection)
        return handler, session

    async def _authenticate(self, session, listener) -> bool:
        if isinstance(session.attributes.get(SESSION_KEY), Connection):
            return True  # decided in _initialize_client_session
        return await super()._authenticate(session, listener)

    async def _handle_disconnect(self, client_session, handler, disconnect_waiter) -> None:
        connection = client_session.attributes.get(SESSION_KEY)
        if isinstance(connection, Connection) and connection.disconnect_reason is None:
            if isinstance(disconnect_waiter.result(), DisconnectPacket):
                connection.disconnect_reason = "CLIENT_INITIATED_DISCONNECT"
            elif self.stopping:
                connection.disconnect_reason = "SERVER_INITIATED_DISCONNECT"
            else:
                connection.disconnect_reason = "CONNECTION_LOST"
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        # Here rather than in the plugin's disconnected event, which runs later, when a reused
        # persistent session may already hold the next connection.
        if isinstance(connection, Connection):
            self.emulator._disconnected(connection)

    async def _handle_message_delivery(self, client_session, handler, wait_deliver) -> bool:
        # amqtt ends the message loop on an invalid publish ($ topics, wildcards) without closing
        # the connection or the session; AWS IoT disconnects. QoS 2 is not supported by AWS IoT.
        message = wait_deliver.result()
        if message is not None and message.qos == QOS_2:
            self.emulator._disconnect_reason(client_session, "CLIENT_ERROR")
            await _drop(handler)
            return True
        if not await super()._handle_message_delivery(client_session, handler, wait_deliver):
            self.emulator._disconnect_reason(client_session, "CLIENT_ERROR")
            await _drop(handler)
        return True

    async def add_subscription(self, subscription, session) -> int:
        topic_filter, qos = subscription
        return await super().add_subscription((topic_filter, min(qos, QOS_1)), session)

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        # amqtt sends retained messages of every filter anyone subscribed to when a client
        # connects, and never checks Receive for them: only the session's own filters, checked.
        topic_filter, qos = subscription
        subscribers = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _ in subscribers):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if tasks:
            await asyncio.wait(tasks)


class IotCoreAuthPlugin(BaseAuthPlugin):
    """AWS IoT's connection decision; allowed device messages go on to the rules."""

    @dataclass
    class Config:
        emulator: str

    def _emulator(self) -> IotCoreEmulator:
        return _EMULATORS[self.config.emulator]

    async def authenticate(self, *, session) -> bool:
        return await self._emulator()._authenticate(session)

    async def on_broker_message_broadcast(self, *, client_id: str, message) -> None:
        self._emulator()._rules_dispatch(message.topic, bytes(message.data or b""))


class IotCoreTopicPlugin(BaseTopicPlugin):
    """AWS IoT's policy checks of subscriptions, deliveries and publishes."""

    @dataclass
    class Config:
        emulator: str

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        return await _EMULATORS[self.config.emulator]._authorize(session, topic, action)


def _install_iot_data_bridge() -> None:
    """moto's iot-data Publish only records the message, and moto has no DeleteConnection
    (`moto_patches` adds one that finds no client): forward both to the running emulators of
    their account and region, as AWS IoT's message broker would deliver the message and close
    the connection."""
    from moto.iotdata.models import IoTDataPlaneBackend

    from fleetkey_local import moto_patches

    moto_patches.patch_iot_data()
    with _bridge_lock:
        if not getattr(IoTDataPlaneBackend.publish, "_fleetkey_bridge", False):
            original_publish = IoTDataPlaneBackend.publish

            def publish(self, topic: str, payload: bytes) -> None:
                original_publish(self, topic, payload)
                for emulator in list(_EMULATORS.values()):
                    if (emulator.account, emulator.region) == (self.account_id, self.region_name):
                        emulator.publish(topic, payload)

            publish._fleetkey_bridge = True
            IoTDataPlaneBackend.publish = publish

        if not getattr(IoTDataPlaneBackend.delete_connection, "_fleetkey_bridge", False):
            original_delete_connection = IoTDataPlaneBackend.delete_connection

            def delete_connection(
                self, client_id: str, clean_session: bool, prevent_will_message: bool
            ) -> None:
                closed = False
                for emulator in list(_EMULATORS.values()):
                    if (emulator.account, emulator.region) == (self.account_id, self.region_name):
                        closed = (
                            emulator.disconnect(
                                client_id,
                                clean_session=clean_session,
                                prevent_will_message=prevent_will_message,
                            )
                            or closed
                        )
                if not closed:  # not connected anywhere: AWS's ResourceNotFoundException
                    original_delete_connection(self, client_id, clean_session, prevent_will_message)

            delete_connection._fleetkey_bridge = True
            IoTDataPlaneBackend.delete_connection = delete_connection


# ---- the emulator ---------------------------------------------------------------------------


class IotCoreEmulator:
    """AWS IoT Core on `host:port` (port 0: a free one) for the moto backend of `account` and
    `region` in this process. `start()` and `stop()` are synchronous; the broker runs on its own
    asyncio loop in a background thread.

    `endpoint_url` is the moto server for the AWS IoT calls of just-in-time registration
    (default: the environment's AWS_ENDPOINT_URL, which `fleetkey_local.server.local_aws` sets).
    """

    def __init__(
        self,
        state_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 8883,
        account: str = ACCOUNT,
        region: str = REGION,
        rules: Sequence[Rule] = RULES,
        *,
        endpoint_url: str | None = None,
        policy_refresh_seconds: float = 1.0,
        function_concurrency: int = 1,
        bridge_iot_data: bool = True,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.state_dir = Path(state_dir)
        self.host = host
        self.account = account
        self.region = region
        self.arn_prefix = arn_prefix(region, account)
        self.policy_refresh_seconds = policy_refresh_seconds
        self.bridge_iot_data = bridge_iot_data
        self._requested_port = port
        self._port: int | None = None
        self._endpoint_url = endpoint_url
        self.rules = RulesEngine(
            rules, account=account, region=region, concurrency=function_concurrency
        )
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self._versions: Counter[str] = Counter()
        self._policy_index: dict[str, tuple] = {}
        self._policy_index_at = float("-inf")
        self._ca_certificates: dict[str, x509.Certificate] = {}
        self._blocking = ThreadPoolExecutor(max_workers=4, thread_name_prefix="iot-core")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: _IotBroker | None = None
        self._iot = None
        # written by start(): what devices trust, as they trust the Amazon Root CA
        self.endpoint_ca_path: Path = self.state_dir / ENDPOINT_CA_FILE
        self.trust: TrustStore | None = None
        self._stopped = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> IotCoreEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def address(self) -> tuple[str, int]:
        if self._port is None:
            raise RuntimeError("the emulator is not started")
        return self.host, self._port

    @property
    def port(self) -> int:
        return self.address[1]

    def _backend(self):
        return registry_backend(self.account, self.region)

    def start(self, timeout: float = 30.0) -> IotCoreEmulator:
        if self.running:
            return self
        if self._stopped:
            raise RuntimeError("an emulator runs once: create a new one")
        from moto.settings import iot_use_valid_cert

        if not iot_use_valid_cert():
            raise RuntimeError(
                "moto must use AWS's certificate ids (iot.use_valid_cert): run inside "
                "fleetkey_local.server.local_aws() or "
                "mock_aws(config={'iot': {'use_valid_cert': True}})"
            )
        self.endpoint_ca_path, certfile, keyfile = ensure_endpoint_pki(self.state_dir, [self.host])
        self.trust = TrustStore(self._backend, certfile, keyfile)
        self._iot = client_factory(self._endpoint_url, self.region)("iot")
        amqtt_logger = logging.getLogger("amqtt")
        if amqtt_logger.level == logging.NOTSET:
            # amqtt logs every refused connection as a warning; refusals are counted here instead.
            amqtt_logger.setLevel(logging.ERROR)
        _EMULATORS[self.id] = self
        if self.bridge_iot_data:
            _install_iot_data_bridge()
        started = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(started, failure), name=f"iot-core-{self.id[:8]}", daemon=True
        )
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("the IoT Core emulator did not start")
        if failure:
            _EMULATORS.pop(self.id, None)
            self._thread.join(5)
            raise RuntimeError(f"the IoT Core emulator did not start: {failure[0]}") from failure[0]
        return self

    def _run(self, started: threading.Event, failure: list) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_broker())
        except BaseException as exc:  # noqa: BLE001 - re-raised by start() in the caller's thread
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=2))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _start_broker(self) -> None:
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self._requested_port}"},
            },
            "timeout_disconnect_delay": 0,
            "plugins": {
                f"{__name__}.IotCoreAuthPlugin": {"emulator": self.id},
                f"{__name__}.IotCoreTopicPlugin": {"emulator": self.id},
            },
        }
        self._broker = _IotBroker(self, config, asyncio.get_running_loop())
        await self._broker.start()
        server = self._broker._servers["default"].instance
        self._port = server.sockets[0].getsockname()[1]

    def stop(self, timeout: float = 15.0) -> None:
        """Close every connection and the listener; wait for running function invocations."""
        self._stopped = True
        if self.running:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(timeout)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout)
        _EMULATORS.pop(self.id, None)
        self.rules.close()
        self._blocking.shutdown(wait=True, cancel_futures=True)

    async def _shutdown(self) -> None:
        broker = self._broker
        broker.stopping = True
        for task in list(broker.handshakes):
            task.cancel()
        for session, handler in list(broker.sessions.values()):
            if session.transitions.is_connected():
                await _drop(handler)
        try:
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            # A safety net: amqtt can wait forever on a protocol handler that does not stop.
            logger.warning(
                "amqtt did not shut down within %s s; closing what is left", SHUTDOWN_TIMEOUT
            )
            for server in broker._servers.values():
                server.instance.close()

    # ---- what callers see ----------------------------------------------------------------------

    @property
    def invocations(self) -> list[Invocation]:
        """Every function invocation the rules made (all attempts of each in one record)."""
        return self.rules.invocations

    def drain(self, timeout: float | None = 30.0) -> bool:
        """Wait until the queued function invocations are done; False on timeout."""
        return self.rules.drain(timeout)

    def statistics(self) -> dict:
        with self._counters_lock:
            counters = dict(self._counters)

        def group(prefix: str) -> dict[str, int]:
            return {
                k[len(prefix) :]: v for k, v in sorted(counters.items()) if k.startswith(prefix)
            }

        return {
            "connections": {
                "accepted": counters.get("connect.accepted", 0),
                "refused": group("connect.refused."),
                "disconnected": group("disconnect."),
            },
            "just_in_time_registrations": counters.get("jitr.registered", 0),
            "publishes": group("publish."),
            "subscriptions": group("subscribe."),
            "deliveries": group("receive."),
            "rules": self.rules.statistics(),
        }

    def connected_clients(self) -> list[str]:
        if self._broker is None:
            return []
        return sorted(
            client_id
            for client_id, (session, _) in list(self._broker.sessions.items())
            if session.transitions.is_connected()
        )

    def publish(
        self, topic: str, payload: bytes | str | dict | list = b"", qos: int | None = None
    ) -> None:
        """iot-data Publish: deliver to the subscribers whose policies allow Receive (at their
        subscription's QoS when `qos` is None), and offer it to the rules."""
        if not self.running:
            raise RuntimeError("the emulator is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("publish() blocks: call it from another thread than the broker's")
        if isinstance(payload, (dict, list)):
            data = json.dumps(payload).encode()
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = bytes(payload)
        self._count("publish.api")
        self._rules_dispatch(topic, data)
        asyncio.run_coroutine_threadsafe(
            self._broker.internal_message_broadcast(topic, data, qos), self._loop
        ).result(10)

    def disconnect(
        self, client_id: str, *, clean_session: bool = False, prevent_will_message: bool = False
    ) -> bool:
        """iot-data DeleteConnection: close the connection of `client_id` at once (presence
        event disconnectReason API_INITIATED_DISCONNECT). `clean_session` also discards a
        persistent session (subscriptions, queued messages); `prevent_will_message` keeps its
        Last Will from being published. False when no such client is connected."""
        if not self.running:
            return False
        if threading.current_thread() is self._thread:
            raise RuntimeError("disconnect() blocks: call it from another thread than the broker's")
        return asyncio.run_coroutine_threadsafe(
            self._disconnect_client(client_id, clean_session, prevent_will_message), self._loop
        ).result(10)

    async def _disconnect_client(
        self, client_id: str, clean_session: bool, prevent_will_message: bool
    ) -> bool:
        broker = self._broker
        entry = broker.sessions.get(client_id) if broker is not None else None
        if entry is None or not entry[0].transitions.is_connected():
            return False
        session, handler = entry
        self._disconnect_reason(session, "API_INITIATED_DISCONNECT")
        if prevent_will_message:
            # amqtt publishes the will of a connection that ends without DISCONNECT; a reused
            # persistent session takes the next CONNECT's will flag again.
            session.will_flag = False
        await _drop(handler)
        for _ in range(500):  # the message loop handles the disconnection
            if not session.transitions.is_connected():
                break
            await asyncio.sleep(0.01)
        current = broker.sessions.get(client_id)
        if (
            clean_session
            and current is not None
            and current[0] is session
            and not session.transitions.is_connected()
        ):
            await broker._delete_session(client_id)
        return True

    def publish_command(
        self, device_id: str, command: str, payload: Any = None, qos: int | None = None
    ) -> str:
        """A fleetkey command to a device on fleetkey/<device_id>/commands/<command>; the topic."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
        topic = f"fleetkey/{device_id}/commands/{command}"
        self.publish(topic, {} if payload is None else payload, qos)
        return topic

    # ---- counting ------------------------------------------------------------------------------

    def _count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[key] += n

    def _count_refusal(self, reason: str) -> None:
        self._count(f"connect.refused.{reason}")

    # ---- AWS IoT's registry, read in-process ---------------------------------------------------

    def _issuing_ca(self, backend, certificate: x509.Certificate):
        for ca_id, ca in _snapshot(backend.ca_certificates):
            parsed = self._ca_certificates.get(ca_id)
            if parsed is None:
                try:
                    parsed = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
                except ValueError:
                    continue
                self._ca_certificates[ca_id] = parsed
            if parsed.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(parsed)
            except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
                continue  # not its issuer, or a key type or algorithm it cannot verify
            return ca
        return None

    def _thing_context(self, backend, certificate_arn: str, client_id: str) -> ConnectionContext:
        attachment = backend.principal_things.get((certificate_arn, client_id))
        if attachment is None:
            return ConnectionContext(client_id=client_id)
        thing = attachment[1]
        thing = backend.things.get(thing.arn, thing)
        return ConnectionContext(
            client_id=client_id,
            thing_name=thing.thing_name,
            thing_type_name=thing.thing_type.thing_type_name if thing.thing_type else None,
            thing_attributes=dict(thing.attributes or {}),
        )

    @staticmethod
    def _parsed_policies(policies) -> tuple:
        parsed = []
        for policy in policies:
            try:
                parsed.append(parse_document(policy.document))
            except PolicyError as exc:
                # Kept as text: evaluating it raises, and the request is denied.
                logger.warning("policy %s cannot be read: %s", policy.name, exc)
                parsed.append(policy.document)
        return tuple(parsed)

    def _policies_now(self, backend, certificate_arn: str) -> tuple:
        return self._parsed_policies(
            policy
            for (target, _), (_, policy) in _snapshot(backend.principal_policies)
            if target == certificate_arn
        )

    def _policies_indexed(self, certificate_arn: str) -> tuple:
        now = time.monotonic()
        if now - self._policy_index_at > self.policy_refresh_seconds:
            index: dict[str, list] = {}
            for (target, _), (_, policy) in _snapshot(self._backend().principal_policies):
                index.setdefault(target, []).append(policy)
            self._policy_index = {k: self._parsed_policies(v) for k, v in index.items()}
            self._policy_index_at = now
        return self._policy_index.get(certificate_arn, ())

    # ---- CONNECT -------------------------------------------------------------------------------

    async def _authenticate(self, session) -> bool:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        loop = asyncio.get_running_loop()
        try:
            decision = await loop.run_in_executor(
                self._blocking,
                self._decide_connect,
                der,
                session.client_id or "",
                session.remote_address,
            )
        except Exception:
            logger.exception("connection decision failed")
            decision = ConnectDecision(False, "internal_error")
        if decision.allowed:
            session.attributes[SESSION_KEY] = decision.connection
            self._count("connect.accepted")
        else:
            self._count_refusal(decision.reason)
            logger.info("connection of %r refused: %s", session.client_id, decision.reason)
        return decision.allowed

    def _decide_connect(
        self, der: bytes | None, client_id: str, remote: str | None
    ) -> ConnectDecision:
        if not der:
            return ConnectDecision(False, "no_client_certificate")
        certificate_id = hashlib.sha256(der).hexdigest()
        backend = self._backend()
        registered = backend.certificates.get(certificate_id)
        if registered is None:
            return self._register_just_in_time(backend, der)
        if registered.status != "ACTIVE":
            return ConnectDecision(False, f"certificate_{registered.status.lower()}")
        context = self._thing_context(backend, registered.arn, client_id)
        policies = self._policies_now(backend, registered.arn)
        try:
            decision = evaluate(
                policies, "iot:Connect", client_resource(self.arn_prefix, client_id), context
            )
        except PolicyError as exc:
            logger.warning("policy of %s not understood: %s", certificate_id, exc)
            return ConnectDecision(False, "policy_error")
        if not decision.allowed:
            return ConnectDecision(False, "not_authorized")
        return ConnectDecision(
            True,
            "accepted",
            Connection(
                client_id=client_id,
                certificate_id=certificate_id,
                certificate_arn=registered.arn,
                context=context,
                policies=policies,
                remote_address=remote,
            ),
        )

    def _register_just_in_time(self, backend, der: bytes) -> ConnectDecision:
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return ConnectDecision(False, "malformed_certificate")
        ca = self._issuing_ca(backend, certificate)
        # moto does not keep a CA's auto-registration status; fleetkey turns it on and off with
        # the CA's status. A registered certificate of an INACTIVE CA still connects (above).
        if (
            ca is None
            or ca.status != "ACTIVE"
            or getattr(ca, "auto_registration_status", "ENABLE") != "ENABLE"
        ):
            return ConnectDecision(False, "unknown_certificate")
        device_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        event = iot_emulation.auto_register(self._iot, device_pem, ca.certificate_pem, self.account)
        if event is None:  # registered meanwhile (a concurrent first connection)
            return ConnectDecision(False, "unknown_certificate")
        self._count("jitr.registered")
        topic = f"$aws/events/certificates/registered/{event['caCertificateId']}"
        self._publish_event(topic, event)
        return ConnectDecision(False, "certificate_registered_just_in_time")

    # ---- lifecycle events ----------------------------------------------------------------------

    def _next_version(self, client_id: str) -> int:
        with self._counters_lock:
            self._versions[client_id] += 1
            return self._versions[client_id]

    def _connected(self, connection: Connection) -> None:
        if "#" in connection.client_id or "+" in connection.client_id:
            return  # AWS IoT publishes no lifecycle events for such client ids
        self._publish_event(
            f"$aws/events/presence/connected/{connection.client_id}",
            {
                "clientId": connection.client_id,
                "timestamp": int(time.time() * 1000),
                "eventType": "connected",
                "sessionIdentifier": connection.session_identifier,
                "principalIdentifier": connection.certificate_id,
                "ipAddress": connection.remote_address,
                "versionNumber": self._next_version(connection.client_id),
            },
        )

    def _disconnected(self, connection: Connection) -> None:
        reason = connection.disconnect_reason or "CONNECTION_LOST"
        self._count(f"disconnect.{reason}")
        if "#" in connection.client_id or "+" in connection.client_id:
            return
        self._publish_event(
            f"$aws/events/presence/disconnected/{connection.client_id}",
            {
                "clientId": connection.client_id,
                "timestamp": int(time.time() * 1000),
                "eventType": "disconnected",
                "clientInitiatedDisconnect": reason == "CLIENT_INITIATED_DISCONNECT",
                "sessionIdentifier": connection.session_identifier,
                "principalIdentifier": connection.certificate_id,
                "disconnectReason": reason,
                "versionNumber": self._next_version(connection.client_id),
            },
        )

    def _publish_event(self, topic: str, event: dict) -> None:
        """An event AWS IoT itself publishes: to the rules, and to subscribers allowed to receive
        it. Callable from any thread."""
        self._rules_dispatch(topic, event)
        loop = self._loop
        if loop is None or loop.is_closed() or self._broker is None:
            return
        coroutine = self._broker.internal_message_broadcast(topic, json.dumps(event).encode())
        if threading.current_thread() is self._thread:
            task = asyncio.ensure_future(coroutine)
            self._broker.broadcasts.add(task)
            task.add_done_callback(self._broker.broadcasts.discard)
        else:
            try:
                asyncio.run_coroutine_threadsafe(coroutine, loop)
            except RuntimeError:  # the loop is closing
                coroutine.close()

    def _rules_dispatch(self, topic: str, payload: bytes | dict) -> None:
        try:
            self.rules.dispatch(topic, payload)
        except Exception:
            logger.exception("rules dispatch failed for %s", topic)

    # ---- messages ------------------------------------------------------------------------------

    def _refresh(self, connection: Connection) -> None:
        if time.monotonic() - connection.loaded_at <= self.policy_refresh_seconds:
            return
        backend = self._backend()
        connection.context = self._thing_context(
            backend, connection.certificate_arn, connection.client_id
        )
        connection.policies = self._policies_indexed(connection.certificate_arn)
        connection.loaded_at = time.monotonic()

    def _disconnect_reason(self, session, reason: str) -> None:
        connection = session.attributes.get(SESSION_KEY) if session is not None else None
        if isinstance(connection, Connection) and connection.disconnect_reason is None:
            connection.disconnect_reason = reason

    async def _authorize(self, session, topic: str | None, action: Action | None) -> bool:
        connection = session.attributes.get(SESSION_KEY) if session is not None else None
        if not isinstance(connection, Connection) or topic is None or action is None:
            return False
        self._refresh(connection)
        if action == Action.SUBSCRIBE:
            iot_action, resource, counter = (
                "iot:Subscribe",
                topic_filter_resource(self.arn_prefix, topic),
                "subscribe",
            )
        elif action == Action.PUBLISH:
            iot_action, resource, counter = (
                "iot:Publish",
                topic_resource(self.arn_prefix, topic),
                "publish",
            )
        else:
            iot_action, resource, counter = (
                "iot:Receive",
                topic_resource(self.arn_prefix, topic),
                "receive",
            )
        try:
            allowed = evaluate(
                connection.policies, iot_action, resource, connection.context
            ).allowed
        except PolicyError as exc:
            logger.warning("policy of %s not understood: %s", connection.certificate_id, exc)
            allowed = False
        self._count(f"{counter}.{'allowed' if allowed else 'denied'}")
        if not allowed:
            logger.info("%s denied to %s on %s", iot_action, connection.client_id, topic)
            if action == Action.PUBLISH:
                # AWS IoT disconnects a client that publishes where its policy does not allow.
                self._disconnect_reason(session, "AUTH_ERROR")
                entry = self._broker.sessions.get(session.client_id) if self._broker else None
                if entry is not None and entry[0] is session:
                    await _drop(entry[1])
        return allowed
