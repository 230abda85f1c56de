"""One construct per concern; the stack composes them and does the grants where they meet."""

from fleetkey_infra.constructs.api import Api
from fleetkey_infra.constructs.api_domain import ApiDomain, ApiDomainConfig
from fleetkey_infra.constructs.data import Data
from fleetkey_infra.constructs.data_keys import DataKeys
from fleetkey_infra.constructs.functions import Functions
from fleetkey_infra.constructs.iot_profiles import IotResources
from fleetkey_infra.constructs.iot_rules import PresenceRule, RegistrationRule, TamperRule
from fleetkey_infra.constructs.layer import CoreLayer
from fleetkey_infra.constructs.lifecycle import LifecycleQueue
from fleetkey_infra.constructs.monitoring import Monitoring
from fleetkey_infra.constructs.operations import RedrivePolicy
from fleetkey_infra.constructs.registration_retries import RegistrationConfig, RegistrationRetries
from fleetkey_infra.constructs.rotation import EstDomain, RotationConfig
from fleetkey_infra.constructs.schedules import Schedules
from fleetkey_infra.constructs.token_keys import TokenKeys
from fleetkey_infra.constructs.waf import ApiRateLimits

__all__ = [
    "Api",
    "ApiDomain",
    "ApiDomainConfig",
    "ApiRateLimits",
    "CoreLayer",
    "Data",
    "DataKeys",
    "EstDomain",
    "Functions",
    "IotResources",
    "LifecycleQueue",
    "Monitoring",
    "PresenceRule",
    "RedrivePolicy",
    "RegistrationConfig",
    "RegistrationRetries",
    "RegistrationRule",
    "RotationConfig",
    "Schedules",
    "TamperRule",
    "TokenKeys",
]
