"""A failed rollout notifies someone: the automation from deployments/notifications.py,
on a real Prefect server, delivering to a real HTTP endpoint."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from compose_rollout.deployments.notifications import AUTOMATION_NAME
from tests.prefect_server import clean_env, prefect_server

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def endpoint() -> Iterator[tuple[str, queue.Queue[dict[str, Any]]]]:
    """A local HTTP endpoint that collects the JSON bodies POSTed to it."""
    received: queue.Queue[dict[str, Any]] = queue.Queue()

    class Collect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            received.put(json.loads(self.rfile.read(min(length, 1 << 20)) or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(240)
def test_a_failed_rollout_sends_a_notification_with_the_summary(
    tmp_path: Path, endpoint: tuple[str, queue.Queue[dict[str, Any]]]
) -> None:
    url, received = endpoint
    home = tmp_path / "prefect-home"
    home.mkdir()
    with prefect_server(home) as api:
        env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        python = [sys.executable]
        made = subprocess.run(
            [*python, "-m", "deployments.notifications", "--webhook-url", url],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        automations = httpx.post(f"{api}/automations/filter", json={}, timeout=10).raise_for_status().json()
        [automation] = [a for a in automations if a["name"] == AUTOMATION_NAME]
        assert "prefect.flow-run.Failed" in automation["trigger"]["expect"]

        failing = (
            "from compose_rollout.flows.rolling_deploy import rolling_deploy; "
            "rolling_deploy(fleet_file='/nowhere.yaml', tag='v2')"
        )
        run = subprocess.run([*python, "-c", failing], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode != 0
        message = received.get(timeout=120)  # delivered by the server's automation, bounded
    assert "rolling-deploy" in message["subject"] and "Failed" in message["subject"]
    assert "fleet file /nowhere.yaml does not exist" in message["body"]
