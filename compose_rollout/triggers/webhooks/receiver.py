"""The receiver: accepted pushes, debounced, become Prefect runs (retried, bounded)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from compose_rollout.triggers.webhooks.coalescer import Coalescer
from compose_rollout.triggers.webhooks.prefect_runs import FlowRunRef, PrefectApiError, RunCreator
from compose_rollout.triggers.webhooks.routing import PlannedRun
from compose_rollout.triggers.webhooks.settings import WebhookSettings
from compose_rollout.triggers.webhooks.state import StateFile
from compose_rollout.triggers.windows import scheduled_start

logger = logging.getLogger("compose_rollout.triggers.webhooks")


@dataclass(frozen=True)
class StartedRun:
    """A run this receiver created (or found, for a known key)."""

    fleet: str
    tag: str
    flow_run: FlowRunRef
    seconds_after_push: float
    scheduled_time: datetime | None = None  # set when the push came outside the fleet's windows


@dataclass(frozen=True)
class FailedRun:
    """A push whose run could not be created."""

    fleet: str
    tag: str
    error: str


class Receiver:
    """Runs the coalescer's clock: starts each fleet's newest push once its burst is over.

    Its memory (keys, delivery ids, each fleet's last started tag) is loaded from
    `settings.state_directory` when it is made (ConfigError if the file is damaged) and
    saved after every change.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        runs: RunCreator,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = StateFile(settings.state_directory, settings.remembered_pushes)
        self.coalescer = Coalescer(
            settings.debounce_seconds,
            settings.debounce_max_seconds,
            remembered=settings.remembered_pushes,
            memory=self.state.load(),
        )
        self.started: deque[StartedRun] = deque(maxlen=256)
        self.failed: deque[FailedRun] = deque(maxlen=256)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def offer(self, run: PlannedRun) -> str:
        """Hand over an accepted push (on the event loop); returns what became of it.
        Call `save` once the request's pushes are all offered."""
        outcome = self.coalescer.offer(run, self.clock())
        self._wake.set()
        return outcome

    def known_delivery(self, delivery: str) -> bool:
        """Whether a request with this delivery id was already accepted (and not forgotten)."""
        return delivery in self.coalescer.memory.deliveries

    def remember_delivery(self, delivery: str) -> None:
        """Record an accepted request's delivery id (saved with the next `save`)."""
        self.coalescer.memory.deliveries[delivery] = None

    def save(self) -> None:
        """Write the memory to the state file. A disk that refuses is logged, not fatal:
        Prefect's idempotency keys still stop duplicates of what is in memory."""
        try:
            self.state.save(self.coalescer.memory)
        except OSError as error:
            logger.error("could not save the receiver's memory to %s: %s", self.state.path, error)

    def _forget(self, planned: PlannedRun) -> None:
        # So that a redelivery (GitHub's "Redeliver", a registry retry) is tried again.
        self.coalescer.forget(planned)
        if planned.delivery is not None:
            self.coalescer.memory.deliveries.pop(planned.delivery, None)
        self.save()

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing being created."""
        return self.coalescer.pending_count == 0 and not self._in_flight

    @property
    def creating(self) -> int:
        """Runs being created in Prefect right now."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Start due pushes until cancelled."""
        while True:
            busy = frozenset(self._in_flight)
            deadline = self.coalescer.next_deadline(busy)
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            for planned in self.coalescer.pop_due(self.clock(), frozenset(self._in_flight)):
                self._in_flight[planned.fleet] = asyncio.create_task(self._start(planned))

    async def drain(self, timeout: float) -> None:
        """On shutdown: start every pending push now (after its fleet's call in flight, if
        any) and wait for the calls, at most `timeout` seconds in all; then cancel the rest."""
        deadline = self.clock() + timeout
        pending = self.coalescer.pop_all()
        busy = [self._in_flight[run.fleet] for run in pending if run.fleet in self._in_flight]
        if busy:
            await asyncio.wait(busy, timeout=max(0.0, deadline - self.clock()))
        for planned in pending:
            if planned.fleet in self._in_flight:
                logger.error(
                    "shutting down: %s for fleet %s not started (a run is still being created)",
                    planned.push,
                    planned.fleet,
                )
                continue
            self._in_flight[planned.fleet] = asyncio.create_task(self._start(planned))
        tasks = list(self._in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - self.clock()))
            for task in late:
                task.cancel()

    async def _start(self, planned: PlannedRun) -> None:
        try:
            await self._create(planned)
        finally:
            self._in_flight.pop(planned.fleet, None)
            self._wake.set()

    async def _create(self, planned: PlannedRun) -> None:
        # Checked again here: a newer version may have started while this push waited.
        downgrade = self.coalescer.downgrade(planned)
        if downgrade is not None:
            logger.info("%s for fleet %s starts nothing: %s", planned.push, planned.fleet, downgrade)
            return
        try:
            # Decided when the run is created, not when the push came: the debounce may cross a window edge.
            when = scheduled_start(planned.route.maintenance_windows, self.wall_clock())
            ref = await self.runs.create_run(planned, when)
        except PrefectApiError as error:
            self._forget(planned)
            self.failed.append(FailedRun(planned.fleet, planned.push.tag, str(error)))
            logger.error("no run started for fleet %s, tag %s: %s", planned.fleet, planned.push.tag, error)
            return
        except asyncio.CancelledError:
            self._forget(planned)  # shutting down before Prefect answered: a redelivery may try again
            raise
        except Exception as error:
            # Whatever went wrong, the push must not stay "seen" with no run to show for it.
            self._forget(planned)
            self.failed.append(FailedRun(planned.fleet, planned.push.tag, f"{type(error).__name__}: {error}"))
            logger.exception("no run started for fleet %s, tag %s: unexpected error", planned.fleet, planned.push.tag)
            return
        self.coalescer.mark_started(planned, ref.created)
        self.save()
        seconds = self.clock() - planned.received_at
        self.started.append(StartedRun(planned.fleet, planned.push.tag, ref, seconds, when))
        logger.info(
            "%s flow run %s (%s) for fleet %s, tag %s, %.3f s after the push%s",
            "created" if ref.created else "found existing",
            ref.name,
            ref.id,
            planned.fleet,
            planned.push.tag,
            seconds,
            f", scheduled for the next maintenance window at {when.isoformat()}" if when else "",
        )
        await self._cancel_superseded(planned, ref)

    async def _cancel_superseded(self, planned: PlannedRun, ref: FlowRunRef) -> None:
        try:
            cancelled = await self.runs.cancel_superseded(planned, ref)
        except (PrefectApiError, httpx.HTTPError) as error:
            logger.warning(
                "could not cancel runs superseded by %s for fleet %s: %s", planned.push, planned.fleet, error
            )
        else:
            for run_id in cancelled:
                logger.info("cancelled flow run %s of fleet %s: superseded by %s", run_id, planned.fleet, planned.push)
