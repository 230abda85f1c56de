"""Every command the docs show is run by a test or by the demo.

The shell commands of the fenced code blocks of README.md and docs/*.md (whatever pages exist)
that call `fleetkey`, `make`, Python, `curl` and the other programs of TRACKED_PROGRAMS are each
exercised one of two ways, and a command that is neither fails this module:

- **run here, as written**: a block marked `<!-- docs-test: run NAME -->` on the line before its
  fence is run by the test of RUNS[NAME] against `make serve` (its own free ports and state
  directory), in a working directory of its own holding a link to docs/. The block's text is
  the docs' own, with `127.0.0.1:8080`, `127.0.0.1:8443` and `build/local` pointed at that stack.
  Every command must succeed (curl fails on an HTTP error here); a trailing comment
  `# expect: TEXT` says what its output contains, `# fails: TEXT` that it fails saying TEXT. A
  comment line `# NAME: ...` is a value the block leaves to its reader (an assertion signed by
  a device's key): the test makes it (tests/support/docs_hooks.py) and exports it as $NAME.
- **run elsewhere**: REGISTRY names the test that runs the command, with a string of that test's
  module that shows it does (for `make` targets, also what the Makefile's recipe runs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey_local.device import client_assertion, rotation_assertion, rotation_csr
from fleetkey_local.mqtt_device import MqttDevice
from fleetkey_local.pki import generate_key, key_pem, pem
from fleetkey_local.serve import DEMO_CA
from fleetkey_local.validation_phase import AnsweringDevice, MqttCommands, firmware_release
from tests.support.docs import ROOT, Block, blocks, doc_files, relative
from tests.support.served import Served, serve, signed
from tests.support.served import send as served_send

# ---- what counts as a command --------------------------------------------------------------------

TRACKED_PROGRAMS = {
    "fleetkey",
    "make",
    "python",
    "python3",
    "curl",
    "fkcurl",
    "openssl",
    "jq",
    "npx",
    "cdk",
    "aws",
    "mosquitto_pub",
    "mosquitto_sub",
}
SHELL_INFOS = {"", "sh", "bash", "shell", "console", "zsh"}
HOOK = re.compile(r"^#\s*(?P<name>[A-Z][A-Z0-9_]*):\s")


@dataclass(frozen=True)
class Command:
    """One logical command of a block (continuation lines joined), its programs and comment."""

    block: Block
    line: int  # in the Markdown file
    text: str  # as written, continuation lines included, without the trailing comment
    comment: str
    hook: str | None = None  # `# NAME: ...`

    @property
    def normalized(self) -> str:
        return " ".join(self.text.replace("\\\n", " ").split())

    @property
    def where(self) -> str:
        return f"{relative(self.block.path)}:{self.line}"

    @property
    def programs(self) -> set[str]:
        return programs_of(self.text)

    @property
    def tracked(self) -> bool:
        return bool(self.programs & TRACKED_PROGRAMS)

    @property
    def expect(self) -> str | None:
        found = re.match(r"expect:\s*(.+)$", self.comment)
        return found[1].strip() if found else None

    @property
    def fails(self) -> str | None:
        found = re.match(r"fails:\s*(.+)$", self.comment)
        return found[1].strip() if found else None


def split_comment(text: str) -> tuple[str, str]:
    """The command and its trailing comment: a `#` that starts a word outside quotes."""
    quote = None
    for index, char in enumerate(text):
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                continue
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index].rstrip(), text[index + 1 :].strip()
    return text.rstrip(), ""


def programs_of(text: str) -> set[str]:
    """The programs a shell command line runs: the first word of each pipeline element and
    list element, after assignments, and of each `$(...)` in it."""
    found: set[str] = set()
    for inner in re.findall(r"\$\(([^()]*)\)", text):
        found |= programs_of(inner)
    text = re.sub(r"\$\([^()]*\)", "SUBST", text)
    for segment in re.split(r"\|\||&&|[|;]", text.replace("\\\n", " ")):
        try:
            words = shlex.split(segment)
        except ValueError:
            words = segment.split()
        while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in ("export", "!")):
            words = words[1:]
        if words:
            found.add(Path(words[0]).name)
    return found


def commands(block: Block) -> list[Command]:
    """The logical commands of a shell block: lines continued with a backslash or after a pipe
    or `&&` are one command; blank and comment lines are not commands, except `# NAME: ...`."""
    found: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(block.lines):
        line = raw[2:] if raw.startswith("$ ") else raw
        if not pending:
            if not line.strip():
                continue
            if line.lstrip().startswith("#"):
                hook = HOOK.match(line.strip())
                if hook:
                    found.append(
                        Command(block, block.line + 1 + offset, "", line.strip(), hook["name"])
                    )
                continue
            start = block.line + 1 + offset
        pending.append(line)
        code, _ = split_comment(line)
        if code.endswith("\\") or re.search(r"(\|\||&&|\|)\s*$", code):
            continue
        text, comment = split_comment("\n".join(pending))
        found.append(Command(block, start, text, comment))
        pending = []
    assert not pending, f"{block.where}: a command continues past the block's end"
    return found


def shell_blocks() -> list[Block]:
    return [
        b for path in doc_files() if path.exists() for b in blocks(path) if b.info in SHELL_INFOS
    ]


def documented_commands() -> list[Command]:
    return [c for block in shell_blocks() for c in commands(block) if c.hook is None]


# ---- the registry: commands run by other tests or by the demo ----------------------------------


@dataclass(frozen=True)
class RunBy:
    test: str  # a pytest node id: path::function
    evidence: str  # in the test's module: the proof that it runs the command (ARGV: see below)
    recipe: str | None = None  # `make` targets: what the Makefile's recipe must run


# As evidence: every argument of the command after its script is a string literal of the module.
ARGV = "<every argument of the command, quoted in the module>"


REGISTRY: dict[str, RunBy] = {
    # `make demo` runs `python -m fleetkey_local.demo`, which test_demo runs (6 devices).
    "make demo": RunBy(
        "tests/e2e/test_demo.py::test_demo_registers_the_fleet_and_refuses_rogues",
        '"fleetkey_local.demo"',
        recipe="-m fleetkey_local.demo",
    ),
    "make serve": RunBy(
        "tests/e2e/test_serve.py::test_serve_prints_its_addresses_serves_and_stops",
        '"fleetkey_local.serve"',
        recipe="-m fleetkey_local.serve",
    ),
    # `make test` is the suite this module is part of.
    "make test": RunBy(
        "tests/integration/test_docs_commands.py::test_make_test_runs_the_suite_this_test_is_in",
        "def test_make_test_runs_the_suite_this_test_is_in",
        recipe="-m pytest",
    ),
    # docs/runbook-redrive.md: test_redrive runs each (its COMMANDS) against a stack with the
    # failure queues filled as AWS fills them.
    **{
        f"fleetkey {command}": RunBy(f"tests/integration/test_redrive.py::{test}", evidence)
        for command, test, evidence in (
            (
                "redrive all --dry-run",
                "test_schedule_dead_letters_are_one_run_of_their_function",
                'command_line("list all")',
            ),
            *(
                (
                    command,
                    "test_the_cli_redrives_the_local_stack_through_its_lambda_endpoint",
                    f'command_line("{name}")',
                )
                for command, name in (
                    ("redrive registration-failures --dry-run", "list registrations"),
                    ("redrive registration-failures", "registrations"),
                    ("redrive lifecycle-dlq --max 10", "lifecycle"),
                )
            ),
            *(
                (
                    command,
                    "test_the_cli_reads_a_deployed_stack_from_its_cloudformation_outputs",
                    f'command_line("{name}")',
                )
                for command, name in (
                    ("--region eu-west-1 redrive all --dry-run --stack Fleetkey", "deployed list"),
                    (
                        "--region eu-west-1 redrive tamper-rule-errors --stack Fleetkey",
                        "deployed tamper",
                    ),
                )
            ),
        )
    },
}

# docs/stock-clients.md: its tests are tests/e2e/test_stock_clients.py, which `make test` runs
# after `make mosquitto` (a prerequisite of its recipe).
STOCK_MOSQUITTO = (
    "tests/e2e/test_stock_clients.py::test_a_device_publishes_its_telemetry_with_mosquitto_pub"
)
REGISTRY.update(
    {
        "make mosquitto": RunBy(
            STOCK_MOSQUITTO, '"mosquitto" / "bin" / "mosquitto_pub"', recipe="mosquitto_pub"
        ),
        ".venv/bin/python -m pytest tests/e2e/test_stock_clients.py -n 0 -q": RunBy(
            STOCK_MOSQUITTO, "def test_a_device_publishes_its_telemetry_with_mosquitto_pub"
        ),
        "mosquitto_pub -h 127.0.0.1 -p PORT --cafile iot-endpoint-ca.pem --cert device.crt "
        "--key device.key -i sensor-0001 -q 1 -t fleetkey/sensor-0001/telemetry/temperature "
        """-m '{"celsius": 21.5}'""": RunBy(STOCK_MOSQUITTO, '"-t", topic,'),
    }
)

# docs/load.md: the onboarding benchmark's smoke test runs the command it shows.
REGISTRY[
    ".venv/bin/python benchmarks/onboarding.py --devices 40 --environments 4 --quota-scale 0.5 "
    "--sdk-attempts 1 --async-retry-delays 0.2 --retry-visibility-timeout 1"
] = RunBy(
    "tests/integration/test_onboarding_benchmark_smoke.py"
    "::test_onboarding_benchmark_registers_every_device_under_the_rate_limits",
    ARGV,
)

# docs/cold-start.md: the benchmarks' smoke tests run each command it shows (one run, one function).
COLD_START_IMPORTS = (
    "tests/integration/test_benchmarks_smoke.py"
    "::test_importtime_benchmark_reports_each_ratio_to_the_reference_measured_beside_it"
)
REGISTRY.update(
    {
        "make importtime": RunBy(
            COLD_START_IMPORTS, '"importtime.py"', recipe="benchmarks/importtime.py"
        ),
        ".venv/bin/python benchmarks/importtime.py --initialization snap-start": RunBy(
            COLD_START_IMPORTS, '["on-demand", "snap-start"]'
        ),
        ".venv/bin/python benchmarks/snapstart.py": RunBy(
            "tests/integration/test_benchmarks_smoke.py"
            "::test_snapstart_benchmark_answers_every_request_each_way_it_starts",
            '"snapstart.py"',
        ),
    }
)

# Pages whose every shell command a test of their own reads from the page and runs (so that a
# command added to the page is run without an entry here).
PAGES_RUN_BY = {
    "docs/deploy.md": RunBy(
        "tests/integration/test_deploy_guide.py::test_every_command_of_the_guide_is_one_this_test_runs",
        'GUIDE = ROOT / "docs" / "deploy.md"',
    ),
}

# Commands of blocks without a run mark that a test of this module runs, as the docs write them
# (found by their text), against `make serve`.
RUN_COMMANDS = {
    command: "test_the_runbooks_commands_on_a_pump"
    for command in (
        "fleetkey audit pump-0042",
        "fleetkey rotation status pump-0042",
        "fleetkey device show pump-0042",
        'fleetkey device suspend pump-0042 --reason "suspected clone"',
        'fleetkey device decommission pump-0042 --reason "end of life" --wait 30',
    )
}

# Run blocks (`<!-- docs-test: run NAME -->`) and the test of this module that runs each.
RUNS = {
    "local-stack": "test_the_local_stack_walkthrough",
    "cli": "test_the_cli_walkthrough",
    "register-ca": "test_registering_a_manufacturer_ca",
    "register-ca-openssl": "test_registering_a_manufacturer_ca",
    "firmware": "test_firmware_releases",
    "validate": "test_a_relying_party_validates_a_pump",
    "rotation": "test_a_device_rotates_with_stock_tools_and_the_crl_lists_what_it_replaced",
    "rotation-commit": "test_a_device_rotates_with_stock_tools_and_the_crl_lists_what_it_replaced",
    "crl": "test_a_device_rotates_with_stock_tools_and_the_crl_lists_what_it_replaced",
    "est": "test_a_device_reenrolls_over_est_with_stock_tools",
}


def run_blocks() -> dict[str, Block]:
    found: dict[str, Block] = {}
    for block in shell_blocks():
        if block.run:
            assert block.run not in found, f"two blocks run as {block.run!r}: {block.where}"
            found[block.run] = block
    return found


# ---- the static checks ---------------------------------------------------------------------------


def test_the_docs_have_commands_and_run_blocks():
    assert len(documented_commands()) > 20
    assert set(run_blocks()) >= {"local-stack", "rotation"}


def test_every_command_in_the_docs_is_run_by_a_test_or_by_the_demo():
    unexercised = []
    for command in documented_commands():
        if not command.tracked or command.block.run in RUNS:
            continue
        if relative(command.block.path) in PAGES_RUN_BY:
            continue
        if command.normalized not in REGISTRY and command.normalized not in RUN_COMMANDS:
            unexercised.append(f"{command.where}: {command.normalized}")
    assert not unexercised, (
        "commands in the docs that no test runs (mark their block `<!-- docs-test: run NAME -->`"
        " and run it in tests/integration/test_docs_commands.py, or name the test that runs "
        "each in its REGISTRY):\n" + "\n".join(unexercised)
    )


def test_every_run_block_is_run_by_a_test_of_this_module():
    names = set(run_blocks())
    assert names == set(RUNS), (
        f"run blocks without a test: {sorted(names - set(RUNS))}; "
        f"tests of blocks the docs no longer have: {sorted(set(RUNS) - names)}"
    )
    module = sys.modules[__name__]
    for test in [*RUNS.values(), *RUN_COMMANDS.values()]:
        assert callable(getattr(module, test, None)), test


def _function_source(path: Path, name: str) -> str | None:
    source = path.read_text(encoding="utf-8")
    found = re.search(rf"^def {re.escape(name)}\(.*?(?=^\S)", source + "\nEND", re.S | re.M)
    return found[0] if found else None


def _recipe(target: str, depth: int = 2) -> str:
    """What `make target` runs: its recipe, and its prerequisites' recipes (`depth` levels)."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    found = re.search(
        rf"^{re.escape(target)}:(?P<needs>[^\n]*)\n(?P<recipe>(?:\t[^\n]*\n?)*)", makefile, re.M
    )
    assert found, f"no target {target} in the Makefile"
    recipe = found["recipe"]
    if depth:
        for need in found["needs"].split():
            if re.search(rf"^{re.escape(need)}:", makefile, re.M):
                recipe += _recipe(need, depth - 1)
    return recipe


