"""Builds the CDK app: the stack plus cdk-nag, with the context from cdk.json.

`cdk synth` passes cdk.json's context itself; reading it here too makes `python infra/app.py`
and the infrastructure tests synthesize exactly what the CLI does (the CLI's values win).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from aws_cdk import App, Validations
from cdk_nag import AwsSolutionsChecks

from fleetkey_infra import constants
from fleetkey_infra.stack import FleetkeyStack
from fleetkey_infra.stage import StageConfig


def cdk_json_context() -> dict[str, Any]:
    return json.loads(constants.CDK_JSON.read_text())["context"]


def create_app(*, outdir: str | None = None, context: Mapping[str, Any] | None = None) -> App:
    """The fleetkey app: one stack, `Fleetkey`, or `Fleetkey-<stage>` with context `stage`
    (fleetkey_infra.stage). cdk-nag's AwsSolutions pack runs on every synthesis; an
    unacknowledged finding fails it."""
    # Under the CLI, CDK_OUTDIR names the assembly directory; run directly, write <repo>/cdk.out.
    outdir = outdir or os.environ.get("CDK_OUTDIR") or str(constants.REPO_ROOT / "cdk.out")
    app = App(outdir=outdir, context={**cdk_json_context(), **(context or {})})
    stage = StageConfig.from_context(app.node.try_get_context)
    description = constants.STACK_DESCRIPTION
    if stage.stage:
        description += f", stage {stage.stage}"
    FleetkeyStack(app, stage.stack_id, stage=stage, description=description)
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))
    return app
