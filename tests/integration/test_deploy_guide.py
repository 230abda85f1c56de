"""docs/deploy.md, run: every command of its shell blocks.

- `fleetkey ...` runs the operator CLI (tooling/fleetkey_cli) against the admin and rotation
  functions, in this process, on moto, from a deployed stack's state (its table, AWS IoT
  profiles, lifecycle queue, data-key key and first token key; no CA, no issuing CA), with the
  converge function consuming the lifecycle queue as Lambda's event source does; `VAR=$(...)`
  keeps a command's output for the lines after it.
- `openssl ...` runs as written, in the guide's working directory, with the manufacturer's CA
  files (`acme-ca.pem`, `acme-ca.key`) and the guide's manifest (its CSV block) in it.
- `npx cdk <verb> ...` needs an AWS account to deploy; what the tests can run is the synthesis
  each one starts from: the app with the command's `-c` context (cdk.json's underneath, cdk-nag
  included), which must succeed and name the stack the guide says. One synthesis goes through
  the CDK CLI itself, to show the CLI hands `-c stage=...` to the app.

Between the manifest import and the teardown, the guide's device connects (AWS IoT's
just-in-time registration), so that the teardown has something to take out of AWS IoT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetkey.crypto.certificates import certificate_id
from fleetkey_cli.client import AdminClient, InProcessTransport
from fleetkey_cli.main import main
from fleetkey_local.pki import key_pem, pem
from fleetkey_local.provision import (
    create_data_key_key,
    create_iot_profiles,
    create_table,
    create_token_key,
)
from fleetkey_local.queues import provision_lifecycle_queues
from fleetkey_local.stack import ACCOUNT, REGION, TABLE, EmbeddedStack, client_factory
from tests.conftest import ROOT
from tests.support.handlers import LambdaContext, load_handler
from tests.support.pki_cache import ca as cached_ca

GUIDE = ROOT / "docs" / "deploy.md"
OPERATOR = "arn:aws:iam::123456789012:user/ops"
# What the manufacturer hands over (the guide's file names); the CA is the tests' acme factory.
CA_CERTIFICATE, CA_KEY = "acme-ca.pem", "acme-ca.key"
# The guide's device that connects after the import (its manifest row: serial SN-0001).
DEVICE, SERIAL = "pump-0001", "SN-0001"
CDK_VERBS = {"bootstrap", "deploy", "diff", "destroy", "synth"}
# Options of those verbs the guide may use (besides -c/--context), with a value or not.
CDK_OPTIONS = {"--outputs-file": True, "--force": False}
SUBSTITUTION = re.compile(r"\$(\w+)|\$\{(\w+)\}")
CAPTURE = re.compile(r"^(\w+)=\$\((.*)\)$")


def shell_lines(markdown: str) -> list[str]:
    """The command lines of the guide's ```sh blocks (continuations joined, comments dropped)."""
    lines: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def manifest(markdown: str) -> str:
    [block] = re.findall(r"^```csv\n(.*?)^```", markdown, flags=re.S | re.M)
    return block


def cdk_command(line: str) -> tuple[str, dict[str, str]]:
    """`npx cdk <verb> [options]`: the verb and the context it passes.

    Raises:
        AssertionError: not a cdk command the guide may document.
    """
    argv = shlex.split(line)
    assert argv[:2] == ["npx", "cdk"] and argv[2] in CDK_VERBS, line
    context: dict[str, str] = {}
    rest = iter(argv[3:])
    for arg in rest:
        if arg in ("-c", "--context"):
            key, _, value = next(rest).partition("=")
            context[key] = value
        elif arg in CDK_OPTIONS:
            if CDK_OPTIONS[arg]:
                next(rest)
        else:
            raise AssertionError(f"an option the guide test does not know: {arg} in {line}")
    return argv[2], context


def test_every_command_of_the_guide_is_one_this_test_runs() -> None:
    # Given the guide's command lines
    lines = shell_lines(GUIDE.read_text())

    # Then each is a cdk, fleetkey or openssl command (or a fleetkey output kept in a variable),
    # and the guide has each kind the teardown and set-up need
    kinds = set()
    for line in lines:
        capture = CAPTURE.match(line)
        program = shlex.split(capture.group(2) if capture else line)[0]
        kinds.add("cdk" if line.startswith("npx cdk ") else program)
    assert kinds == {"cdk", "fleetkey", "openssl"}, lines
    for needed in ("npx cdk bootstrap", "-c stage=staging", "npx cdk destroy", "pki init"):
        assert any(needed in line for line in lines), needed