@pytest.mark.parametrize("command", sorted(REGISTRY) + sorted(PAGES_RUN_BY))
def test_every_registered_command_names_a_test_that_runs_it(command):
    run_by = REGISTRY.get(command) or PAGES_RUN_BY[command]
    path_text, _, function = run_by.test.partition("::")
    path = ROOT / path_text
    assert path.is_file(), f"{command}: no test file {path_text}"
    assert _function_source(path, function), f"{command}: no test {run_by.test}"
    source = path.read_text(encoding="utf-8")
    if run_by.evidence == ARGV:
        for argument in shlex.split(command)[2:]:
            assert f'"{argument}"' in source or f"'{argument}'" in source, (
                f"{command}: {path_text} does not pass {argument!r}"
            )
    else:
        assert run_by.evidence in source, (
            f"{command}: {path_text} does not show that it runs it ({run_by.evidence!r})"
        )
    if command.startswith("make "):
        recipe = _recipe(command.split()[1])
        assert run_by.recipe and run_by.recipe in recipe, (
            f"{command}: the Makefile's recipe does not run {run_by.recipe!r}:\n{recipe}"
        )


def test_every_registered_command_is_still_in_the_docs():
    documented = {c.normalized for c in documented_commands()}
    assert not sorted(set(REGISTRY) - documented), "REGISTRY names commands the docs no longer show"
    assert not sorted(set(RUN_COMMANDS) - documented), "RUN_COMMANDS: no longer in the docs"
    assert all((ROOT / page).is_file() for page in PAGES_RUN_BY), "PAGES_RUN_BY: no such page"


