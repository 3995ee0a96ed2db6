"""Which lock a run may take over: never one that needs a person, unless a person says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from compose_rollout.flows.recovery import take_over_rule
from compose_rollout.state import lock
from compose_rollout.state.fleet_journals import FleetJournals
from compose_rollout.state.journal import Ledger, RunStatus
from tests.unit.fakes import fleet

GONE = 2**22 + 12345  # no such pid here


def _ended(tmp_path: Path, run_id: str, status: RunStatus | None) -> None:
    ledger = Ledger("demo", run_id, "app:v2", tmp_path / "demo" / "runs" / f"{run_id}.json")
    ledger.save()
    if status is not None:
        ledger.finish(status)


def test_a_run_that_needs_a_person_is_never_taken_over_by_the_next_run(tmp_path: Path) -> None:
    the_fleet = fleet(state_directory=str(tmp_path))
    _ended(tmp_path, "run-1", "needs attention")
    dead = replace(lock.me("run-1", "app:v2"), pid=GONE)
    verdict = take_over_rule(the_fleet, FleetJournals(the_fleet, None))(dead)
    assert isinstance(verdict, str)
    assert "run-1 ended needing a person" in verdict and "rollout recover --fleet FLEET --i-checked" in verdict
    assert take_over_rule(the_fleet, FleetJournals(the_fleet, None), i_checked=True)(dead) is True


def test_a_recovery_that_failed_is_judged_by_the_run_it_was_recovering(tmp_path: Path) -> None:
    the_fleet = fleet(state_directory=str(tmp_path))
    _ended(tmp_path, "run-1", "needs attention")  # the recovery of run-1 failed and said so
    taker = replace(lock.me("recover-7", "recovery"), pid=GONE, recovers="run-1")
    assert isinstance(take_over_rule(the_fleet, FleetJournals(the_fleet, None))(taker), str)


def test_an_interrupted_run_is_taken_over_only_when_its_process_is_known_dead(tmp_path: Path) -> None:
    the_fleet = fleet(state_directory=str(tmp_path))
    _ended(tmp_path, "run-1", None)
    alive = lock.me("run-1", "app:v2")
    assert take_over_rule(the_fleet, FleetJournals(the_fleet, None))(alive) is False
    assert take_over_rule(the_fleet, FleetJournals(the_fleet, None))(replace(alive, pid=GONE)) is True
    elsewhere = replace(alive, hostname="another-orchestrator", pid=GONE)
    assert take_over_rule(the_fleet, FleetJournals(the_fleet, None))(elsewhere) is False
    assert take_over_rule(the_fleet, FleetJournals(the_fleet, None), i_checked=True)(elsewhere) is True


def test_a_run_that_ended_and_left_the_lock_is_taken_over_unless_it_is_still_running(tmp_path: Path) -> None:
    the_fleet = fleet(state_directory=str(tmp_path))
    _ended(tmp_path, "run-1", "recovered")
    running = lock.me("recover-2", "recovery")
    assert (
        take_over_rule(the_fleet, FleetJournals(the_fleet, None))(replace(running, recovers="run-1")) is False
    )  # about to rewrite the lock
    assert (
        take_over_rule(the_fleet, FleetJournals(the_fleet, None))(replace(running, recovers="run-1", pid=GONE)) is True
    )
