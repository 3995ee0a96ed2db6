"""Small helpers shared by the test-bed modules: bounded subprocesses, child
daemons, waiting on observed state, and plain loopback HTTP/TCP probes."""

from __future__ import annotations

import ctypes
import http.client
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger("compose_rollout.testbed")

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


class TestbedError(RuntimeError):
    """Something the test bed needs did not work (a command failed, a daemon
    died or a state was not reached before its deadline)."""

    # pytest would otherwise try to collect this class (its name starts with "Test").
    __test__ = False


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion with a hard timeout and captured output.

    Raises TestbedError (with the command's stderr) when it fails and ``check``
    is set, or when it does not finish within ``timeout`` seconds."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{' '.join(argv)} did not finish within {timeout}s") from exc
    if check and result.returncode != 0:
        raise TestbedError(
            f"{' '.join(argv)} failed with exit code {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    abort: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something other than None/False.

    ``abort`` is checked on every round; a non-None string from it ends the
    wait at once (e.g. "the daemon exited"), so a crash is reported right
    away instead of after the whole deadline."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except (OSError, TestbedError, RuntimeError, KeyError, ValueError) as exc:
            # Until the state is reached a probe may well fail (connection
            # refused, a daemon not answering yet); keep the last for the report.
            last_error = exc
        if abort is not None:
            reason = abort()
            if reason is not None:
                raise TestbedError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TestbedError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec. If the test process is killed
    # (SIGKILL, a crashed CI job) no stop() runs; the kernel then sends SIGTERM
    # to the daemon, so a stale sshd/haproxy/registry never holds the fixed
    # ports for the next run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Daemon:
    """A long-running child process with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_file: Path, *, die_with_parent: bool) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_file = log_file
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None

    def start(self) -> None:
        """Spawn the process (appending to its log file)."""
        if self.running():
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log_handle = open(self.log_file, "ab")
        log.debug("starting %s: %s", self.name, " ".join(self.argv))
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal must not kill the daemons
            # before stop() has removed the containers in order.
            start_new_session=True,
            preexec_fn=_set_parent_death_signal if self.die_with_parent else None,
        )

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def exit_reason(self) -> str | None:
        """None while running, else a description with the tail of the log."""
        if self.process is None:
            return f"{self.name} was never started"
        code = self.process.poll()
        if code is None:
            return None
        return f"{self.name} exited with code {code}; log tail:\n{tail(self.log_file)}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %ss, killing it", self.name, timeout)
                process.kill()
                process.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """GET ``url`` on a loopback address and return the status, or None when
    no HTTP answer came."""
    try:
        return http_get(url, timeout)[0]
    except OSError:
        return None


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``url`` (loopback) and return (status, body text). http.client is used
    on purpose: it never consults proxy environment variables, which a CI machine
    may set."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def tcp_accepts(host: str, port: int, timeout: float = 1.0, banner: bytes | None = None) -> bool:
    """True if something accepts a TCP connection on host:port (and, when
    ``banner`` is given, its first bytes start with it)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if banner is None:
                return True
            sock.settimeout(timeout)
            return sock.recv(len(banner)) == banner
    except OSError:
        return False


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Fail early and clearly if something else already listens on host:port
    (e.g. a registry or HAProxy someone left running), instead of letting the
    daemon die with a bind error."""
    if tcp_accepts(host, port, timeout=0.5):
        raise TestbedError(f"{host}:{port} (for {what}) is already in use by another process")


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without variables that would silently change
    what docker-compose does (project name, file, profiles)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(extra)
    return env
