"""Optional adapter capabilities, against a real HAProxy: what an adapter declares is
what it can do, and preflight names what a strategy needs and the LB lacks."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
import requests

from compose_rollout.errors import PreflightError
from compose_rollout.lb.base import CountsResponses, require
from compose_rollout.lb.haproxy import HaproxyClient
from tests.integration.test_haproxy_recheck import HAPROXY


class _App(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503 if self.path == "/bad" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[tuple[HaproxyClient, str]]:
    app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    Thread(target=app.serve_forever, daemon=True).start()
    front = _free_port()
    socket_path = tmp_path / "admin.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""global
    stats socket {socket_path} level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:{front}
    default_backend app
backend app
    server s1 127.0.0.1:{app.server_address[1]}
"""
    )
    process = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = HaproxyClient(f"unix://{socket_path}", "app", timeout=3)
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client, f"http://127.0.0.1:{front}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        app.shutdown()
        app.server_close()


def test_haproxy_counts_each_servers_responses_by_class(haproxy: tuple[HaproxyClient, str]) -> None:
    client, url = haproxy
    assert isinstance(client, CountsResponses) and "response_counters" in client.capabilities
    before = client.response_counts("s1")
    with requests.Session() as session:
        session.trust_env = False
        codes = [session.get(f"{url}{path}", timeout=5).status_code for path in ("/", "/", "/bad", "/", "/bad")]
    assert codes == [200, 200, 503, 200, 503]
    after = client.response_counts("s1")
    assert (after["2xx"] - before["2xx"], after["5xx"] - before["5xx"]) == (3, 2)


def test_preflight_names_the_capability_a_strategy_needs_and_the_lb_lacks(
    haproxy: tuple[HaproxyClient, str],
) -> None:
    client, _ = haproxy
    require(client, ["response_counters"], "the metric gate")  # declared: no error
    with pytest.raises(PreflightError, match="HAProxy backend app cannot add_server, which the surge strategy needs"):
        require(client, ["add_server", "response_counters"], "the surge strategy")
