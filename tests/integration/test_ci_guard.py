"""Under CI=true the real-fleet tests fail when they cannot run: CI must never go green
with every real-fleet test skipped (on a machine without root or the bed's binaries)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ONE_FLEET_TEST = "tests/fleet/test_testbed.py::test_fleet_file_describes_the_bed"


def _pytest_without_the_bed_binaries(ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": "/nonexistent", "CI": ci}  # no docker, haproxy, sshd... on PATH
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", ONE_FLEET_TEST]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_in_ci_a_fleet_test_that_cannot_run_fails() -> None:
    run = _pytest_without_the_bed_binaries("true")
    assert run.returncode != 0
    assert "CI cannot run the real-fleet tests" in run.stdout and "1 error" in run.stdout, run.stdout[-2000:]


def test_outside_ci_it_is_skipped_with_the_reason() -> None:
    run = _pytest_without_the_bed_binaries("")
    assert run.returncode == 0, run.stdout[-2000:]
    assert "1 skipped" in run.stdout and "needs these binaries" in run.stdout
