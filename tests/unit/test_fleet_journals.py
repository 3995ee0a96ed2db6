"""Journals on the fleet: a run killed on one worker machine is seen and recovered from another."""

from __future__ import annotations

import json
from pathlib import Path

from compose_rollout.state.fleet_journals import FleetJournals
from compose_rollout.state.history import newer_request
from compose_rollout.state.journal import InstanceRecord, Ledger
from tests.unit.fakes import FakeHost, fleet

RUNS = "/srv/app-1/.compose-rollout-demo.runs"


def first_host() -> FakeHost:
    """The fleet's first host, where the lock and the journals' copies live."""
    return FakeHost("app-1")


def worker(state: Path, host: FakeHost | None) -> FleetJournals:
    return FleetJournals(fleet(state_directory=str(state)), host)


def a_run(journals: FleetJournals, run_id: str = "run-1", asked: float = 100.0) -> Ledger:
    ledger = journals.attach(Ledger("demo", run_id, "app:v2", requested_at=asked))
    ledger.add(InstanceRecord("app-1", "/srv/app-1/docker-compose.yml", "app:v1", "sha256:" + "a" * 64, b"x", 0o644))
    return ledger


def test_every_write_lands_here_and_on_the_fleet_readable_only_by_its_owner(tmp_path: Path) -> None:
    host = first_host()
    ledger = a_run(worker(tmp_path / "a", host))
    ledger.update("app-1", drained=True)
    assert (tmp_path / "a" / "demo" / "runs" / "run-1.json").is_file()
    assert RUNS in host.directories and host.modes[f"{RUNS}/run-1.json"] == 0o600
    assert Ledger.from_json(json.loads(host.files[f"{RUNS}/run-1.json"]))["app-1"].drained


def test_another_worker_finds_a_run_it_never_saw_and_keeps_it_from_then_on(tmp_path: Path) -> None:
    host = first_host()
    killed = a_run(worker(tmp_path / "a", host))
    killed.update("app-1", drained=True, file_written=True)  # then worker A is killed

    b = worker(tmp_path / "b", host)
    found = b.find("run-1")
    assert found is not None and found["app-1"].file_written and found.journal is not None
    recovering = b.attach(found)
    recovering.finish("recovered")
    assert (tmp_path / "b" / "demo" / "runs" / "run-1.json").is_file()
    assert b.find("run-1").status == "recovered"  # type: ignore[union-attr]
    assert worker(tmp_path / "a", host).find("run-1").status == "recovered"  # type: ignore[union-attr]


def test_of_two_copies_of_a_journal_the_newer_one_counts(tmp_path: Path) -> None:
    host = first_host()
    ledger = a_run(worker(tmp_path / "a", host))
    stale_here = (tmp_path / "a" / "demo" / "runs" / "run-1.json").read_bytes()
    ledger.update("app-1", restarted=True)
    (tmp_path / "a" / "demo" / "runs" / "run-1.json").write_bytes(stale_here)  # this machine's copy is older
    [run] = worker(tmp_path / "a", host).all()
    assert run["app-1"].restarted


def test_the_newest_request_rule_sees_runs_made_from_other_workers(tmp_path: Path) -> None:
    host = first_host()
    a_run(worker(tmp_path / "a", host), "newer", asked=200.0).finish("succeeded")
    b = worker(tmp_path / "b", host)
    found = newer_request(b.fleet, 150.0, b)
    assert found is not None and found.run_id == "newer"
    assert newer_request(b.fleet, 150.0) is None  # what worker B alone would have seen


def test_a_fleet_host_that_cannot_be_written_never_stops_the_run(tmp_path: Path) -> None:
    host = first_host()
    journals = worker(tmp_path / "a", host)
    host.fail_writes = True
    ledger = a_run(journals)
    ledger.update("app-1", drained=True)  # no exception: the local journal is the write-ahead record
    assert Ledger.load(tmp_path / "a" / "demo" / "runs" / "run-1.json")["app-1"].drained
    assert journals.failures and "No space left" in journals.failures[-1]
