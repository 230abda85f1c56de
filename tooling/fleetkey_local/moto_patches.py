"""Where moto departs from AWS in ways fleetkey depends on, brought back in line.

Each patch names the AWS behaviour it restores. Applied by the embedded stack and the tests.

1. IoT GetRegistrationCode: AWS gives one code per account and region; moto a new random one on
   every call, so no CA verification certificate could ever match.
2. DynamoDB TransactWriteItems: AWS transactions are atomic and isolated and cost the same
   whatever the table size. moto deep-copies the whole table once per action of a transaction
   (to roll back), which makes a 10,000-row import take hours and tens of GiB, and it does not
   isolate a transaction from concurrent requests. The patch snapshots only the items the
   transaction touches, and serializes DynamoDB writes and transactions behind one lock.
3. IoT CreateThing: AWS returns the existing thing when the request is identical and answers
   ResourceAlreadyExists when it differs; moto silently replaces the thing.
4. IoT certificate ids: AWS uses the SHA-256 of the certificate's DER; moto does only with its
   `iot.use_valid_cert` option, which `mock_aws(config=...)` sets but the moto server's
   /moto-api/config endpoint silently ignores. `use_aws_certificate_ids` sets it in-process.
5. IoT RegisterCACertificate: AWS answers ResourceAlreadyExists for a CA certificate already
   registered in the account and region, and changes nothing; moto replaces the CA (so a refused
   second registration with setAsActive=False deactivated the first, stopping its JITR).
6. IoT DescribeCertificate: AWS reports `caCertificateId`, the registered CA that issued the
   certificate (absent for a certificate registered without a CA); moto keeps it but leaves it
   out of the description. moto also finds the CA of RegisterCertificate(caCertificatePem=...)
   only if the PEM text is byte-identical to the registered one; AWS matches the certificate
   itself, so the patch compares DER.
7. IoT CA auto-registration: AWS keeps a CA's `autoRegistrationStatus` (RegisterCACertificate
   `allowAutoRegistration`, UpdateCACertificate `newAutoRegistrationStatus`) and reports it in
   DescribeCACertificate; JITR happens only while it is ENABLE. moto ignores both parameters.
8. IoT UpdateCertificate: AWS refuses to move a REVOKED certificate anywhere else ("once a
   certificate is revoked, its status can't be changed"; CertificateStateException, "the
   certificate operation is not allowed") and refuses PENDING_TRANSFER and PENDING_ACTIVATION
   as a new status (statuses AWS IoT sets itself; InvalidRequestException). moto sets any status.
   (DeleteCertificate of an ACTIVE certificate or one with things or policies attached, and
   DeleteThing with principals attached, moto already refuses as AWS does.)
9. iot-data DeleteConnection (`DELETE /connections/{clientId}?cleanSession=&preventWillMessage=`):
   moto has no such operation. It answers ResourceNotFoundException, AWS's answer for a client
   that is not connected (moto has no MQTT connections); while the local IoT Core emulator runs,
   `fleetkey_local.iot_core` forwards it there and the client's connection is closed at once.
"""

from __future__ import annotations

import copy
import threading
import types
import uuid
from typing import Any
from urllib.parse import unquote

from fleetkey_local import moto_kms_patches

_applied = False
_dynamodb_lock = threading.RLock()


def _stable_registration_code(self) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fleetkey:{self.account_id}:{self.region_name}"))


def _patch_iot() -> None:
    from moto.core.responses import ActionResult
    from moto.iot.exceptions import (
        CertificateStateException,
        InvalidRequestException,
        ResourceAlreadyExistsException,
    )
    from moto.iot.models import FakeCaCertificate, FakeCertificate, IoTBackend
    from moto.iot.responses import IoTResponse

    IoTBackend.get_registration_code = _stable_registration_code
    original_create_thing = IoTBackend.create_thing

    def create_thing(self, thing_name, thing_type_name, attribute_payload, *args, **kwargs):
        existing = next((t for t in self.things.values() if t.thing_name == thing_name), None)
        if existing is not None:
            wanted = (attribute_payload or {}).get("attributes", {})
            existing_type = existing.thing_type.thing_type_name if existing.thing_type else None
            if existing_type == thing_type_name and existing.attributes == wanted:
                return existing
            raise ResourceAlreadyExistsException(
                "thing already exists with different configuration", thing_name, existing.arn
            )
        return original_create_thing(
            self, thing_name, thing_type_name, attribute_payload, *args, **kwargs
        )

    IoTBackend.create_thing = create_thing

    def register_ca_certificate(
        self: IoTBackend, ca_certificate: str, *args: Any, **kwargs: Any
    ) -> FakeCaCertificate:
        candidate = FakeCaCertificate(
            ca_certificate, "INACTIVE", self.account_id, self.region_name, {}
        )
        existing = self.ca_certificates.get(candidate.certificate_id)
        if existing is not None:
            raise ResourceAlreadyExistsException(
                "The certificate is already provisioned or registered",
                existing.certificate_id,
                existing.arn,
            )
        return original_register_ca_certificate(self, ca_certificate, *args, **kwargs)

    original_register_ca_certificate = IoTBackend.register_ca_certificate
    IoTBackend.register_ca_certificate = register_ca_certificate

    def find_ca_certificate(self: IoTBackend, ca_certificate_pem: str | None) -> str | None:
        wanted = _der(ca_certificate_pem)
        if wanted is None:
            return None
        for ca_cert in self.ca_certificates.values():
            if _der(ca_cert.certificate_pem) == wanted:
                return ca_cert.certificate_id
        return None

    IoTBackend._find_ca_certificate = find_ca_certificate

    original_description = FakeCertificate.to_description_dict

    def to_description_dict(self: FakeCertificate) -> dict[str, Any]:
        description = original_description(self)
        if self.ca_certificate_id is not None:
            description["caCertificateId"] = self.ca_certificate_id
        if isinstance(self, FakeCaCertificate):
            description["autoRegistrationStatus"] = getattr(
                self, "auto_registration_status", "DISABLE"
            )
        return description

    FakeCertificate.to_description_dict = to_description_dict

    def register_ca_response(self: IoTResponse) -> ActionResult:
        cert = self.iot_backend.register_ca_certificate(
            ca_certificate=self._get_param("caCertificate"),
            set_as_active=self._get_bool_param("setAsActive"),
            registration_config=self._get_param("registrationConfig"),
        )
        allow = self._get_bool_param("allowAutoRegistration")
        cert.auto_registration_status = "ENABLE" if allow else "DISABLE"
        return ActionResult({"certificateId": cert.certificate_id, "certificateArn": cert.arn})

    IoTResponse.register_ca_certificate = register_ca_response
    original_update_ca_response = IoTResponse.update_ca_certificate

    def update_ca_response(self: IoTResponse) -> Any:
        result = original_update_ca_response(self)
        wanted = self._get_param("newAutoRegistrationStatus")
        if wanted in ("ENABLE", "DISABLE"):
            certificate_id = unquote(self.path.split("/")[-1])
            self.iot_backend.ca_certificates[certificate_id].auto_registration_status = wanted
        return result

    IoTResponse.update_ca_certificate = update_ca_response

    original_update_certificate = IoTBackend.update_certificate

    def update_certificate(self: IoTBackend, certificate_id: str, new_status: str) -> None:
        certificate = self.describe_certificate(certificate_id)
        if new_status in ("PENDING_TRANSFER", "PENDING_ACTIVATION"):
            raise InvalidRequestException(f"the status {new_status} is set by AWS IoT only")
        if certificate.status == "REVOKED" and new_status != "REVOKED":
            raise CertificateStateException(
                "The certificate is revoked: its status cannot change.", certificate_id
            )
        original_update_certificate(self, certificate_id, new_status)

    IoTBackend.update_certificate = update_certificate


