"""How far a run is, while it runs: a Prefect progress artifact, and a line per step in a terminal.

The progress artifact (`rollout-<fleet>-progress`) moves as instances finish, with a
description naming what is done and what runs now; the table artifact at the end stays.
`rollout deploy` in a terminal also prints one line per step change (which instance,
which step, n of N done); not in a terminal (a worker, CI, a pipe), it prints nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import TextIO
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from compose_rollout.state.journal import Ledger

FINISHED = ("updated", "unchanged", "failed", "rolled back", "rollback failed")


class Progress:
    """Watches a ledger (`Ledger.observer`) and reports the run's progress."""

    def __init__(
        self,
        fleet: str,
        total: int,
        stream: TextIO | None = None,
        publish: Callable[[float, str], None] | None = None,
    ) -> None:
        self.key = f"rollout-{fleet}-progress"
        self.total = total
        self.stream = stream if stream is not None else (sys.stderr if sys.stderr.isatty() else None)
        self.publish = publish or self._publish
        self._lock = threading.Lock()
        self._last_line = ""
        self._done = -1
        self._artifact: UUID | None = None

    def describe(self, ledger: Ledger) -> tuple[int, str, list[str]]:
        """(instances finished, one line for people, the lines of instances in progress)."""
        done = [r.name for r in ledger.records.values() if r.outcome in FINISHED and r.outcome != "unchanged"]
        moving = [f"{r.name}: {r.step}" for r in ledger.records.values() if r.step and r.outcome not in FINISHED]
        summary = f"{len(done)} of {self.total} instances done" + (f" ({', '.join(done)})" if done else "")
        return len(done), summary, moving

    def __call__(self, ledger: Ledger) -> None:
        """Called on every journal write: report what changed. Never raises."""
        done, summary, moving = self.describe(ledger)
        with self._lock:
            line = f"[{done}/{self.total}] " + ("; ".join(moving) if moving else "between steps")
            if self.stream is not None and line != self._last_line:
                self._last_line = line
                print(f"rollout {line}", file=self.stream, flush=True)
            if done != self._done:
                self._done = done
                percent = 100.0 * done / self.total if self.total else 100.0
                self.publish(percent, summary + (f"; now {'; '.join(moving)}" if moving else ""))

    def _publish(self, percent: float, description: str) -> None:
        """The Prefect progress artifact, created once then updated."""
        try:
            if self._artifact is None:
                created = create_progress_artifact(percent, key=self.key, description=description)
                self._artifact = created if isinstance(created, UUID) else None  # sync call: a UUID
            else:
                update_progress_artifact(self._artifact, percent, description=description)
        except Exception as error:  # noqa: BLE001 - progress must never change a run's outcome
            logging.getLogger(__name__).warning("could not publish the progress artifact: %s", error)
