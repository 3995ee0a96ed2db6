"""The `rolling-deploy` flow: move a Compose fleet to one image, instance by instance.

    preflight (registry, LB, every host) → pre-pull everywhere → per batch, per instance:
    drain → wait for sessions → set image → pull → up → await healthy → await LB up → enable

Any failure (or Ctrl-C) rolls back: the failed instance first, then every instance this
run moved, newest first, with the same drain dance. Whatever happens, every server
this run drained is put back in rotation before the flow ends.

This module orchestrates. Beside it: `instance.py` (the work on one instance, as Prefect
tasks), `recovery.py` (the rollback across instances, the recovery of an interrupted
run), `report.py` (what the run tells people), `timing.py` (when a run may go).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from pydantic import Field

from compose_rollout import hooks, inspection, procedure, surge
from compose_rollout.config import load_fleet
from compose_rollout.context import Context
from compose_rollout.errors import (
    ConfigError,
    DeployFailed,
    PreflightError,
    RegistryError,
    RolloutError,
    StepFailed,
)
from compose_rollout.flows.instance import update_instance
from compose_rollout.flows.recovery import recover_run, roll_back, roll_back_alone, take_over_rule
from compose_rollout.flows.report import (
    failure_summary,
    partial_summary,
    publish,
    report_rows,
    run_after_deploy_hook,
    run_on_failure_hook,
)
from compose_rollout.flows.timing import Superseded, WindowClosed, outside_window
from compose_rollout.images import ImageRef
from compose_rollout.progress import Progress
from compose_rollout.registry import RegistryClient
from compose_rollout.state import history, lock
from compose_rollout.state.fleet_journals import FleetJournals, local_runs_directory
from compose_rollout.state.journal import InstanceRecord, Ledger
from compose_rollout.target import repository_change, target_image
from compose_rollout.tasks import steps
from compose_rollout.triggers import windows
from compose_rollout.triggers.tag_policy import resolve_tag


def _wait_all(futures: dict[str, PrefectFuture[Any]], cancel: threading.Event) -> dict[str, BaseException]:
    """Wait for every future; on Ctrl-C ask them to stop at the next step, wait, re-raise."""
    try:
        for future in futures.values():
            future.wait()
    except BaseException:
        cancel.set()
        for future in futures.values():
            future.wait()
        raise
    errors = {}
    for name, future in futures.items():
        if future.state.is_failed() or future.state.is_crashed():
            result = future.result(raise_on_failure=False)
            errors[name] = result if isinstance(result, BaseException) else RolloutError(str(future.state.message))
    return errors


def _preflight(
    ctx: Context, target: ImageRef
) -> tuple[ImageRef, dict[str, inspection.Snapshot], str, dict[str, BaseException]]:
    """Check everything, pre-pull everywhere; touch nothing. Returns pinned image,
    snapshots, image ID, and the instances whose pull failed when the failure budget
    (rollout.max_failed_instances) allows going on without them."""
    logger = get_run_logger()
    try:
        with RegistryClient(ctx.fleet.registry) as registry:
            digest = registry.resolve_digest(target)
    except RegistryError as error:
        raise PreflightError(f"registry: {error}") from None
    pinned = target.with_digest(digest)
    logger.info("%s resolves to %s; deploying that digest everywhere", target, digest)
    # Each instance's server as the LB names it now (one that names servers by address
    # renamed it when a surge moved the container to another port): the run uses these.
    ctx.fleet = procedure.find_servers(ctx)
    procedure.preflight_lb(ctx)
    names = [instance.name for instance in ctx.fleet.instances]
    beside = {name: 0 for name in names}
    if ctx.fleet.rollout.strategy == "surge":
        surge.adds_servers(ctx)  # refused once, naming what the LB lacks
        batch = ctx.fleet.rollout.batch_count(len(names))
        for instance in ctx.fleet.instances:  # second containers a batch may start on one host at once
            beside[instance.name] = min(batch, sum(other.host == instance.host for other in ctx.fleet.instances))
    checks = {name: steps.preflight.submit(ctx, name, beside[name]) for name in names}
    errors = _wait_all(checks, threading.Event())
    if errors:
        raise PreflightError("; ".join(f"{name}: {error}" for name, error in errors.items()))
    snapshots = {name: future.result() for name, future in checks.items()}
    by_digest = f"{pinned.repository}@{digest}"
    pulls = {name: steps.pre_pull.submit(ctx, name, by_digest) for name in names}
    errors = _wait_all(pulls, threading.Event())
    if errors and (len(errors) > ctx.fleet.rollout.max_failed_instances or len(errors) == len(names)):
        detail = "; ".join(f"{name}: {error}" for name, error in errors.items())
        raise PreflightError(f"pre-pull of {by_digest} failed, nothing was drained: {detail}")
    image_ids = {future.result() for name, future in pulls.items() if name not in errors}
    if len(image_ids) != 1:
        raise PreflightError(f"{by_digest} has different image IDs on different hosts: {sorted(image_ids)}")
    return pinned, snapshots, image_ids.pop(), errors


def batches(names: list[str], size: int, canary: bool) -> list[list[str]]:
    """Split the instances to update into batches: a lone canary first if asked."""
    head: list[list[str]] = [names[:1]] if canary and names else []
    rest = names[1:] if head else names
    return head + [rest[i : i + size] for i in range(0, len(rest), size)]


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _deploy(
    ctx: Context,
    journals: FleetJournals,
    ledger: Ledger,
    target: ImageRef,
    cancel: threading.Event,
    order: list[str],
    urgent: bool,
    tag_only: bool = False,
) -> str:
    """Preflight, pre-pull, then the batches; raises on the first failed instance, or
    WindowClosed when the maintenance window closes between two batches. Returns what
    the run changed of the repository the fleet runs ("" if nothing)."""
    fleet = ctx.fleet
    logger = get_run_logger()
    newer = history.newer_request(fleet, ledger.asked_at, journals)
    if newer is not None:
        raise Superseded(
            f"it was requested at {_utc(ledger.asked_at)}, and run {newer.run_id} ({newer.target}), requested later "
            f"at {_utc(newer.asked_at)}, has already run ({newer.status or 'interrupted'}); "
            "an older request never undoes a newer one. Nothing was touched; start a new run to deploy it now."
        )
    pinned, snapshots, image_id, unpulled = _preflight(ctx, target)
    switch = repository_change(fleet, {name: found.image for name, found in snapshots.items()}, pinned, tag_only)
    if switch:
        logger.warning("fleet %s: %s", fleet.name, switch)
    ledger.target = str(pinned)
    ledger.add(
        *(
            InstanceRecord(
                name=name,
                compose_path=found.edited_path or found.instance.compose_path,
                old_image=found.image,
                old_image_id=found.container.image_id,
                original=found.edited or found.compose,
                mode=found.mode,
                image_variable=found.variable,
                image_prefix=found.image_prefix,
                old_container=found.container.id,
                container_port=found.ports.container_port if found.ports else "",
                port_low=found.ports.low if found.ports else 0,
                port_high=found.ports.high if found.ports else 0,
                port=found.port,
                lb_server=found.instance.lb_server,
            )
            for name, found in snapshots.items()
        )
    )
    for name, why in unpulled.items():  # within the failure budget: left as they are
        logger.warning("%s could not pull %s (%s); going on without it (max_failed_instances)", name, pinned, why)
        ledger.update(name, outcome="failed", error=f"pre-pull: {why}")
    pending = [
        name
        for name, found in snapshots.items()
        if name not in unpulled and (found.image != str(pinned) or found.container.image_id != image_id)
    ]
    ledger.observer = Progress(fleet.name, len(pending))
    for name in snapshots:
        if name not in pending and name not in unpulled:  # already there; one that could not pull stays failed
            ledger.update(name, outcome="unchanged")
    if fleet.hooks.before_deploy is not None and pending:
        try:
            hooks.run("before_deploy", fleet.hooks.before_deploy, hooks.deploy_env("before_deploy", ledger))
        except RolloutError as refused:
            raise PreflightError(f"{refused}\nNothing was touched.") from None
    canary = fleet.rollout.canary or fleet.rollout.canary_weight is not None
    plan = batches(pending, fleet.rollout.batch_count(len(fleet.instances)), canary)
    for number, batch in enumerate(plan, start=1):
        if number > 1 and fleet.rollout.pause_between_batches_seconds:
            time.sleep(fleet.rollout.pause_between_batches_seconds)
        if not urgent and not windows.window_open(fleet.maintenance_windows, datetime.now(UTC)):
            following = windows.next_window_start(fleet.maintenance_windows, datetime.now(UTC))
            raise WindowClosed(
                f"the maintenance window closed before batch {number}/{len(plan)}: {len(order)} of "
                f"{len(pending)} instances moved, the others untouched, every instance serving. "
                f"Run again in the next window (starts {following:%Y-%m-%d %H:%M} UTC) to finish."
            )
        logger.info("batch %d/%d: %s", number, len(plan), ", ".join(batch))
        order.extend(batch)
        weighted = number == 1 and canary and fleet.rollout.canary_weight is not None
        futures = {
            name: update_instance.submit(ctx, name, ledger, str(pinned), image_id, cancel, weighted) for name in batch
        }
        errors = _wait_all(futures, cancel)
        if errors:
            failed, error = next(iter(errors.items()))
            for name, other in errors.items():
                ledger.update(name, outcome="failed", error=str(other))
            failures = [r.name for r in ledger.records.values() if r.outcome in ("failed", "rolled back")]
            if cancel.is_set() or len(failures) > fleet.rollout.max_failed_instances:
                raise error if isinstance(error, StepFailed) else StepFailed(failed, ledger[failed].step, error)
            roll_back_alone(ctx, ledger, list(errors))
    return switch


# The tag grammar (images.TAG_RE) as a JSON-schema pattern: the UI's run form and the
# server (enforce_parameter_schema) refuse a malformed tag before a run exists. Only in
# the schema: a direct call gets images.validate_tag's plainer message instead.
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
# How far a caller's clock may run ahead of this machine's for `requested_at`.
MAX_CLOCK_SKEW_SECONDS = 300
# Prefect 3.9's worker kills a cancelled run's process 30 s after its SIGTERM (a fixed
# grace in prefect/workers/base.py): a rollback after an interruption ends its waits by
# then, and what it could not finish is left in the journal for `rollout recover`.
ROLLBACK_SECONDS_AFTER_INTERRUPT = 25.0


@flow(name="rolling-deploy", validate_parameters=True)
def rolling_deploy(
    fleet_file: str,
    tag: Annotated[str | None, Field(json_schema_extra={"pattern": TAG_PATTERN})] = None,
    image: str | None = None,
    batch_size: int | str | None = None,
    canary: bool | None = None,
    pause_between_batches_seconds: Annotated[float | None, Field(ge=0, le=3600)] = None,
    drain_timeout_seconds: Annotated[float | None, Field(gt=0, le=86400)] = None,
    on_drain_timeout: Literal["fail", "proceed"] | None = None,
    on_locked: Literal["fail", "wait"] | None = None,
    strategy: Literal["in-place", "surge"] | None = None,
    urgent: bool = False,
    triggered_by: str = "python",
    requested_at: datetime | None = None,
) -> list[dict[str, Any]]:
    """Move every instance of the fleet to `tag` (or `image`), rolling back on failure.

    Args:
        fleet_file: Path of the fleet YAML file on the machine running the flow.
        tag: Image tag to deploy, in the fleet's image_repository (letters, digits, _.-).
            Empty: chosen by the fleet's tag_policy from the registry (e.g. the highest 1.x).
        image: A full image reference instead of a tag (e.g. to switch repository).
        batch_size: Instances updated at once: a count (1) or a percentage like "25%".
            Empty: the fleet file's rollout.batch_size.
        canary: Update one instance alone first, whatever the batch size. Empty: the fleet file's.
        pause_between_batches_seconds: Wait between two batches. Empty: the fleet file's.
        drain_timeout_seconds: How long to wait for an instance's active requests to finish
            after draining it. Empty: the fleet file's (130 s by default).
        on_drain_timeout: When requests outlast the drain timeout: "fail" aborts and rolls
            back, "proceed" cuts them and goes on. Empty: the fleet file's ("fail").
        on_locked: When another run holds the fleet: "fail" at once, or "wait" for it.
            Empty: the fleet file's ("fail").
        strategy: "in-place" replaces each instance's container while it is out of rotation;
            "surge" starts the new container beside the old one and puts it in the LB before
            the old one leaves (no capacity lost). Empty: the fleet file's ("in-place").
        urgent: Deploy now even outside the fleet's maintenance windows.
        triggered_by: Who or what started the run, for the record.
        requested_at: When this deploy was asked for; set by a run that re-scheduled itself
            into a maintenance window. Empty: this run's scheduled start. A request never
            runs after a newer one for the same fleet has run (it ends "superseded").
    """
    logger = get_run_logger()
    knobs = {
        "batch_size": batch_size,
        "canary": canary,
        "pause_between_batches_seconds": pause_between_batches_seconds,
        "drain_timeout_seconds": drain_timeout_seconds,
        "on_drain_timeout": on_drain_timeout,
        "on_locked": on_locked,
        "strategy": strategy,
    }
    policy = {name: value for name, value in knobs.items() if value is not None}
    fleet = load_fleet(fleet_file, **({"rollout": policy} if policy else {}))
    asked = requested_at or flow_run.get_scheduled_start_time()
    if asked.timestamp() > time.time() + MAX_CLOCK_SKEW_SECONDS:
        # A request from the future would make every later run end "superseded".
        raise ConfigError(
            f"requested_at {asked.isoformat()} is in the future (now "
            f"{datetime.now(UTC).isoformat(timespec='seconds')}); it must say when the deploy was asked for"
        )
    # As asked (a tag policy re-decides later), and when: a re-scheduled run keeps its place.
    requested = {"fleet_file": fleet_file, "tag": tag, "image": image, **policy, "requested_at": asked}
    if not tag and not image:
        if fleet.tag_policy is None:
            raise ConfigError("give a tag or an image (or set tag_policy in the fleet file to choose one)")
        with RegistryClient(fleet.registry) as registry:
            tag = resolve_tag(registry, fleet.image_repository, fleet.tag_policy)
        logger.info("tag policy %s chose %s", fleet.tag_policy.version_range, tag)
    target = target_image(fleet, tag, image)
    early = 0.0 if urgent else windows.early_start_seconds(fleet.maintenance_windows, datetime.now(UTC))
    if early:
        logger.info("the maintenance window opens in %.1f s; waiting for it", early)
        time.sleep(early)
    when = windows.scheduled_start(fleet.maintenance_windows, datetime.now(UTC), urgent=urgent)
    if when is not None:
        return outside_window(fleet, when, requested, triggered_by)
    run_id = str(flow_run.get_id() or f"local-{int(time.time())}")
    holder = lock.me(run_id, str(target))
    ledger = Ledger(
        fleet.name,
        run_id,
        str(target),
        local_runs_directory(fleet) / f"{run_id}.json",
        triggered_by=triggered_by,
        user=f"{holder.user}@{holder.hostname}",
        requested_at=asked.timestamp(),
    )
    logger.info(
        "rolling out %s to fleet %s (%d instances), started by %s",
        target,
        fleet.name,
        len(fleet.instances),
        triggered_by,
    )
    ctx = Context.connect(fleet)
    try:
        journals = FleetJournals(fleet, ctx.hosts[fleet.instances[0].name])
        journals.attach(ledger)
        lease = lock.acquire(ctx, holder, take_over=take_over_rule(fleet, journals))
        if lease.stale is not None:
            # On failure the lock stays, naming the run to recover: the fleet needs that first.
            recover_run(ctx, journals, lease.holder.recovers)
            lease = lock.recovered(ctx, lease)
    except BaseException:
        ctx.close()
        raise
    cancel = ctx.interrupt  # set on Ctrl-C, SIGTERM or a Prefect cancel: every wait stops at once
    order: list[str] = []
    completed = False  # only the end of the success path may record "succeeded"
    try:
        switch = _deploy(ctx, journals, ledger, target, cancel, order, urgent, tag_only=image is None)
        completed = True
        partial = partial_summary(fleet, ledger)
        if partial:
            logger.error(partial)
            publish(fleet, ledger, partial)
            ledger.finish("partial")
    except Superseded as superseded:
        summary = f"Not deploying {target} to fleet {fleet.name}: {superseded}"
        logger.warning(summary)
        publish(fleet, ledger, summary)
        ledger.finish("superseded")
        return []
    except WindowClosed as closed:
        summary = f"Rollout of fleet {fleet.name} to {ledger.target} stopped: {closed}"
        logger.warning(summary)
        publish(fleet, ledger, summary)
        ledger.finish("stopped")
        raise DeployFailed(summary) from None
    except BaseException as failure:
        # Measured before the rollback, which re-enables what was drained.
        touched = any(record.changed or record.drained for record in ledger.records.values())
        failed_names = [name for name in order if ledger[name].outcome == "failed"]
        if not isinstance(failure, Exception):  # Ctrl-C, SIGTERM: what is still running stops at once
            cancel.set()
        # After Prefect's SIGTERM (a cancel) the rollback must end before the worker's kill.
        cancelled = isinstance(failure, TerminationSignal)
        calm = ctx.for_rollback(ROLLBACK_SECONDS_AFTER_INTERRUPT if cancelled else None)
        rolled, note = roll_back(calm, ledger, failed_names + [n for n in reversed(order) if n not in failed_names])
        summary = failure_summary(fleet, ledger, failure, rolled, note, touched)
        logger.error(summary)
        publish(fleet, ledger, summary)
        run_on_failure_hook(fleet, ledger, summary)
        if note and calm.out_of_time():
            raise  # the cancel left no time to finish: unrecorded, locked, for `rollout recover` (see _end)
        ledger.finish("needs attention" if note else "rolled back" if touched else "refused")
        if isinstance(failure, Exception):
            raise DeployFailed(summary) from failure
        raise
    finally:
        try:
            _end(ctx, journals, ledger, lease.holder, completed)
        finally:
            ctx.close()
    if partial:
        run_on_failure_hook(fleet, ledger, partial)
        raise DeployFailed(partial)
    moved = [r.name for r in ledger.records.values() if r.outcome == "updated"]
    summary = (
        f"Fleet {fleet.name} runs {ledger.target} on all {len(fleet.instances)} instances "
        f"({len(moved)} updated, {len(fleet.instances) - len(moved)} already on it)."
        + (f" Note: {switch}; update image_repository in the fleet file to match." if switch else "")
    )
    logger.info(summary)
    publish(fleet, ledger, summary)
    run_after_deploy_hook(fleet, ledger, summary)
    return report_rows(ledger)


def _end(ctx: Context, journals: FleetJournals, ledger: Ledger, holder: lock.Holder, completed: bool) -> None:
    """Whatever happened: every server this run drained back in rotation, then the lock.

    A run that did not reach the end of its success path and recorded no outcome was
    interrupted while it rolled back (a second Ctrl-C, SIGTERM, the journal's disk
    full): it stays unrecorded ("interrupted") and the fleet stays locked, so `rollout
    recover` finishes the rollback from the journal. Likewise a run that needs a person.
    """
    logger = get_run_logger()
    problems = procedure.release_all(ctx, ledger)
    for problem in problems:
        logger.error(problem)
    if problems and ledger.status is not None and ledger.status != "needs attention":
        ledger.finish("needs attention")
    if ledger.status is None and completed:
        ledger.finish("needs attention" if problems else "succeeded")
    if ledger.status is None:
        logger.error(
            "run %s was interrupted before it finished rolling back: fleet %s stays locked and may run mixed "
            "versions. Run `rollout recover --fleet FLEET` to finish the rollback from the journal %s.",
            ledger.run_id,
            ctx.fleet.name,
            ledger.journal,
        )
    elif ledger.status != "needs attention":  # a fleet that needs a person stays locked
        lock.release(ctx, holder)
    for failure in journals.failures:
        logger.warning("the copy of this run's journal on the fleet could not be written: %s", failure)


@flow(name="recover-fleet", validate_parameters=True)
def recover_fleet(fleet_file: str, i_checked: bool = False) -> str:
    """Finish what an interrupted (killed) run left: revert the instances it changed, put
    every server it drained back in rotation, release the fleet's lock.

    Args:
        fleet_file: Path of the fleet YAML file on the machine that ran the interrupted run.
        i_checked: A person checked the fleet: release a run that needed attention as the
            fleet is now (nothing rolled back), and take over a lock whose holder this
            machine cannot see (its journal, if here, is still recovered).
    """
    fleet = load_fleet(fleet_file)
    ctx = Context.connect(fleet)
    holder = lock.me(f"recover-{int(time.time())}", "recovery")
    try:
        journals = FleetJournals(fleet, ctx.hosts[fleet.instances[0].name])
        lease = lock.acquire(ctx, holder, take_over=take_over_rule(fleet, journals, i_checked))
        if lease.stale is None:
            lock.release(ctx, lease.holder)
            return f"fleet {fleet.name} was not left locked by an interrupted run; nothing to recover"
        # On failure the lock stays, naming the run: the fleet needs a person.
        message = f"fleet {fleet.name}: {recover_run(ctx, journals, lease.holder.recovers, i_checked)}"
        lock.release(ctx, lease.holder)
    finally:
        ctx.close()
    get_run_logger().info(message)
    return message
