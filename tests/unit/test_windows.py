"""Maintenance windows: when batches may start, including across DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from compose_rollout.errors import ConfigError
from compose_rollout.triggers.windows import (
    MAX_OPEN_PERIOD,
    MaintenanceWindow,
    MaintenanceWindows,
    early_start_seconds,
    next_window_start,
    remaining_seconds,
    scheduled_start,
    window_containing,
    window_open,
)

BERLIN = ZoneInfo("Europe/Berlin")
# Weeknights 22:00-00:00 Berlin time, the shape most teams use.
WEEKNIGHTS = MaintenanceWindow(cron="0 22 * * MON-FRI", duration_minutes=120, timezone="Europe/Berlin")


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN, fold=fold)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_inside_a_window_it_is_open_with_the_time_left() -> None:
    friday_2230 = berlin(2025, 1, 10, 22, 30)
    assert window_open([WEEKNIGHTS], friday_2230)
    assert remaining_seconds([WEEKNIGHTS], friday_2230) == 90 * 60
    assert window_containing([WEEKNIGHTS], friday_2230) == (utc(2025, 1, 10, 21, 0), utc(2025, 1, 10, 23, 0))


def test_outside_every_window_a_run_waits_for_the_next_start() -> None:
    saturday_2230 = berlin(2025, 1, 11, 22, 30)
    assert not window_open([WEEKNIGHTS], saturday_2230)
    assert remaining_seconds([WEEKNIGHTS], saturday_2230) is None
    monday_2200 = berlin(2025, 1, 13, 22, 0)
    assert next_window_start([WEEKNIGHTS], saturday_2230) == monday_2200
    assert scheduled_start([WEEKNIGHTS], saturday_2230) == monday_2200


def test_an_urgent_run_or_a_run_inside_a_window_starts_now() -> None:
    assert scheduled_start([WEEKNIGHTS], berlin(2025, 1, 11, 12, 0), urgent=True) is None
    assert scheduled_start([WEEKNIGHTS], berlin(2025, 1, 10, 23, 59)) is None


def test_no_windows_means_any_time() -> None:
    now = utc(2025, 1, 11, 12, 0)
    assert window_open([], now)
    assert scheduled_start([], now) is None
    assert window_containing([], now) is None
    with pytest.raises(ConfigError, match="no maintenance windows"):
        next_window_start([], now)


def test_the_window_end_is_exclusive_and_its_start_inclusive() -> None:
    assert window_open([WEEKNIGHTS], berlin(2025, 1, 10, 22, 0))
    assert not window_open([WEEKNIGHTS], berlin(2025, 1, 11, 0, 0))
    assert next_window_start([WEEKNIGHTS], berlin(2025, 1, 10, 22, 0)) == berlin(2025, 1, 10, 22, 0)
    # Inside a window, "next start" is the following one.
    assert next_window_start([WEEKNIGHTS], berlin(2025, 1, 10, 22, 0, 1)) == berlin(2025, 1, 13, 22, 0)


def test_no_new_batch_starts_after_the_window_closes() -> None:
    # A rollout whose batches take 25 minutes, asked for at 23:05 on a Friday: the flow
    # asks window_open before each batch, so the batch of 23:55 runs past midnight but
    # no batch starts at 00:20.
    now = berlin(2025, 1, 10, 23, 5)
    started: list[str] = []
    while window_open([WEEKNIGHTS], now) and len(started) < 10:
        started.append(now.astimezone(BERLIN).strftime("%H:%M"))
        now += timedelta(minutes=25)
    assert started == ["23:05", "23:30", "23:55"]


def test_a_margin_keeps_a_batch_from_starting_too_close_to_the_end() -> None:
    assert window_open([WEEKNIGHTS], berlin(2025, 1, 10, 23, 30), needed_seconds=25 * 60)
    assert not window_open([WEEKNIGHTS], berlin(2025, 1, 10, 23, 40), needed_seconds=25 * 60)


def test_dst_spring_forward_the_duration_is_elapsed_time() -> None:
    # 2025-03-30 in Berlin: 02:00 CET jumps to 03:00 CEST. A 2-hour window from 01:00
    # lasts two real hours and closes at 04:00 CEST, not at a wall-clock 03:00.
    night = MaintenanceWindow(cron="0 1 * * *", duration_minutes=120, timezone="Europe/Berlin")
    assert window_containing([night], berlin(2025, 3, 30, 3, 30)) == (utc(2025, 3, 30, 0, 0), utc(2025, 3, 30, 2, 0))
    assert remaining_seconds([night], berlin(2025, 3, 30, 3, 30)) == 30 * 60
    assert not window_open([night], berlin(2025, 3, 30, 4, 0))


def test_dst_spring_forward_a_skipped_start_happens_when_the_clocks_jump() -> None:
    # 02:30 does not exist on 2025-03-30 in Berlin: like cron, the window opens at 03:00 CEST.
    skipped = MaintenanceWindow(cron="30 2 * * *", duration_minutes=60, timezone="Europe/Berlin")
    assert next_window_start([skipped], berlin(2025, 3, 30, 0, 0)) == berlin(2025, 3, 30, 3, 0)
    assert remaining_seconds([skipped], berlin(2025, 3, 30, 3, 15)) == 45 * 60
    # The day after, back to 02:30 (now CEST).
    assert next_window_start([skipped], berlin(2025, 3, 30, 5, 0)) == berlin(2025, 3, 31, 2, 30)


def test_dst_fall_back_a_repeated_start_happens_once() -> None:
    # 2025-10-26 in Berlin: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice.
    repeated = MaintenanceWindow(cron="30 2 * * *", duration_minutes=60, timezone="Europe/Berlin")
    # (Compared in UTC: Python never finds a time in the repeated hour equal across zones.)
    first_0230 = utc(2025, 10, 26, 0, 30)  # 02:30 CEST
    assert next_window_start([repeated], berlin(2025, 10, 26, 0, 0)) == first_0230
    assert window_containing([repeated], berlin(2025, 10, 26, 2, 45, fold=0)) == (
        utc(2025, 10, 26, 0, 30),
        utc(2025, 10, 26, 1, 30),
    )
    # The second 02:45 (CET) is after the window's elapsed hour, and no second window opens.
    second_0245 = berlin(2025, 10, 26, 2, 45, fold=1)
    assert not window_open([repeated], second_0245)
    assert next_window_start([repeated], second_0245) == berlin(2025, 10, 27, 2, 30)


def test_back_to_back_and_overlapping_windows_form_one_open_period() -> None:
    evening = MaintenanceWindow(cron="0 22 * * *", duration_minutes=60, timezone="UTC")
    # 23:00 UTC is midnight in Berlin in winter: this window starts as the first one ends.
    night = MaintenanceWindow(cron="0 0 * * *", duration_minutes=90, timezone="Europe/Berlin")
    assert window_containing([evening, night], utc(2025, 1, 10, 22, 30)) == (
        utc(2025, 1, 10, 22, 0),
        utc(2025, 1, 11, 0, 30),
    )
    # An hourly 90-minute window is open all the time: the period is capped, not endless.
    hourly = MaintenanceWindow(cron="0 * * * *", duration_minutes=90)
    now = utc(2025, 1, 1, 11, 10)
    assert window_containing([hourly], now) == (utc(2025, 1, 1, 10, 0), now + MAX_OPEN_PERIOD)


def test_a_rare_window_is_found_within_the_horizon_or_refused_clearly() -> None:
    leap_day = MaintenanceWindow(cron="0 3 29 2 *", duration_minutes=60)
    assert next_window_start([leap_day], utc(2025, 3, 1)) == utc(2028, 2, 29, 3, 0)
    with pytest.raises(ConfigError, match=r"no maintenance window \('0 3 29 2 \*' \(UTC\)\) starts within 30 days"):
        next_window_start([leap_day], utc(2025, 3, 1), horizon=timedelta(days=30))


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window_open([WEEKNIGHTS], datetime(2025, 1, 10, 22, 30))
    with pytest.raises(ValueError, match="timezone-aware"):
        window_open([], datetime(2025, 1, 10, 22, 30))


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 22 * * * *", "5 fields"),
        ("@daily", "5 fields"),
        ("61 22 * * *", "Bad minute"),
        ("0 22 31 2 *", "Bad day-of-month"),
        ("0 22 * * FUNDAY", "invalid cron"),
    ],
)
def test_a_bad_cron_is_refused_at_load_time(cron: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MaintenanceWindow(cron=cron, duration_minutes=60)


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "Europe/berlin ", "../../etc/passwd", "CEST"])
def test_an_unknown_timezone_is_refused_at_load_time(zone: str) -> None:
    with pytest.raises(ValidationError, match="unknown IANA timezone"):
        MaintenanceWindow(cron="0 22 * * *", duration_minutes=60, timezone=zone)


def test_limits_and_unknown_keys_are_refused_with_their_path() -> None:
    class Section(BaseModel):
        maintenance_windows: MaintenanceWindows = []

    assert Section().maintenance_windows == []
    with pytest.raises(ValidationError) as error:
        Section.model_validate(
            {"maintenance_windows": [{"cron": "0 22 * * *", "duration_minutes": 60, "timezone": "UTC", "days": 1}]}
        )
    assert error.value.errors()[0]["loc"] == ("maintenance_windows", 0, "days")
    with pytest.raises(ValidationError, match="less than or equal to 10080"):
        MaintenanceWindow(cron="0 22 * * *", duration_minutes=10081)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        MaintenanceWindow(cron="0 22 * * *", duration_minutes=0)


@given(st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)))
def test_the_functions_agree_with_each_other(now: datetime) -> None:
    windows = [WEEKNIGHTS, MaintenanceWindow(cron="30 2 * * SUN", duration_minutes=45, timezone="Europe/Berlin")]
    period = window_containing(windows, now)
    remaining = remaining_seconds(windows, now)
    assert window_open(windows, now) == (period is not None)
    if period is None:
        assert remaining is None
        start = next_window_start(windows, now)
        assert now < start <= now + timedelta(days=4)
        assert window_open(windows, start)
    else:
        assert period[0] <= now < period[1]
        assert remaining == (period[1] - now).total_seconds()
        assert not window_open(windows, period[1])


def test_a_run_let_in_just_before_a_window_opens_waits_for_it() -> None:
    # Prefect may start a run scheduled for 22:00 at 21:59:59.6; re-scheduling it would
    # only create another run for 22:00. Further ahead, the run is re-scheduled instead.
    assert early_start_seconds([WEEKNIGHTS], berlin(2025, 1, 10, 21, 59, 59)) == 1.0
    assert early_start_seconds([WEEKNIGHTS], berlin(2025, 1, 10, 21, 59, 50)) == 10.0
    assert early_start_seconds([WEEKNIGHTS], berlin(2025, 1, 10, 21, 59, 49)) == 0.0
    assert early_start_seconds([WEEKNIGHTS], berlin(2025, 1, 10, 22, 0, 0)) == 0.0  # open: start now
    assert early_start_seconds([], berlin(2025, 1, 10, 21, 59, 59)) == 0.0
