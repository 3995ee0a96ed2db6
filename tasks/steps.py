"""Prefect tasks: one domain verb each, with the instance in the run name.

Steps that are safe to repeat (they converge on a state) retry a bounded number of
times on transient errors; the waits do not retry (they already wait to a deadline).
No Prefect `timeout_seconds`: these tasks run in worker threads, where Prefect cannot
interrupt a blocking call and warns on every run (see PREFECT.md). Every I/O below
carries its own native timeout instead: SSH connect and command deadlines, a remote
`timeout` around pull and up, requests timeouts, and a deadline on every poll.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compose_rollout import procedure
from compose_rollout.procedure import Context, Snapshot
from compose_rollout.state.journal import Ledger


def _retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry unless the error is permanent (bad input, host key, failed precondition)."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - the state's own exception, inspected only
        return not procedure.is_permanent(error)
    return True


SAFE_TO_REPEAT: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [1, 3],
    "retry_condition_fn": _retry_transient,
}
ONCE: dict[str, Any] = {"cache_policy": NO_CACHE}


@task(name="preflight", task_run_name="preflight-{instance}", **SAFE_TO_REPEAT)
def preflight(ctx: Context, instance: str) -> Snapshot:
    found = procedure.preflight_instance(ctx, ctx.fleet.instance(instance))
    get_run_logger().info("%s runs %s (%s)", instance, found.image, found.container.describe())
    return found


@task(name="pre-pull", task_run_name="pre-pull-{instance}", **SAFE_TO_REPEAT)
def pre_pull(ctx: Context, instance: str, image: str) -> str:
    image_id = procedure.pull_image(ctx, ctx.fleet.instance(instance), image)
    get_run_logger().info("%s has %s as %s", instance, image, image_id[:19])
    return image_id


@task(name="drain", task_run_name="drain-{instance}", **SAFE_TO_REPEAT)
def drain(ctx: Context, instance: str, ledger: Ledger) -> None:
    sessions = procedure.drain(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s drained in the LB with %d active sessions", instance, sessions)


@task(name="wait-for-sessions", task_run_name="wait-for-sessions-{instance}", **ONCE)
def wait_for_sessions(ctx: Context, instance: str, ledger: Ledger) -> None:
    cut = procedure.wait_for_sessions(ctx, ctx.fleet.instance(instance), ledger)
    if cut:
        get_run_logger().warning("%s: cut %d sessions still open at the drain timeout", instance, cut)
    else:
        get_run_logger().info("%s has no active sessions", instance)


@task(name="set-image", task_run_name="set-image-{instance}", **SAFE_TO_REPEAT)
def set_image(ctx: Context, instance: str, ledger: Ledger, image: str) -> None:
    procedure.write_compose(ctx, ctx.fleet.instance(instance), ledger, image)
    get_run_logger().info("%s: compose file now says %s", instance, image)


@task(name="restore-compose", task_run_name="restore-compose-{instance}", **SAFE_TO_REPEAT)
def restore_compose(ctx: Context, instance: str, ledger: Ledger) -> None:
    procedure.restore_compose(ctx, ctx.fleet.instance(instance), ledger[instance])
    get_run_logger().info("%s: compose file restored byte for byte", instance)


@task(name="pull", task_run_name="pull-{instance}", **SAFE_TO_REPEAT)
def pull(ctx: Context, instance: str, image: str) -> str:
    image_id = procedure.pull_image(ctx, ctx.fleet.instance(instance), image)
    get_run_logger().info("%s has %s", instance, image)
    return image_id


@task(name="up", task_run_name="up-{instance}", **SAFE_TO_REPEAT)
def up(ctx: Context, instance: str, ledger: Ledger) -> None:
    checked = procedure.up(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: %s recreated", instance, ctx.fleet.service)
    if not checked:
        get_run_logger().warning(
            "%s: the LB has no health check for its server, so 'the LB sees it UP' will not be an observation "
            "of the new container; only compose-rollout's own health gate vouches for it",
            instance,
        )


@task(name="await-healthy", task_run_name="await-healthy-{instance}", **ONCE)
def await_healthy(ctx: Context, instance: str, image_id: str) -> float:
    seconds = procedure.await_healthy(ctx, ctx.fleet.instance(instance), image_id)
    get_run_logger().info("%s healthy on %s after %.1f s", instance, image_id[:19], seconds)
    return seconds


@task(name="await-lb-up", task_run_name="await-lb-up-{instance}", **ONCE)
def await_lb_up(ctx: Context, instance: str) -> None:
    if procedure.await_lb_up(ctx, ctx.fleet.instance(instance)):
        get_run_logger().info("%s: the LB's own check sees it UP", instance)
    else:
        get_run_logger().info("%s: the LB cannot tell whether it is UP; the health gate vouched for it", instance)


@task(name="enable", task_run_name="enable-{instance}", **SAFE_TO_REPEAT)
def enable(ctx: Context, instance: str, ledger: Ledger) -> None:
    procedure.enable(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s back in rotation", instance)
