"""One run per fleet: the lock's decisions, with a fake host and clock (instant)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import replace

import pytest

from compose_rollout.context import Context
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
    assert lock.acquire(ctx, holder("run-1")).stale is None
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
    assert lock.acquire(ctx, holder("run-2")).stale is None
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
    previous = lock.acquire(ctx, holder("run-2"), take_over=lambda h: h.run_id == "killed-run").stale
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


def test_of_two_runs_that_find_the_holder_dead_only_one_takes_the_lock_over() -> None:
    ctx, _, _ = make()
    lock.acquire(ctx, holder("killed-run"))
    won: list[str] = []

    def dead_and_meanwhile_taken(current: Holder) -> bool:
        # Between this run's read of the dead holder and its take-over, another run takes over.
        if not won:
            won.append(lock.acquire(ctx, holder("run-b"), take_over=lambda h: h.run_id == "killed-run").holder.run_id)
        return current.run_id == "killed-run"

    with pytest.raises(FleetLocked, match="taking it over from run killed-run"):
        lock.acquire(ctx, holder("run-a"), take_over=dead_and_meanwhile_taken)
    assert won == ["run-b"] and lock.read_holder(ctx).run_id == "run-b"  # type: ignore[union-attr]


def test_a_taker_that_dies_too_leaves_the_original_run_named_for_the_next_recovery() -> None:
    ctx, host, _ = make()
    lock.acquire(ctx, holder("killed-run"))
    first = lock.acquire(ctx, holder("recover-1"), take_over=lambda h: True)
    assert first.holder.recovers == "killed-run" and first.holder.generation == 1
    # recover-1 fails or is killed: whoever takes over next must still recover killed-run.
    second = lock.acquire(ctx, holder("recover-2"), take_over=lambda h: h.run_id == "recover-1")
    assert second.stale is not None and second.stale.journal_run == "killed-run"
    assert second.holder.recovers == "killed-run" and second.holder.generation == 2
    lock.release(ctx, second.holder)
    assert lock.read_holder(ctx) is None and not host.directories


def test_once_the_taken_over_run_is_recovered_the_lock_names_only_its_holder() -> None:
    ctx, _, _ = make()
    lock.acquire(ctx, holder("killed-run"))
    lease = lock.recovered(ctx, lock.acquire(ctx, holder("run-2"), take_over=lambda h: True))
    assert lock.read_holder(ctx) == lease.holder and lease.holder.journal_run == "run-2"


def test_a_refusal_from_the_judge_is_raised_at_once_even_when_waiting() -> None:
    ctx, _, clock = make(on_locked="wait", lock_wait_seconds=60)
    lock.acquire(ctx, holder("run-1"))
    with pytest.raises(FleetLocked, match="needs a person"):
        lock.acquire(ctx, holder("run-2"), take_over=lambda h: "needs a person")
    assert clock.slept == 0


def test_liveness_is_judged_only_for_processes_this_machine_can_see() -> None:
    me = lock.me("run-1", "x")
    assert me.is_running_here() and not me.is_dead_local_process()
    # Same host name and pid number, another PID namespace (another container): unknown, not dead.
    gone = 2**22 + 12345
    other_namespace = replace(me, pid=gone, pid_namespace="pid:[1]")
    assert not other_namespace.is_dead_local_process() and not other_namespace.is_running_here()
    # Another boot of this machine: a pid from then means nothing now.
    assert not replace(me, pid=gone, boot_id="another-boot").is_dead_local_process()
    # Here, and no such process: dead.
    assert replace(me, pid=gone).is_dead_local_process()
    # Here, and the pid now belongs to another process (reused): dead.
    assert replace(me, process_start="1").is_dead_local_process()


def test_a_holder_record_of_an_exited_process_here_is_dead() -> None:
    child = subprocess.Popen(["true"])
    started = lock.process_start(child.pid)
    child.wait(timeout=10)
    record = replace(lock.me("run-1", "x"), pid=child.pid, process_start=started)
    assert record.is_dead_local_process()