def test_make_test_runs_the_suite_this_test_is_in():
    recipe = _recipe("test")
    assert re.search(r"-m pytest\b.*\btests\b", recipe), recipe
    assert Path(__file__).resolve().is_relative_to(ROOT / "tests")


def test_commands_are_read_as_a_shell_reads_them():
    # Given a block with continuations, a pipe at the end of a line, comments and a hook
    block = Block(
        ROOT / "README.md",
        "sh",
        (
            "export A=1 B=2",
            "# ASSERTION: made by the reader",
            "jq -n '{a: 1}' |",
            "  curl -d @- $API/x > out.json   # expect: ok",
            'openssl req -subj "/CN=$(fleetkey ca registration-code)" \\',
            "  -out v.pem",
            "echo '# not a comment' # fails: nope",
        ),
        10,
        None,
    )
    found = commands(block)
    assert [c.hook for c in found] == [None, "ASSERTION", None, None, None]
    assert found[2].programs == {"jq", "curl"} and found[2].expect == "ok"
    assert found[2].line == 13
    assert found[3].programs == {"openssl", "fleetkey"}
    assert (
        found[3].normalized == 'openssl req -subj "/CN=$(fleetkey ca registration-code)" -out v.pem'
    )
    assert found[4].text == "echo '# not a comment'" and found[4].fails == "nope"
    assert not found[0].tracked and found[2].tracked


