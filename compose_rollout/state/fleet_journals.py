"""Run journals kept on the fleet itself, beside its lock, so every worker sees every run.

A run writes its journal on the machine that runs it (the write-ahead record) and a copy
to `.compose-rollout-<fleet>.runs/` beside the fleet's lock on the first instance's host.
Recovery, history and the newest-request rule read both, so a run killed on one worker
machine is recovered from another, and no user has to share a filesystem between them.

The copy is best effort: a host that cannot be written to (it is down, its disk is full)
never stops a rollback; the failure is kept and said at the end of the run. The lock lives
on the same host, so while it is unreachable no other worker can take the fleet over.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from compose_rollout.config import Fleet
from compose_rollout.errors import RolloutError
from compose_rollout.hosts.ssh import Executor
from compose_rollout.state.journal import Ledger

RUN_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.json")
MAX_FAILURES_KEPT = 5


def local_runs_directory(fleet: Fleet) -> Path:
    """Where this machine keeps the fleet's journals."""
    return Path(fleet.state_directory).expanduser() / fleet.name / "runs"


def fleet_runs_directory(fleet: Fleet) -> str:
    """Where the fleet keeps the copies: beside the lock, on the first instance's host."""
    return posixpath.join(fleet.instances[0].project_directory, f".compose-rollout-{fleet.name}.runs")


class FleetJournals:
    """The fleet's journals, here and on the fleet's first host."""

    def __init__(self, fleet: Fleet, host: Executor | None) -> None:
        self.fleet = fleet
        self.host = host
        self.directory = fleet_runs_directory(fleet)
        self.failures: list[str] = []
        self._directory_made = False

    def local_path(self, run_id: str) -> Path:
        return local_runs_directory(self.fleet) / f"{run_id}.json"

    def copy(self, run_id: str, payload: bytes) -> None:
        """Write `run_id`'s journal to the fleet (a Ledger's `mirror`); never raises."""
        if self.host is None:
            return
        try:
            if not self._directory_made:
                self.host.make_directory(self.directory)  # 0700: journals hold compose files
                self._directory_made = True
            # Not synced to the host's disk: a copy, written on every journal update (the
            # directory sync, a command on the host, took ~0.1 s of each). A host that loses
            # power keeps an older revision; this machine's journal, fsynced, is the record.
            self.host.write_file_atomic(posixpath.join(self.directory, f"{run_id}.json"), payload, 0o600, durable=False)
        except RolloutError as error:
            self._remember(error)

    def _remember(self, error: RolloutError) -> None:
        self.failures = [*self.failures[-(MAX_FAILURES_KEPT - 1) :], str(error)]

    def attach(self, ledger: Ledger) -> Ledger:
        """Keep `ledger` here and copy it to the fleet on every write from now on."""
        ledger.journal = self.local_path(ledger.run_id)
        ledger.mirror = self.copy
        return ledger

    def find(self, run_id: str) -> Ledger | None:
        """The newest copy of one run's journal (here or on the fleet), or None."""
        here = self._load_local(self.local_path(run_id))
        there = self._load_remote(f"{run_id}.json")
        found = [ledger for ledger in (here, there) if ledger is not None]
        return max(found, key=lambda ledger: ledger.revision) if found else None

    def all(self) -> list[Ledger]:
        """Every run of the fleet, here or on the fleet, newest copy of each, oldest first."""
        by_run: dict[str, Ledger] = {}
        candidates = [self._load_local(path) for path in local_runs_directory(self.fleet).glob("*.json")]
        candidates += [self._load_remote(name) for name in self._remote_names()]
        for ledger in candidates:
            if ledger is None:
                continue
            known = by_run.get(ledger.run_id)
            if known is None or ledger.revision > known.revision:
                by_run[ledger.run_id] = ledger
        return sorted(by_run.values(), key=lambda ledger: ledger.started_at)

    @staticmethod
    def _load_local(path: Path) -> Ledger | None:
        try:
            return Ledger.load(path) if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remote_names(self) -> list[str]:
        if self.host is None:
            return []
        try:
            names = self.host.list_directory(self.directory)
        except RolloutError as error:
            self._remember(error)
            return []
        return [name for name in names if RUN_FILE_RE.fullmatch(name)]

    def _load_remote(self, name: str) -> Ledger | None:
        if self.host is None or not RUN_FILE_RE.fullmatch(name):
            return None
        try:
            data = json.loads(self.host.read_file(posixpath.join(self.directory, name)))
            ledger = Ledger.from_json(data)
        except (RolloutError, ValueError, KeyError, TypeError):
            return None
        ledger.journal = self.local_path(ledger.run_id)  # a recovery from here writes here too
        return ledger
