"""The local Prefect server `rollout` starts when no PREFECT_API_URL is set, and reuses.

Real `prefect server start` processes in a Prefect home of the test's own."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from compose_rollout import local_server
from compose_rollout.errors import RolloutError


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _stop(home: Path) -> None:
    """`prefect server stop`, as a user stops it."""
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "stop"],
        env=os.environ | {"PREFECT_HOME": str(home)},
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A Prefect home of the test's own and no PREFECT_API_URL; stops what was left in it."""
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}, restore_defaults={PREFECT_API_URL}):
        try:
            yield tmp_path
        finally:
            state = tmp_path / local_server.STATE_FILE
            if state.exists():
                pid = json.loads(state.read_text())["pid"]
                _stop(tmp_path)
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
            for process in local_server._started:  # reaped here: this process started them
                process.wait(timeout=30)
            local_server._started.clear()


def _pid(home: Path) -> int:
    return int(json.loads((home / local_server.STATE_FILE).read_text())["pid"])


@pytest.mark.timeout(240)
def test_the_first_run_starts_a_server_the_next_reuse_and_prefect_server_stop_stops_it(home: Path) -> None:
    # Two runs started together share one server: one starts it, the other waits and uses it.
    with ThreadPoolExecutor(2) as pool:
        # Each thread in this test's Prefect settings (a context variable threads do not inherit).
        runs = [pool.submit(contextvars.copy_context().run, local_server.api_url) for _ in range(2)]
        first, second = (run.result() for run in runs)
    assert first[0] == second[0]
    assert sorted([first[1], second[1]]) == [False, True]
    url = first[0]
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    pid = _pid(home)
    assert (home / "server.pid").read_text() == str(pid)  # what `prefect server stop` reads

    # A later run, and a flow run inside it, go to that server.
    with local_server.prefect_api():
        assert PREFECT_API_URL.value() == url
    assert local_server.api_url() == (url, False)

    _stop(home)
    assert not _running(pid)
    # The next run finds it gone and starts another.
    again, started = local_server.api_url()
    assert started and _pid(home) != pid
    assert requests.get(f"{again}/health", timeout=5).status_code == 200


def test_a_configured_api_url_is_used_and_nothing_is_started(home: Path) -> None:
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}), local_server.prefect_api():
        assert PREFECT_API_URL.value() == "http://127.0.0.1:9/api"
    assert not (home / local_server.STATE_FILE).exists()


def test_a_recorded_server_that_is_gone_is_not_used(home: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (home / local_server.STATE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": dead.pid}))
    assert local_server.left_running(home) is None


@pytest.mark.timeout(60)
def test_a_server_that_does_not_answer_in_time_is_stopped_and_the_error_names_its_log(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "0.5")
    with pytest.raises(RolloutError, match=r"did not answer within 0.5 s; its log: .*compose-rollout-server\.log"):
        local_server.api_url()
    assert not (home / local_server.STATE_FILE).exists()
    assert not [pid for pid in _servers_started_here() if _running(pid)]


def _servers_started_here() -> list[int]:
    """Processes this test process started that run `prefect server start`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"prefect server start" in command:
            found.append(int(proc.name))
    return found
