"""Shell commands a fleet's owner writes (LB commands, hooks), run on the orchestrator or a host.

On the orchestrator they run through prefect-shell's `ShellOperation`; on a host over its
SSH connection as argv `timeout N env NAME=VALUE... sh -c COMMAND NAME`, quoted once by
the SSH layer. What a command acts on reaches it only as environment variables, never
inside its text; every command is bounded by its timeout (stopped with its process
group); the commands' text is never printed (it may hold what belongs in no log).
"""

from __future__ import annotations

import contextvars
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prefect_shell import ShellOperation

from compose_rollout.errors import RolloutError
from compose_rollout.hosts.commands import KILL_GRACE_SECONDS, with_timeout
from compose_rollout.hosts.ssh import Result


class ShellError(RolloutError):
    """A command could not be started or its host not reached."""


# What is kept of a command's output: the parsers need one line, errors the last few.
MAX_KEPT_CHARS = 64 * 1024
TAIL_LINES = 5
TAIL_LINE_CHARS = 300
# GNU timeout's exit code when it stopped the command.
TIMED_OUT = 124

# ShellOperation (and its ShellProcess) log at INFO that each process started, completed
# and closed, and at DEBUG the commands' text. An LB queried ten times a second would flood
# the run's logs, and the text may hold what belongs in no log. These processes run outside
# any Prefect run context (see LocalShell), so those messages go to these loggers only,
# which keep their warnings.
for _logger in ("prefect.ShellOperation", "prefect.ShellProcess"):
    logging.getLogger(_logger).setLevel(logging.WARNING)


def remote_argv(action: str, command: str, env: Mapping[str, str], timeout: float) -> list[str]:
    """The argv that runs `command` on an SSH host: every value its own element (the SSH
    layer quotes each once), `sh` named after the action in its messages, and coreutils
    `timeout` stopping it on the host itself."""
    assignments = [f"{name}={value}" for name, value in env.items()]
    return with_timeout(["env", *assignments, "sh", "-c", command, f"rollout-{action}"], timeout)


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

    def run(self, action: str, command: str, env: Mapping[str, str], timeout: float) -> Outcome: ...


class LocalShell:
    """`sh` on the orchestrator, through prefect-shell's ShellOperation.

    The environment is the orchestrator's plus `env` (ShellOperation's `env=`); stdin is
    /dev/null. stderr goes to a private temporary file (ShellOperation keeps only stdout).
    The process runs outside the Prefect run context (so ShellOperation logs to its own
    logger, not the task run's) and in its own process group, which is stopped when the
    timeout passes: SIGTERM, then SIGKILL five seconds later.
    """

    where = "on the orchestrator"

    def run(self, action: str, command: str, env: Mapping[str, str], timeout: float) -> Outcome:
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
            raise ShellError(f"cannot start `sh` on the orchestrator: {error}") from None

        def wait() -> None:
            try:
                process.wait_for_completion(_sync=True)
            except RuntimeError:  # a non-zero exit: its code is in return_code
                pass

        waiting = threading.Thread(target=contextvars.Context().run, args=(wait,), name="shell-command", daemon=True)
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

    def run(self, action: str, command: str, env: Mapping[str, str], timeout: float) -> Outcome:
        argv = remote_argv(action, command, env, timeout)
        try:
            result = self.host.run(argv, timeout=timeout + KILL_GRACE_SECONDS + 5, check=False)
        except RolloutError as error:
            # The SSH layer's messages quote the command line: never its text here.
            reason = str(error).replace(shlex.join(argv), f"the {action} command")
            raise ShellError(f"command `{action}` {self.where} failed: {reason}") from None
        stdout, stderr = result.stdout[-MAX_KEPT_CHARS:], result.stderr[-MAX_KEPT_CHARS:]
        return Outcome(None if result.exit_code == TIMED_OUT else result.exit_code, stdout, stderr)