# ---- running blocks against `make serve` ---------------------------------------------------------

TOOLS = ("bash", "curl", "openssl", "jq", "base64", "sha256sum", "head", "cut")


def _tools_present() -> bool:
    """The tools the blocks use, and a curl with --aws-sigv4 and --fail-with-body (7.76)."""
    if not all(shutil.which(tool) for tool in TOOLS):
        return False
    version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    found = re.match(r"curl (\d+)\.(\d+)", version)
    return bool(found) and (int(found[1]), int(found[2])) >= (7, 76)


needs_tools = pytest.mark.skipif(
    not _tools_present(), reason=f"needs {', '.join(TOOLS)} and curl >= 7.76"
)
pytestmark = pytest.mark.xdist_group("docs-commands")

TIMEOUT = 60.0
# Every curl of a run block fails on an HTTP error and never goes through a proxy.
PRELUDE = """\
shopt -s expand_aliases
set -o pipefail
curl() { command curl --fail-with-body --silent --show-error --noproxy '*' "$@"; }
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m fleetkey_local.serve` (what `make serve` runs) on free ports, the rotation sweep
    every 2 s, until the module's tests are done."""
    with serve(
        tmp_path_factory.mktemp("docs-serve"),
        ["--rotation-sweep-seconds", "2"],
        start_timeout=120,
    ) as running:
        yield running


