"""The local Prefect server `rollout` uses when no `PREFECT_API_URL` is set.

Prefect's own answer to "no server" is a temporary one started inside each process:
10-20 s before a run can begin, paid again by every `rollout deploy`. Instead the first
run starts `prefect server start` in the background (its own session, so it outlives the
command), records where it listens in PREFECT_HOME, and leaves it running; every later
run on the machine finds it there and starts at once. `prefect server stop` stops it
(its pid is in Prefect's own `server.pid`); a run that finds it gone starts another.

A lock file serialises the check-and-start, so two runs started together share one
server. Every wait is bounded: the start by PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
(as Prefect bounds its temporary server), each health probe by a second or two.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from compose_rollout.errors import RolloutError

STATE_FILE = "compose-rollout-server.json"  # {"url": ..., "pid": ...}
LOG_FILE = "compose-rollout-server.log"
LOCK_FILE = "compose-rollout-server.lock"
PREFECT_PID_FILE = "server.pid"  # prefect.cli._server_utils.SERVER_PID_FILE_NAME: `prefect server stop` reads it
PROBE_SECONDS = 2.0
# The servers this process started. They outlive it by design; holding them keeps Python
# from warning, when a Popen is collected, that its process still runs.
_started: list[subprocess.Popen[bytes]] = []


def _home() -> Path:
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _start_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


def healthy(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a Prefect API answers its health check at `url` (ending in /api)."""
    try:
        return requests.get(f"{url}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_in(path: Path) -> bool:
    """Whether `path` names a process that runs."""
    try:
        return _alive(int(path.read_text()))
    except (OSError, ValueError):
        return False


def left_running(home: Path) -> str | None:
    """The URL of the server an earlier run left in `home`, if it still runs and answers."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
        url, pid = str(state["url"]), int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if _alive(pid) and healthy(url) else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(home: Path) -> str:
    """Start `prefect server start` in the background; return its URL once it answers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    env.pop("PREFECT_API_URL", None)
    with (home / LOG_FILE).open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C, outlives this command
        )
    try:
        deadline = time.monotonic() + _start_timeout()
        while not healthy(url, timeout=min(PROBE_SECONDS, max(0.1, deadline - time.monotonic()))):
            status = process.poll()
            if status is not None or time.monotonic() >= deadline:
                why = f"exited with status {status}" if status is not None else "did not answer"
                raise RolloutError(
                    f"The local Prefect server {why} within {_start_timeout():g} s; its log: {home / LOG_FILE}. "
                    "Set PREFECT_API_URL to use a running Prefect server instead."
                )
            time.sleep(0.2)
    except BaseException:  # also Ctrl-C: no server is left running unrecorded
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        raise
    _started.append(process)
    (home / STATE_FILE).write_text(json.dumps({"url": url, "pid": process.pid}))
    if not _pid_in(home / PREFECT_PID_FILE):  # never hide a background server someone else started
        (home / PREFECT_PID_FILE).write_text(str(process.pid))
    return url


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    with (home / LOCK_FILE).open("a") as lock:
        deadline = time.monotonic() + _start_timeout() + 10
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RolloutError(
                        f"Another `rollout` is starting the local Prefect server ({home / LOCK_FILE})."
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def api_url() -> tuple[str, bool]:
    """The URL of the local server (started now if none runs) and whether it was started now."""
    home = _home()
    with _locked(home):
        found = left_running(home)
        if found is not None:
            return found, False
        return _start(home), True


@contextmanager
def prefect_api() -> Iterator[None]:
    """Run the body against PREFECT_API_URL if one is set, else against the local server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    url, started = api_url()
    what = "started a local Prefect server" if started else "using the local Prefect server an earlier run started"
    print(
        f"Prefect: {what} at {url.removesuffix('/api')} (kept for later runs; `prefect server stop` stops it)",
        file=sys.stderr,
    )
    with temporary_settings({PREFECT_API_URL: url}):
        yield
