"""Any other load balancer, through commands its owner writes (`load_balancer.kind: command`).

Each command is shell text from the fleet file, run by `sh` on the orchestrator (through
prefect-shell's `ShellOperation`) or, with `ssh_host`, on that host over SSH (argv
`timeout ... env ROLLOUT_...=... sh -c COMMAND`, quoted once by the SSH layer). What the
command acts on reaches it only as environment variables, never inside its text:

    ROLLOUT_ACTION      drain, ready, in_flight, state, shutdown_sessions or recheck
    ROLLOUT_SERVER      the instance's `lb_server`: the LB's name for the server
    ROLLOUT_INSTANCE    the instance's `name`
    ROLLOUT_HOST        the instance's `host`
    ROLLOUT_PORT        the port of the instance's `health_url` (its scheme's when it names none)
    ROLLOUT_HEALTH_URL  the instance's `health_url`

The output contract, checked on every call (anything else is a LoadBalancerError naming
the command, the server and what it printed):

    drain, ready, shutdown_sessions, recheck   exit 0 once the LB has applied it; output ignored
    in_flight   one line: a non-negative integer (requests in flight; never fewer)
    state       one line: `ready` or `drained`, a space, `up`, `down` or `unknown`
                (`drained` = takes no new requests, whatever the reason; the second
                word is the LB's health check, `unknown` when it has none);
                or `absent` when the LB has no such server

Blank lines and surrounding spaces are ignored. Every command is bounded by
`timeout_seconds` (stopped after it, with its process group); a non-zero exit is an error
naming the command, the server, the exit code and the last lines of its output. The
commands' text is never printed (it may hold what its owner should have put elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.hosts.shell import Shell
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.settings import CommandSettings

Action = Literal["drain", "ready", "in_flight", "state", "shutdown_sessions", "recheck"]


_STATE_RE = re.compile(r"(ready|drained)[ \t]+(up|down|unknown)|absent")
_COUNT_RE = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class Target:
    """One server, as its instance in the fleet file describes it to the commands."""

    server: str
    instance: str
    host: str
    port: int
    health_url: str


def url_port(url: str) -> int:
    """The port `url` reaches: the one it names, else its scheme's (80, 443)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise LoadBalancerError(f"{url!r} names no valid port") from None
    return port or (443 if parts.scheme == "https" else 80)


def command_env(target: Target, action: Action) -> dict[str, str]:
    """The environment a command gets for `target`: the values only, never shell text."""
    env = {
        "ROLLOUT_ACTION": action,
        "ROLLOUT_SERVER": target.server,
        "ROLLOUT_INSTANCE": target.instance,
        "ROLLOUT_HOST": target.host,
        "ROLLOUT_PORT": str(target.port),
        "ROLLOUT_HEALTH_URL": target.health_url,
    }
    for name, value in env.items():
        if "\0" in value:
            raise LoadBalancerError(f"{name} for server {target.server!r} holds a NUL byte, which no environment can")
    return env


def _lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def _shown(stdout: str) -> str:
    text = stdout.strip()
    return repr(text[:200] + ("..." if len(text) > 200 else "")) if text else "nothing"


def parse_in_flight(stdout: str, what: str) -> int:
    """The count `in_flight` printed; LoadBalancerError unless it is one non-negative integer."""
    lines = _lines(stdout)
    if len(lines) != 1 or not _COUNT_RE.fullmatch(lines[0]):
        raise LoadBalancerError(
            f"{what} broke its output contract: it must print one line with a non-negative integer "
            f"(requests in flight), it printed {_shown(stdout)}"
        )
    return int(lines[0])


def parse_state(stdout: str, what: str) -> tuple[bool, bool | None] | None:
    """(drained, up) from what `state` printed, None for `absent`; LoadBalancerError for
    anything else."""
    lines = _lines(stdout)
    match = _STATE_RE.fullmatch(lines[0]) if len(lines) == 1 else None
    if match is None:
        raise LoadBalancerError(
            f"{what} broke its output contract: it must print one line, `ready` or `drained` then `up`, "
            f"`down` or `unknown` (e.g. `drained up`), or `absent`; it printed {_shown(stdout)}"
        )
    if match.group(0) == "absent":
        return None
    return match.group(1) == "drained", {"up": True, "down": False, "unknown": None}[match.group(2)]


@dataclass(frozen=True)
class CommandServer:
    """One server as the `state` and `in_flight` commands report it."""

    name: str
    drained: bool
    up: bool | None
    sessions: int

    @property
    def in_rotation(self) -> bool:
        return not self.drained and self.up is not False

    def describe(self) -> str:
        health = {True: "up", False: "down", None: "health unknown"}[self.up]
        return f"{'drained' if self.drained else 'ready'}, {health}, {self.sessions} in flight"


class CommandLoadBalancer:
    """The fleet's servers, through the commands of `settings`, run by `shell`."""

    def __init__(self, settings: CommandSettings, targets: Iterable[Target], shell: Shell) -> None:
        self.settings = settings
        self.shell = shell
        self.targets = {target.server: target for target in targets}

    capabilities: frozenset[Capability] = frozenset()

    @property
    def backend(self) -> str:
        """For people: `LB kind: command (on lb1 over SSH)`."""
        return f"kind: command ({self.shell.where})"

    def _target(self, server: str) -> Target:
        if server not in self.targets:
            raise LoadBalancerError(f"no instance of the fleet has lb_server {server!r}")
        return self.targets[server]

    def _what(self, action: Action, server: str) -> str:
        return f"load balancer command `{action}` for server {server!r} ({self.shell.where})"

    def _run(self, action: Action, server: str) -> str:
        """Run the `action` command for `server`; its stdout, or LoadBalancerError."""
        command = getattr(self.settings, action)
        env = command_env(self._target(server), action)
        limit = self.settings.timeout_seconds
        try:
            outcome = self.shell.run(action, command, env, limit)
        except RolloutError as error:
            raise LoadBalancerError(f"load balancer {error}") from None
        if outcome.exit_code is None:
            raise LoadBalancerError(
                f"{self._what(action, server)} did not finish within {limit:g} s and was stopped; "
                f"last output:\n{outcome.tail()}"
            )
        if outcome.exit_code != 0:
            raise LoadBalancerError(
                f"{self._what(action, server)} exited {outcome.exit_code}; last output:\n{outcome.tail()}"
            )
        return outcome.stdout

    def _view(self, server: str) -> CommandServer | None:
        state = parse_state(self._run("state", server), self._what("state", server))
        if state is None:
            return None
        sessions = parse_in_flight(self._run("in_flight", server), self._what("in_flight", server))
        return CommandServer(server, state[0], state[1], sessions)

    def servers(self) -> dict[str, CommandServer]:
        """The fleet's servers the LB has (`state` not `absent`), in the fleet's order."""
        return {server: view for server in self.targets if (view := self._view(server)) is not None}

    def server(self, name: str) -> CommandServer:
        view = self._view(name)
        if view is None:
            raise LoadBalancerError(f"{self._what('state', name)} says the LB has no such server (`absent`)")
        return view

    def set_state(self, server: str, state: ServerAction) -> None:
        self._run("drain" if state == "drain" else "ready", server)

    def shutdown_sessions(self, server: str) -> None:
        """Without a `shutdown_sessions` command nothing is cut here; stopping the container does."""
        if self.settings.shutdown_sessions is not None:
            self._run("shutdown_sessions", server)

    def recheck(self, server: str) -> bool:
        if self.settings.recheck is None:
            return False
        self._run("recheck", server)
        return True