def patch_iot_data() -> None:
    """Patch 9: iot-data DeleteConnection. Idempotent; the IoT Core emulator's bridge calls it
    too, so the operation exists whenever an emulator runs."""
    from moto.iotdata.exceptions import ResourceNotFoundException
    from moto.iotdata.models import IoTDataPlaneBackend
    from moto.iotdata.responses import IoTDataPlaneResponse

    if hasattr(IoTDataPlaneBackend, "delete_connection"):
        return

    def delete_connection(
        self: IoTDataPlaneBackend, client_id: str, clean_session: bool, prevent_will_message: bool
    ) -> None:
        raise ResourceNotFoundException()

    def delete_connection_response(self: IoTDataPlaneResponse) -> str:
        # The client id is the URI's last segment, percent-encoded by the SDK.
        client_id = unquote(self.path.split("/connections/", 1)[-1])

        def flag(name: str) -> bool:
            return self.querystring.get(name, ["false"])[0].lower() == "true"

        self.iotdata_backend.delete_connection(
            client_id=client_id,
            clean_session=flag("cleanSession"),
            prevent_will_message=flag("preventWillMessage"),
        )
        return ""

    IoTDataPlaneBackend.delete_connection = delete_connection
    IoTDataPlaneResponse.delete_connection = delete_connection_response


def _der(pem: str | None) -> bytes | None:
    """The DER of a PEM certificate, or None if it does not parse (moto then finds no CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if not pem:
        return None
    try:
        return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
    except ValueError:
        return None


def _patch_dynamodb() -> None:
    from moto.dynamodb import models as dynamodb_models
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    def deepcopy(value, memo=None):
        # The whole-table backup becomes the table itself; the wrapper below restores the items
        # the transaction touched instead.
        if isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)

    dynamodb_models.copy = types.SimpleNamespace(deepcopy=deepcopy)

    def touched_items(backend, transact_items):
        touched = []
        for action in transact_items:
            op_type, op = next(iter(action.items()))
            table = backend.tables.get(op.get("TableName"))
            if table is None:
                continue
            key = op["Item"] if op_type == "Put" else op["Key"]
            hash_value = DynamoType(key[table.hash_key_attr])
            range_value = DynamoType(key[table.range_key_attr]) if table.range_key_attr else None
            current = table.get_item(hash_value, range_value)
            touched.append((table, hash_value, range_value, copy.deepcopy(current)))
        return touched

    def restore(touched):
        for table, hash_value, range_value, original in reversed(touched):
            if range_value is None:
                if original is None:
                    table.items.pop(hash_value, None)
                else:
                    table.items[hash_value] = original
            elif original is None:
                table.items.get(hash_value, {}).pop(range_value, None)
            else:
                table.items[hash_value][range_value] = original

    original_transact = DynamoDBBackend.transact_write_items

    def transact_write_items(self, transact_items):
        with _dynamodb_lock:
            touched = touched_items(self, transact_items)
            try:
                return original_transact(self, transact_items)
            except Exception:
                restore(touched)
                raise

    DynamoDBBackend.transact_write_items = transact_write_items

    for name in ("put_item", "update_item", "delete_item", "get_item", "batch_write_item"):
        original = getattr(DynamoDBBackend, name)

        def locked(self, *args, __original=original, **kwargs):
            with _dynamodb_lock:
                return __original(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, locked)


def use_aws_certificate_ids() -> None:
    from moto.settings import default_user_config

    default_user_config.setdefault("iot", {})["use_valid_cert"] = True


def apply() -> None:
    global _applied
    if _applied:
        return
    _patch_iot()
    patch_iot_data()
    _patch_dynamodb()
    moto_kms_patches.apply()
    _applied = True
