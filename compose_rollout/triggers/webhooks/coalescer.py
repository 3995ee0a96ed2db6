"""Coalescing bursts of pushes per fleet: only the newest starts (pure, clock passed in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from compose_rollout.triggers.tag_policy import parse_version, version_key
from compose_rollout.triggers.webhooks.routing import PlannedRun
from compose_rollout.triggers.webhooks.state import Memory


def _newer(candidate: PlannedRun, current: PlannedRun) -> bool:
    new, old = version_key(candidate.push.tag), version_key(current.push.tag)
    if new is not None and old is not None and new != old:
        return new > old
    return True  # not both versions, or the same version pushed again: the latest received wins


@dataclass
class _Pending:
    run: PlannedRun
    first_at: float
    last_at: float
    debounce: float


@dataclass
class Coalescer:
    """Per fleet, the newest push of the current burst, released after the debounce.

    Pure: the caller passes the time (monotonic seconds). Holds at most one pending push
    per fleet and `remembered` idempotency keys, in `memory` (which the receiver saves).
    """

    debounce_seconds: float
    debounce_max_seconds: float
    remembered: int = 4096
    memory: Memory = field(default_factory=Memory)
    _pending: dict[str, _Pending] = field(default_factory=dict, init=False, repr=False)

    def offer(self, run: PlannedRun, now: float) -> str:
        """Take an accepted push; return what became of it, in words."""
        key = run.idempotency_key
        seen = self.memory.keys
        if key in seen:
            seen.move_to_end(key)
            return "duplicate of a push already received"
        seen[key] = None
        while len(seen) > self.remembered:
            seen.popitem(last=False)
        refusal = self.downgrade(run)
        if refusal is not None:
            return refusal
        pending = self._pending.get(run.fleet)
        if pending is None:
            debounce = self.debounce_seconds if run.route.debounce_seconds is None else run.route.debounce_seconds
            self._pending[run.fleet] = _Pending(run, now, now, debounce)
            return "scheduled"
        pending.last_at = now
        if _newer(run, pending.run):
            replaced, pending.run = pending.run, run
            return f"scheduled, replacing {replaced.push.tag}"
        return f"superseded by {pending.run.push.tag}"

    def _deadline(self, pending: _Pending) -> float:
        cap = max(self.debounce_max_seconds, pending.debounce)
        return min(pending.last_at + pending.debounce, pending.first_at + cap)

    def next_deadline(self, busy: frozenset[str] = frozenset()) -> float | None:
        """When the next pending push is due (fleets in `busy` wait); None if none is."""
        deadlines = [self._deadline(p) for fleet, p in self._pending.items() if fleet not in busy]
        return min(deadlines, default=None)

    def pop_due(self, now: float, busy: frozenset[str] = frozenset()) -> list[PlannedRun]:
        """The pushes whose burst is over, removed from pending (fleets in `busy` wait)."""
        due = [f for f, p in self._pending.items() if f not in busy and self._deadline(p) <= now]
        return [self._pending.pop(fleet).run for fleet in due]

    def pop_all(self) -> list[PlannedRun]:
        """Every pending push, due or not (for shutdown)."""
        runs = [p.run for p in self._pending.values()]
        self._pending.clear()
        return runs

    def downgrade(self, run: PlannedRun) -> str | None:
        """Why `run` starts nothing because it is older than its fleet's last webhook run, or None.

        Registries do not promise delivery order, and a captured request can be replayed:
        an older version deploys only where the route says `allow_downgrade: true`.
        """
        started = self.memory.started.get(run.fleet)
        if started is None or run.route.allow_downgrade:
            return None
        new, last = parse_version(run.push.tag), parse_version(started)
        if new is not None and last is not None and new < last:
            return f"older than {started}, the version of fleet {run.fleet}'s last webhook run (allow_downgrade is off)"
        return None

    def forget(self, run: PlannedRun) -> None:
        """Drop `run`'s idempotency key: the same push delivered again is no longer a duplicate."""
        self.memory.keys.pop(run.idempotency_key, None)

    def mark_started(self, run: PlannedRun, created: bool = True) -> None:
        """Record that `run` exists in Prefect: it is its fleet's last webhook run from now on
        (a run Prefect already had, `created` False, only if it is not older)."""
        started = self.memory.started.get(run.fleet)
        new, last = parse_version(run.push.tag), None if started is None else parse_version(started)
        if created or last is None or (new is not None and new >= last):
            self.memory.started[run.fleet] = run.push.tag
            self.memory.started.move_to_end(run.fleet)

    @property
    def pending_count(self) -> int:
        """How many fleets have a push waiting for its burst to end."""
        return len(self._pending)

    @property
    def pending(self) -> Mapping[str, PlannedRun]:
        """Fleet → the push that would start now."""
        return {fleet: p.run for fleet, p in self._pending.items()}
