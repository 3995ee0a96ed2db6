"""One rollout per fleet at a time: a lock held on the fleet's first host.

The lock is a directory created over SFTP (`mkdir` is atomic on the host), so it works
whichever machine or Prefect worker runs the flow, and runs of different fleets never
block each other. A `holder.json` inside says who holds it. A holder that was killed
leaves the lock behind on purpose: the fleet may be half-changed, and only a recovery
(which reads that run's journal) may take the lock over.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from compose_rollout.config import Fleet
from compose_rollout.errors import RemoteError, RolloutError
from compose_rollout.procedure import Context

POLL_SECONDS = 1.0


class FleetLocked(RolloutError):
    """Another run holds the fleet's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a fleet's lock."""

    run_id: str
    target: str
    user: str
    hostname: str
    pid: int
    since: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"run {self.run_id} to {self.target} by {self.user}@{self.hostname} (pid {self.pid}) since {started}"

    def is_dead_local_process(self) -> bool:
        """The holder ran on this machine and its process is gone (killed, crashed)."""
        if self.hostname != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def me(run_id: str, target: str) -> Holder:
    """A holder record for this process."""
    return Holder(run_id, target, getpass.getuser(), socket.gethostname(), os.getpid(), time.time())


def lock_directory(fleet: Fleet) -> str:
    """Where the lock lives: beside the first instance's compose file."""
    return posixpath.join(fleet.instances[0].project_directory, f".compose-rollout-{fleet.name}.lock")


def _holder_file(fleet: Fleet) -> str:
    return posixpath.join(lock_directory(fleet), "holder.json")


def read_holder(ctx: Context) -> Holder | None:
    """The current holder, or None if the fleet is not locked (or the record is unreadable)."""
    host = ctx.hosts[ctx.fleet.instances[0].name]
    try:
        return Holder(**json.loads(host.read_file(_holder_file(ctx.fleet))))
    except (RemoteError, ValueError, TypeError):
        return None


def acquire(ctx: Context, holder: Holder, *, take_over: Callable[[Holder], bool] | None = None) -> Holder | None:
    """Take the fleet's lock for `holder`, following rollout.on_locked (fail or wait).

    A lock whose holder `take_over` accepts (a dead run, one that ended needing a person)
    is taken over and the old holder returned, so the caller recovers that run first.
    Raises FleetLocked.
    """
    fleet = ctx.fleet
    host = ctx.hosts[fleet.instances[0].name]
    directory = lock_directory(fleet)
    deadline = ctx.clock.monotonic() + fleet.rollout.lock_wait_seconds
    while True:
        if host.make_directory(directory):
            _write_holder(ctx, holder)
            return None
        current = read_holder(ctx)
        if current is not None and take_over is not None and take_over(current):
            _write_holder(ctx, holder)
            return current
        who = current.describe() if current else "an unknown run (no readable holder record)"
        if current is not None and current.is_dead_local_process():
            raise FleetLocked(
                f"fleet {fleet.name} is locked by {who}, which is no longer running: "
                f"the fleet may be half-changed. Run `rollout recover --fleet FLEET` first."
            )
        if fleet.rollout.on_locked == "fail" or ctx.clock.monotonic() >= deadline:
            waited = "" if fleet.rollout.on_locked == "fail" else f" (waited {fleet.rollout.lock_wait_seconds:g} s)"
            raise FleetLocked(
                f"fleet {fleet.name} is locked by {who}{waited}; refusing to interleave. "
                f"If that run is dead on another machine, recover there or remove {directory} on "
                f"{fleet.instances[0].host} after checking the fleet."
            )
        ctx.clock.sleep(POLL_SECONDS)


def _write_holder(ctx: Context, holder: Holder) -> None:
    host = ctx.hosts[ctx.fleet.instances[0].name]
    host.write_file_atomic(_holder_file(ctx.fleet), json.dumps(asdict(holder)).encode(), 0o600)


def release(ctx: Context, holder: Holder) -> None:
    """Release the lock if `holder` still holds it."""
    current = read_holder(ctx)
    if current is not None and current.run_id != holder.run_id:
        return
    host = ctx.hosts[ctx.fleet.instances[0].name]
    host.remove_file(_holder_file(ctx.fleet))
    host.remove_directory(lock_directory(ctx.fleet))
