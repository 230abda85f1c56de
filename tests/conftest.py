import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# IAM derived from the code: records each function's AWS calls, checks them against the
# synthesized roles at the end of a whole-suite run (see the module).
pytest_plugins = ("tests.support.aws_calls",)

# Offline, fake credentials, no tracing daemon: set before anything builds a client.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_REGION": "eu-west-1",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_NAMESPACE": "fleetkey",
        "POWERTOOLS_SERVICE_NAME": "fleetkey-tests",
        "POWERTOOLS_DEV": "false",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }
)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(autouse=True)
def only_the_device_repository_writes_state():
    """Fails a test during which anything but the device repository wrote a device's state
    (tests/support/state_writes.py)."""
    from tests.support import state_writes

    state_writes.install()
    before = len(state_writes.VIOLATIONS)
    yield
    violations = state_writes.VIOLATIONS[before:]
    del state_writes.VIOLATIONS[before:]
    # Each test starts as a fresh Lambda environment would: the admin routers' components (built
    # from the environment of the test that first used them) are not carried into the next test.
    from fleetkey import composition

    composition.components.cache_clear()
    assert not violations, violations


def load_event(name: str) -> dict:
    """A canonical sample event from events/."""
    return json.loads((ROOT / "events" / f"{name}.json").read_text())


@pytest.fixture
def moto():
    from moto import mock_aws

    from fleetkey_local import moto_patches

    # Where moto departs from AWS in ways fleetkey depends on (KMS DIGEST signing, ...): patched
    # for every test, so none passes or fails by the order tests run in.
    moto_patches.apply()
    # use_valid_cert: certificate ids are SHA-256 of the DER, as in AWS IoT.
    with mock_aws(config={"iot": {"use_valid_cert": True}}):
        yield


@pytest.fixture
def stack(moto):
    from fleetkey_local.stack import EmbeddedStack, client_factory

    return EmbeddedStack(client_factory()).provision()


@pytest.fixture
def make_stack():
    """A factory of fresh provisioned stacks, each in a moto of its own (the previous one is
    stopped when the next is made): for tests that start over for every fault they inject."""
    from moto import mock_aws

    from fleetkey_local.stack import EmbeddedStack, client_factory

    mocks = []

    def make():
        if mocks:
            mocks.pop().stop()
        mock = mock_aws(config={"iot": {"use_valid_cert": True}})
        mock.start()
        mocks.append(mock)
        return EmbeddedStack(client_factory()).provision()

    yield make
    for mock in mocks:
        mock.stop()
