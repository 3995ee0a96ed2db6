"""The work on one instance, as Prefect tasks: its update (the seed procedure, or the
surge strategy's) and its rollback, each verb a step of `tasks/steps.py`.

`_step` runs one step: it records the step in the ledger first, does not start once the
run is interrupted, and turns a failure into `StepFailed` naming the instance and the
step (a Ctrl-C or TERM inside it stops the run as interrupted instead).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from compose_rollout import inspection
from compose_rollout.context import Context
from compose_rollout.errors import Interrupted, StepFailed
from compose_rollout.state.journal import Ledger
from compose_rollout.tasks import steps


def _interrupt_in(error: BaseException) -> BaseException | None:
    """The Ctrl-C or TERM behind `error`, if any: one that lands while Prefect starts a task
    run comes back as Prefect's own error ("Task run is not set"), the interrupt as its cause."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:
        if not isinstance(seen, Exception):
            return seen
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _step(ledger: Ledger, instance: str, name: str, cancel: threading.Event, call: Any, *args: Any) -> Any:
    if cancel.is_set():
        raise StepFailed(instance, name, Interrupted("the run was interrupted"))
    ledger.update(instance, step=name)
    try:
        return call(*args)
    except Exception as error:
        interrupt = _interrupt_in(error)
        if interrupt is not None:
            raise interrupt from None  # an interrupt, not a failed step: the run stops as interrupted
        raise StepFailed(instance, name, error) from error


@task(name="update-instance", task_run_name="update-{instance}", cache_policy=NO_CACHE)
def update_instance(
    ctx: Context,
    instance: str,
    ledger: Ledger,
    image: str,
    image_id: str,
    cancel: threading.Event,
    weighted: bool = False,
) -> None:
    """The seed procedure for one instance, each verb a task (or the surge strategy's);
    `weighted`: it is the weighted canary (rollout.canary_weight)."""
    ledger.update(instance, new_image=image)
    if ctx.fleet.hooks.before_instance is not None:
        _step(
            ledger, instance, "before_instance", cancel, steps.instance_hook, ctx, instance, ledger, "before_instance"
        )
    if ctx.fleet.rollout.strategy == "surge":
        _surge_instance(ctx, instance, ledger, image, image_id, cancel)
        return
    _step(ledger, instance, "drain", cancel, steps.drain, ctx, instance, ledger)
    _step(ledger, instance, "wait-for-sessions", cancel, steps.wait_for_sessions, ctx, instance, ledger)
    _step(ledger, instance, "set-image", cancel, steps.set_image, ctx, instance, ledger, image)
    _step(ledger, instance, "pull", cancel, steps.pull, ctx, instance, image)
    _step(ledger, instance, "up", cancel, steps.up, ctx, instance, ledger)
    url = inspection.health_url(ctx.fleet.instance(instance), ledger[instance])
    seconds = _step(ledger, instance, "await-healthy", cancel, steps.await_healthy, ctx, instance, image_id, url)
    ledger.update(instance, seconds_to_healthy=seconds, healthy_at=time.time())
    _step(ledger, instance, "await-lb-up", cancel, steps.await_lb_up, ctx, instance, ledger)
    ledger.update(instance, lb_up_at=time.time())
    if ctx.fleet.hooks.after_instance is not None:  # a smoke test before it takes traffic
        _step(ledger, instance, "after_instance", cancel, steps.instance_hook, ctx, instance, ledger, "after_instance")
    if weighted:  # the weighted canary: its share of requests, watched, then every weight back
        _step(ledger, instance, "weigh-canary", cancel, steps.weigh_canary, ctx, instance, ledger)
        _step(ledger, instance, "enable", cancel, steps.enable, ctx, instance, ledger)
        _step(ledger, instance, "bake", cancel, steps.bake, ctx, instance, ledger)
        _step(ledger, instance, "restore-weights", cancel, steps.restore_weights, ctx, instance, ledger)
        ledger.update(instance, outcome="updated", step="")
        return
    _step(ledger, instance, "enable", cancel, steps.enable, ctx, instance, ledger)
    if ctx.fleet.health.watch_seconds > 0:
        _step(ledger, instance, "watch-responses", cancel, steps.watch_responses, ctx, instance, ledger)
    ledger.update(instance, outcome="updated", step="")