# ---- the cdk commands --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_built() -> None:
    from fleetkey_infra import constants

    if not (constants.DEFAULT_LAYER_DIR / "python" / "fleetkey").is_dir():
        pytest.fail("run `make layer` first (`make test` does it)", pytrace=False)


def test_each_cdk_command_of_the_guide_synthesizes_the_stack_it_names(
    layer_built: None, tmp_path: Path
) -> None:
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
    from aws_cdk.assertions import Template

    from fleetkey_infra.application import create_app
    from fleetkey_infra.stack import FleetkeyStack

    # Given the guide's cdk commands, by the context they pass
    commands = [cdk_command(line) for line in shell_lines(GUIDE.read_text()) if "npx cdk" in line]
    contexts = {
        json.dumps(context, sort_keys=True) for verb, context in commands if verb != "bootstrap"
    }
    # (bootstrap takes the account and Region from the credentials, nothing of the app)
    assert [c for verb, c in commands if verb == "bootstrap"] == [{}]

    for n, text in enumerate(sorted(contexts)):
        context = json.loads(text)
        # When synthesizing the app with it (cdk.json's context underneath, cdk-nag included)
        app = create_app(
            outdir=str(tmp_path / str(n)),
            context={"aws:cdk:disable-asset-staging": True, **context},
        )
        app.synth()
        [stack] = [c for c in app.node.children if isinstance(c, FleetkeyStack)]

        # Then it is the stack the guide says: Fleetkey, or Fleetkey-<stage>
        stage = context.get("stage")
        assert stack.stack_name == (f"Fleetkey-{stage}" if stage else "Fleetkey")
        outputs = Template.from_stack(stack).to_json()["Outputs"]
        assert {"ApiUrl", "Issuer", "FleetAdminRoleArn", "RetainedResources"} <= set(outputs)
        if "apiDomainName" in context:
            # and with the custom domain, the issuer is https://<domain>
            assert outputs["Issuer"]["Value"] == f"https://{context['apiDomainName']}"
            assert {"ApiDomainTarget", "ApiDomainHostedZoneId"} <= set(outputs)


