"""Maintenance windows: when a rollout may start its batches.

A window opens at each time its cron expression names, in its own IANA timezone, and
stays open for `duration_minutes` of *elapsed* time. Semantics for the flow:

- A run requested outside every window is scheduled for the next window start
  (`scheduled_start`), unless it is urgent; an empty list of windows means "any time".
  A run that begins a moment before a window opens (`early_start_seconds`) waits for it
  instead: Prefect lets a run scheduled for the window's start begin up to half a second
  early, and the worker's clock is not the API server's.
- Before each batch the flow asks `window_open(windows, now)`. After the window has
  closed no new batch starts: the batch in progress finishes (an instance is never
  left half-updated), the remaining instances wait for the next run. A flow that wants
  a margin asks `window_open(windows, now, needed_seconds=...)` with its estimate of
  one batch.
- Windows that overlap or touch form one open period: `window_containing` and
  `remaining_seconds` report the period's end, so a rollout does not stop at the
  seam between two back-to-back windows.

Daylight saving time follows cron (Debian's cron, as `cronsim` implements it): a start
time skipped when clocks go forward (02:30 in Europe/Berlin on the last Sunday of
March) happens at the moment the clocks jump (03:00); a start time repeated when
clocks go back happens once, at its first occurrence. The duration is elapsed time, so
a 2-hour window from 01:00 on the spring-forward night closes at 04:00 local time.

Every function takes an aware `now` (a naive one is refused) and returns aware UTC
datetimes; searches are bounded (`next_window_start`'s horizon, `MAX_OPEN_PERIOD`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compose_rollout.errors import ConfigError

# An always-open schedule (say `* * * * *` for 60 minutes) never closes: its open
# period is reported as ending this far after `now`, and no merge walks further.
MAX_OPEN_PERIOD = timedelta(days=8)
# Enough for a window that opens only on February 29th.
DEFAULT_HORIZON = timedelta(days=8 * 366)
_MAX_MERGE_STEPS = 100_000
_EPSILON = timedelta(microseconds=1)
# How early a run may begin before a window opens and still wait for it rather than
# re-schedule itself (to the same instant, again and again).
EARLY_START_TOLERANCE = timedelta(seconds=10)


class MaintenanceWindow(BaseModel):
    """A recurring window during which rollout batches may start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            description=(
                "When the window opens: a 5-field cron expression (minute hour day-of-month month day-of-week), "
                "e.g. '0 22 * * MON-FRI'."
            ),
        ),
    ]
    duration_minutes: Annotated[
        int, Field(ge=1, le=7 * 24 * 60, description="How long the window stays open (elapsed minutes).")
    ]
    timezone: Annotated[
        str, Field(min_length=1, max_length=64, description="IANA timezone of the cron expression, e.g. Europe/Berlin.")
    ] = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        # cronsim would also accept a 6th (seconds) field; Prefect's and everyone's cron has 5.
        if len(value.split()) != 5:
            raise ValueError(f"cron must have 5 fields (minute hour day-of-month month day-of-week), got {value!r}")
        try:
            CronSim(value, datetime(2000, 1, 1))
        except CronSimError as error:
            raise ValueError(f"invalid cron expression {value!r}: {error}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r} (e.g. UTC, Europe/Berlin, America/New_York)") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The timezone the cron expression is read in."""
        return ZoneInfo(self.timezone)

    @property
    def duration(self) -> timedelta:
        """How long one window lasts."""
        return timedelta(minutes=self.duration_minutes)

    def starts_after(self, moment: datetime) -> Iterator[datetime]:
        """The window's start times strictly after `moment`, oldest first, in UTC.

        Ends after cronsim's own bound (50 years without a match)."""
        for start in CronSim(self.cron, _aware(moment).astimezone(self.zone)):
            yield start.astimezone(UTC)


MaintenanceWindows = Annotated[
    list[MaintenanceWindow],
    Field(max_length=32, description="Windows in which rollout batches may start; empty means any time."),
]
"""The field type for a fleet's list of windows: `maintenance_windows: MaintenanceWindows = []`."""


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is required, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


