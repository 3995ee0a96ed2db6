"""Optional adapter capabilities, against a real HAProxy: what an adapter declares is
what it can do, and preflight names what a strategy needs and the LB lacks."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import cast

import pytest
import requests

from compose_rollout.errors import LoadBalancerError, PreflightError
from compose_rollout.lb.base import SURGE_NEEDS, AddsServers, Capability, CountsResponses, LoadBalancer, Weighs, require
from compose_rollout.lb.command import CommandLoadBalancer
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
    require(client, ["response_counters", *SURGE_NEEDS], "the surge strategy")  # declared: no error
    commands = _Named(CommandLoadBalancer.capabilities)
    with pytest.raises(PreflightError, match="cannot add_server, move_server, remove_server, which the surge"):
        require(cast(LoadBalancer, commands), SURGE_NEEDS, "the surge strategy")


class _Named:
    """An LB as preflight sees it: a name and capabilities."""

    def __init__(self, capabilities: frozenset[Capability]) -> None:
        self.capabilities = capabilities
        self.backend = "the fleet's commands"


class _Other(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _codes(url: str, count: int) -> list[int]:
    with requests.Session() as session:
        session.trust_env = False
        return [session.get(url, timeout=5, headers={"Connection": "close"}).status_code for _ in range(count)]


def _until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_haproxy_adds_moves_and_removes_a_server_for_a_surge(haproxy: tuple[HaproxyClient, str]) -> None:
    client, url = haproxy
    client.surge_check = (100, 1, 1)
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    Thread(target=other.serve_forever, daemon=True).start()
    try:
        address, port = client.server_address("s1")
        assert address == "127.0.0.1" and isinstance(client, AddsServers)

        client.add_server("s1-surge", "s1", other.server_address[1])
        added = client.server("s1-surge")
        assert added.drained and not added.in_rotation  # no request before it is proven and readied
        assert set(_codes(url, 6)) == {200}
        _until(lambda: client.server("s1-surge").up, "the added server's own check to pass")
        client.set_state("s1-surge", "ready")
        assert set(_codes(url, 6)) == {200, 204}  # both take requests: round robin

        client.set_state("s1", "drain")
        client.move_server("s1", other.server_address[1])
        assert client.server_address("s1") == (address, other.server_address[1])
        client.set_state("s1", "ready")
        client.set_state("s1-surge", "drain")
        client.remove_server("s1-surge")
        assert set(client.servers()) == {"s1"}
        client.remove_server("s1-surge")  # gone already: nothing to do
        assert set(_codes(url, 4)) == {204}  # the server now sends to the new port
        client.move_server("s1", port)
        assert set(_codes(url, 4)) == {200}
    finally:
        other.shutdown()
        other.server_close()


def test_haproxy_refuses_a_second_server_of_the_same_name(haproxy: tuple[HaproxyClient, str]) -> None:
    client, _ = haproxy
    with pytest.raises(LoadBalancerError, match="HAProxy refused `add server app/s1 "):
        client.add_server("s1", "s1", 8081)
    with pytest.raises(LoadBalancerError, match="has no server 'nope'"):
        client.add_server("s2", "nope", 8081)


def test_haproxy_reads_and_sets_a_servers_weight(haproxy: tuple[HaproxyClient, str]) -> None:
    client, _ = haproxy
    assert isinstance(client, Weighs) and client.weight("s1") == 1
    client.set_weight("s1", 64)
    assert client.weight("s1") == 64
    with pytest.raises(LoadBalancerError, match="from 0 to 256, not 300"):
        client.set_weight("s1", 300)
    with pytest.raises(LoadBalancerError, match="get weight app/nope"):
        client.weight("nope")
