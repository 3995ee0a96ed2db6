"""A real `prefect server start` (SQLite, its own home) for tests, and process helpers."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

SERVER_START_SECONDS = 120.0
SERVER_COMMAND = [sys.executable, "-m", "prefect", "server", "start"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the developer's own Prefect profile, plus `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return env | extra


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode} while starting:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a starting process: nothing to wait on but its answer
    pytest.fail(f"{url} did not answer within {seconds:g} s:\n{tail(log)}")


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session (so `stop` ends its children too),
    its output into `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def prefect_server(home: Path, ui: bool = False, **settings: str) -> Iterator[str]:
    """Start a Prefect server on a free port; yield its API URL; stop it. `settings` are
    extra PREFECT_* variables for the server (a database URL, a service's loop time)."""
    port = free_port()
    log = home / "server.log"
    flags = [] if ui else ["--no-ui"]
    api = f"http://127.0.0.1:{port}/api"
    process = spawn(
        [*SERVER_COMMAND, "--host", "127.0.0.1", "--port", str(port), *flags, "--analytics-off"],
        clean_env(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED=str(ui).lower(),
            PREFECT_UI_API_URL=api,  # the UI is told the API's address, else it calls :4200
            **settings,
        ),
        log,
    )
    try:
        wait_until_up(f"{api}/health", process, log, SERVER_START_SECONDS)
        yield api
    finally:
        stop(process)


def _postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (Debian package postgresql; ./dev setup installs it)")
    return found[-1].parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql), trust auth on
    127.0.0.1 only; yields the database URL a Prefect server takes."""
    bindir = _postgres_bindir()
    root = Path(tempfile.mkdtemp(prefix="compose-rollout-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(tool: str, *argv: str | Path) -> None:
        command = [*as_postgres, str(bindir / tool), *map(str, argv)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        output = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert done.returncode == 0, f"{tool} failed:\n{output}\n{tail(root / 'log')}"

    try:
        pg("initdb", "-D", data, "-U", "prefect", "-A", "trust", "--no-sync")
        listen = f"-h 127.0.0.1 -p {port} -k {root}"
        pg("pg_ctl", "-D", data, "-l", root / "log", "-w", "-t", "60", "-o", listen, "start")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
            yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        finally:
            pg("pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def basic_auth(auth_string: str) -> dict[str, str]:
    """The Authorization header Prefect's client sends for PREFECT_API_AUTH_STRING."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def wait_for_final_state(api: str, run_id: str, headers: dict[str, str], timeout: float = 240) -> dict[str, Any]:
    """Poll flow run `run_id` (with `headers`, e.g. `basic_auth(...)`) until it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{api}/flow_runs/{run_id}", headers=headers, timeout=30)
        if response.status_code != 503:  # 503: the server is busy, ask again
            response.raise_for_status()
            run: dict[str, Any] = response.json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
        time.sleep(0.5)  # polling the run's observed state in Prefect's API
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:g} s")
