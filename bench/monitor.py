"""An independent view of the rollout from HAProxy itself.

The journal of compose-rollout says when *it* drained and re-enabled an instance; the
peers (a shell script, Ansible) keep no such record. To compare all three the same way,
a thread polls HAProxy's admin socket every 50 ms during each run and records every
change of a server's operational state (check UP/DOWN), admin state (ready, drain,
maint) and session count. From that: when each server left rotation, when its last
session ended, when HAProxy saw it DOWN and UP again, and when it was back in rotation.
Resolution is the poll interval (50 ms), identical for every runner.

The same polls give *capacity*: per poll, the servers HAProxy sends requests to, by the
test bed's one definition (`compose_rollout.testbed.capacity.takes_requests`), whoever
added them. The backend's servers may change during a run: a surge adds `NAME-surge`
and deletes it again. A server that appears mid-run is *joining* until it is first in
rotation (not an outage); one that disappears stops being counted from that poll on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise

from compose_rollout.testbed import HaproxyAdmin
from compose_rollout.testbed.capacity import Sample as ServingSample
from compose_rollout.testbed.capacity import takes_requests

OP_RUNNING = 2
ADMIN_MAINT = 0x01 | 0x02 | 0x20
ADMIN_DRAIN = 0x08 | 0x10


@dataclass(frozen=True)
class Sample:
    """One server at one instant."""

    t: float
    op_state: int
    admin_state: int
    sessions: int

    @property
    def in_rotation(self) -> bool:
        """UP by the health checks and taking new connections."""
        return self.op_state == OP_RUNNING and not self.admin_state & (ADMIN_MAINT | ADMIN_DRAIN)

    @property
    def admin_out(self) -> bool:
        """Drained or in maintenance by an operator (whatever the checks say)."""
        return bool(self.admin_state & (ADMIN_MAINT | ADMIN_DRAIN))


@dataclass
class Outage:
    """One stretch out of rotation of one server, with what happened inside it."""

    server: str
    left: float  # first sample not in rotation
    back: float  # first sample in rotation again
    sessions_done: float | None = None  # first sample with 0 sessions after leaving
    down_at: float | None = None  # HAProxy's check first saw it DOWN
    up_at: float | None = None  # HAProxy's check saw it UP again (after down_at)
    # An operator (the runner) drained it or put it in maintenance. False means HAProxy's
    # own check took it out (a failed check under load, say): not part of the rollout.
    planned: bool = False

    @property
    def seconds(self) -> float:
        return self.back - self.left

    @property
    def drain_seconds(self) -> float:
        """The inherent wait for in-flight requests to finish."""
        return (self.sessions_done - self.left) if self.sessions_done is not None else 0.0


@dataclass
class LbMonitor:
    """Poll `show servers state` + `show stat` every `interval` s in a thread."""

    admin: HaproxyAdmin
    backend: str
    interval: float = 0.05
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    # Per poll (all of them, not changes only): which servers took requests.
    serving: list[ServingSample] = field(default_factory=list)
    # Servers that were in the backend and then were not, and the poll that saw them gone.
    gone: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, object]:
        # Samples only: the thread and its event cannot be pickled (results are saved
        # so a report can be re-rendered without re-running the bench).
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_thread")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update({"serving": [], "gone": {}} | state)  # results saved before these existed
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lb-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        now = time.time()
        states = self.admin.show_servers_state(self.backend)
        stats = self.admin.server_stats(self.backend)
        self.serving.append(ServingSample(now, frozenset(n for n, row in stats.items() if takes_requests(row))))
        for name in self.samples.keys() - states.keys():
            self.gone.setdefault(name, now)
        for name, row in states.items():
            self.gone.pop(name, None)
            sample = Sample(
                t=now,
                op_state=int(row["srv_op_state"]),
                admin_state=int(row["srv_admin_state"]),
                sessions=int(stats.get(name, {}).get("scur") or 0),
            )
            series = self.samples.setdefault(name, [])
            last = series[-1] if series else None
            # Keep changes only (and the first sample): a compact, exact step function.
            if last is None or (last.op_state, last.admin_state, last.sessions) != (
                sample.op_state,
                sample.admin_state,
                sample.sessions,
            ):
                series.append(sample)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except (OSError, RuntimeError, ValueError, KeyError):
                self.errors += 1  # HAProxy busy or restarting: the next poll tells
            self._stop.wait(self.interval)

    def outages(self, server: str) -> list[Outage]:
        """Every stretch during which `server` was out of rotation (closed ones only),
        from its first poll in rotation on: a server added mid-run (a surge's) is not
        out of rotation before it first joined it."""
        found: list[Outage] = []
        current: Outage | None = None
        joined = False
        for sample in self.samples.get(server, []):
            joined = joined or sample.in_rotation
            if not joined:
                continue
            if current is None:
                if not sample.in_rotation:
                    current = Outage(server, left=sample.t, back=sample.t, planned=sample.admin_out)
                    if sample.sessions == 0:
                        current.sessions_done = sample.t
                    if sample.op_state != OP_RUNNING:
                        current.down_at = sample.t
                continue
            current.planned = current.planned or sample.admin_out
            if current.sessions_done is None and sample.sessions == 0:
                current.sessions_done = sample.t
            if sample.op_state != OP_RUNNING and current.down_at is None:
                current.down_at = sample.t
            if sample.op_state == OP_RUNNING and current.down_at is not None and current.up_at is None:
                current.up_at = sample.t
            if sample.in_rotation:
                current.back = sample.t
                found.append(current)
                current = None
        return found

    def capacity_lost(self, n: int, began: float, ended: float) -> float:
        """Seconds within [began, ended] with fewer than `n` servers taking requests:
        each poll's count holds until the next poll (a failed poll extends the one before)."""
        return sum(
            max(0.0, min(later.at, ended) - max(sample.at, began))
            for sample, later in pairwise(self.serving)
            if sample.count < n
        )

    def serving_range(self, began: float, ended: float) -> tuple[int, int] | None:
        """(fewest, most) servers taking requests at once within [began, ended]."""
        counts = [s.count for s, later in pairwise(self.serving) if later.at > began and s.at < ended]
        return (min(counts), max(counts)) if counts else None

    def all_outages(self) -> dict[str, list[Outage]]:
        return {server: self.outages(server) for server in sorted(self.samples, key=_natural)}


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, 0)
