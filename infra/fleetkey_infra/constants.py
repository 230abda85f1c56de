"""Names and settings of the fleetkey stack, in one place.

The table layout (key names, TTL attribute) and the device profiles are not repeated here: the
constructs import them from the core library, so the stack and the code that uses it share one
definition.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Duration
from aws_cdk import aws_logs as logs

from fleetkey import events
from fleetkey.domain.pki import CA_KEY_SPECS
from fleetkey.domain.profiles import FLEETKEY_THING_ATTRIBUTES
from fleetkey.services.signing_keys import KEY_ORIGIN, KEY_SPEC, KEY_USAGE, TAG_KEY
from fleetkey.store import schema
from fleetkey_infra import edge

# Repository layout, resolved from this file so that synthesis works from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]
CDK_JSON = REPO_ROOT / "cdk.json"
FUNCTIONS_DIR = REPO_ROOT / "functions"
DEFAULT_LAYER_DIR = REPO_ROOT / "build" / "layer"
# `cdk synth -c layerDir=/some/where` points the layer at another build (relative to the repo root).
LAYER_DIR_CONTEXT_KEY = "layerDir"

STACK_ID = "Fleetkey"
STACK_DESCRIPTION = (
    "fleetkey: serverless IoT device identity lifecycle (registration, token vending, admin API)"
)
PROJECT_TAG = "fleetkey"

# Prefix of the AWS IoT resources fleetkey owns (policies, thing types); the functions receive the
# same value as FLEETKEY_NAME_PREFIX so that what they attach is what the stack created.
NAME_PREFIX = "fleetkey"
# A second stack in the same account (`cdk deploy -c stage=<name>`): the stack `Fleetkey-<name>`,
# the name prefix `fleetkey-<name>` (fleetkey_infra.stage). Absent: the names above.
STAGE_CONTEXT_KEY = "stage"
# Every taggable resource of a staged stack carries `stage=<name>` (next to `project`).
STAGE_TAG = "stage"

# Thing attributes the registration service writes, searchable in the registry (AWS IoT allows
# at most three searchable attributes per thing type).
THING_SEARCHABLE_ATTRIBUTES = FLEETKEY_THING_ATTRIBUTES

# Token signing keys: KMS ECC_NIST_P256 SIGN_VERIFY. The tag marks every key this stack signs
# tokens with (its first key and the keys rotation creates), and its value names the stack
# (`fleetkey:purpose=token-signing:<stack name>`, fleetkey.services.signing_keys.
# token_signing_tags): every KMS grant on `key/*` is conditioned on it and on the key spec and
# usage, so no role of this stack reaches another key. One definition, in the core.
TOKEN_SIGNING_TAG_KEY = TAG_KEY
TOKEN_KEY_SPEC = KEY_SPEC
TOKEN_KEY_USAGE = KEY_USAGE
# Material KMS generates, single-Region (CreateKey is conditioned on both; so is every key/*
# grant, and the functions trust no key of another origin).
TOKEN_KEY_ORIGIN = KEY_ORIGIN
# What no fleetkey function role may do to the table's key nor to the data-key key, whatever IAM
# grants (a Deny in each key's own policy): manage, re-tag, re-permission, disable or delete it.
TABLE_KEY_DENIED_ACTIONS = (
    "kms:CancelKeyDeletion",
    "kms:CreateGrant",
    "kms:DisableKey",
    "kms:DisableKeyRotation",
    "kms:ImportKeyMaterial",
    "kms:PutKeyPolicy",
    "kms:ReplicateKey",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateKeyDescription",
)
TOKEN_KEY_DESCRIPTION = "fleetkey access-token signing key (the first; rotation adds new keys)"

# Lambda
HANDLER = "handler.handler"
REGISTRATION_CODE_DIR = FUNCTIONS_DIR / "registration"
ADMIN_CODE_DIR = FUNCTIONS_DIR / "admin"
TOKEN_CODE_DIR = FUNCTIONS_DIR / "token"
DISCOVERY_CODE_DIR = FUNCTIONS_DIR / "discovery"
INTROSPECT_CODE_DIR = FUNCTIONS_DIR / "introspect"
MAINTENANCE_CODE_DIR = FUNCTIONS_DIR / "maintenance"
CONVERGE_CODE_DIR = FUNCTIONS_DIR / "converge"
DEVICE_EVENTS_CODE_DIR = FUNCTIONS_DIR / "device_events"
DATA_KEYS_CODE_DIR = FUNCTIONS_DIR / "data_keys"
ROTATION_CODE_DIR = FUNCTIONS_DIR / "rotation"
ROTATION_EVENTS_CODE_DIR = FUNCTIONS_DIR / "rotation_events"
VALIDATIONS_CODE_DIR = FUNCTIONS_DIR / "validations"
REGISTRATION_MEMORY_MB = 512
ADMIN_MEMORY_MB = 512
# The API functions verify signatures with `cryptography` on their first call: Lambda gives CPU
# in proportion to memory, so a smaller size mostly buys slower cold starts.
TOKEN_MEMORY_MB = 512
DISCOVERY_MEMORY_MB = 512
INTROSPECT_MEMORY_MB = 512
# An hourly job of a few AWS calls, where a slower cold start costs nothing.
MAINTENANCE_MEMORY_MB = 256
# Lifecycle work in the background: AWS IoT calls, no cryptography.
CONVERGE_MEMORY_MB = 256
DEVICE_EVENTS_MEMORY_MB = 256
# Device-facing: verifies the client assertion and seals the data key (HPKE / RSA-OAEP) with
# `cryptography`, like the token function.
DATA_KEYS_MEMORY_MB = 512
# Certificates and CRLs are built and parsed with `cryptography` (and CSRs, assertions and client
# certificates verified) on every call.
ROTATION_MEMORY_MB = 512
ROTATION_EVENTS_MEMORY_MB = 512
# Relying parties' validation requests: a command published to the device and DynamoDB reads and
# writes, no cryptography; the API functions' size, for the same cold starts.
VALIDATIONS_MEMORY_MB = 512
REGISTRATION_TIMEOUT = Duration.seconds(30)
# API Gateway's integration timeout is 29 s; a longer function would be cut off mid-write.
ADMIN_TIMEOUT = Duration.seconds(29)
# Device- and relying-party-facing calls are a few DynamoDB and KMS requests: fail fast (the
# client retries) rather than hold a connection for API Gateway's 29 s.
TOKEN_TIMEOUT = Duration.seconds(10)
DISCOVERY_TIMEOUT = Duration.seconds(10)
INTROSPECT_TIMEOUT = Duration.seconds(10)
# One registry read, a ScheduleKeyDeletion per due key and one transaction, each retried by the
# SDK: far less than a minute, with room for a few keys at once.
MAINTENANCE_TIMEOUT = Duration.seconds(60)
# One batch of lifecycle messages: per device a teardown of a few dozen AWS IoT calls at most,
# with short bounded retries; what cannot finish yet is reported failed and retried by SQS after
# the queue's visibility timeout, so nothing waits minutes inside one invocation.
CONVERGE_TIMEOUT = Duration.seconds(60)
# A suspension: a few DynamoDB writes and AWS IoT calls per certificate.
DEVICE_EVENTS_TIMEOUT = Duration.seconds(30)
DEVICE_EVENTS_ASYNC_RETRY_ATTEMPTS = 2
# Device-facing, behind API Gateway: fail fast, the device retries.
DATA_KEYS_TIMEOUT = Duration.seconds(10)
# Behind API Gateway, at its 29 s: a rotation is a KMS Sign and several AWS IoT control-plane calls
# (register, attach policy and thing), which AWS IoT throttles per account and the SDK retries;
# cut off halfway, a device would hold a registered certificate that no record names.
ROTATION_TIMEOUT = Duration.seconds(29)
# Under the sweep's one-minute period, so that one sweep never overlaps the next.
ROTATION_EVENTS_TIMEOUT = Duration.seconds(55)
# A result is long-polled for up to 20 s (`?wait=`): room for the wait and the reads around it,
# within API Gateway's 29 s integration timeout.
VALIDATIONS_TIMEOUT = Duration.seconds(29)
# Presence events and sweeps that failed in the function: retried twice, then the failure queue
# (a failed sweep needs no replay: the next one repeats its work).
ROTATION_EVENTS_ASYNC_RETRY_ATTEMPTS = 2
REGISTRATION_ASYNC_RETRY_ATTEMPTS = 2
LOG_RETENTION = logs.RetentionDays.ONE_MONTH
# Failed events wait here for an operator (SQS's maximum retention).
FAILED_EVENT_RETENTION = Duration.days(14)

# Function environment (read by fleetkey.settings.Settings.from_environ and Powertools)
ENV_TABLE = "FLEETKEY_TABLE"
ENV_NAME_PREFIX = "FLEETKEY_NAME_PREFIX"
ENV_ISSUER = "FLEETKEY_ISSUER"
ENV_TOKEN_KEY_ID = "FLEETKEY_TOKEN_KEY_ID"
ENV_TOKEN_SIGNER_ROLE_ARN = "FLEETKEY_TOKEN_SIGNER_ROLE_ARN"
ENV_TOKEN_KEY_RETIRER_ROLE_ARNS = "FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS"
ENV_STACK_NAME = "FLEETKEY_STACK_NAME"
ENV_LIFECYCLE_QUEUE_URL = "FLEETKEY_LIFECYCLE_QUEUE_URL"
ENV_RECOMMISSION_QUIET_SECONDS = "FLEETKEY_RECOMMISSION_QUIET_SECONDS"
ENV_DATA_KEY_ID = "FLEETKEY_DATA_KEY_ID"
ENV_ISSUING_CA_SIGNER_ROLE_ARNS = "FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS"
ENV_ROTATION_COMMIT_SECONDS = "FLEETKEY_ROTATION_COMMIT_SECONDS"
ENV_RENEWAL_RATE_PER_MINUTE = "FLEETKEY_RENEWAL_RATE_PER_MINUTE"
REGISTRATION_SERVICE_NAME = "fleetkey-registration"
ADMIN_SERVICE_NAME = "fleetkey-admin"
TOKEN_SERVICE_NAME = "fleetkey-token"
DISCOVERY_SERVICE_NAME = "fleetkey-discovery"
INTROSPECT_SERVICE_NAME = "fleetkey-introspect"
MAINTENANCE_SERVICE_NAME = "fleetkey-maintenance"
CONVERGE_SERVICE_NAME = "fleetkey-converge"
DEVICE_EVENTS_SERVICE_NAME = "fleetkey-device_events"
DATA_KEYS_SERVICE_NAME = "fleetkey-data_keys"
ROTATION_SERVICE_NAME = "fleetkey-rotation"
ROTATION_EVENTS_SERVICE_NAME = "fleetkey-rotation_events"
VALIDATIONS_SERVICE_NAME = "fleetkey-validations"
METRICS_NAMESPACE = "fleetkey"
LOG_LEVEL = "INFO"

# IoT rule: just-in-time registration
REGISTRATION_RULE_SQL = events.REGISTRATION_RULE_SQL
IOT_SQL_VERSION = events.IOT_SQL_VERSION
# IoT rule: a device reports tampering -> suspend it (reason "tamper")
TAMPER_RULE_SQL = events.TAMPER_RULE_SQL
# IoT rule: a device connected -> rotation_events (a pending certificate it connects with is
# committed; principalIdentifier is the certificate id)
PRESENCE_CONNECTED_RULE_SQL = events.PRESENCE_CONNECTED_RULE_SQL

# The lifecycle queue: decommission answers 202 and leaves the teardown in AWS IoT to the
# converge function, through this queue. SQS redelivers a message the function reports failed
# (teardown not finished: AWS IoT's detaches settle asynchronously) after the visibility timeout;
# after LIFECYCLE_MAX_RECEIVE_COUNT deliveries it moves to the dead-letter queue.
# AWS's guidance for an SQS event source: a visibility timeout of at least six times the
# function's timeout, so a batch still being retried by Lambda is not delivered twice.
LIFECYCLE_VISIBILITY_TIMEOUT = Duration.seconds(6 * CONVERGE_TIMEOUT.to_seconds())
# 8 deliveries, 6 minutes apart: about 45 minutes for AWS IoT to settle before an operator looks.
LIFECYCLE_MAX_RECEIVE_COUNT = 8
# A message waits at most this long for its first delivery (the dead-letter queue keeps longer,
# FAILED_EVENT_RETENTION: a standard queue's message keeps its first enqueue time when moved).
LIFECYCLE_RETENTION = Duration.days(4)
# Small batches: one failed device does not hold back many others, and a batch fits the timeout.
CONVERGE_BATCH_SIZE = 10
# At most this many converge invocations at once: teardown is AWS IoT control-plane calls, whose
# per-account rate limits (a few to a few tens of requests per second per API) registration and
# the admin API share.
CONVERGE_MAX_CONCURRENCY = 5

# The registration retry queue (constructs/registration_retries.py): Lambda's on-failure
# destination for registration events, given back to the function by an event source mapping.
# One record per invocation (one decision, one `reason` dimension), two at once (the mapping's
# minimum): the retries of a throttled onboarding must not add much to what throttled it.
REGISTRATION_RETRY_BATCH_SIZE = 1
REGISTRATION_RETRY_MAX_CONCURRENCY = 2
# AWS's guidance for an SQS event source: at least six times the function's timeout.
REGISTRATION_RETRY_VISIBILITY_TIMEOUT = Duration.seconds(6 * REGISTRATION_TIMEOUT.to_seconds())
# 120 deliveries, 3 minutes apart: six hours, as long as Lambda keeps an asynchronous event. A
# delivery Lambda throttles (the function's reserved concurrency, busy with an onboarding) uses one
# too. What fails for a reason retrying cannot fix alarms at once (RegistrationRetriesFailing);
# what is left after six hours goes to the failure queue and its alarm.
REGISTRATION_RETRY_MAX_RECEIVE_COUNT = 120
# A week: what is still there when nothing consumed it (RegistrationRetriesStalled alarms) waits
# for a person; the failure queue keeps longer (FAILED_EVENT_RETENTION, 14 days).
REGISTRATION_RETRY_RETENTION = Duration.days(7)
# The registration function's reserved concurrency: at AWS IoT's 10 registrations a second
# (DescribeCertificate, UpdateCertificate: docs/load.md) 2 to 3 environments keep the quota busy;
# 5 leaves room, and events beyond it wait in Lambda's asynchronous queue rather than spending the
# quota on attempts that fail. `-c registrationConcurrency=none` reserves nothing (an account whose
# concurrency quota is too small to reserve from: AWS keeps 100 unreserved).
REGISTRATION_CONCURRENCY_CONTEXT_KEY = "registrationConcurrency"
DEFAULT_REGISTRATION_CONCURRENCY = 5
REGISTRATION_CONCURRENCY_RANGE = (REGISTRATION_RETRY_MAX_CONCURRENCY, 1000)

# The data-key KMS key: a symmetric key that wraps each device's data key (GenerateDataKey,
# AES_256). The functions and the backend's policy reach it by its id; operators by its alias.
DATA_KEY_DESCRIPTION = "fleetkey: wraps the devices' data keys (GenerateDataKey, AES_256)"
# Every data key is wrapped with exactly this encryption context (fleetkey.services.data_keys):
# the backend's decrypt policy requires these keys and no other.
DATA_KEY_CONTEXT_DEVICE_ID = "fleetkey:device_id"
DATA_KEY_CONTEXT_OWNER = "fleetkey:owner"
DATA_KEY_CONTEXT_EPOCH = "fleetkey:epoch"
DATA_KEY_CONTEXT_KEYS = (
    DATA_KEY_CONTEXT_DEVICE_ID,
    DATA_KEY_CONTEXT_OWNER,
    DATA_KEY_CONTEXT_EPOCH,
)

# Point-in-time recovery of the table: how many days back it can be restored (DynamoDB accepts
# 1 to 35). A data key destroyed at decommission (its KMS-wrapped blob deleted from the table)
# stays in the table's backups that long. cdk.json context `pitrRecoveryDays`.
PITR_RECOVERY_DAYS_CONTEXT_KEY = "pitrRecoveryDays"
DEFAULT_PITR_RECOVERY_DAYS = 7
PITR_RECOVERY_DAYS_RANGE = (1, 35)

# Scheduled maintenance: retire the token signing keys whose tokens have all expired. Hourly, so
# that a retired key leaves the JWKS (and KMS) within the hour after its `retire_after`.
MAINTENANCE_SCHEDULE_RATE = Duration.hours(1)
# EventBridge's retries when it cannot invoke the function (throttled, missing); after them, and
# for events older than the next run, the event goes to the rule's dead-letter queue. Failures
# inside the function are Lambda's asynchronous retries; the next run repeats the work anyway.
MAINTENANCE_TARGET_RETRY_ATTEMPTS = 2
MAINTENANCE_TARGET_MAX_EVENT_AGE = Duration.hours(1)
# The rotation sweep (rotation_events): rollbacks past their deadline, retired certificates'
# deletion, renewal commands, the CRL's refresh. Every minute, so that a deadline is kept to the
# minute; a sweep EventBridge could not deliver within the minute is superseded by the next one
# (60 s is EventBridge's smallest maximum event age).
ROTATION_SWEEP_RATE = Duration.minutes(1)
ROTATION_SWEEP_TARGET_RETRY_ATTEMPTS = 2
ROTATION_SWEEP_TARGET_MAX_EVENT_AGE = Duration.minutes(1)

# The API (one regional REST API, one stage). Its base URL is the token issuer. The stage's name is
# the edge's (the resource policy and the operator roles name it).
API_STAGE_NAME = edge.API_STAGE_NAME
# Resources
ADMIN_PATH = "/v1/admin/{proxy+}"
TOKEN_PATH = "/v1/token"
CHALLENGE_PATH = "/v1/challenge"
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
INTROSPECT_PATH = "/v1/introspect"
DATA_KEY_PATH = "/v1/devices/{device_id}/data-key"
# Certificate rotation (the rotation function)
ROTATION_PATH = "/v1/devices/{device_id}/certificates"
ROTATION_COMMIT_PATH = "/v1/devices/{device_id}/certificates/{certificate_id}/commit"
PKI_CA_PATH = "/v1/pki/ca"
PKI_CRL_PATH = "/v1/pki/crl"
EST_CACERTS_PATH = "/.well-known/est/cacerts"
EST_SIMPLEREENROLL_PATH = "/.well-known/est/simplereenroll"
# The operators' PKI routes: `GET /v1/admin/pki` itself and everything under it. API Gateway
# prefers these literal resources to the admin function's `/v1/admin/{proxy+}`.
ADMIN_PKI_PATH = "/v1/admin/pki"
ADMIN_PKI_PROXY_PATH = "/v1/admin/pki/{proxy+}"
# Relying parties' validation requests and their results (the validations function).
VALIDATIONS_PATH = "/v1/validations"
VALIDATION_PATH = "/v1/validations/{validation_id}"
# The DER CRL is returned base64-encoded by the function (`isBase64Encoded`); API Gateway decodes
# it only for a media type listed here, and only when the request's first Accept value matches it.
BINARY_MEDIA_TYPES = ("application/pkix-crl",)
# Stage-wide throttling (steady requests per second, burst), for every method without its own.
API_THROTTLE_RATE = 50
API_THROTTLE_BURST = 100
# The public, device-facing methods are throttled one by one: an unauthenticated flood on one of
# them is held at its own limit. Discovery documents are cacheable and cheap (one GetItem),
# token and challenge each cost DynamoDB writes (and a KMS Sign).
TOKEN_THROTTLE_RATE = 50
TOKEN_THROTTLE_BURST = 100
DISCOVERY_THROTTLE_RATE = 100
DISCOVERY_THROTTLE_BURST = 200

# The issuing CA's KMS keys, created at run time by the rotation function (`pki init` / `pki csr`):
# ECC P-256 or P-384 SIGN_VERIFY keys of KMS's own material, single-Region, tagged
# `fleetkey:purpose=issuing-ca:<stack name>` (fleetkey.services.pki.issuing_ca_tags). Every grant
# on them is conditioned on all of it. Specs from the core, sorted for a stable template.
ISSUING_CA_KEY_SPECS = tuple(sorted(CA_KEY_SPECS))
ISSUING_CA_KEY_USAGE = "SIGN_VERIFY"
ISSUING_CA_KEY_ORIGIN = "AWS_KMS"
# Commands to devices: the sweep asks a device to renew on its own command topic.
ROTATE_COMMAND_TOPIC = "fleetkey/*/commands/rotate"
# ... and the validations function asks a device to prove itself now.
VALIDATE_COMMAND_TOPIC = "fleetkey/*/commands/validate"
# The operator roles' longest session (IAM's default, written down: people assume them).
OPERATOR_ROLE_MAX_SESSION = Duration.hours(1)

# The table's sparse `due` index (fleetkey.store.schema, fleetkey.domain.rotation): devices with
# something due, spread over "DUE#0".."DUE#7" by `due_shard`, ordered by `due_at` (epoch
# seconds); keys only.
DUE_INDEX_NAME = schema.DUE_INDEX
DUE_PARTITION_KEY = schema.DUE_PARTITION_KEY
DUE_SORT_KEY = schema.DUE_SORT_KEY
RENEWAL_INDEX_NAME = schema.RENEWAL_INDEX
SPARSE_INDEXES = schema.SPARSE_INDEXES

# Rotation settings (cdk.json context; constructs/rotation.py checks them).
ROTATION_COMMIT_SECONDS_CONTEXT_KEY = "rotationCommitSeconds"
DEFAULT_ROTATION_COMMIT_SECONDS = 3600
# From five minutes (a device must reconnect in time) to a week (a pending certificate is a
# second valid identity until it is committed or rolled back).
ROTATION_COMMIT_SECONDS_RANGE = (300, 7 * 86400)
RENEWAL_RATE_CONTEXT_KEY = "renewalRatePerMinute"
DEFAULT_RENEWAL_RATE_PER_MINUTE = 100
# Renewal commands per sweep (one a minute): each is a publish, then a rotation request of the
# device to the API; at most the API's own throttling per minute.
RENEWAL_RATE_RANGE = (1, TOKEN_THROTTLE_RATE * 60)
# EST (RFC 7030) on a mutual-TLS custom domain: the domain, its certificate and the truststore
# all set, or none of them; the truststore's S3 object version is optional (constructs/rotation.py).
EST_DOMAIN_NAME_CONTEXT_KEY = "estDomainName"
EST_CERTIFICATE_ARN_CONTEXT_KEY = "estCertificateArn"
EST_TRUSTSTORE_URI_CONTEXT_KEY = "estTruststoreUri"
EST_TRUSTSTORE_VERSION_CONTEXT_KEY = "estTruststoreVersion"
# The API's own custom domain (constructs/api_domain.py): the token issuer becomes
# https://<apiDomainName>, which outlives the REST API (a replaced API has another id, hence
# another execute-api URL). Both set, or neither; the certificate is an ACM certificate of the
# stack's Region covering the name.
API_DOMAIN_NAME_CONTEXT_KEY = "apiDomainName"
API_CERTIFICATE_ARN_CONTEXT_KEY = "apiCertificateArn"