def test_the_cdk_cli_hands_the_stage_to_the_app(layer_built: None, tmp_path: Path) -> None:
    # Given the CDK CLI of package.json, with the guide's stage (no asset staging: only names)
    if shutil.which("npx") is None:
        pytest.fail("npx is missing: `make install` installs the CDK CLI", pytrace=False)
    env = {**os.environ, "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"}

    # When listing the app's stacks as `cdk deploy -c stage=staging` would select them
    listed = subprocess.run(
        ["npx", "cdk", "ls", "--no-staging", "-o", str(tmp_path), "-c", "stage=staging"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Then the one stack is the stage's
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.split() == ["Fleetkey-staging"]


# ---- the operator's commands -------------------------------------------------------------------


@pytest.fixture
def deployed(moto):
    """A stack as `cdk deploy` leaves it: the table, the AWS IoT profiles, the lifecycle queue,
    the data-key key and the first token key (FLEETKEY_TOKEN_KEY_ID; the registry is empty until
    the first rotation). No manufacturer CA, no issuing CA, no device."""
    import dataclasses

    stack = EmbeddedStack(client_factory())
    create_table(stack.make_client("dynamodb"), stack.settings.table_name)
    create_iot_profiles(stack.harness_iot, REGION, ACCOUNT)
    queue_url, _ = provision_lifecycle_queues(stack.make_client("sqs"))
    stack.settings = dataclasses.replace(
        stack.settings,
        lifecycle_queue_url=queue_url,
        data_key_kms_key_id=create_data_key_key(stack.make_client("kms")),
    )
    stack._build()
    stack.token_key_id = create_token_key(stack.make_client("kms"), stack.key_trust)
    return stack


@pytest.fixture
def operator(deployed, monkeypatch):
    """The CLI's client: `/v1/admin/pki*` to the rotation function, the rest to admin."""
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    monkeypatch.setenv("FLEETKEY_IOT_DATA_ENDPOINT", "https://data-ats.iot.eu-west-1.amazonaws.com")
    monkeypatch.setenv("FLEETKEY_TOKEN_KEY_ID", deployed.token_key_id)
    for name, value in deployed.environment().items():
        monkeypatch.setenv(name, value)
    admin, rotation, converge = (load_handler(n) for n in ("admin", "rotation", "converge"))
    admin.services.cache_clear()
    rotation.components.cache_clear()
    converge.components.cache_clear()
    functions = {"admin": admin.handler, "rotation": rotation.handler}
    worker = deployed.lifecycle_worker(function=converge.handler).start()
    yield AdminClient(InProcessTransport(None, OPERATOR, LambdaContext(), functions=functions))
    worker.stop()
    admin.services.cache_clear()
    rotation.components.cache_clear()
    converge.components.cache_clear()


def test_the_guides_operator_commands_take_a_new_stack_from_empty_to_torn_down(
    deployed, operator, tmp_path, monkeypatch, capsys
):
    if shutil.which("openssl") is None:
        pytest.fail("the guide's verification certificate needs the openssl CLI", pytrace=False)
    guide = GUIDE.read_text()
    # Given the guide's working directory: the manufacturer's CA files and the guide's manifest
    acme = cached_ca("acme")
    (tmp_path / CA_CERTIFICATE).write_text(acme.pem)
    (tmp_path / CA_KEY).write_text(key_pem(acme.key))
    imports = [line for line in shell_lines(guide) if line.startswith("fleetkey allowlist import")]
    [manifest_file] = [shlex.split(line)[3] for line in imports]
    (tmp_path / manifest_file).write_text(manifest(guide))
    monkeypatch.chdir(tmp_path)
    variables: dict[str, str] = {}
    outputs: dict[str, str] = {}

    # When running every fleetkey and openssl line of the guide, in its order
    for line in shell_lines(guide):
        if line.startswith("npx cdk "):
            continue  # synthesized above: deploying needs an AWS account
        capture = CAPTURE.match(line)
        command = _substitute(capture.group(2) if capture else line, variables)
        argv = shlex.split(command)
        if argv[0] == "openssl":
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
            assert done.returncode == 0, f"{line}: {done.stderr}"
            continue
        assert argv[0] == "fleetkey", line
        code = main(argv[1:], client=operator)
        captured = capsys.readouterr()
        # Then each succeeds
        assert code == 0, f"{line}: exit {code}: {captured.err}"
        outputs[line] = captured.out
        if capture:
            variables[capture.group(1)] = captured.out.strip()
        if line.startswith("fleetkey allowlist import"):
            # (the guide's device connects: AWS IoT auto-registers its factory certificate)
            _connects(deployed, acme)

    # and the stack went from empty to torn down as the guide says: the CA was registered with
    # the proof openssl made, the issuing CA created, the manifest imported, a key rotated
    registered = json.loads(_output(outputs, "fleetkey ca register"))
    assert (registered["name"], registered["status"]) == ("acme-2026", "ACTIVE")
    issuing = json.loads(_output(outputs, "fleetkey pki show"))
    assert issuing["key_spec"] == "ECC_NIST_P384" and issuing["self_signed"] is True
    report = json.loads(_output(outputs, "fleetkey allowlist import"))
    assert (report["imported"], report["rejected"]) == (2, [])
    keys = json.loads(_output(outputs, "fleetkey signing-keys list"))
    assert len(keys["keys"] if isinstance(keys, dict) else keys) == 2
    # and the teardown took the device out of AWS IoT and disabled the CA there
    device = json.loads(_output(outputs, "fleetkey device decommission"))
    assert (device["state"], device["teardown"]["status"]) == ("DECOMMISSIONED", "completed")
    assert DEVICE not in [t["thingName"] for t in deployed.harness_iot.list_things()["things"]]
    iot_ca = deployed.harness_iot.describe_ca_certificate(certificateId=registered["iot_ca_id"])
    description = iot_ca["certificateDescription"]
    assert (description["status"], description["autoRegistrationStatus"]) == (
        "INACTIVE",
        "DISABLE",
    )


def _connects(stack: EmbeddedStack, acme) -> None:
    """The guide's device, made by the acme factory, connects for the first time."""
    _, certificate = acme.issue_device(DEVICE, serial_number=SERIAL)
    event = stack.first_connect(pem(certificate), acme.pem)
    assert event is not None
    outcome = stack.register(event)
    assert outcome.accepted, outcome
    assert stack.certificate_status(certificate_id(certificate)) == "ACTIVE"


def _substitute(command: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is not set by an earlier line of the guide"
        return variables[name]

    return SUBSTITUTION.sub(value, command)


def _output(outputs: dict[str, str], prefix: str) -> str:
    [found] = [out for line, out in outputs.items() if line.startswith(prefix)]
    return found
