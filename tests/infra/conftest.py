"""Synthesizes the fleetkey app once per test session (once per xdist worker).

The synthesis is the real one: `create_app` with cdk.json's context and cdk-nag, into a temporary
cloud assembly. It needs the Lambda layer built by `make layer` (`make test` builds it first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before aws_cdk starts its node process: this machine's node 20 is past its CDK support window.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")

from aws_cdk import App
from aws_cdk.assertions import Template

from fleetkey_infra import constants
from fleetkey_infra.application import create_app
from fleetkey_infra.stack import FleetkeyStack
from tests.support.aws_calls import remember_template


@dataclass(frozen=True)
class Synthesized:
    stack: FleetkeyStack
    template: Template
    template_json: dict
    outdir: Path

    @property
    def template_path(self) -> Path:
        return self.outdir / self.stack.template_file

    @property
    def validation_report(self) -> dict:
        return json.loads((self.outdir / "validation-report.json").read_text())


def require_layer() -> None:
    if not (constants.DEFAULT_LAYER_DIR / "python" / "fleetkey").is_dir():
        pytest.fail(
            f"{constants.DEFAULT_LAYER_DIR} is not built: run `make layer` before the "
            "infrastructure tests (`make test` does it for you).",
            pytrace=False,
        )


# The tests read templates, not asset bundles: skip copying the layer (~70 MB) into every
# temporary assembly. Asset hashes, hence the template, are the same either way.
TEST_CONTEXT = {"aws:cdk:disable-asset-staging": True}


@pytest.fixture(scope="session")
def app_factory() -> Callable[[Path], App]:
    """Builds the fleetkey app (cdk.json context, cdk-nag) writing its assembly to a directory."""
    require_layer()
    return lambda outdir: create_app(outdir=str(outdir), context=TEST_CONTEXT)


@pytest.fixture(scope="session")
def synthesized(
    app_factory: Callable[[Path], App], tmp_path_factory: pytest.TempPathFactory
) -> Synthesized:
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = app_factory(outdir)
    app.synth()  # cdk-nag runs here: an unacknowledged finding raises
    stack = app.node.find_child(constants.STACK_ID)
    assert isinstance(stack, FleetkeyStack)
    template = Template.from_stack(stack)  # reuses the assembly above, no second synthesis
    template_json = template.to_json()
    remember_template(template_json)  # the suite's IAM check evaluates this template
    return Synthesized(stack=stack, template=template, template_json=template_json, outdir=outdir)


@pytest.fixture(scope="session")
def template(synthesized: Synthesized) -> Template:
    return synthesized.template


@pytest.fixture(scope="session")
def resources(synthesized: Synthesized) -> dict[str, dict]:
    return synthesized.template_json["Resources"]


@pytest.fixture(scope="session")
def template_outputs(synthesized: Synthesized) -> dict[str, dict]:
    return synthesized.template_json["Outputs"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n N --dist loadgroup`, keep the infrastructure tests on one worker so the
    app is synthesized once, not once per worker. (Without loadgroup the mark is inert.)"""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("infra-synth"))
