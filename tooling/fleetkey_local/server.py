"""AWS on this machine: an in-process moto server on 127.0.0.1, configured like AWS where fleetkey
depends on it (certificate ids, registration code, atomic transactions)."""

from __future__ import annotations

import logging
import os
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from fleetkey.settings import (
    LOCAL_ISSUING_CA_SIGNER_ROLE_ARNS,
    LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS,
    LOCAL_TOKEN_SIGNER_ROLE_ARN,
)
from fleetkey_local import moto_patches
from fleetkey_local.stack import REGION, TABLE

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fleetkey-local",
    "AWS_SECRET_ACCESS_KEY": "fleetkey-local",
    "AWS_SESSION_TOKEN": "fleetkey-local",
    "AWS_SECURITY_TOKEN": "fleetkey-local",  # botocore reads this one first
}


def function_environment(endpoint_url: str, service_name: str = "fleetkey") -> dict[str, str]:
    """What a function's environment would hold in AWS, pointed at the local endpoint."""
    return {
        **FAKE_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "FLEETKEY_TABLE": TABLE,
        "FLEETKEY_NAME_PREFIX": "fleetkey",
        "FLEETKEY_ISSUER": "http://127.0.0.1:8080",
        "FLEETKEY_IOT_DATA_ENDPOINT": endpoint_url,
        "FLEETKEY_TOKEN_SIGNER_ROLE_ARN": LOCAL_TOKEN_SIGNER_ROLE_ARN,
        "FLEETKEY_TOKEN_KEY_RETIRER_ROLE_ARNS": ",".join(LOCAL_TOKEN_KEY_RETIRER_ROLE_ARNS),
        # The rotation functions' roles, which alone may sign with the issuing CA's key; the
        # commit window and the renewal pace at their deployed defaults.
        "FLEETKEY_ISSUING_CA_SIGNER_ROLE_ARNS": ",".join(LOCAL_ISSUING_CA_SIGNER_ROLE_ARNS),
        "FLEETKEY_ROTATION_COMMIT_SECONDS": "3600",
        "FLEETKEY_RENEWAL_RATE_PER_MINUTE": "100",
        "POWERTOOLS_SERVICE_NAME": service_name,
        "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": "ERROR",
    }


@contextmanager
def local_aws(port: int = 0) -> Iterator[str]:
    """Start moto on 127.0.0.1 (`port` 0 picks a free one); yield its endpoint URL. The process
    environment points boto3 at it for the duration."""
    from moto.server import ThreadedMotoServer

    moto_patches.apply()
    moto_patches.use_aws_certificate_ids()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # Powertools warns when a request published no metric (the admin API publishes none).
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    endpoint = f"http://{host}:{bound}"
    # moto's state lives in the process, not the server: start from an empty account.
    # S310: the URL is the http:// endpoint just above, on this machine
    reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310
    urllib.request.urlopen(reset, timeout=5).read()  # noqa: S310
    saved = dict(os.environ)
    os.environ.update(function_environment(endpoint))
    try:
        yield endpoint
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
