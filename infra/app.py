"""CDK entry point (cdk.json: `.venv/bin/python infra/app.py`)."""

from fleetkey_infra.application import create_app

create_app().synth()
