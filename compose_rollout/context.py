"""What a run acts through: the fleet, one executor per host, the LB, the clock.

`Context.connect` builds the real one (SSH connections open lazily, once per host); unit
tests build one of fakes. The clock and the health probe are injectable, so waits run
instantly in tests. The context also carries the run's interruption and, after one, the
rollback's deadline: every wait of the procedure ends by it (`wait_until`, `pause`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import requests

from compose_rollout.config import Fleet, Instance
from compose_rollout.errors import Interrupted
from compose_rollout.hosts.commands import ComposeVersion
from compose_rollout.hosts.ssh import Executor, SshHost
from compose_rollout.lb import adapters
from compose_rollout.lb.base import LoadBalancer


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


HealthProbe = Callable[[str, float], tuple[bool, str]]


def http_health(url: str, timeout: float) -> tuple[bool, str]:
    """One probe of a health URL on a new connection: (2xx?, what was seen).

    Straight to the instance: no proxy from HTTP_PROXY and no credentials from ~/.netrc
    (the environment's settings are for other traffic; a proxy would answer for the
    instance, and the instance must not be sent someone's password).
    """
    with requests.Session() as session:
        session.trust_env = False
        try:
            response = session.get(
                url, timeout=(timeout, timeout), allow_redirects=False, headers={"Connection": "close"}
            )
        except requests.RequestException as error:
            return False, f"{type(error).__name__}: {error}"
    return 200 <= response.status_code < 300, f"HTTP {response.status_code}"


@dataclass
class Context:
    """Everything a run needs: the fleet, one executor per host, the LB, the clock."""

    fleet: Fleet
    hosts: dict[str, Executor]
    lb: LoadBalancer
    clock: Clock = field(default_factory=SystemClock)
    probe: HealthProbe = http_health
    compose_versions: dict[str, ComposeVersion] = field(default_factory=dict)
    lb_host: Executor | None = None
    # Set when the run is interrupted: every wait stops at its next poll.
    interrupt: threading.Event = field(default_factory=threading.Event)
    # Once interrupted, the rollback's waits all end by this monotonic time (a Prefect
    # cancel kills the process 30 s after its SIGTERM).
    deadline: float | None = None

    def for_rollback(self, seconds: float | None) -> Context:
        """This context for a rollback: not interrupted, its waits ending within
        `seconds` if given (after an interruption)."""
        deadline = None if seconds is None else self.clock.monotonic() + seconds
        return replace(self, interrupt=threading.Event(), deadline=deadline)

    def out_of_time(self) -> bool:
        """The rollback's deadline (after an interruption) has passed."""
        return self.deadline is not None and self.clock.monotonic() >= self.deadline

    def wait_until(self, seconds: float) -> tuple[float, float]:
        """(monotonic deadline, seconds) of a wait of `seconds`, cut to the rollback's deadline."""
        now = self.clock.monotonic()
        if self.deadline is None or now + seconds <= self.deadline:
            return now + seconds, seconds
        return self.deadline, max(0.0, self.deadline - now)

    def pause(self, seconds: float) -> None:
        """One pause of a wait loop; raises Interrupted at once when the run is interrupted."""
        if self.interrupt.is_set():
            raise Interrupted("the run was interrupted; stopped waiting")
        self.clock.sleep(seconds)
        if self.interrupt.is_set():
            raise Interrupted("the run was interrupted; stopped waiting")

    @classmethod
    def connect(cls, fleet: Fleet) -> Context:
        """Build the real context (connections open lazily, once per host)."""
        hosts: dict[str, Executor] = {
            instance.name: SshHost(
                name=instance.name,
                hostname=instance.host,
                port=fleet.ssh_port(instance),
                user=fleet.ssh_user(instance),
                key_file=fleet.ssh.key_file,
                known_hosts_file=fleet.ssh.known_hosts_file,
                connect_timeout=fleet.ssh.connect_timeout_seconds,
                key_passphrase=fleet.ssh.key_passphrase,
            )
            for instance in fleet.instances
        }

        def ssh_to(hostname: str, port: int | None, user: str | None) -> SshHost:
            return SshHost(
                name=f"lb {hostname}",
                hostname=hostname,
                port=port or fleet.ssh.port,
                user=user or fleet.ssh.user,
                key_file=fleet.ssh.key_file,
                known_hosts_file=fleet.ssh.known_hosts_file,
                connect_timeout=fleet.ssh.connect_timeout_seconds,
                key_passphrase=fleet.ssh.key_passphrase,
            )

        lb, lb_host = adapters.connect(fleet.load_balancer, ssh_to, fleet.instances)
        return cls(fleet=fleet, hosts=hosts, lb=lb, lb_host=lb_host)

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()
        if self.lb_host is not None:
            self.lb_host.close()

    def run(self, instance: Instance, argv: list[str], timeout: float | None = None) -> str:
        """Run argv on the instance's host; its stdout."""
        limit = timeout or self.fleet.ssh.command_timeout_seconds
        return self.hosts[instance.name].run(argv, timeout=limit).stdout