def window_containing(windows: Sequence[MaintenanceWindow], now: datetime) -> tuple[datetime, datetime] | None:
    """The open period containing `now` as (start, end), end exclusive; None outside every window.

    `start` is the earliest start among the windows open at `now`; `end` is extended
    through every window that starts before it closes (overlapping or touching), up to
    `MAX_OPEN_PERIOD` after `now`.
    """
    now = _aware(now)
    limit = now + MAX_OPEN_PERIOD
    # Walk every window's starts after `now - duration` in time order: those up to
    # `now` are open at `now` (they close after it); each later one that begins before
    # the period closes extends it. Bounded by `limit` and a step count.
    upcoming = [w.starts_after(now - w.duration) for w in windows]
    heap = [(start, index) for index, starts in enumerate(upcoming) for start in _first(starts)]
    heapq.heapify(heap)
    period_start: datetime | None = None
    period_end: datetime | None = None
    steps = 0
    while heap and steps < _MAX_MERGE_STEPS:
        start, index = heapq.heappop(heap)
        if start > now and (period_end is None or start > period_end):
            break
        period_start = start if period_start is None else period_start
        period_end = max(period_end or start, start + windows[index].duration)
        if period_end >= limit:
            break
        for following in _first(upcoming[index]):
            heapq.heappush(heap, (following, index))
        steps += 1
    if period_start is None or period_end is None:
        return None
    return period_start, min(period_end, limit)


def window_open(windows: Sequence[MaintenanceWindow], now: datetime, needed_seconds: float = 0.0) -> bool:
    """Whether a batch may start at `now`: True with no windows at all, else only inside
    an open period with at least `needed_seconds` left."""
    if not windows:
        _aware(now)
        return True
    remaining = remaining_seconds(windows, now)
    return remaining is not None and remaining > 0 and remaining >= needed_seconds


def remaining_seconds(windows: Sequence[MaintenanceWindow], now: datetime) -> float | None:
    """Seconds until the open period containing `now` closes; None outside every window."""
    period = window_containing(windows, now)
    if period is None:
        return None
    return (period[1] - _aware(now)).total_seconds()


def next_window_start(
    windows: Sequence[MaintenanceWindow], now: datetime, horizon: timedelta = DEFAULT_HORIZON
) -> datetime:
    """The earliest window start at or after `now` (UTC), looking at most `horizon` ahead.

    Raises ConfigError when there are no windows or none starts within the horizon.
    Inside an open window this is still the *next* start, not the current one.
    """
    now = _aware(now)
    if not windows:
        raise ConfigError("no maintenance windows are configured, so none starts next")
    starts = [start for w in windows for start in _first(w.starts_after(now - _EPSILON))]
    starts = [start for start in starts if start <= now + horizon]
    if not starts:
        crons = ", ".join(f"{w.cron!r} ({w.timezone})" for w in windows)
        raise ConfigError(f"no maintenance window ({crons}) starts within {horizon.days} days of {now.isoformat()}")
    return min(starts)


def scheduled_start(windows: Sequence[MaintenanceWindow], now: datetime, *, urgent: bool = False) -> datetime | None:
    """When a run requested at `now` should start: None for "now", else the next window start.

    A run starts now when it is urgent, when no windows are configured, or when `now`
    is inside an open window; otherwise it waits for `next_window_start`.
    """
    if urgent or window_open(windows, now):
        return None
    return next_window_start(windows, now)


def early_start_seconds(windows: Sequence[MaintenanceWindow], now: datetime) -> float:
    """Seconds until the next window opens, if that is within EARLY_START_TOLERANCE and no
    window is open at `now`; else 0 (start now, or re-schedule with `scheduled_start`)."""
    now = _aware(now)
    if window_open(windows, now):
        return 0.0
    starts = [start for w in windows for start in _first(w.starts_after(now - _EPSILON))]
    soon = [start for start in starts if start - now <= EARLY_START_TOLERANCE]
    return (min(soon) - now).total_seconds() if soon else 0.0


def _first(iterator: Iterator[datetime]) -> list[datetime]:
    return [start for start in [next(iterator, None)] if start is not None]
