"""What this run changed, per instance: the only thing rollback and recovery read.

The ledger is written to a journal file on the orchestrator after every change, so a
run killed mid-instance leaves enough behind (the original compose bytes included) to
finish or revert it; and copied after every change to the fleet itself (`mirror`, see
`state.fleet_journals`), so a worker on another machine can recover it too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Outcome = Literal["pending", "unchanged", "updated", "failed", "rolled back", "rollback failed"]
# A run without a status was interrupted (killed) and must be recovered.
# "superseded": a newer request had already run, so this older one touched nothing.
# "resolved": it needed attention, and a person said they checked the fleet (recover --i-checked).
# "partial": within rollout.max_failed_instances, some instances failed and were rolled back alone.
RunStatus = Literal[
    "succeeded",
    "partial",
    "rolled back",
    "needs attention",
    "recovered",
    "resolved",
    "refused",
    "stopped",
    "superseded",
]


@dataclass
class InstanceRecord:
    """One instance in one run: where it started, what was done to it, how it ended."""

    name: str
    compose_path: str  # the file the run edits: the compose file, or `.env` (image_variable)
    old_image: str
    old_image_id: str
    original: bytes
    mode: int
    new_image: str = ""
    # Recorded before each action (write-ahead): True means "may have happened".
    drained: bool = False
    file_written: bool = False
    restarted: bool = False
    outcome: Outcome = "pending"
    step: str = ""
    error: str = ""
    sessions_at_drain: int = 0
    sessions_cut: int = 0
    # Wall-clock (Unix) times of the last update's phases, for timelines and audit.
    drained_at: float | None = None
    up_at: float | None = None
    healthy_at: float | None = None
    lb_up_at: float | None = None
    enabled_at: float | None = None
    seconds_to_healthy: float | None = None
    rollback_attempted: bool = False
    # Ports (`ports.py`): the container port behind the LB server, its published host
    # range, and the host port the serving container has now ("" / 0: not followed).
    container_port: str = ""
    port_low: int = 0
    port_high: int = 0
    port: int = 0
    # The instance's LB server now: as the run found it, then as it named it after a
    # move (an LB that names servers by HOST:PORT renames one that moves). "" in a
    # journal written before it was recorded: the fleet file's `lb_server`.
    lb_server: str = ""
    old_container: str = ""
    # The surge strategy (`surge.py`), write-ahead like the flags above.
    strategy: str = "in-place"
    surge_started: bool = False
    surge_container: str = ""
    surge_port: int = 0
    surge_server: str = ""
    old_removed: bool = False
    moved: bool = False
    # The image's tag is this variable, set in `.env` (compose_path); the compose file
    # says `image_prefix${VAR}`.
    image_variable: str = ""
    image_prefix: str = ""
    # The 5xx gate (health.watch_seconds): responses the LB counted while it watched.
    watched_responses: int | None = None
    watched_5xx: int | None = None
    # The weighted canary changed this server's weight; written before, to be put back.
    weight: int | None = None
    baked_at: float | None = None

    @property
    def seconds_out_of_rotation(self) -> float | None:
        if self.drained_at is None or self.enabled_at is None:
            return None
        return self.enabled_at - self.drained_at

    @property
    def changed(self) -> bool:
        """The run changed something on this instance that a rollback must undo."""
        return self.file_written or self.restarted or self.surge_started


@dataclass
class Ledger:
    """Every instance record of one run, persisted to `journal` on each change."""

    fleet: str
    run_id: str
    target: str
    journal: Path | None = None
    started_at: float = field(default_factory=time.time)
    triggered_by: str = ""
    user: str = ""
    status: RunStatus | None = None
    finished_at: float | None = None
    # When the deploy was asked for (Unix time; the Prefect run's expected start), which
    # orders requests: an older one never undoes a newer one. None in older journals.
    requested_at: float | None = None
    records: dict[str, InstanceRecord] = field(default_factory=dict)
    # Counts the writes: of two copies of one journal (here, on the fleet) the higher is newer.
    revision: int = 0
    # Called with each written snapshot, after the local journal (the copy on the fleet).
    mirror: Callable[[str, bytes], None] | None = field(default=None, repr=False, compare=False)
    # Called with the ledger after every write (`progress.Progress`); must not raise.
    observer: Callable[[Ledger], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *records: InstanceRecord) -> None:
        """Add records and persist the journal once."""
        with self._lock:
            self.records.update((record.name, record) for record in records)
            self._write()

    def update(self, name: str, **changes: Any) -> InstanceRecord:
        """Change fields of one record and persist the journal before returning."""
        with self._lock:
            record = self.records[name]
            for key, value in changes.items():
                setattr(record, key, value)
            self._write()
        return record

    def finish(self, status: RunStatus) -> None:
        """Mark the run as ended (a journal without a status is an interrupted run)."""
        with self._lock:
            self.status, self.finished_at = status, time.time()
            self._write()

    @property
    def asked_at(self) -> float:
        """When the deploy was asked for; journals older than `requested_at` count from their start."""
        return self.requested_at if self.requested_at is not None else self.started_at

    def __getitem__(self, name: str) -> InstanceRecord:
        return self.records[name]

    def to_json(self) -> dict[str, Any]:
        records = []
        for record in self.records.values():
            data = asdict(record)
            data["original"] = base64.b64encode(record.original).decode()
            records.append(data)
        return {
            "fleet": self.fleet,
            "run_id": self.run_id,
            "target": self.target,
            "started_at": self.started_at,
            "triggered_by": self.triggered_by,
            "user": self.user,
            "status": self.status,
            "finished_at": self.finished_at,
            "requested_at": self.requested_at,
            "revision": self.revision,
            "records": records,
        }

    def save(self) -> None:
        """Write the journal atomically (no-op without a journal path)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        # Called with the lock held, through the rename: with batches, two instances'
        # updates race, and a snapshot renamed after a newer one would lose a
        # write-ahead record (a lost `restarted` makes recovery skip `up`).
        if self.journal is None:
            if self.observer is not None:
                self.observer(self)
            return
        self.revision += 1
        payload = json.dumps(self.to_json(), indent=1)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.journal.parent, prefix=".journal-")
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(payload)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temp, self.journal)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if self.mirror is not None:
            self.mirror(self.run_id, payload.encode())
        if self.observer is not None:
            self.observer(self)

    @classmethod
    def load(cls, journal: Path) -> Ledger:
        """Read a journal left by an earlier run."""
        return cls.from_json(json.loads(journal.read_text()), journal)

    @classmethod
    def from_json(cls, data: dict[str, Any], journal: Path | None = None) -> Ledger:
        """A ledger from its journal's JSON (`journal`: where it is kept from now on)."""
        ledger = cls(
            data["fleet"],
            data["run_id"],
            data["target"],
            journal,
            data["started_at"],
            data.get("triggered_by", ""),
            data.get("user", ""),
            data.get("status"),
            data.get("finished_at"),
            data.get("requested_at"),
            revision=data.get("revision", 0),
        )
        for item in data["records"]:
            item["original"] = base64.b64decode(item["original"])
            ledger.records[item["name"]] = InstanceRecord(**item)
        return ledger
