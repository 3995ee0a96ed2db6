"""Prefect tasks: one domain verb each, with the instance in the run name.

Steps that are safe to repeat (they converge on a state) retry a bounded number of
times on transient errors; the waits do not retry (they already wait to a deadline).
No Prefect `timeout_seconds`: these tasks run in worker threads, where Prefect cannot
interrupt a blocking call and warns on every run (see PREFECT.md). Every I/O below
carries its own native timeout instead: SSH connect and command deadlines, a remote
`timeout` around pull and up, requests timeouts, and a deadline on every poll.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compose_rollout import hooks, inspection, procedure, surge
from compose_rollout.context import Context
from compose_rollout.errors import RolloutError
from compose_rollout.hosts.shell import RemoteShell
from compose_rollout.inspection import Snapshot
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
def preflight(ctx: Context, instance: str, surge_beside: int = 0) -> Snapshot:
    """Check one instance; with `surge_beside` > 0, also that the host can run that many
    second containers of the service (the surge strategy)."""
    found = procedure.preflight_instance(ctx, ctx.fleet.instance(instance))
    get_run_logger().info("%s runs %s (%s)", instance, found.image, found.container.describe())
    if surge_beside:
        surge.preflight(ctx, ctx.fleet.instance(instance), found, surge_beside)
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
def await_healthy(ctx: Context, instance: str, image_id: str, url: str = "", container_id: str | None = None) -> float:
    seconds = procedure.await_healthy(ctx, ctx.fleet.instance(instance), image_id, url, container_id)
    where = f" at {url}" if url else ""
    get_run_logger().info("%s healthy on %s%s after %.1f s", instance, image_id[:19], where, seconds)
    return seconds


@task(name="await-lb-up", task_run_name="await-lb-up-{instance}", **ONCE)
def await_lb_up(ctx: Context, instance: str, ledger: Ledger, server: str = "") -> None:
    name = server or procedure.server_of(ctx.fleet.instance(instance), ledger)
    if procedure.await_lb_up(ctx, ctx.fleet.instance(instance), name):
        get_run_logger().info("%s: the LB's own check sees %s UP", instance, name)
    else:
        get_run_logger().info("%s: the LB cannot tell whether it is UP; the health gate vouched for it", instance)


@task(name="enable", task_run_name="enable-{instance}", **SAFE_TO_REPEAT)
def enable(ctx: Context, instance: str, ledger: Ledger) -> None:
    procedure.enable(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s back in rotation", instance)


@task(name="watch-responses", task_run_name="watch-responses-{instance}", **ONCE)
def watch_responses(ctx: Context, instance: str, ledger: Ledger) -> None:
    total, errors = procedure.watch_responses(ctx, ctx.fleet.instance(instance), ledger)
    health = ctx.fleet.health
    if total < health.min_requests:
        get_run_logger().warning(
            "%s: only %d responses in %g s, fewer than health.min_requests %d: the 5xx gate could not judge",
            instance,
            total,
            health.watch_seconds,
            health.min_requests,
        )
    else:
        get_run_logger().info("%s: %d of %d responses were 5xx while watched", instance, errors, total)


@task(name="weigh-canary", task_run_name="weigh-canary-{instance}", **ONCE)
def weigh_canary(ctx: Context, instance: str, ledger: Ledger) -> None:
    share = procedure.weigh_canary(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: the canary gets %.1f %% of new requests", instance, 100 * share)


@task(name="bake", task_run_name="bake-{instance}", **ONCE)
def bake(ctx: Context, instance: str, ledger: Ledger) -> None:
    seconds = ctx.fleet.rollout.canary_bake_seconds
    total, errors = procedure.watch_responses(ctx, ctx.fleet.instance(instance), ledger, seconds)
    ledger.update(instance, baked_at=time.time())
    get_run_logger().info("%s baked %g s: %d of %d responses were 5xx", instance, seconds, errors, total)


@task(name="restore-weights", task_run_name="restore-weights-{instance}", **SAFE_TO_REPEAT)
def restore_weights(ctx: Context, instance: str, ledger: Ledger) -> None:
    failures = procedure.restore_weights(ctx, ledger)
    if failures:
        raise RolloutError("; ".join(failures))
    get_run_logger().info("%s: every weight back as it was; the rest of the fleet follows", instance)


# --- the surge strategy (surge.py) -------------------------------------------------------


@task(name="start-second", task_run_name="start-second-{instance}", **SAFE_TO_REPEAT)
def start_second(ctx: Context, instance: str, ledger: Ledger) -> str:
    container = surge.start_second(ctx, ctx.fleet.instance(instance), ledger)
    port = surge.second_port(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: second container %s started on port %d", instance, container[:12], port)
    return container


@task(name="add-server", task_run_name="add-server-{instance}", **ONCE)
def add_server(ctx: Context, instance: str, ledger: Ledger) -> None:
    surge.register(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: %s added to the LB", instance, ledger[instance].surge_server)


@task(name="surge-ready", task_run_name="surge-ready-{instance}", **SAFE_TO_REPEAT)
def surge_ready(ctx: Context, instance: str, ledger: Ledger) -> None:
    ctx.lb.set_state(ledger[instance].surge_server, "ready")
    get_run_logger().info("%s: %s in rotation beside the old container", instance, ledger[instance].surge_server)


@task(name="remove-old", task_run_name="remove-old-{instance}", **SAFE_TO_REPEAT)
def remove_old(ctx: Context, instance: str, ledger: Ledger) -> None:
    surge.retire_old(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: old container %s removed", instance, ledger[instance].old_container[:12])


@task(name="move-server", task_run_name="move-server-{instance}", **SAFE_TO_REPEAT)
def move_server(ctx: Context, instance: str, ledger: Ledger) -> None:
    before = procedure.server_of(ctx.fleet.instance(instance), ledger)
    surge.move(ctx, ctx.fleet.instance(instance), ledger)
    after = ledger[instance].lb_server
    renamed = f" (now named {after})" if after != before else ""
    get_run_logger().info("%s: %s now sends to port %d%s", instance, before, ledger[instance].surge_port, renamed)


@task(name="move-back", task_run_name="move-back-{instance}", **SAFE_TO_REPEAT)
def move_back(ctx: Context, instance: str, ledger: Ledger) -> None:
    surge.move_back(ctx, ctx.fleet.instance(instance), ledger)
    server = ledger[instance].lb_server
    get_run_logger().info("%s: %s sends to the old container again (port %d)", instance, server, ledger[instance].port)


@task(name="settle-names", task_run_name="settle-names-{instance}", **SAFE_TO_REPEAT)
def settle_names(ctx: Context, instance: str, ledger: Ledger) -> None:
    surge.settle_names(ctx, ctx.fleet.instance(instance), ledger)


@task(name="remove-surge-server", task_run_name="remove-surge-server-{instance}", **ONCE)
def remove_surge_server(ctx: Context, instance: str, ledger: Ledger) -> None:
    names = surge.unregister(ctx, ctx.fleet.instance(instance), ledger)
    if names:
        get_run_logger().info("%s: %s removed from the LB", instance, ", ".join(names))


@task(name="remove-second", task_run_name="remove-second-{instance}", **SAFE_TO_REPEAT)
def remove_second(ctx: Context, instance: str, ledger: Ledger) -> None:
    surge.remove_strays(ctx, ctx.fleet.instance(instance), ledger)
    get_run_logger().info("%s: only the old container runs", instance)


# --- hooks (hooks.py) ------------------------------------------------------------------------


@task(name="hook", task_run_name="{name}-{instance}", **ONCE)
def instance_hook(ctx: Context, instance: str, ledger: Ledger, name: str, url: str = "") -> None:
    """Run the per-instance hook `name` (before_instance, after_instance) for one instance."""
    hook = getattr(ctx.fleet.hooks, name)
    found = ctx.fleet.instance(instance)
    env = hooks.instance_env(name, ledger, found, url or inspection.health_url(found, ledger[instance]))
    shell = RemoteShell(ctx.hosts[instance]) if hook.run_on == "host" else None
    hooks.run(name, hook, env, shell)
    get_run_logger().info("%s: hook %s passed", instance, name)