send = functools.partial(served_send, timeout=TIMEOUT)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}, method="POST"
    )
    status, answer = send(request)
    return status, json.loads(answer)


def certificate_id_of(certificate_pem: str) -> str:
    certificate = x509.load_pem_x509_certificate(certificate_pem.encode())
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def current_certificate(served: Served, device_id: str) -> str | None:
    status, body = send(signed("GET", f"{served.api}/v1/admin/devices/{device_id}"))
    assert status == 200, body
    return json.loads(body)["certificate_id"]


@dataclass
class Onboarded:
    device_id: str
    key: object
    certificate_id: str
    certfile: Path
    keyfile: Path


def onboard(served: Served, device_id: str, directory: Path, profile: str) -> Onboarded:
    """A device of the demo factory, allow-listed through the admin API and registered just in
    time by connecting to AWS IoT, as a real one would; its files are current.pem and
    current.key in `directory`."""
    serial = f"SN-{device_id}"
    entry = {
        "device_id": device_id,
        "serial_number": serial,
        "manufacturer_ca": DEMO_CA,
        "profile": profile,
    }
    status, body = send(
        signed(
            "POST",
            f"{served.api}/v1/admin/allowlist",
            json.dumps(entry).encode(),
            {"content-type": "application/json"},
        )
    )
    assert status == 201, body
    factory = served.factory()
    key, certificate = factory.issue_device(device_id, serial_number=serial)
    certfile, keyfile = directory / "current.pem", directory / "current.key"
    certfile.write_text(pem(certificate))
    keyfile.write_text(key_pem(key))
    # A first connection presents the CA certificate after the device's (JITR).
    first = directory / "first-connect.pem"
    first.write_text(pem(certificate) + factory.pem)
    mqtt = MqttDevice(device_id, first, keyfile, served.endpoint_ca, served.mqtt)
    try:
        assert mqtt.connect().startswith("refused")
    finally:
        mqtt.close()
    expected = certificate_id_of(pem(certificate))
    deadline = time.monotonic() + TIMEOUT
    while current_certificate(served, device_id) != expected:
        assert time.monotonic() < deadline, "".join(served.output)
        time.sleep(0.2)
    return Onboarded(device_id, key, expected, certfile, keyfile)


