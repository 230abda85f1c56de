"""`make demo` end to end: the real functions on the embedded local stack (moto server on
127.0.0.1), as a separate process."""

import subprocess
import sys

from tests.conftest import ROOT


def test_demo_registers_the_fleet_and_refuses_rogues():
    # When the demo runs with a small fleet
    result = subprocess.run(
        [sys.executable, "-m", "fleetkey_local.demo", "--devices", "6", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Then every expectation held
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6/6 registered and ACTIVE" in result.stdout
    assert "FAIL" not in result.stdout
    assert "refused: clone_suspected, cannot connect" in result.stdout
    assert "passed:" in result.stdout
