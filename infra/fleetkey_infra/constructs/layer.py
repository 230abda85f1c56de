"""The core library as a Lambda layer, from the directory `make layer` builds."""

from __future__ import annotations

from pathlib import Path

from aws_cdk import aws_lambda as lambda_
from constructs import Construct


class LayerNotBuiltError(RuntimeError):
    """The layer directory is missing: synthesis would ship an empty or stale layer."""


class CoreLayer(Construct):
    """Attribute: `layer` (lambda.LayerVersion), Python 3.12 on arm64."""

    def __init__(self, scope: Construct, construct_id: str, *, directory: Path) -> None:
        super().__init__(scope, construct_id)
        self.directory = self._check_built(directory)
        self.layer = self._build_layer()

    @staticmethod
    def _check_built(directory: Path) -> Path:
        # The core package itself, not just the directory: an empty or half-built layer would
        # synthesize (and deploy) without complaint and fail only at the first invocation.
        if not (directory / "python" / "fleetkey" / "__init__.py").is_file():
            raise LayerNotBuiltError(
                f"the Lambda layer is not built: {directory}/python/fleetkey is missing. "
                "Run `make layer` first (or pass -c layerDir=<dir> to use another build)."
            )
        return directory

    def _build_layer(self) -> lambda_.LayerVersion:
        return lambda_.LayerVersion(
            self,
            "Layer",
            code=lambda_.Code.from_asset(str(self.directory)),
            compatible_runtimes=[lambda_.Runtime.PYTHON_3_12],
            compatible_architectures=[lambda_.Architecture.ARM_64],
            description="fleetkey core library and its arm64 dependencies",
        )
