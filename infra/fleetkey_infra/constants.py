"""Names and settings of the fleetkey stack, in one place.

The table layout (key names, TTL attribute) and the device profiles are not repeated here: the
constructs import them from the core library, so the stack and the code that uses it share one
definition.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Duration
from aws_cdk import aws_logs as logs

from fleetkey.domain.profiles import FLEETKEY_THING_ATTRIBUTES

# Repository layout, resolved from this file so that synthesis works from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]
CDK_JSON = REPO_ROOT / "cdk.json"
FUNCTIONS_DIR = REPO_ROOT / "functions"
DEFAULT_LAYER_DIR = REPO_ROOT / "build" / "layer"
# `cdk synth -c layerDir=/some/where` points the layer at another build (relative to the repo root).
LAYER_DIR_CONTEXT_KEY = "layerDir"

STACK_ID = "Fleetkey"
STACK_DESCRIPTION = "fleetkey: serverless IoT device identity lifecycle (registration, admin API)"
PROJECT_TAG = "fleetkey"

# Prefix of the AWS IoT resources fleetkey owns (policies, thing types); the functions receive the
# same value as FLEETKEY_NAME_PREFIX so that what they attach is what the stack created.
NAME_PREFIX = "fleetkey"

# Thing attributes the registration service writes, searchable in the registry (AWS IoT allows
# at most three searchable attributes per thing type).
THING_SEARCHABLE_ATTRIBUTES = FLEETKEY_THING_ATTRIBUTES

# Lambda
HANDLER = "handler.handler"
REGISTRATION_CODE_DIR = FUNCTIONS_DIR / "registration"
ADMIN_CODE_DIR = FUNCTIONS_DIR / "admin"
REGISTRATION_MEMORY_MB = 512
ADMIN_MEMORY_MB = 512
REGISTRATION_TIMEOUT = Duration.seconds(30)
# API Gateway's integration timeout is 29 s; a longer function would be cut off mid-write.
ADMIN_TIMEOUT = Duration.seconds(29)
REGISTRATION_ASYNC_RETRY_ATTEMPTS = 2
LOG_RETENTION = logs.RetentionDays.ONE_MONTH
# Failed events wait here for an operator (SQS's maximum retention).
FAILED_EVENT_RETENTION = Duration.days(14)

# Function environment (read by fleetkey.settings.Settings.from_environ and Powertools)
ENV_TABLE = "FLEETKEY_TABLE"
ENV_NAME_PREFIX = "FLEETKEY_NAME_PREFIX"
REGISTRATION_SERVICE_NAME = "fleetkey-registration"
ADMIN_SERVICE_NAME = "fleetkey-admin"
METRICS_NAMESPACE = "fleetkey"
LOG_LEVEL = "INFO"

# IoT rule: just-in-time registration
REGISTRATION_RULE_SQL = "SELECT * FROM '$aws/events/certificates/registered/+'"
IOT_SQL_VERSION = "2016-03-23"

# Admin API
API_STAGE_NAME = "prod"
API_PATH = ("v1", "admin")
API_THROTTLE_RATE = 50
API_THROTTLE_BURST = 100
