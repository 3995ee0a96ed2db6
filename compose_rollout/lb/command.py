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

import contextvars
import logging
import os
import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from prefect_shell import ShellOperation

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.hosts.commands import KILL_GRACE_SECONDS, with_timeout
from compose_rollout.hosts.ssh import Result
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.settings import CommandSettings

Action = Literal["drain", "ready", "in_flight", "state", "shutdown_sessions", "recheck"]

# What is kept of a command's output: the parsers need one line, errors the last few.
MAX_KEPT_CHARS = 64 * 1024
TAIL_LINES = 5
TAIL_LINE_CHARS = 300
# GNU timeout's exit code when it stopped the command.
TIMED_OUT = 124

_STATE_RE = re.compile(r"(ready|drained)[ \t]+(up|down|unknown)|absent")
_COUNT_RE = re.compile(r"[0-9]{1,9}")

# ShellOperation (and its ShellProcess) log at INFO that each process started, completed
# and closed, and at DEBUG the commands' text. An LB queried ten times a second would flood
# the run's logs, and the text may hold what belongs in no log. These processes run outside
# any Prefect run context (see LocalShell), so those messages go to these loggers only,
# which keep their warnings.
for _logger in ("prefect.ShellOperation", "prefect.ShellProcess"):
    logging.getLogger(_logger).setLevel(logging.WARNING)


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


def remote_argv(action: Action, command: str, env: Mapping[str, str], timeout: float) -> list[str]:
    """The argv that runs `command` on an SSH host: every value its own element (the SSH
    layer quotes each once), `sh` named after the action in its messages, and coreutils
    `timeout` stopping it on the host itself."""
    assignments = [f"{name}={value}" for name, value in env.items()]
    return with_timeout(["env", *assignments, "sh", "-c", command, f"rollout-{action}"], timeout)


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
class Outcome:
    """What one command did: its exit code (None when stopped at its timeout) and output."""

    exit_code: int | None
    stdout: str
    stderr: str

    def tail(self) -> str:
        """The last lines of stderr (of stdout if stderr is empty), indented, each cut short."""
        text = self.stderr.strip() or self.stdout.strip()
        kept = [line.rstrip()[:TAIL_LINE_CHARS] for line in text.splitlines() if line.strip()][-TAIL_LINES:]
        return "\n".join("    " + line for line in kept) or "    (no output)"


class Shell(Protocol):
    """Where the commands run."""

    @property
    def where(self) -> str: ...

    def run(self, action: Action, command: str, env: Mapping[str, str], timeout: float) -> Outcome: ...


class LocalShell:
    """`sh` on the orchestrator, through prefect-shell's ShellOperation.

    The environment is the orchestrator's plus `env` (ShellOperation's `env=`); stdin is
    /dev/null. stderr goes to a private temporary file (ShellOperation keeps only stdout).
    The process runs outside the Prefect run context (so ShellOperation logs to its own
    logger, not the task run's) and in its own process group, which is stopped when the
    timeout passes: SIGTERM, then SIGKILL five seconds later.
    """

    where = "on the orchestrator"

    def run(self, action: Action, command: str, env: Mapping[str, str], timeout: float) -> Outcome:
        handle, stderr_path = tempfile.mkstemp(prefix=f"rollout-{action}-", suffix=".stderr")
        os.close(handle)
        try:
            operation = ShellOperation(  # noqa: S604 - the fleet owner's command, run by `sh` by design
                commands=[f"exec 2>{shlex.quote(stderr_path)}", command],
                env=dict(env),
                shell="sh",
                stream_output=False,
            )
            try:
                return self._run(operation, timeout, stderr_path)
            finally:
                operation.close()
        finally:
            os.unlink(stderr_path)

    @staticmethod
    def _run(operation: Any, timeout: float, stderr_path: str) -> Outcome:
        outside = contextvars.Context()  # no Prefect run context: see the module's logger note
        try:
            process = outside.run(operation.trigger, stdin=subprocess.DEVNULL, _sync=True)
        except OSError as error:
            raise LoadBalancerError(f"cannot start `sh` on the orchestrator: {error}") from None

        def wait() -> None:
            try:
                process.wait_for_completion(_sync=True)
            except RuntimeError:  # a non-zero exit: its code is in return_code
                pass

        waiting = threading.Thread(target=contextvars.Context().run, args=(wait,), name="lb-command", daemon=True)
        waiting.start()
        waiting.join(timeout)
        stopped = waiting.is_alive()
        if stopped:
            operation.close()  # the process group: SIGTERM, SIGKILL after a grace period
            # A descendant that left the group may still hold stdout open: give up on it.
            waiting.join(KILL_GRACE_SECONDS)
        stdout = "\n".join(process.fetch_result(_sync=True))[-MAX_KEPT_CHARS:]
        if not waiting.is_alive():  # else its reader still holds them
            _close_pipes(process)
        with open(stderr_path, "rb") as stderr:
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - MAX_KEPT_CHARS))
            errors = stderr.read().decode(errors="replace")
        return Outcome(None if stopped else process.return_code, stdout, errors)


def _close_pipes(process: Any) -> None:
    """Close the process's stdout and stderr pipes. prefect-shell's sync path reads them to
    the end but never closes them, which leaves two file objects per command to the
    garbage collector (a ResourceWarning each), and its ShellProcess has no public handle
    on the `subprocess.Popen` that owns them."""
    popen = process._process
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()


class RemoteHost(Protocol):
    """What the SSH route needs from the LB host (hosts.ssh.SshHost is one)."""

    name: str

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result: ...


class RemoteShell:
    """`sh` on an SSH host (one connection for the run, like every host's)."""

    def __init__(self, host: RemoteHost) -> None:
        self.host = host

    @property
    def where(self) -> str:
        return f"on {self.host.name} over SSH"

    def run(self, action: Action, command: str, env: Mapping[str, str], timeout: float) -> Outcome:
        argv = remote_argv(action, command, env, timeout)
        try:
            result = self.host.run(argv, timeout=timeout + KILL_GRACE_SECONDS + 5, check=False)
        except RolloutError as error:
            # The SSH layer's messages quote the command line: never its text here.
            reason = str(error).replace(shlex.join(argv), f"the {action} command")
            raise LoadBalancerError(f"load balancer command `{action}` {self.where} failed: {reason}") from None
        stdout, stderr = result.stdout[-MAX_KEPT_CHARS:], result.stderr[-MAX_KEPT_CHARS:]
        return Outcome(None if result.exit_code == TIMED_OUT else result.exit_code, stdout, stderr)


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
        outcome = self.shell.run(action, command, env, limit)
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
