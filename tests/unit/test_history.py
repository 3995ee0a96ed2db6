"""Which request is the newest: what decides that an older run must not undo a newer one."""

from __future__ import annotations

from pathlib import Path

from compose_rollout.state.history import newer_request, runs_directory
from compose_rollout.state.journal import Ledger, RunStatus
from tests.unit.fakes import fleet


def journal(state: Path, run_id: str, asked: float | None, started: float, status: RunStatus | None) -> None:
    path = runs_directory(fleet(state_directory=str(state))) / f"{run_id}.json"
    ledger = Ledger("demo", run_id, f"app:{run_id}", path, started_at=started, requested_at=asked)
    ledger.status = status
    ledger.save()


def test_a_run_asked_for_later_that_acted_on_the_fleet_supersedes_an_earlier_request(tmp_path: Path) -> None:
    demo = fleet(state_directory=str(tmp_path))
    journal(tmp_path, "older", asked=100.0, started=101.0, status="succeeded")
    journal(tmp_path, "newer", asked=200.0, started=201.0, status="rolled back")

    found = newer_request(demo, 150.0)
    assert found is not None and found.run_id == "newer"
    assert newer_request(demo, 200.0) is None  # the newest request itself may run


def test_refused_and_superseded_runs_changed_nothing_so_they_supersede_nothing(tmp_path: Path) -> None:
    demo = fleet(state_directory=str(tmp_path))
    journal(tmp_path, "refused", asked=200.0, started=201.0, status="refused")
    journal(tmp_path, "skipped", asked=300.0, started=301.0, status="superseded")

    assert newer_request(demo, 150.0) is None


def test_journals_without_a_request_time_count_from_their_start(tmp_path: Path) -> None:
    demo = fleet(state_directory=str(tmp_path))
    journal(tmp_path, "old-format", asked=None, started=200.0, status=None)  # interrupted, then recovered

    assert newer_request(demo, 199.0) is not None
    assert newer_request(demo, 201.0) is None