def _surge_instance(
    ctx: Context, instance: str, ledger: Ledger, image: str, image_id: str, cancel: threading.Event
) -> None:
    """The surge strategy for one instance (`surge.py`): the old container serves until
    the new one is in rotation beside it."""
    ledger.update(instance, strategy="surge")
    _step(ledger, instance, "set-image", cancel, steps.set_image, ctx, instance, ledger, image)
    _step(ledger, instance, "pull", cancel, steps.pull, ctx, instance, image)
    second = _step(ledger, instance, "start-second", cancel, steps.start_second, ctx, instance, ledger)
    url = inspection.health_url(ctx.fleet.instance(instance), ledger[instance], ledger[instance].surge_port)
    seconds = _step(
        ledger, instance, "await-healthy", cancel, steps.await_healthy, ctx, instance, image_id, url, second
    )
    ledger.update(instance, seconds_to_healthy=seconds, healthy_at=time.time())
    if ctx.fleet.hooks.after_instance is not None:  # a smoke test before it joins the LB
        _step(
            ledger,
            instance,
            "after_instance",
            cancel,
            steps.instance_hook,
            ctx,
            instance,
            ledger,
            "after_instance",
            url,
        )
    _step(ledger, instance, "add-server", cancel, steps.add_server, ctx, instance, ledger)
    added = ledger[instance].surge_server
    _step(ledger, instance, "await-lb-up", cancel, steps.await_lb_up, ctx, instance, ledger, added)
    ledger.update(instance, lb_up_at=time.time())
    _step(ledger, instance, "surge-ready", cancel, steps.surge_ready, ctx, instance, ledger)
    _step(ledger, instance, "drain", cancel, steps.drain, ctx, instance, ledger)
    _step(ledger, instance, "wait-for-sessions", cancel, steps.wait_for_sessions, ctx, instance, ledger)
    # The own server moves to the new container while the old one still runs: its checks
    # never see a removed container, so it is UP when it goes back in rotation, before
    # the surge server leaves (else that instance has no server taking requests a moment).
    _step(ledger, instance, "move-server", cancel, steps.move_server, ctx, instance, ledger)
    _step(ledger, instance, "await-lb-up", cancel, steps.await_lb_up, ctx, instance, ledger)
    _step(ledger, instance, "enable", cancel, steps.enable, ctx, instance, ledger)
    _step(ledger, instance, "remove-old", cancel, steps.remove_old, ctx, instance, ledger)
    _step(ledger, instance, "remove-surge-server", cancel, steps.remove_surge_server, ctx, instance, ledger)
    if ctx.fleet.health.watch_seconds > 0:
        _step(ledger, instance, "watch-responses", cancel, steps.watch_responses, ctx, instance, ledger)
    ledger.update(instance, outcome="updated", step="")


def _undo_surge(ctx: Context, instance: str, ledger: Ledger) -> bool:
    """Roll back what the surge strategy did on one instance. True when that is all
    (the old container never stopped); False when the old container is gone, so the
    instance now serves from the new one and the in-place rollback must follow."""
    record = ledger[instance]
    never = threading.Event()

    def undo(step: str, call: Any) -> None:
        _step(ledger, instance, f"rollback: {step}", never, call, ctx, instance, ledger)

    if record.moved:
        undo("settle-names", steps.settle_names)
    if not record.old_removed:
        if record.moved:  # back to the old container, which still runs
            # Let what it sent to the new container finish first (drained or not: after
            # an interruption the record may say drained of a server not yet drained).
            undo("drain", steps.drain)
            undo("wait-for-sessions", steps.wait_for_sessions)
            undo("move-back", steps.move_back)
        if ledger[instance].drained:  # the instance's own server sends to the old container
            undo("enable", steps.enable)
        undo("remove-surge-server", steps.remove_surge_server)
        undo("remove-second", steps.remove_second)
        undo("restore-compose", steps.restore_compose)
        ledger.update(instance, outcome="rolled back", step="")
        return True
    if not record.moved:
        undo("move-server", steps.move_server)
    if ledger[instance].drained:
        undo("enable", steps.enable)
    undo("remove-surge-server", steps.remove_surge_server)
    # The new container is the instance's only one now: replaced in place, like a restarted one.
    ledger.update(instance, restarted=True)
    return False


@task(name="rollback-instance", task_run_name="rollback-{instance}", cache_policy=NO_CACHE)
def rollback_instance(ctx: Context, instance: str, ledger: Ledger) -> None:
    """Undo this run on one instance: old compose file, old container, back in rotation."""
    record = ledger.update(instance, rollback_attempted=True)
    never = threading.Event()
    if record.surge_started and _undo_surge(ctx, instance, ledger):
        return
    if not record.drained:
        _step(ledger, instance, "rollback: drain", never, steps.drain, ctx, instance, ledger)
        _step(ledger, instance, "rollback: wait-for-sessions", never, steps.wait_for_sessions, ctx, instance, ledger)
    # Always compared with the original: an interrupted write may have landed or not.
    _step(ledger, instance, "rollback: restore-compose", never, steps.restore_compose, ctx, instance, ledger)
    if record.restarted:
        _step(ledger, instance, "rollback: up", never, steps.up, ctx, instance, ledger)
        url = inspection.health_url(ctx.fleet.instance(instance), record)
        old_id = record.old_image_id
        _step(ledger, instance, "rollback: await-healthy", never, steps.await_healthy, ctx, instance, old_id, url)
        _step(ledger, instance, "rollback: await-lb-up", never, steps.await_lb_up, ctx, instance, ledger)
    _step(ledger, instance, "rollback: enable", never, steps.enable, ctx, instance, ledger)
    ledger.update(instance, outcome="rolled back", step="")
