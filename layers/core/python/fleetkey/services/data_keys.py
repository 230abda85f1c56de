"""Device-bound data keys: each device life has one data encryption key, which exists only
wrapped by KMS (GenerateDataKey on the stack's data-key key, the encryption context naming the
device, its owner and its epoch), and is handed out only

- to the device itself, sealed to its current certificate's public key (HPKE, RFC 9180, for EC
  keys; RSA-OAEP-256 for RSA keys: `fleetkey.crypto.sealing`), after it proves itself with a
  client assertion exactly as at /v1/token (single-use, recorded in the same transaction that
  checks the device is still ACTIVE with that certificate);
- to an IAM-authenticated backend, as the KMS-wrapped blob and its encryption context, which it
  decrypts under its own kms:Decrypt grant (scoped by encryption context).

A life's key is created at its first request, recorded with a `data_key_created` record in the
device's chain in one transaction conditional on the device being ACTIVE as read, so no key is
created for a device suspended or decommissioned meanwhile. Decommission destroys every key of the
device (and so does an ownership transfer, which is a recommission: the new owner's life starts
with a new key).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fleetkey.adapters.data_keys import encryption_context
from fleetkey.clock import Clock, timestamp, utc_now
from fleetkey.crypto.sealing import seal_data_key
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import Device
from fleetkey.domain.oauth import InvalidClient, InvalidScope, OAuthInvalidRequest
from fleetkey.domain.profiles import get_profile
from fleetkey.errors import Conflict, FleetkeyError, NotFound
from fleetkey.ports import (
    AlreadyExists,
    DataKeyRecords,
    DataKeyVault,
    DeviceChange,
    DeviceChanged,
    DeviceRepository,
)
from fleetkey.services.tokens import MAX_ASSERTION_BYTES, TokenService
from fleetkey.settings import Settings

# The scope a device's profile must allow for it to obtain its data key.
DATA_KEY_SCOPE = "fleetkey:data-key"
MAX_ROUNDS = 4


class DataKeyService:
    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        records: DataKeyRecords,
        vault: DataKeyVault,
        tokens: TokenService,
        clock: Clock = utc_now,
    ) -> None:
        self._settings = settings
        self._devices = devices
        self._records = records
        self._vault = vault
        self._tokens = tokens
        self._clock = clock

    def _key_id(self) -> str:
        if not self._settings.data_key_kms_key_id:
            raise FleetkeyError("no data-key KMS key is configured")
        return self._settings.data_key_kms_key_id

    def for_device(self, device_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The device's data key, sealed to its current certificate's key.

        AWS calls: 1 (the device's credential) + 1 (the assertion's single-use write, with the
        device check) + 1 (the key: GetItem) + 1 (KMS Decrypt); a life's first request instead
        reads the device, generates (KMS GenerateDataKey) and records the key (1 transaction).

        Raises:
            OAuthInvalidRequest: the body is not {"client_assertion": <JWT>}.
            InvalidClient: the assertion does not authenticate this device (as /v1/token), or
                the device changed before the key was granted.
            InvalidScope: the device's profile does not allow data keys.
            InvalidGrant: a replayed assertion, unattested firmware.
        """
        assertion = body.get("client_assertion")
        if set(body) != {"client_assertion"} or not isinstance(assertion, str):
            raise OAuthInvalidRequest('the body must be {"client_assertion": "<JWT>"}')
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthInvalidRequest("client_assertion is required (at most 8 KiB)")
        if not DEVICE_ID.fullmatch(device_id):  # no device has it: refused before any read
            raise InvalidClient("device id")
        key_id = self._key_id()  # a misconfigured stack answers 503 before using the assertion
        auth = self._tokens.authenticate(assertion, None)
        if auth.device.device_id != device_id:
            raise InvalidClient("the assertion is another device's")
        rules = get_profile(auth.device.profile).token_rules
        if DATA_KEY_SCOPE not in rules.scopes:
            raise InvalidScope("this device's profile does not allow data keys")
        attestation = self._tokens.attested_firmware(auth.claims, auth.device.profile, rules)
        self._tokens.record_assertion(auth, attestation)

        device = auth.device
        context = encryption_context(device.device_id, device.owner, device.epoch)
        blob = self._records.get(device.device_id, device.epoch)
        if blob is None:
            plaintext, blob = self._create(device.device_id, device.epoch, context)
        else:
            plaintext = self._vault.decrypt(key_id, blob, context)
        public_key = load_pem_public_key(auth.certificate.public_key_pem.encode())
        sealed = seal_data_key(
            public_key,
            plaintext,
            device_id=device.device_id,
            epoch=device.epoch,
            owner=device.owner,
        )
        return {
            "device_id": device.device_id,
            "epoch": device.epoch,
            "owner": device.owner,
            "certificate_id": auth.certificate.certificate_id,
            "key_ref": _key_ref(blob),
            **sealed.to_public(),
        }

    def _create(self, device_id: str, epoch: int, context: dict[str, str]) -> tuple[bytes, bytes]:
        """Generate the life's key and record it with its audit record, conditional on the device
        being ACTIVE in that life as read; a concurrent first request that won is decrypted
        instead."""
        plaintext, blob = self._vault.generate(self._key_id(), context)
        for _ in range(MAX_ROUNDS):
            device = self._devices.get(device_id)
            if device is None or device.state is not DeviceState.ACTIVE or device.epoch != epoch:
                raise InvalidClient("device not active")
            change = DeviceChange(
                action="data_key_created",
                actor=f"device:{device_id}",
                at=timestamp(self._clock()),
                details={"epoch": epoch, "key_ref": _key_ref(blob)},
            )
            try:
                self._devices.apply(
                    device, change, with_writes=[self._records.put(device_id, epoch, blob)]
                )
            except DeviceChanged:
                continue
            except AlreadyExists:
                kept = self._records.get(device_id, epoch)
                if kept is None:
                    continue
                return self._vault.decrypt(self._key_id(), kept, context), kept
            return plaintext, blob
        raise InvalidClient("device kept changing")

    def _audit_read(self, device: Device, actor: str, blob: bytes) -> None:
        """A backend's read of a device's data key, in the device's chain (who, which key)."""
        for _ in range(MAX_ROUNDS):
            change = DeviceChange(
                action="data_key_read",
                actor=actor,
                at=timestamp(self._clock()),
                details={"epoch": device.epoch, "key_ref": _key_ref(blob)},
            )
            try:
                self._devices.apply(device, change)
                return
            except DeviceChanged as changed:
                if changed.current is None or changed.current.epoch != device.epoch:
                    raise Conflict(f"device {device.device_id} changed; retry") from None
                if changed.current.state not in (DeviceState.ACTIVE, DeviceState.SUSPENDED):
                    raise Conflict(f"device {device.device_id} is no longer in service") from None
                device = changed.current
        raise Conflict(f"device {device.device_id} kept changing; retry")

    def for_backend(self, device_id: str, *, actor: str) -> dict[str, Any]:
        """The device's current data key as KMS holds it (the wrapped blob and its encryption
        context), for a backend that decrypts it with its own kms:Decrypt grant. Only for a
        device in service (ACTIVE or SUSPENDED): after decommission there is none to give. The
        read is audited (`data_key_read`, with the caller) in the device's chain.

        AWS calls: 3 (device, key, the audit transaction).

        Raises:
            NotFound: no such device, or it has no data key in this life yet.
            Conflict: the device is not in service.
        """
        if not DEVICE_ID.fullmatch(device_id):
            raise NotFound(f"no device {device_id[:128]!r}")
        device = self._devices.get(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        if device.state not in (DeviceState.ACTIVE, DeviceState.SUSPENDED):
            raise Conflict(f"device {device_id} is {device.state.value}: it has no data key")
        blob = self._records.get(device_id, device.epoch)
        if blob is None:
            raise NotFound(f"device {device_id} has no data key in this life yet")
        self._audit_read(device, actor, blob)
        return {
            "device_id": device_id,
            "owner": device.owner,
            "epoch": device.epoch,
            "key_id": self._key_id(),
            "key_ref": _key_ref(blob),
            "ciphertext_blob": base64.b64encode(blob).decode(),
            "encryption_context": encryption_context(device_id, device.owner, device.epoch),
        }


def _key_ref(blob: bytes) -> str:
    """A short, stable name of a wrapped key (not secret): the first 16 hex of its SHA-256."""
    return hashlib.sha256(blob).hexdigest()[:16]
