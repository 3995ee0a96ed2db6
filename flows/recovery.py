"""Undoing what a run changed, across its instances.

The rollback of a failed run, one instance at a time in the order given (a host that
cannot be reached is left for a person, any other rollback failure stops there); the
rollback of one failed instance alone, within the failure budget; and the recovery of
an interrupted run from its journal, with how a run judges a lock that someone else
holds (`take_over_rule`).
"""

from __future__ import annotations

from prefect import get_run_logger

from compose_rollout import procedure
from compose_rollout.config import Fleet
from compose_rollout.context import Context
from compose_rollout.errors import ConnectError, DeployFailed, HostKeyError, PreflightError, RolloutError, StepFailed
from compose_rollout.flows.instance import rollback_instance
from compose_rollout.state import lock
from compose_rollout.state.fleet_journals import FleetJournals
from compose_rollout.state.journal import Ledger


def _unreachable(error: BaseException) -> bool:
    cause = error.cause if isinstance(error, StepFailed) else error
    return isinstance(cause, (ConnectError, HostKeyError))


def roll_back(ctx: Context, ledger: Ledger, order: list[str]) -> tuple[list[str], str]:
    """Roll back instances one at a time, in `order`.

    An instance whose host cannot be reached is left for a person (the safety net still
    re-enables it in the LB, where its own health check decides) and the others are
    rolled back. Any other rollback failure (the old version does not come back healthy)
    stops the rollback there, so the instances still on the new version keep serving.
    Returns the instances rolled back, in order, and a note for a person ("" if none).
    """
    logger = get_run_logger()
    rolled: list[str] = []
    unreachable: list[str] = []
    for name in order:
        record = ledger[name]
        if not (record.changed or record.drained) or record.rollback_attempted:
            continue
        logger.warning("rolling back %s to %s", name, record.old_image)
        try:
            rollback_instance(ctx, name, ledger)
            rolled.append(name)
        except Exception as error:  # noqa: BLE001 - reported to the person, with the instance
            ledger.update(name, outcome="rollback failed", error=str(error))
            if _unreachable(error):
                unreachable.append(f"{name} ({error})")
                continue
            untouched = [other for other in order if other != name and ledger[other].outcome == "updated"]
            still = f"; not rolled back, still on the new image: {', '.join(untouched)}" if untouched else ""
            return rolled, (
                f"ROLLBACK FAILED on {name} ({error}). Stopped rolling back so the others keep serving{still}. "
                f"A person must check {name}: its original compose file is in the journal {ledger.journal}."
            )
    if unreachable:
        return rolled, (
            f"COULD NOT REACH {'; '.join(unreachable)} to roll it back: it is back in rotation in the LB, where "
            f"its own health check decides. A person must check it; its original compose file is in the journal "
            f"{ledger.journal}."
        )
    return rolled, ""


def take_over_rule(fleet: Fleet, journals: FleetJournals, i_checked: bool = False) -> lock.TakeOver:
    """How a run judges a lock someone else holds (see `lock.acquire`).

    Taken over: a run that ended and left the lock (not one that needs a person), or an
    interrupted run whose process is known dead here. A run that needs a person is taken
    over only when a person says they checked (`rollout recover --i-checked`), so an
    automatic run never rolls back over a manual fix; so is a run this machine cannot see.
    """

    def judge(holder: lock.Holder) -> bool | str:
        found = journals.find(holder.journal_run)
        status = found.status if found is not None else None
        if status == "needs attention" and not i_checked:
            return (
                f"fleet {fleet.name} is locked: run {holder.journal_run} ended needing a person (see its journal "
                f"{journals.local_path(holder.journal_run)} and `rollout history`). Check and fix the fleet, then run "
                "`rollout recover --fleet FLEET --i-checked` to release the lock; no run takes it over before that."
            )
        if status is not None:
            return not holder.is_running_here()
        return i_checked or holder.is_dead_local_process()

    return judge


def recover_run(ctx: Context, journals: FleetJournals, run_id: str, i_checked: bool = False) -> str:
    """Revert what an interrupted run changed, from its journal; what was done, for a person.
    DeployFailed if a person must look.

    With `i_checked`, a run that needed a person is closed as they left it ("resolved"),
    and a journal this machine does not have is not asked for.
    """
    logger = get_run_logger()
    found = journals.find(run_id)
    if found is None:
        if i_checked:
            logger.warning("run %s left no journal here or on the fleet; releasing its lock on your word", run_id)
            return f"run {run_id} released on your word (it left no journal); nothing was rolled back"
        raise PreflightError(
            f"fleet {ctx.fleet.name} was left locked by run {run_id}, whose journal is neither on this machine "
            f"({journals.local_path(run_id)}) nor on the fleet ({journals.directory} on {ctx.fleet.instances[0].host}"
            "): check the fleet and run `rollout recover --fleet FLEET --i-checked`"
        )
    old = journals.attach(found)
    if old.status == "needs attention" and i_checked:
        old.finish("resolved")
        logger.warning("run %s needed attention; a person checked the fleet: released as it is", run_id)
        return f"run {run_id} released as a person checked the fleet; nothing was rolled back"
    if old.status not in (None, "needs attention"):  # it ended by itself, or was recovered
        return f"run {run_id} had ended ({old.status}); nothing to revert"
    logger.warning("run %s (to %s) did not finish; reverting what it changed first", run_id, old.target)
    for record in old.records.values():
        old.records[record.name].rollback_attempted = False
    order = sorted(
        (r.name for r in old.records.values() if r.changed or r.drained),
        key=lambda name: old[name].drained_at or 0.0,
        reverse=True,
    )
    rolled, note = roll_back(ctx, old, order)
    problems = procedure.release_all(ctx, old)
    if note or problems:
        old.finish("needs attention")
        raise DeployFailed(f"recovery of run {run_id} on fleet {ctx.fleet.name}: {note or '; '.join(problems)}")
    old.finish("recovered")
    logger.info("recovered run %s: rolled back %s", run_id, ", ".join(rolled) or "nothing (nothing was changed)")
    return f"run {run_id} recovered; its instances are back on their previous image"


def roll_back_alone(ctx: Context, ledger: Ledger, names: list[str]) -> None:
    """Within the failure budget: roll back only these failed instances and go on. A
    rollback that fails stops the run (the whole rollback follows, then a person)."""
    logger = get_run_logger()
    for name in names:
        error = ledger[name].error
        if not (ledger[name].changed or ledger[name].drained):
            continue  # failed before it changed anything: nothing to undo
        logger.warning("%s failed (%s); rolling it back alone (rollout.max_failed_instances)", name, error)
        rolled, note = roll_back(ctx, ledger, [name])
        ledger.update(name, error=error)  # the cause, not the rollback's
        if note or name not in rolled:
            raise StepFailed(name, "rollback", RolloutError(note or f"{name} could not be rolled back"))
