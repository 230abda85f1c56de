"""AWS IoT registry adapter. Every call here is idempotent, so a retried registration converges."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from botocore.exceptions import ClientError

from fleetkey.adapters.aws import client as aws_client
from fleetkey.adapters.aws import error_code
from fleetkey.errors import Conflict, NotSettled

if TYPE_CHECKING:
    from mypy_boto3_iot import IoTClient
    from mypy_boto3_iot.type_defs import AttributePayloadTypeDef

NOT_FOUND = "ResourceNotFoundException"
# Waits between attempts of a teardown step AWS IoT refuses until earlier detaches settle:
# 5 attempts, 3.75 s of waiting at most, so a Lambda invocation stays short and the queue's
# redelivery (not a long sleep) covers anything slower.
TEARDOWN_DELAYS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True, slots=True)
class IotCertificate:
    """A certificate as AWS IoT describes it. `ca_certificate_id` is the registered CA AWS IoT
    says issued it (None for a certificate registered without a CA)."""

    certificate_id: str
    arn: str
    status: str
    pem: str
    ca_certificate_id: str | None = None


class ThingConflict(Conflict):
    """A thing with the device's name exists in AWS IoT and is not fleetkey's (its thing type
    is none of this deployment's profile thing types). Permanent until an operator resolves the
    name clash: nothing in AWS IoT was changed."""

    def __init__(self, thing_name: str, thing_type: str | None) -> None:
        super().__init__(
            f"a thing named {thing_name!r} exists in AWS IoT and is not fleetkey's",
            details={"thing_name": thing_name, "thing_type": thing_type},
        )
        self.thing_name = thing_name
        self.thing_type = thing_type


@contextmanager
def _done_if_not_found() -> Iterator[None]:
    """A teardown step someone else already did (ResourceNotFound) is done."""
    try:
        yield
    except ClientError as exc:
        if error_code(exc) != NOT_FOUND:
            raise


class TeardownNotSettled(NotSettled):
    """AWS IoT still refuses a teardown step after the bounded retries (detaches not yet
    visible: DeleteConflictException, CertificateStateException, InvalidRequestException).
    Nothing is broken and every step done stays done: report the work as not finished so the
    queue delivers it again later."""

    code = "teardown_not_settled"
    status = 503

    def __init__(self, resource: str, operation: str, aws_code: str, attempts: int) -> None:
        super().__init__(
            f"{operation} of {resource!r} not settled after {attempts} attempts ({aws_code})",
            details={
                "resource": resource,
                "operation": operation,
                "aws_code": aws_code,
                "attempts": attempts,
            },
        )
        self.resource = resource
        self.operation = operation
        self.aws_code = aws_code
        self.attempts = attempts


class IotRegistry:
    """`client` is a boto3 IoT client; None builds a real one.

    `sleep` and `teardown_delays` bound the teardown's waits for AWS IoT's eventual consistency
    (tests pass a recording `sleep`); `on_retry(operation)` is told of each retry (a metric).
    """

    def __init__(
        self,
        client: IoTClient | None = None,
        region: str | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        teardown_delays: Sequence[float] = TEARDOWN_DELAYS,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._client: IoTClient = client or aws_client("iot", region)
        self._sleep = sleep
        self._teardown_delays = tuple(teardown_delays)
        self._on_retry = on_retry

    def describe_certificate(self, certificate_id: str) -> IotCertificate | None:
        """The certificate as AWS IoT has it, None when AWS IoT has no such certificate.

        AWS calls: 1 (DescribeCertificate).

        Raises:
            botocore ClientError: any other AWS failure.
        """
        try:
            description = self._client.describe_certificate(certificateId=certificate_id)[
                "certificateDescription"
            ]
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                return None
            raise
        return IotCertificate(
            certificate_id=description["certificateId"],
            arn=description["certificateArn"],
            status=description["status"],
            pem=description["certificatePem"],
            ca_certificate_id=description.get("caCertificateId") or None,
        )

    def ensure_thing(
        self,
        thing_name: str,
        thing_type: str,
        attributes: dict[str, str],
        certificate_arn: str,
        *,
        owned_thing_types: frozenset[str],
    ) -> list[str]:
        """Create the thing for `certificate_arn`, or take over an existing one of fleetkey's:
        bring it to the wanted type and attributes and detach every other certificate (any
        certificate attached to a device's thing may connect as that device). Returns the ARNs
        detached.

        AWS answers CreateThing with success when an identical thing exists (a retry of this
        registration: the attributes name this certificate) and ResourceAlreadyExists when it
        differs, so the take-over costs calls only when there is something to take over. A thing
        is fleetkey's when its type is one of `owned_thing_types` (this deployment's profile
        thing types, `<name_prefix>-<profile>`); any other thing of that name belongs to someone
        else in the account and is left exactly as it is.

        AWS calls: 1 (CreateThing); a take-over 4 + one per page of principals + one per
        certificate detached (DescribeThing, ListThingPrincipals, DetachThingPrincipal...,
        UpdateThing); a refused take-over 2 (CreateThing, DescribeThing).

        Raises:
            ThingConflict: the existing thing is not fleetkey's (nothing changed).
            botocore ClientError: any other AWS failure.
        """
        payload: AttributePayloadTypeDef = {"attributes": attributes, "merge": False}
        try:
            self._client.create_thing(
                thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
            )
            return []
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
        # Read only on this path, so the happy path stays one call. A thing created by another
        # team (or by hand) may share the device's name; detaching its certificates would cut
        # their devices off and hand the thing to ours.
        existing_type = self._client.describe_thing(thingName=thing_name).get("thingTypeName")
        if existing_type not in owned_thing_types:
            raise ThingConflict(thing_name, existing_type)
        stale = [
            arn
            for page in self._client.get_paginator("list_thing_principals").paginate(
                thingName=thing_name
            )
            for arn in page.get("principals", [])
            if arn != certificate_arn
        ]
        for arn in stale:
            self._client.detach_thing_principal(thingName=thing_name, principal=arn)
        self._client.update_thing(
            thingName=thing_name, thingTypeName=thing_type, attributePayload=payload
        )
        return stale

    def attach_policy(self, policy_name: str, certificate_arn: str) -> None:
        self._client.attach_policy(policyName=policy_name, target=certificate_arn)

    def attach_exclusively(self, thing_name: str, certificate_arn: str) -> None:
        """Attach the certificate to the thing; EXCLUSIVE_THING forbids attaching it elsewhere."""
        self._client.attach_thing_principal(
            thingName=thing_name, principal=certificate_arn, thingPrincipalType="EXCLUSIVE_THING"
        )

    def activate_certificate(self, certificate_id: str) -> None:
        self._client.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")

    def revoke_certificate(self, certificate_id: str) -> None:
        self._client.update_certificate(certificateId=certificate_id, newStatus="REVOKED")

    def registration_code(self) -> str:
        return self._client.get_registration_code()["registrationCode"]

    def describe_ca(self, ca_id: str) -> bool:
        """Whether AWS IoT has a CA certificate with id `ca_id` (in any status).

        AWS calls: 1 (DescribeCACertificate).

        Raises:
            botocore ClientError: any AWS failure but "no such CA".
        """
        try:
            self._client.describe_ca_certificate(certificateId=ca_id)
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFoundException", "InvalidRequestException"):
                return False
            raise
        return True

    def register_ca(self, ca_pem: str, verification_pem: str, ca_id: str) -> bool:
        """Register a CA, inactive and without auto-registration (`set_ca_active` turns both on
        once fleetkey trusts it). Returns True when this call registered it, False when AWS IoT
        already had it (ResourceAlreadyExists: nothing changed). Whether a CA already there may
        be adopted is the caller's decision (`ManufacturerCaService`): this adapter cannot tell
        fleetkey's earlier attempt from another team's CA.

        `ca_id` is the id AWS IoT gives this CA (SHA-256 of its DER).

        AWS calls: 1 (RegisterCACertificate).

        Raises:
            botocore ClientError: any AWS failure but ResourceAlreadyExists.
        """
        try:
            self._client.register_ca_certificate(
                caCertificate=ca_pem,
                verificationCertificate=verification_pem,
                setAsActive=False,
                allowAutoRegistration=False,
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            return False
        return True

    def set_ca_active(self, ca_id: str, active: bool) -> None:
        self._client.update_ca_certificate(
            certificateId=ca_id,
            newStatus="ACTIVE" if active else "INACTIVE",
            newAutoRegistrationStatus="ENABLE" if active else "DISABLE",
        )

    # ---- fleetkey's issuing CA and the certificates it issues ----------------------------------

    def register_issuing_ca(self, ca_pem: str, verification_pem: str) -> None:
        """Register fleetkey's issuing CA: ACTIVE, auto-registration off (fleetkey registers
        every certificate it issues itself, so just-in-time registration never sees them). A CA
        AWS IoT already has counts as done (a retry). AWS calls: 1 (RegisterCACertificate).

        Raises:
            botocore ClientError: any AWS failure but ResourceAlreadyExists.
        """
        try:
            self._client.register_ca_certificate(
                caCertificate=ca_pem,
                verificationCertificate=verification_pem,
                setAsActive=True,
                allowAutoRegistration=False,
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise

    def register_issued_certificate(
        self, certificate_id: str, certificate_pem: str, ca_pem: str
    ) -> str:
        """Register a certificate fleetkey issued, INACTIVE (it is activated once its policy and
        thing are attached); its ARN. A certificate AWS IoT already has is left as it is (a
        retry) and its ARN read.

        AWS calls: 1 (RegisterCertificate); + 1 (DescribeCertificate) when it exists.

        Raises:
            botocore ClientError: any AWS failure but ResourceAlreadyExists.
        """
        try:
            response = self._client.register_certificate(
                certificatePem=certificate_pem, caCertificatePem=ca_pem, status="INACTIVE"
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
            existing = self._client.describe_certificate(certificateId=certificate_id)[
                "certificateDescription"
            ]
            return existing["certificateArn"]
        return response["certificateArn"]

    # ---- suspend, resume, teardown ------------------------------------------------------------

    def certificate_status(self, certificate_id: str) -> str | None:
        """The certificate's status in AWS IoT, None when AWS IoT has no such certificate.
        AWS calls: 1 (DescribeCertificate)."""
        current = self.describe_certificate(certificate_id)
        return current.status if current else None

    def set_certificate_status(
        self, certificate_id: str, status: Literal["ACTIVE", "INACTIVE"]
    ) -> bool:
        """Bring a certificate to ACTIVE or INACTIVE (suspend and resume). True when it has that
        status now; False, with nothing done, when AWS IoT has no such certificate or it is
        REVOKED (final in AWS IoT, and in fleetkey a refusal for cause: never left). Also False
        when AWS IoT refuses the update with CertificateStateException (revoked meanwhile, or a
        pending transfer to another account).

        AWS calls: 1 (DescribeCertificate) when it already has the status or cannot change;
        2 otherwise (+ UpdateCertificate).

        Raises:
            ValueError: `status` is neither ACTIVE nor INACTIVE.
            botocore ClientError: any other AWS failure.
        """
        if status not in ("ACTIVE", "INACTIVE"):
            raise ValueError(f"status must be ACTIVE or INACTIVE, not {status!r}")
        current = self.describe_certificate(certificate_id)
        if current is None or current.status == "REVOKED":
            return False
        if current.status == status:
            return True
        try:
            self._client.update_certificate(certificateId=certificate_id, newStatus=status)
        except ClientError as exc:
            if error_code(exc) in (NOT_FOUND, "CertificateStateException"):
                return False
            raise
        return True

    def teardown_certificate(self, certificate_id: str) -> bool:
        """Take a certificate out of AWS IoT in the order AWS IoT requires: out of ACTIVE
        (ACTIVE or PENDING_ACTIVATION -> INACTIVE; REVOKED and INACTIVE stay), every policy
        detached, detached from every thing, then deleted (forceDelete=False: a policy attached
        meanwhile refuses the deletion instead of being silently dropped). True when the
        certificate is no longer in AWS IoT (deleted now, or already absent).

        Idempotent and resumable: each step reads what is left, and ResourceNotFound at any step
        means another run finished it. The deletion is retried on DeleteConflictException and
        CertificateStateException (detaches and the status change settle asynchronously) with
        the bounded backoff; a conflict that outlives it raises TeardownNotSettled, and the next
        run starts over from what AWS IoT then says (a policy or thing attached meanwhile is
        detached then).

        AWS calls: 1 when absent (DescribeCertificate); otherwise DescribeCertificate,
        UpdateCertificate (only from ACTIVE or PENDING_ACTIVATION), one ListAttachedPolicies per
        page + one DetachPolicy per policy, one ListPrincipalThings per page + one
        DetachThingPrincipal per thing, and 1 to 5 DeleteCertificate.

        Raises:
            TeardownNotSettled: AWS IoT still refuses the deletion after the bounded retries.
            botocore ClientError: any other AWS failure.
        """
        certificate = self.describe_certificate(certificate_id)
        if certificate is None:
            return True
        if certificate.status in ("ACTIVE", "PENDING_ACTIVATION"):
            try:
                self._client.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
            except ClientError as exc:
                code = error_code(exc)
                if code == NOT_FOUND:
                    return True
                # Revoked meanwhile (final, and deletable); anything else the deletion reports.
                if code != "CertificateStateException":
                    raise
        arn = certificate.arn
        for policy in self._attached_policies(arn):
            with _done_if_not_found():
                self._client.detach_policy(policyName=policy, target=arn)
        for thing in self._principal_things(arn):
            with _done_if_not_found():
                self._client.detach_thing_principal(thingName=thing, principal=arn)
        self._settle(
            "DeleteCertificate",
            certificate_id,
            lambda: self._client.delete_certificate(
                certificateId=certificate_id, forceDelete=False
            ),
            retry_on=("DeleteConflictException", "CertificateStateException"),
        )
        return True

    def delete_thing(self, thing_name: str, *, owned_thing_types: frozenset[str]) -> bool:
        """Delete a device's thing once its certificates are torn down: every principal still
        attached is detached first (AWS IoT refuses to delete a thing with principals), then the
        thing is deleted, retried on InvalidRequestException (detaches settle asynchronously)
        with the bounded backoff. True when the thing is no longer in AWS IoT (deleted now, or
        already absent). A thing whose type is none of `owned_thing_types` is not fleetkey's
        (see `ensure_thing`) and is left exactly as it is.

        AWS calls: 1 when absent (DescribeThing); otherwise DescribeThing, one
        ListThingPrincipals per page + one DetachThingPrincipal per principal, and 1 to 5
        DeleteThing.

        Raises:
            ThingConflict: the thing is not fleetkey's (nothing changed).
            TeardownNotSettled: AWS IoT still refuses the deletion after the bounded retries.
            botocore ClientError: any other AWS failure.
        """
        try:
            thing_type = self._client.describe_thing(thingName=thing_name).get("thingTypeName")
        except ClientError as exc:
            if error_code(exc) == NOT_FOUND:
                return True
            raise
        if thing_type not in owned_thing_types:
            raise ThingConflict(thing_name, thing_type)
        try:
            principals = [
                arn
                for page in self._client.get_paginator("list_thing_principals").paginate(
                    thingName=thing_name
                )
                for arn in page.get("principals", [])
            ]
        except ClientError as exc:
            if error_code(exc) == NOT_FOUND:
                return True
            raise
        for arn in principals:
            with _done_if_not_found():
                self._client.detach_thing_principal(thingName=thing_name, principal=arn)
        self._settle(
            "DeleteThing",
            thing_name,
            lambda: self._client.delete_thing(thingName=thing_name),
            retry_on=("InvalidRequestException",),
        )
        return True

    def _attached_policies(self, target: str) -> list[str]:
        try:
            return [
                policy["policyName"]
                for page in self._client.get_paginator("list_attached_policies").paginate(
                    target=target
                )
                for policy in page.get("policies", [])
                if "policyName" in policy
            ]
        except ClientError as exc:
            if error_code(exc) == NOT_FOUND:
                return []
            raise

    def _principal_things(self, principal: str) -> list[str]:
        try:
            return [
                thing
                for page in self._client.get_paginator("list_principal_things").paginate(
                    principal=principal
                )
                for thing in page.get("things", [])
            ]
        except ClientError as exc:
            if error_code(exc) == NOT_FOUND:
                return []
            raise

    def _settle(
        self,
        operation: str,
        resource: str,
        call: Callable[[], object],
        *,
        retry_on: tuple[str, ...],
    ) -> None:
        """Run a deletion AWS IoT may refuse until earlier steps settle: retried on `retry_on`
        after each of the teardown delays; ResourceNotFound means it is already deleted."""
        attempts = len(self._teardown_delays) + 1
        for attempt in range(attempts):
            try:
                call()
                return
            except ClientError as exc:
                code = error_code(exc)
                if code == NOT_FOUND:
                    return
                if code not in retry_on:
                    raise
                if attempt == attempts - 1:
                    raise TeardownNotSettled(resource, operation, code, attempts) from exc
            if self._on_retry is not None:
                self._on_retry(operation)
            self._sleep(self._teardown_delays[attempt])
