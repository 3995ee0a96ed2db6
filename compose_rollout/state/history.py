"""A fleet's history, read from the run journals (here and on the fleet, see fleet_journals).

Each run leaves `state_directory/<fleet>/runs/<run>.json` and a copy beside the fleet's
lock (who started it, from which trigger, the target pinned to its digest, and per
instance the old and new image, timings and result), so the journals are the audit
trail; nothing else is written.
"""

from __future__ import annotations

import time

from compose_rollout.config import Fleet
from compose_rollout.errors import RolloutError
from compose_rollout.state.fleet_journals import FleetJournals
from compose_rollout.state.fleet_journals import local_runs_directory as runs_directory
from compose_rollout.state.journal import Ledger

ROLLBACK_TRIGGER = "rollback"

__all__ = ["ROLLBACK_TRIGGER", "newer_request", "previous_image", "rows", "runs", "runs_directory"]


def runs(fleet: Fleet, journals: FleetJournals | None = None) -> list[Ledger]:
    """Every recorded run of the fleet, oldest first (unreadable journals are skipped):
    this machine's, and with `journals` the fleet's copies too."""
    return (journals or FleetJournals(fleet, None)).all()


def newer_request(fleet: Fleet, requested_at: float, journals: FleetJournals | None = None) -> Ledger | None:
    """The newest run of the fleet that was asked for after `requested_at` and acted on it
    (a refused or superseded run did not), or None.

    Prefect does not keep the order of two runs its worker picks up in one poll, and a run
    re-scheduled into a maintenance window can start after a later, urgent one: the request
    times, not the start times, say which one is the user's latest wish.
    """
    for ledger in reversed(runs(fleet, journals)):
        if ledger.status in ("refused", "superseded"):
            continue
        if ledger.asked_at > requested_at:
            return ledger
    return None


def rows(fleet: Fleet, journals: FleetJournals | None = None) -> list[dict[str, object]]:
    """One row per run, newest first, for `rollout history`."""
    table = []
    for ledger in reversed(runs(fleet, journals)):
        results: dict[str, int] = {}
        for record in ledger.records.values():
            results[record.outcome] = results.get(record.outcome, 0) + 1
        table.append(
            {
                "started (UTC)": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ledger.started_at)),
                "run": ledger.run_id[:12],
                "by": f"{ledger.user} via {ledger.triggered_by}" if ledger.user else ledger.triggered_by,
                "target": ledger.target,
                "status": ledger.status or "INTERRUPTED",
                "instances": ", ".join(f"{count} {outcome}" for outcome, count in sorted(results.items())),
                "seconds": round((ledger.finished_at or ledger.started_at) - ledger.started_at, 1),
            }
        )
    return table


def previous_image(fleet: Fleet, journals: FleetJournals | None = None) -> str:
    """The image the fleet ran before its newest successful deploy (rollbacks skipped,
    so a rollback is never rolled back: a second `rollout rollback` is a no-op)."""
    for ledger in reversed(runs(fleet, journals)):
        if ledger.status != "succeeded" or ledger.triggered_by == ROLLBACK_TRIGGER:
            continue
        moved = {record.old_image for record in ledger.records.values() if record.outcome == "updated"}
        if len(moved) == 1:
            return moved.pop()
        if len(moved) > 1:
            raise RolloutError(
                f"run {ledger.run_id} moved instances from different images ({', '.join(sorted(moved))}); "
                "name the image to go back to with `rollout deploy --image`"
            )
    raise RolloutError(f"fleet {fleet.name} has no successful deploy in its history to roll back")
