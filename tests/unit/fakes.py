"""Fakes written for the unit tests (no MagicMock): a clock, a host, a load balancer.

The real parts are exercised by tests/fleet; these let the domain's waits and
decisions be tested instantly and exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from compose_rollout.config import Fleet
from compose_rollout.errors import CommandFailed, LoadBalancerError
from compose_rollout.hosts.ssh import Result
from compose_rollout.lb.haproxy import OP_RUNNING, OP_STOPPED, ServerState


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


Handler = Callable[[list[str]], "str | Result"]


class FakeHost:
    """A host with files and scripted commands; any command nobody expected fails the test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, int] = {}
        self.handlers: list[tuple[list[str], Handler]] = []
        self.commands: list[list[str]] = []
        self.fail_writes = False
        self.directories: set[str] = set()

    def on(self, prefix: list[str], handler: Handler) -> None:
        self.handlers.append((prefix, handler))

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result:
        assert timeout > 0
        self.commands.append(argv)
        for prefix, handler in reversed(self.handlers):
            if argv[: len(prefix)] == prefix:
                answer = handler(argv)
                result = answer if isinstance(answer, Result) else Result(self.name, " ".join(argv), 0, answer, "")
                if check and not result.ok:
                    raise CommandFailed(self.name, result.command, result.exit_code, result.stdout, result.stderr)
                return result
        raise AssertionError(f"unexpected command on {self.name}: {argv}")

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            from compose_rollout.errors import RemoteError

            raise RemoteError(f"{self.name}: {path} does not exist")
        return self.files[path]

    def file_mode(self, path: str) -> int:
        return self.modes.get(path, 0o644)

    def write_file_atomic(self, path: str, data: bytes, mode: int, *, durable: bool = True) -> None:
        if self.fail_writes:
            from compose_rollout.errors import RemoteError

            raise RemoteError(f"{self.name}: could not write {path} (original left intact): No space left")
        self.files[path] = data
        self.modes[path] = mode

    def remove_file(self, path: str) -> None:
        self.files.pop(path, None)

    def make_directory(self, path: str) -> bool:
        if path in self.directories:
            return False
        self.directories.add(path)
        return True

    def remove_directory(self, path: str) -> None:
        self.directories.discard(path)

    def list_directory(self, path: str) -> list[str]:
        return sorted(p.rsplit("/", 1)[1] for p in self.files if p.rsplit("/", 1)[0] == path.rstrip("/"))

    def close(self) -> None:
        pass


@dataclass
class FakeServer:
    op_state: int = OP_RUNNING
    admin: str = "ready"
    checks_until_up: int = 0  # after a recheck: readings until the health check passes again
    sessions: list[int] = field(default_factory=list)  # successive `scur` readings; last one sticks


class FakeLB:
    """A stateful load balancer with HaproxyClient's interface."""

    backend = "app"
    rise = 2

    def __init__(self, names: list[str]) -> None:
        self.servers_: dict[str, FakeServer] = {name: FakeServer() for name in names}
        self.actions: list[str] = []

    def _sessions(self, server: FakeServer) -> int:
        if len(server.sessions) > 1:
            return server.sessions.pop(0)
        return server.sessions[0] if server.sessions else 0

    def servers(self) -> dict[str, ServerState]:
        return {name: self.server(name) for name in self.servers_}

    def server(self, name: str) -> ServerState:
        if name not in self.servers_:
            raise LoadBalancerError(f"no server {name}")
        server = self.servers_[name]
        if server.checks_until_up:  # each reading stands for one more passing check
            server.checks_until_up -= 1
            if not server.checks_until_up:
                server.op_state = OP_RUNNING
        admin = {"ready": 0, "drain": 0x08, "maint": 0x01}[server.admin]
        return ServerState(name, server.op_state, admin, self._sessions(server), "L7OK")

    def set_state(self, server: str, state: str) -> None:
        self.actions.append(f"{server} {state}")
        self.servers_[server].admin = state

    def shutdown_sessions(self, server: str) -> None:
        self.actions.append(f"{server} shutdown")
        self.servers_[server].sessions = [0]

    def recheck(self, server: str) -> bool:
        self.actions.append(f"{server} recheck")
        self.servers_[server].op_state = OP_STOPPED
        self.servers_[server].checks_until_up = self.rise
        return True


def fleet(**overrides: Any) -> Fleet:
    """A valid three-instance fleet, with top-level overrides."""
    data: dict[str, Any] = {
        "name": "demo",
        "image_repository": "registry.example/demo/app",
        "load_balancer": {"admin_address": "tcp://127.0.0.1:9", "backend": "app"},
        "instances": [
            {
                "name": f"app-{n}",
                "host": f"10.0.0.{n}",
                "project_directory": f"/srv/app-{n}",
                "lb_server": f"app-{n}",
                "health_url": f"http://10.0.0.{n}:8080/health",
            }
            for n in (1, 2, 3)
        ],
    }
    data.update(overrides)
    return Fleet(**data)


def container_json(container_id: str, image_id: str, status: str = "running", restarts: int = 0) -> str:
    return json.dumps(
        [
            {
                "Id": container_id,
                "Image": image_id,
                "Config": {"Image": "registry.example/demo/app:v1"},
                "State": {"Status": status},
                "RestartCount": restarts,
            }
        ]
    )


def scripted(values: list[Any]) -> Iterator[Any]:
    """Yield the values in order, then repeat the last one forever."""
    yield from values
    while True:
        yield values[-1]
