"""What a run tells people: the table of its instances (the flow's return value and the
run's artifact), the summary of a run that failed or ended partial, and the hooks that
hear how it ended (`on_failure` after a rollback, `after_deploy` after a success).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from compose_rollout import hooks
from compose_rollout.config import Fleet
from compose_rollout.errors import DeployFailed, PreflightError, RolloutError, StepFailed
from compose_rollout.state.journal import Ledger


def report_rows(ledger: Ledger) -> list[dict[str, Any]]:
    rows = []
    for record in ledger.records.values():
        out = record.seconds_out_of_rotation
        rows.append(
            {
                "instance": record.name,
                "old image": record.old_image,
                "new image": record.new_image or "-",
                "result": record.outcome,
                "seconds out of rotation": round(out, 2) if out is not None else None,
                "sessions at drain": record.sessions_at_drain,
                "sessions cut": record.sessions_cut,
                "seconds to healthy": round(record.seconds_to_healthy, 2) if record.seconds_to_healthy else None,
                "responses watched": record.watched_responses,
                "5xx watched": record.watched_5xx,
                "error": record.error,
            }
        )
    return rows


def failure_summary(
    fleet: Fleet, ledger: Ledger, failure: BaseException, rolled: list[str], rollback_note: str, touched: bool
) -> str:
    if isinstance(failure, StepFailed):
        what = f"failed on instance {failure.instance} at step {failure.step}: {failure.cause}"
    else:
        what = f"failed: {str(failure) or type(failure).__name__}"
    if isinstance(failure, (PreflightError, DeployFailed)) or not touched:
        return f"Rollout of fleet {fleet.name} to {ledger.target} refused before any instance was touched: {failure}"
    back = f" Rolled back {', '.join(rolled)}." if rolled else " No instance had been changed; drained ones are back."
    if rollback_note:
        return f"Rollout of fleet {fleet.name} to {ledger.target} {what}.{back} {rollback_note}"
    return (
        f"Rollout of fleet {fleet.name} to {ledger.target} {what}.{back} "
        f"All {len(fleet.instances)} instances run their previous image and are in rotation."
    )


def publish(fleet: Fleet, ledger: Ledger, description: str) -> None:
    try:
        create_table_artifact(key=f"rollout-{fleet.name}", table=report_rows(ledger), description=description)
    except Exception as error:  # noqa: BLE001 - a missing artifact must not change the outcome
        get_run_logger().warning("could not publish the run artifact: %s", error)


def partial_summary(fleet: Fleet, ledger: Ledger) -> str:
    """The summary of a run that ended within its failure budget ("" when none failed)."""
    failed = [r for r in ledger.records.values() if r.outcome in ("failed", "rolled back")]
    if not failed:
        return ""
    moved = [r.name for r in ledger.records.values() if r.outcome in ("updated", "unchanged")]
    listed = "; ".join(f"{r.name} ({r.outcome}: {r.error})" for r in failed)
    return (
        f"Rollout of fleet {fleet.name} to {ledger.target} ended partial: {len(moved)} of {len(fleet.instances)} "
        f"instances run it ({', '.join(moved) or 'none'}); {len(failed)} failed within rollout.max_failed_instances "
        f"{fleet.rollout.max_failed_instances} and run their previous image, in rotation: {listed}."
    )


def run_on_failure_hook(fleet: Fleet, ledger: Ledger, summary: str) -> None:
    """The on_failure hook, after the rollback; its own failure is logged, nothing more."""
    if fleet.hooks.on_failure is None:
        return
    try:
        env = {**hooks.deploy_env("on_failure", ledger), "ROLLOUT_SUMMARY": summary}
        hooks.run("on_failure", fleet.hooks.on_failure, env)
    except RolloutError as error:
        get_run_logger().error("%s", error)


def run_after_deploy_hook(fleet: Fleet, ledger: Ledger, summary: str) -> None:
    """The after_deploy hook: the fleet has moved whatever it says; DeployFailed if it fails."""
    if fleet.hooks.after_deploy is None:
        return
    try:
        hooks.run("after_deploy", fleet.hooks.after_deploy, hooks.deploy_env("after_deploy", ledger))
    except RolloutError as error:
        raise DeployFailed(f"{summary} But {error}") from None
