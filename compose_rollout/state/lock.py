"""One rollout per fleet at a time: a lock held on the fleet's first host.

The lock is a directory created over SFTP (`mkdir` is atomic on the host), so it works
whichever machine or Prefect worker runs the flow, and runs of different fleets never
block each other. A `holder.json` inside says who holds it. A holder that was killed
leaves the lock behind on purpose: the fleet may be half-changed, and only a recovery
(which reads that run's journal) may take the lock over.

Taking over is atomic too: the run that takes over a lock of generation N creates
`takeover-(N+1)` inside it, and of two runs that both found the holder dead only the
one whose `mkdir` succeeded goes on. A taker carries the run whose journal it must
recover (`recovers`), so a recovery that fails or is killed leaves that journal named
for the next one.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from compose_rollout.config import Fleet
from compose_rollout.context import Context
from compose_rollout.errors import RemoteError, RolloutError

POLL_SECONDS = 1.0


class FleetLocked(RolloutError):
    """Another run holds the fleet's lock."""


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if there is no such process):
    with the pid, it names one process even after the pid is reused."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else ""


@dataclass(frozen=True)
class Holder:
    """Who holds a fleet's lock.

    A process is named by its host name, the machine's boot, its PID namespace, its pid
    and its start time: a pid alone means nothing in another container or after a reboot.
    """

    run_id: str
    target: str
    user: str
    hostname: str
    pid: int
    since: float
    boot_id: str = ""
    pid_namespace: str = ""
    process_start: str = ""
    generation: int = 0  # how many times the lock was taken over since it was created
    recovers: str = ""  # the interrupted run whose journal this holder took over, until recovered

    @property
    def journal_run(self) -> str:
        """The run whose journal says what the fleet needs: the one taken over, if any."""
        return self.recovers or self.run_id

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        recovering = f", recovering run {self.recovers}" if self.recovers else ""
        return (
            f"run {self.run_id} to {self.target} by {self.user}@{self.hostname} (pid {self.pid}) "
            f"since {started}{recovering}"
        )

    def _visible_here(self) -> bool:
        # This machine, this boot, this PID namespace (records from older versions carry
        # only the host name).
        return (
            self.hostname == socket.gethostname()
            and (not self.boot_id or self.boot_id == _boot_id())
            and (not self.pid_namespace or self.pid_namespace == _pid_namespace())
        )

    def is_dead_local_process(self) -> bool:
        """The holder ran on this machine, in this boot and PID namespace, and its process
        is gone (killed, crashed) or its pid now belongs to another process. Anything this
        machine cannot see (another host, container or boot) is not known dead."""
        if not self._visible_here():
            return False
        started = process_start(self.pid)
        return not started or (bool(self.process_start) and started != self.process_start)

    def is_running_here(self) -> bool:
        """The holder's process is known to be alive (on this machine, same process)."""
        return self._visible_here() and not self.is_dead_local_process()


@dataclass(frozen=True)
class Lease:
    """The lock as `acquire` left it: the holder record written, and the holder it took
    over (whose run, `stale.journal_run`, must be recovered first) if any."""

    holder: Holder
    stale: Holder | None = None


def me(run_id: str, target: str) -> Holder:
    """A holder record for this process."""
    pid = os.getpid()
    return Holder(
        run_id,
        target,
        getpass.getuser(),
        socket.gethostname(),
        pid,
        time.time(),
        boot_id=_boot_id(),
        pid_namespace=_pid_namespace(),
        process_start=process_start(pid),
    )


def lock_directory(fleet: Fleet) -> str:
    """Where the lock lives: beside the first instance's compose file."""
    return posixpath.join(fleet.instances[0].project_directory, f".compose-rollout-{fleet.name}.lock")


def _holder_file(fleet: Fleet) -> str:
    return posixpath.join(lock_directory(fleet), "holder.json")


def _takeover_directory(fleet: Fleet, generation: int) -> str:
    return posixpath.join(lock_directory(fleet), f"takeover-{generation}")


def read_holder(ctx: Context) -> Holder | None:
    """The current holder, or None if the fleet is not locked (or the record is unreadable)."""
    host = ctx.hosts[ctx.fleet.instances[0].name]
    try:
        return Holder(**json.loads(host.read_file(_holder_file(ctx.fleet))))
    except (RemoteError, ValueError, TypeError):
        return None


TakeOver = Callable[[Holder], "bool | str"]


def acquire(ctx: Context, holder: Holder, *, take_over: TakeOver | None = None) -> Lease:
    """Take the fleet's lock for `holder`, following rollout.on_locked (fail or wait).

    `take_over(current)` judges a lock someone else holds: True takes it over (a dead
    run), a string refuses at once with that reason (a run that needs a person), False
    treats it as held. Raises FleetLocked.
    """
    fleet = ctx.fleet
    host = ctx.hosts[fleet.instances[0].name]
    directory = lock_directory(fleet)
    deadline = ctx.clock.monotonic() + fleet.rollout.lock_wait_seconds
    while True:
        if host.make_directory(directory):
            _write_holder(ctx, holder)
            return Lease(holder)
        current = read_holder(ctx)
        verdict = take_over(current) if current is not None and take_over is not None else False
        if isinstance(verdict, str):
            raise FleetLocked(verdict)
        if current is not None and verdict:
            generation = current.generation + 1
            if host.make_directory(_takeover_directory(fleet, generation)):
                taker = replace(holder, generation=generation, recovers=current.journal_run)
                _write_holder(ctx, taker)
                return Lease(taker, current)
            who = f"a run taking it over from {current.describe()}"  # another taker won the race
        else:
            who = current.describe() if current else "an unknown run (no readable holder record)"
        if current is not None and not verdict and current.is_dead_local_process():
            raise FleetLocked(
                f"fleet {fleet.name} is locked by {who}, which is no longer running: "
                f"the fleet may be half-changed. Run `rollout recover --fleet FLEET` first."
            )
        if fleet.rollout.on_locked == "fail" or ctx.clock.monotonic() >= deadline:
            waited = "" if fleet.rollout.on_locked == "fail" else f" (waited {fleet.rollout.lock_wait_seconds:g} s)"
            raise FleetLocked(
                f"fleet {fleet.name} is locked by {who}{waited}; refusing to interleave. "
                f"If that run is dead on another machine, recover there, or run `rollout recover --i-checked` "
                f"once you have checked that it is not running."
            )
        ctx.clock.sleep(POLL_SECONDS)


def _write_holder(ctx: Context, holder: Holder) -> None:
    host = ctx.hosts[ctx.fleet.instances[0].name]
    host.write_file_atomic(_holder_file(ctx.fleet), json.dumps(asdict(holder)).encode(), 0o600)


def recovered(ctx: Context, lease: Lease) -> Lease:
    """The taken-over run is recovered: the lock now names only its holder's own run."""
    if not lease.holder.recovers:
        return lease
    holder = replace(lease.holder, recovers="")
    _write_holder(ctx, holder)
    return Lease(holder)


def release(ctx: Context, holder: Holder) -> None:
    """Release the lock if `holder` still holds it."""
    current = read_holder(ctx)
    if current is not None and current.run_id != holder.run_id:
        return
    host = ctx.hosts[ctx.fleet.instances[0].name]
    host.remove_file(_holder_file(ctx.fleet))
    for generation in range(max(holder.generation, current.generation if current else 0), 0, -1):
        host.remove_directory(_takeover_directory(ctx.fleet, generation))
    host.remove_directory(lock_directory(ctx.fleet))
