"""Typed settings, built once at cold start from the function's environment.

Domain code receives a `Settings`; only `Settings.from_environ` looks at the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from fleetkey.errors import FleetkeyError

# The local stack's API address; a deployed stack sets FLEETKEY_ISSUER to its API's URL.
LOCAL_ISSUER = "http://127.0.0.1:8080"
# The local stack's name: the value of its token signing keys' tag (a deployed stack's functions
# get their CloudFormation stack name in FLEETKEY_STACK_NAME).
LOCAL_STACK_NAME = "fleetkey-local"
# The local stack's token function role: the only principal its signing keys' policy lets sign.
LOCAL_TOKEN_SIGNER_ROLE_ARN = "arn:aws:iam::123456789012:role/fleetkey-local-token"
# The local stack's admin and maintenance function roles: the only principals its signing keys'
# policy lets schedule their deletion (retirement, and the undo of a refused rotation).
LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS = (
    "arn:aws:iam::123456789012:role/fleetkey-local-admin",
    "arn:aws:iam::123456789012:role/fleetkey-local-maintenance",
)

# The local stack's rotation function roles: the only principals its issuing CA key's policy lets
# sign (a deployed stack passes its own in FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS).
LOCAL_ISSUING_CA_SIGNER_ROLE_ARNS = (
    "arn:aws:iam::123456789012:role/fleetkey-local-rotation",
    "arn:aws:iam::123456789012:role/fleetkey-local-rotation-events",
)


class SettingsError(FleetkeyError):
    code = "misconfigured"


@dataclass(frozen=True, slots=True)
class Settings:
    table_name: str
    region: str
    # Prefix of the AWS IoT policies and thing types fleetkey owns. Things are named by device id
    # (the MQTT client id), so deployments sharing an account must not share device ids.
    name_prefix: str = "fleetkey"
    # How long a trust-anchor (manufacturer CA) snapshot is reused before it is read again.
    trust_anchor_cache_seconds: int = 60
    # The largest allow-list manifest one import accepts.
    max_import_rows: int = 10_000
    # The token issuer (RFC 8414 `issuer`): the API's base URL; assertions are addressed to it.
    issuer: str = LOCAL_ISSUER
    # The KMS key created with the stack: the sole signing key until the first rotation.
    token_key_id: str | None = None
    # The token function's role: the only principal a signing key's policy lets sign. Every
    # function that confirms signing keys compares their policy with the one built from it.
    token_signer_role_arn: str = LOCAL_TOKEN_SIGNER_ROLE_ARN
    # The roles a signing key's policy lets schedule its deletion (admin and maintenance): part
    # of the key policy every function compares.
    token_key_retirer_role_arns: tuple[str, ...] = LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS
    # The stack's name: its signing keys are tagged fleetkey:purpose=token-signing:<stack_name>,
    # and its roles may touch no other key.
    stack_name: str = LOCAL_STACK_NAME
    # The lifecycle queue (teardowns, and convergence that could not finish in a request).
    lifecycle_queue_url: str | None = None
    # The symmetric KMS key that wraps devices' data keys.
    data_key_kms_key_id: str | None = None
    # The iot-data endpoint (https://...); None: read once with iot:DescribeEndpoint.
    iot_data_endpoint: str | None = None
    # How long after a teardown completed a recommission waits: the converge function's timeout,
    # so that no other copy of the teardown (SQS delivers at least once) can still be running.
    recommission_quiet_seconds: int = 60
    # The roles the issuing CA key's policy lets sign (the rotation functions).
    issuing_ca_signer_role_arns: tuple[str, ...] = LOCAL_ISSUING_CA_SIGNER_ROLE_ARNS
    # How long a device has to connect with (or commit) a new certificate before the rotation
    # is rolled back.
    rotation_commit_seconds: int = 3600
    # How many renewal commands the sweep sends per minute (AWS IoT's publish quota is shared).
    renewal_rate_per_minute: int = 100

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        try:
            table_name = env["FLEETKEY_TABLE"]
        except KeyError:
            raise SettingsError("FLEETKEY_TABLE is not set") from None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not region:
            raise SettingsError("AWS_REGION is not set")
        try:
            cache_seconds = int(env.get("FLEETKEY_TRUST_ANCHOR_CACHE_SECONDS", "60"))
            max_rows = int(env.get("FLEETKEY_MAX_IMPORT_ROWS", "10000"))
        except ValueError as exc:
            raise SettingsError(f"numeric setting is not a number: {exc}") from None
        if cache_seconds < 0 or max_rows < 1:
            raise SettingsError("cache seconds must be >= 0 and the import row limit >= 1")
        return cls(
            table_name=table_name,
            region=region,
            name_prefix=env.get("FLEETKEY_NAME_PREFIX", "fleetkey"),
            trust_anchor_cache_seconds=cache_seconds,
            max_import_rows=max_rows,
            issuer=env.get("FLEETKEY_ISSUER", LOCAL_ISSUER).rstrip("/"),
            token_key_id=env.get("FLEETKEY_TOKEN_KEY_ID") or None,
            token_signer_role_arn=(
                env.get("FLEETKEY_TOKEN_SIGNER_ROLE_ARN") or LOCAL_TOKEN_SIGNER_ROLE_ARN
            ),
            token_key_retirer_role_arns=_arns(
                env.get("FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS"), LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS
            ),
            stack_name=env.get("FLEETKEY_STACK_NAME") or LOCAL_STACK_NAME,
            lifecycle_queue_url=env.get("FLEETKEY_LIFECYCLE_QUEUE_URL") or None,
            data_key_kms_key_id=env.get("FLEETKEY_DATA_KEY_ID") or None,
            iot_data_endpoint=env.get("FLEETKEY_IOT_DATA_ENDPOINT") or None,
            recommission_quiet_seconds=_seconds(env.get("FLEETKEY_RECOMMISSION_QUIET_SECONDS")),
            issuing_ca_signer_role_arns=_arns(
                env.get("FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS"), LOCAL_ISSUING_CA_SIGNER_ROLE_ARNS
            ),
            rotation_commit_seconds=_bounded(
                env.get("FLEETKEY_ROTATION_COMMIT_SECONDS"), 3600, 60, 7 * 86400
            ),
            renewal_rate_per_minute=_bounded(
                env.get("FLEETKEY_RENEWAL_RATE_PER_MINUTE"), 100, 1, 10_000
            ),
        )


def _seconds(value: str | None, default: int = 60) -> int:
    """A whole number of seconds, 0-900 (a Lambda function's longest timeout)."""
    if value is None or value == "":
        return default
    if not value.isdigit() or int(value) > 900:
        raise SettingsError(f"not a number of seconds from 0 to 900: {value!r}")
    return int(value)


def _bounded(value: str | None, default: int, low: int, high: int) -> int:
    """A whole number from `low` to `high`; `default` when unset or empty."""
    if value is None or value == "":
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise SettingsError(f"not a whole number from {low} to {high}: {value!r}")
    return int(value)


def _arns(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of ARNs (blank entries dropped); `default` when unset or empty."""
    arns = tuple(a.strip() for a in (value or "").split(",") if a.strip())
    return arns or default