def workdir(tmp_path: Path) -> Path:
    """A block's working directory: its own files, and docs/ as in the repository's root."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    return tmp_path


def run_block(served: Served, name: str, cwd: Path, hooks: dict | None = None) -> list[str]:
    """Run the block marked `run NAME` in `cwd`, command by command in one bash; each command's
    output is returned. Fails at the first command that fails (or succeeds where `# fails:`),
    and on an `# expect:` its output does not meet."""
    return _run_steps(served, commands(_pointed_at(served, run_blocks()[name])), cwd, hooks)


def run_commands(served: Served, texts: list[str], cwd: Path) -> list[str]:
    """Run documented commands of blocks without a run mark, found by their text, in order."""
    steps = []
    for text in texts:
        assert RUN_COMMANDS.get(text), f"{text!r} is not in RUN_COMMANDS"
        found = [c for c in documented_commands() if c.normalized == text]
        assert found, f"the docs no longer show {text!r}"
        block = _pointed_at(served, found[0].block)
        steps.append(next(c for c in commands(block) if c.line == found[0].line))
    return _run_steps(served, steps, cwd, None)


def _pointed_at(served: Served, block: Block) -> Block:
    """The block with `make serve`'s default addresses and state directory made this stack's."""
    text = block.text.replace("127.0.0.1:8080", served.api.removeprefix("http://"))
    text = text.replace("127.0.0.1:8443", served.est.removeprefix("https://"))
    text = text.replace("build/local", str(served.state))
    return Block(block.path, block.info, tuple(text.splitlines()), block.line, block.run)


def _run_steps(served: Served, steps: list[Command], cwd: Path, hooks: dict | None) -> list[str]:
    outputs = cwd / ".docs-outputs"
    outputs.mkdir(exist_ok=True)
    (cwd / ".docs-hooks.json").write_text(json.dumps(hooks or {}))
    script = [PRELUDE, f"API={shlex.quote(served.api)}"]
    for index, step in enumerate(steps):
        out = shlex.quote(str(outputs / str(index)))
        if step.hook:
            assert step.hook in (hooks or {}), f"{step.where}: no value for ${step.hook}"
            script.append(
                f'{step.hook}="$("$PYTHON" -m tests.support.docs_hooks {step.hook} 2> {out})" '
                f"|| exit 2\nexport {step.hook}"
            )
            continue
        delimiter = f"__FLEETKEY_DOCS_{index}__"
        script.append(
            f"__command=$(cat <<'{delimiter}'\n{step.text}\n{delimiter}\n)\n"
            f'eval "$__command" > {out} 2>&1\n'
            f"__status=$?\necho $__status > {out}.status\n"
            + ("[ $__status -ne 0 ] || exit 4" if step.fails else "[ $__status -eq 0 ] || exit 3")
        )
    environment = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(cwd),
        "LANG": "C.UTF-8",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "FLEETKEY_DOCS_HOOKS": str(cwd / ".docs-hooks.json"),
        # The CLI's endpoint: `make serve`'s, which the docs' commands mean.
        "FLEETKEY_ENDPOINT": served.api,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = []
    for index, step in enumerate(steps):
        out = outputs / str(index)
        if step.hook:
            continue
        status_file = Path(f"{out}.status")
        assert status_file.exists(), (
            f"{step.where}: not reached (bash exited {done.returncode}: {done.stderr})"
        )
        status, output = int(status_file.read_text()), out.read_text()
        context = f"{step.where}: {step.normalized}\nexit {status}, output:\n{output}"
        if step.fails:
            assert status != 0, f"expected to fail: {context}"
            assert _squashed(step.fails) in _squashed(output), context
        else:
            assert status == 0, context
        if step.expect:
            assert _squashed(step.expect) in _squashed(output), context
        results.append(output)
    assert done.returncode == 0, f"bash exited {done.returncode}: {done.stderr}"
    return results


def _squashed(text: str) -> str:
    return "".join(text.split())


# ---- the run blocks ------------------------------------------------------------------------------


@needs_tools
def test_the_local_stack_walkthrough(served, tmp_path):
    # Given a registered device whose key makes the token request's assertion
    cwd = workdir(tmp_path)
    device = onboard(served, "well-0001", cwd, "telemetry-sensor")
    hooks = {
        "ASSERTION": {
            "key": "current.key",
            "certificate_id": device.certificate_id,
            "device_id": "well-0001",
            "audience": served.api,
        }
    }
    # When the block of docs/local-stack.md runs
    run_block(served, "local-stack", cwd, hooks)
    # Then what it changed is there: the device it allow-listed and the manifest's rows
    for device_id in ("well-0002", "pump-0101", "well-0102"):
        status, body = send(signed("GET", f"{served.api}/v1/admin/devices/{device_id}"))
        assert status == 200 and json.loads(body)["state"] == "ALLOWLISTED", body


@needs_tools
def test_the_cli_walkthrough(served, tmp_path):
    run_block(served, "cli", workdir(tmp_path))
    for device_id in ("pump-0201", "well-0202"):
        status, _ = send(signed("GET", f"{served.api}/v1/admin/devices/{device_id}"))
        assert status == 200


@needs_tools
def test_registering_a_manufacturer_ca(served, tmp_path):
    run_block(served, "register-ca", workdir(tmp_path / "with-key"))
    run_block(served, "register-ca-openssl", workdir(tmp_path / "with-openssl"))
    status, body = send(signed("GET", f"{served.api}/v1/admin/cas"))
    names = {ca["name"] for ca in json.loads(body)["cas"]} if status == 200 else set()
    assert {"my-factory", "line-2"} <= names, body


@needs_tools
def test_firmware_releases(served, tmp_path):
    run_block(served, "firmware", workdir(tmp_path))


@needs_tools
def test_a_relying_party_validates_a_pump(served, tmp_path):
    # Given pump-0001, registered, connected over MQTT and answering its validate commands with
    # the release `make serve` publishes
    cwd = workdir(tmp_path)
    pump = onboard(served, "pump-0001", cwd, "infusion-pump")
    connection = MqttDevice(
        "pump-0001", pump.certfile, pump.keyfile, served.endpoint_ca, served.mqtt
    )
    release = firmware_release("2.4.1")
    running = {"firmware_version": release["version"], "firmware_sha256": release["sha256"]}
    listener = MqttCommands(connection, "pump-0001")
    deadline = time.monotonic() + TIMEOUT
    while True:  # registration activates the certificate last: let it finish
        try:
            listener.open()
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "".join(served.output)
            time.sleep(0.2)
    answering = AnsweringDevice(pump, served.api, listener, running).start()  # type: ignore[arg-type]
    try:
        # When the relying party's command of docs/tokens-and-validation.md runs
        try:
            (output,) = run_block(served, "validate", cwd)
        except AssertionError as failed:
            heard = {k: answering.answers.get(k) for k in answering.heard}
            raise AssertionError(f"{failed}\nthe pump heard and answered: {heard}") from None
    finally:
        answering.stop()
    # Then the pump was validated, and the token verified
    result = json.loads(output[output.index("{") :])
    assert result["status"] == "validated", output
    assert result["verified_claims"]["validation"]["purpose"] == "dose-change"


def _crl_serials(served: Served) -> set[int]:
    request = urllib.request.Request(
        f"{served.api}/v1/pki/crl", headers={"accept": "application/pkix-crl"}
    )
    status, body = send(request)
    assert status == 200, body
    return {revoked.serial_number for revoked in x509.load_der_x509_crl(body)}


@needs_tools
def test_a_device_rotates_with_stock_tools_and_the_crl_lists_what_it_replaced(served, tmp_path):
    # Given well-0042, registered with its factory certificate (current.pem, current.key)
    cwd = workdir(tmp_path)
    device = onboard(served, "well-0042", cwd, "telemetry-sensor")
    # When it rotates as docs/rotation-and-pki.md shows: openssl, jq, curl
    run_block(
        served,
        "rotation",
        cwd,
        {
            "ASSERTION": {
                "key": "current.key",
                "certificate_id": device.certificate_id,
                "device_id": "well-0042",
                "audience": served.api,
                "csr": "new.csr",
            }
        },
    )
    # and commits the new certificate by call, proving the new key
    run_block(
        served,
        "rotation-commit",
        cwd,
        {
            "COMMIT_ASSERTION": {
                "key": "new.key",
                "certificate_from": "answer.json",
                "device_id": "well-0042",
                "audience": served.api,
            }
        },
    )
    issued = json.loads((cwd / "answer.json").read_text())
    assert current_certificate(served, "well-0042") == issued["certificate_id"]
    # Given a second rotation, which replaces (and revokes) the certificate fleetkey issued
    key = generate_key("ec:secp256r1")
    current = serialization.load_pem_private_key((cwd / "new.key").read_bytes(), password=None)
    csr = rotation_csr(key, "well-0042")
    assertion = rotation_assertion(current, issued["certificate_id"], "well-0042", served.api, csr)  # type: ignore[arg-type]
    status, second = post_json(
        f"{served.api}/v1/devices/well-0042/certificates",
        {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "client_assertion": assertion,
        },
    )
    assert status == 201, second
    commit = client_assertion(key, second["certificate_id"], "well-0042", served.api)
    status, answer = post_json(
        f"{served.api}/v1/devices/well-0042/certificates/{second['certificate_id']}/commit",
        {"client_assertion": commit},
    )
    assert status == 200 and answer["committed"], answer
    shutil.copy(cwd / "new.pem", cwd / "old.pem")
    replaced = x509.load_pem_x509_certificate((cwd / "old.pem").read_bytes()).serial_number
    deadline = time.monotonic() + TIMEOUT  # the sweep (every 2 s here) publishes the CRL
    while replaced not in _crl_serials(served):
        assert time.monotonic() < deadline, "".join(served.output)
        time.sleep(0.5)
    # Then the CRL commands verify the CRL and refuse the replaced certificate
    run_block(served, "crl", cwd)


@needs_tools
def test_a_device_reenrolls_over_est_with_stock_tools(served, tmp_path):
    # Given well-0043, registered with its factory certificate (current.pem, current.key)
    cwd = workdir(tmp_path)
    onboard(served, "well-0043", cwd, "telemetry-sensor")
    # When it re-enrolls as docs/rotation-and-pki.md shows
    run_block(served, "est", cwd)
    # Then it holds a certificate of the issuing CA for its new key, pending in fleetkey
    issued = x509.load_pem_x509_certificate((cwd / "new.pem").read_bytes())
    new_key = serialization.load_pem_private_key((cwd / "new.key").read_bytes(), password=None)
    assert issued.public_key() == new_key.public_key()
    status, body = send(signed("GET", f"{served.api}/v1/admin/devices/well-0043/rotation"))
    assert status == 200 and certificate_id_of(pem(issued)) in body.decode(), body


@needs_tools
def test_the_runbooks_commands_on_a_pump(served, tmp_path):
    # Given pump-0042, registered
    cwd = workdir(tmp_path)
    onboard(served, "pump-0042", cwd, "infusion-pump")
    # When an operator follows docs/runbook.md: reads its trail and rotation, suspends it, reads
    # it, and decommissions it, waiting for the teardown
    outputs = run_commands(
        served,
        [
            "fleetkey audit pump-0042",
            "fleetkey rotation status pump-0042",
            'fleetkey device suspend pump-0042 --reason "suspected clone"',
            "fleetkey device show pump-0042",
            'fleetkey device decommission pump-0042 --reason "end of life" --wait 30',
        ],
        cwd,
    )
    # Then each did what the runbook says
    assert "registered" in outputs[0]
    assert '"state": "SUSPENDED"' in outputs[3]
    status, body = send(signed("GET", f"{served.api}/v1/admin/devices/pump-0042"))
    device = json.loads(body)
    assert status == 200 and device["state"] == "DECOMMISSIONED", device
    assert device["teardown"]["status"] == "completed", device


def _banner_labels(lines) -> list[str]:
    """The labels of `make serve`'s banner lines (`  <label, 14 wide> <value>`)."""
    return [line[2:16].strip() for line in lines if line.startswith("  ") and line[2:3] != " "]


def test_the_banner_the_docs_show_is_the_one_make_serve_prints(served):
    # Given the banner docs/local-stack.md shows, and the one `make serve` printed
    (shown,) = [
        b for b in blocks(ROOT / "docs" / "local-stack.md") if b.text.startswith("fleetkey local")
    ]
    printed = "".join(served.output)
    banner = printed[printed.index("fleetkey local stack") : printed.index("Ctrl-C to stop.")]
    # Then they have the same lines, in the same order
    assert _banner_labels(shown.lines) == _banner_labels(banner.splitlines())
