"""One run per fleet: the lock's decisions, with a fake host and clock (instant)."""

from __future__ import annotations

import json
import time

import pytest

from compose_rollout.procedure import Context
from compose_rollout.state import lock
from compose_rollout.state.lock import FleetLocked, Holder
from tests.unit.fakes import FakeClock, FakeHost, FakeLB, fleet


def make(**rollout: object) -> tuple[Context, FakeHost, FakeClock]:
    the_fleet = fleet(rollout=rollout) if rollout else fleet()
    hosts = {i.name: FakeHost(i.name) for i in the_fleet.instances}
    clock = FakeClock()
    ctx = Context(fleet=the_fleet, hosts=hosts, lb=FakeLB([]), clock=clock)  # type: ignore[arg-type]
    return ctx, hosts["app-1"], clock


def holder(run_id: str, pid: int = 1) -> Holder:
    return Holder(run_id, "registry.example/demo/app:v2", "deploy", "orchestrator-1", pid, time.time())


def test_the_lock_lives_on_the_first_host_and_names_its_holder() -> None:
    ctx, host, _ = make()
    assert lock.acquire(ctx, holder("run-1")) is None
    assert lock.lock_directory(ctx.fleet) == "/srv/app-1/.compose-rollout-demo.lock"
    assert lock.lock_directory(ctx.fleet) in host.directories
    written = json.loads(host.files["/srv/app-1/.compose-rollout-demo.lock/holder.json"])
    assert written["run_id"] == "run-1" and written["user"] == "deploy"


def test_a_second_run_is_refused_naming_the_first() -> None:
    ctx, _, clock = make()
    lock.acquire(ctx, holder("run-1"))
    with pytest.raises(FleetLocked, match=r"locked by run run-1 .* by deploy@orchestrator-1"):
        lock.acquire(ctx, holder("run-2"))
    assert clock.slept == 0  # on_locked: fail does not wait


def test_with_wait_a_second_run_gets_the_lock_when_the_first_releases_it() -> None:
    ctx, _, clock = make(on_locked="wait", lock_wait_seconds=60)
    first = holder("run-1")
    lock.acquire(ctx, first)
    sleeps = 0
    original_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 5:
            lock.release(ctx, first)  # the first run ends while the second waits
        original_sleep(seconds)

    clock.sleep = sleep  # type: ignore[method-assign]
    assert lock.acquire(ctx, holder("run-2")) is None
    assert lock.read_holder(ctx) is not None and lock.read_holder(ctx).run_id == "run-2"  # type: ignore[union-attr]
    assert clock.slept == pytest.approx(5 * lock.POLL_SECONDS)


def test_waiting_is_bounded() -> None:
    ctx, _, clock = make(on_locked="wait", lock_wait_seconds=30)
    lock.acquire(ctx, holder("run-1"))
    with pytest.raises(FleetLocked, match="waited 30 s"):
        lock.acquire(ctx, holder("run-2"))
    assert clock.slept == pytest.approx(30, abs=lock.POLL_SECONDS)


def test_an_abandoned_lock_is_taken_over_and_its_holder_returned_for_recovery() -> None:
    ctx, _, _ = make()
    lock.acquire(ctx, holder("killed-run"))
    previous = lock.acquire(ctx, holder("run-2"), take_over=lambda h: h.run_id == "killed-run")
    assert previous is not None and previous.run_id == "killed-run"
    assert lock.read_holder(ctx).run_id == "run-2"  # type: ignore[union-attr]


def test_a_lock_of_a_dead_local_process_refuses_with_the_recover_command() -> None:
    ctx, _, _ = make()
    dead = Holder("killed-run", "x", "root", __import__("socket").gethostname(), 2**22 + 12345, time.time())
    assert dead.is_dead_local_process()
    lock.acquire(ctx, dead)
    with pytest.raises(FleetLocked, match=r"no longer running.*rollout recover"):
        lock.acquire(ctx, holder("run-2"))


def test_only_the_holder_releases_the_lock() -> None:
    ctx, host, _ = make()
    lock.acquire(ctx, holder("run-1"))
    lock.release(ctx, holder("run-2"))
    assert lock.read_holder(ctx).run_id == "run-1"  # type: ignore[union-attr]
    lock.release(ctx, holder("run-1"))
    assert lock.read_holder(ctx) is None and not host.directories
