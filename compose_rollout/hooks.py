"""Hooks: the fleet owner's commands, called at fixed points of a run (`hooks:` in the fleet file).

    before_deploy    once, after preflight and pre-pull, before the first drain
    before_instance  per instance, before it is touched
    after_instance   per instance, once its new container is healthy and before it takes
                     traffic (in place: the LB's check saw it UP, still drained; surge:
                     before it joins the LB)
    after_deploy     once, after every instance moved
    on_failure       once, after a failed run's rollback

Orchestrator-side hooks run through prefect-shell's `ShellOperation`, host-side ones over
the instance's SSH connection (`hosts/shell.py`). The run's facts reach a hook only as
environment variables, never inside its text:

    ROLLOUT_HOOK, ROLLOUT_FLEET, ROLLOUT_RUN_ID, ROLLOUT_NEW_IMAGE, ROLLOUT_TRIGGERED_BY
    per instance: ROLLOUT_INSTANCE, ROLLOUT_HOST, ROLLOUT_OLD_IMAGE, ROLLOUT_HEALTH_URL
                  (at the port the new container got)
    on_failure:   ROLLOUT_SUMMARY

A hook's output goes to the run log; its last lines are in the error when it fails.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from compose_rollout.config import Hook, Instance
from compose_rollout.errors import HookFailed
from compose_rollout.hosts.shell import LocalShell, Shell
from compose_rollout.state.journal import Ledger

MAX_LOGGED_LINES = 200


def deploy_env(name: str, ledger: Ledger) -> dict[str, str]:
    """The environment of a hook of the whole run."""
    return {
        "ROLLOUT_HOOK": name,
        "ROLLOUT_FLEET": ledger.fleet,
        "ROLLOUT_RUN_ID": ledger.run_id,
        "ROLLOUT_NEW_IMAGE": ledger.target,
        "ROLLOUT_TRIGGERED_BY": ledger.triggered_by,
    }


def instance_env(name: str, ledger: Ledger, instance: Instance, health_url: str) -> dict[str, str]:
    """The environment of a per-instance hook."""
    record = ledger[instance.name]
    return {
        **deploy_env(name, ledger),
        "ROLLOUT_INSTANCE": instance.name,
        "ROLLOUT_HOST": instance.host,
        "ROLLOUT_OLD_IMAGE": record.old_image,
        "ROLLOUT_HEALTH_URL": health_url,
    }


def run(name: str, hook: Hook, env: dict[str, str], shell: Shell | None = None) -> None:
    """Run one hook; HookFailed (with the last lines of its output) unless it exits 0 in time."""
    shell = shell or LocalShell()
    env = {key: value.replace("\0", "") for key, value in env.items()}  # no environment can hold a NUL
    outcome = shell.run(name, hook.command, env, hook.timeout_seconds)
    logger = _logger()
    lines = [line for line in (outcome.stdout + "\n" + outcome.stderr).splitlines() if line.strip()]
    for line in lines[-MAX_LOGGED_LINES:]:
        logger.info("hook %s: %s", name, line)
    where = shell.where
    if outcome.exit_code is None:
        raise HookFailed(
            f"hook {name} ({where}) did not finish within {hook.timeout_seconds:g} s and was stopped; "
            f"last output:\n{outcome.tail()}"
        )
    if outcome.exit_code != 0:
        raise HookFailed(f"hook {name} ({where}) exited {outcome.exit_code}; last output:\n{outcome.tail()}")


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
