"""Hooks run by `sh` on the orchestrator (prefect-shell): exit codes, timeouts, output tails, environment."""

from __future__ import annotations

import pytest

from compose_rollout import hooks
from compose_rollout.config import Hook
from compose_rollout.errors import HookFailed


def test_a_hook_that_exits_0_passes_and_sees_only_its_environment() -> None:
    hostile = {"ROLLOUT_FLEET": "demo; rm -rf /"}
    hooks.run("before_deploy", Hook(command='test "$ROLLOUT_FLEET" = "demo; rm -rf /"'), hostile)


def test_a_failing_hook_names_itself_its_exit_code_and_the_last_lines_of_its_output() -> None:
    hook = Hook(command="for n in 1 2 3 4 5 6 7; do echo line $n; done; echo oops >&2; exit 5")
    with pytest.raises(HookFailed, match=r"hook after_deploy \(on the orchestrator\) exited 5; last output:\n    oops"):
        hooks.run("after_deploy", hook, {})


def test_a_hook_that_outlasts_its_timeout_is_stopped_and_fails() -> None:
    with pytest.raises(HookFailed, match=r"did not finish within 0\.3 s and was stopped"):
        hooks.run("before_instance", Hook(command="echo started; sleep 30", timeout_seconds=0.3), {})
