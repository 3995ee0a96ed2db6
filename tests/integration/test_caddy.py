"""The caddy adapter against a real Caddy (Debian's 2.6 here) in front of three small
HTTP servers on 127.0.0.1: what the unit tests' fake assumes of Caddy, and the reason
for the parking handler, observed.

Caddy runs with its config and data directories in the test's tmp_path and its admin
API on a free 127.0.0.1 port (the adapter reaches it directly; the SSH tunnel is
exercised by the contract tests on the real bed).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from compose_rollout.errors import LoadBalancerError
from compose_rollout.lb import adapters
from compose_rollout.lb.admin_http import Answer, HttpAdmin, tcp_stream
from compose_rollout.lb.caddy import CaddyLoadBalancer, config_etag, read_pools
from compose_rollout.lb.settings import CaddySettings
from compose_rollout.testbed.caddy import PARKING_ID, UPSTREAMS_ID, render_config
from tests.ci import unavailable

CADDY = shutil.which("caddy")


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/slow?"):
            time.sleep(float(self.path.partition("?")[2]))
        body = f"{self.server.server_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(condition: Callable[[], object], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, requests.RequestException, LoadBalancerError):
            pass  # not ready yet; the deadline bounds it
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Caddy:
    url: str  # the frontend
    admin: HttpAdmin
    servers: list[str]  # the upstreams' dial addresses
    initial: dict[str, Any]

    def lb(self, **settings: Any) -> CaddyLoadBalancer:
        values = {"kind": "caddy", "admin_url": f"http://127.0.0.1:{self.admin.port}", "upstreams_id": UPSTREAMS_ID}
        lb, host = adapters.connect(CaddySettings.model_validate({**values, **settings}), _no_ssh, [])
        assert isinstance(lb, CaddyLoadBalancer) and host is None
        return lb

    def call(self, method: str, path: str, body: Any = None, **headers: str) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        return self.admin.request(method, path, data, {k.replace("_", "-"): v for k, v in headers.items()})

    def config_bytes(self) -> bytes:
        return self.call("GET", "/config/").body

    def load(self, config: dict[str, Any]) -> None:
        assert self.call("POST", "/load", config).status == 200

    def live(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(self.call("GET", f"/id/{UPSTREAMS_ID}/upstreams").body)
        return listed

    def counted(self) -> dict[str, int]:
        return {e["address"]: e["num_requests"] for e in json.loads(self.call("GET", "/reverse_proxy/upstreams").body)}

    def backend_of(self, path: str = "/") -> str:
        answer = requests.get(self.url + path, timeout=10)
        assert answer.status_code == 200, answer.text
        return f"127.0.0.1:{answer.text.strip()}"


def _no_ssh(host: str, port: int | None, user: str | None) -> Any:
    raise AssertionError("an admin_url without ssh_host needs no SSH connection")


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[Caddy]:
    if CADDY is None:
        unavailable("the caddy adapter's integration tests need caddy (Debian package caddy)")
    apps = [ThreadingHTTPServer(("127.0.0.1", 0), _App) for _ in range(3)]
    for app in apps:
        threading.Thread(target=app.serve_forever, daemon=True).start()
    servers = [f"127.0.0.1:{app.server_address[1]}" for app in apps]
    port, admin_port = _free_port(), _free_port()
    config = render_config(servers, port=port, admin_port=admin_port)
    (tmp_path / "caddy.json").write_text(json.dumps(config))
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    log = tmp_path / "caddy.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [CADDY, "run", "--config", str(tmp_path / "caddy.json")], stdout=output, stderr=subprocess.STDOUT, env=env
        )
    admin = HttpAdmin("127.0.0.1", admin_port, tcp_stream, 5, f"caddy admin http://127.0.0.1:{admin_port}")
    front = Caddy(f"http://127.0.0.1:{port}", admin, servers, config)
    try:
        _wait(lambda: front.backend_of() in servers, f"Caddy to proxy ({log})")
        yield front
    finally:
        process.terminate()
        process.wait(timeout=15)
        for app in apps:
            app.shutdown()
            app.server_close()


# --- what the fake admin API assumes ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_caddy_accepts_the_computed_etag_and_refuses_a_stale_one(caddy: Caddy) -> None:
    body = caddy.config_bytes()
    tag = config_etag("/config/", body)
    keep = caddy.live()[1:]
    refused = caddy.call("PATCH", f"/id/{UPSTREAMS_ID}/upstreams", keep, If_Match=tag.replace(tag[-9:-1], "00000000"))
    assert (refused.status, json.loads(refused.body)) == (
        412,
        {"error": "If-Match header did not match current config hash"},
    )
    assert caddy.call("PATCH", f"/id/{UPSTREAMS_ID}/upstreams", keep, If_Match=tag).status == 200
    assert caddy.live() == keep
    # The tag was for the config before the change: it no longer matches.
    assert caddy.call("PATCH", f"/id/{UPSTREAMS_ID}/upstreams", keep, If_Match=tag).status == 412


@pytest.mark.timeout(60)
def test_caddys_errors_are_json_as_the_fake_answers_them(caddy: Caddy) -> None:
    assert caddy.call("PATCH", "/id/nope/upstreams", []) == Answer(404, b'{"error":"unknown object ID \'nope\'"}\n')
    wrong_type = caddy.admin.request("PATCH", f"/id/{UPSTREAMS_ID}/upstreams", b"[]", {"Content-Type": "text/plain"})
    assert wrong_type.status == 400 and "error" in json.loads(wrong_type.body)


@pytest.mark.timeout(60)
def test_every_parked_address_is_counted_by_caddy(caddy: Caddy) -> None:
    assert caddy.counted() == {server: 0 for server in caddy.servers}


# --- the adapter ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_drained_upstreams_request_in_flight_is_counted_until_it_ends_and_completes(caddy: Caddy) -> None:
    lb = caddy.lb()
    before = caddy.config_bytes()
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(requests.get, caddy.url + "/slow?2", timeout=30)
        _wait(lambda: any(view.sessions for view in lb.servers().values()), "the slow request in flight")
        busy = next(name for name, view in lb.servers().items() if view.sessions)
        lb.set_state(busy, "drain")
        drained = lb.server(busy)
        assert (drained.drained, drained.in_rotation, drained.sessions) == (True, False, 1)
        # New requests go to the others at once.
        assert busy not in {caddy.backend_of() for _ in range(9)}
        polls = 0
        while lb.server(busy).sessions:
            assert not slow.done()
            polls += 1
            time.sleep(0.05)
        assert polls > 10  # counted for most of its 2 s, not forgotten at the drain
        assert slow.result(timeout=5).status_code == 200
    lb.set_state(busy, "ready")
    assert caddy.config_bytes() == before  # the list back as it was, byte for byte
    assert busy in {caddy.backend_of() for _ in range(9)}


@pytest.mark.timeout(60)
def test_without_a_parking_handler_caddy_forgets_a_drained_upstream_under_its_request(caddy: Caddy) -> None:
    """Why the adapter requires the parking handler (Caddy 2.6): with no handler naming a
    drained address, /reverse_proxy/upstreams drops it while its request still runs."""
    config = json.loads(json.dumps(caddy.initial))
    del config["apps"]["http"]["servers"]["app"]["routes"][1]
    caddy.load(config)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(requests.get, caddy.url + "/slow?2", timeout=30)
        _wait(lambda: any(caddy.counted().values()), "the slow request in flight")
        busy = next(address for address, count in caddy.counted().items() if count)
        live = caddy.live()
        caddy.call("PATCH", f"/id/{UPSTREAMS_ID}/upstreams", [u for u in live if u["dial"] != busy])
        _wait(lambda: busy not in caddy.counted(), f"Caddy to forget {busy}", timeout=1)
        assert not slow.done()
        assert slow.result().status_code == 200


@pytest.mark.timeout(60)
def test_a_config_without_the_parking_handler_or_the_id_is_refused_and_left_untouched(caddy: Caddy) -> None:
    config = json.loads(json.dumps(caddy.initial))
    del config["apps"]["http"]["servers"]["app"]["routes"][1]
    caddy.load(config)
    before = caddy.config_bytes()
    with pytest.raises(LoadBalancerError, match=rf'no object with "@id": "{PARKING_ID}" \(the parking handler'):
        caddy.lb().servers()
    with pytest.raises(LoadBalancerError, match=rf'no object with "@id": "{PARKING_ID}"'):
        caddy.lb().set_state(caddy.servers[0], "drain")
    with pytest.raises(LoadBalancerError, match=r'no object with "@id": "web_upstreams" \(the instances'):
        caddy.lb(upstreams_id="web_upstreams").servers()
    assert caddy.config_bytes() == before


@pytest.mark.timeout(60)
def test_the_last_upstream_stays_and_caddy_keeps_answering(caddy: Caddy) -> None:
    lb = caddy.lb()
    first, second, last = caddy.servers
    lb.set_state(first, "drain")
    lb.set_state(second, "drain")
    with pytest.raises(LoadBalancerError, match=f"refusing to drain {last}: it is the last upstream"):
        lb.set_state(last, "drain")
    assert {caddy.backend_of() for _ in range(3)} == {last}
    lb.set_state(second, "ready")
    lb.set_state(first, "ready")
    assert caddy.live() == [{"dial": server} for server in caddy.servers]  # in their order again


@pytest.mark.timeout(60)
def test_drains_in_parallel_each_apply(caddy: Caddy) -> None:
    lb = caddy.lb()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda server: lb.set_state(server, "drain"), caddy.servers[:2]))
    assert caddy.live() == [{"dial": caddy.servers[2]}]
    # Another CaddyLoadBalancer (no shared lock) changing the list between a read and a
    # PATCH is caught by If-Match and computed again.
    other = caddy.lb()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(
            pool.map(
                lambda pair: pair[0].set_state(pair[1], "ready"), [(lb, caddy.servers[0]), (other, caddy.servers[1])]
            )
        )
    assert caddy.live() == [{"dial": server} for server in caddy.servers]


@pytest.mark.timeout(60)
def test_an_admin_api_that_is_not_there_is_named(caddy: Caddy) -> None:
    lb = caddy.lb(admin_url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(LoadBalancerError, match=r"caddy admin http://127\.0\.0\.1:\d+: GET /config/: cannot connect"):
        lb.servers()


@pytest.mark.timeout(60)
def test_the_documented_caddy_config_is_valid_and_accepted_by_the_adapter(tmp_path: Path) -> None:
    if CADDY is None:
        unavailable("the caddy adapter's integration tests need caddy (Debian package caddy)")
    example = Path(__file__).parents[2] / "examples" / "caddy.json"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    checked = subprocess.run(
        [CADDY, "validate", "--config", str(example)], capture_output=True, text=True, env=env, timeout=50
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    found = read_pools(json.loads(example.read_text()), "terrateam_upstreams", "rollout_parking", "example")
    assert (
        [u["dial"] for u in found.upstreams]
        == ["10.0.1.11:8080", "10.0.1.12:8080"]
        == [u["dial"] for u in found.parking]
    )


@pytest.mark.timeout(60)
def test_a_surge_through_caddy_adds_readies_moves_and_removes_a_server(caddy: Caddy) -> None:
    """The surge's steps on the first upstream, with Caddy's config read after each: the
    added server is parked only until ready, the move drops the drained original, and
    the removal waits for the server's request in flight."""
    config = json.loads(json.dumps(caddy.initial))
    routes = config["apps"]["http"]["servers"]["app"]["routes"]
    for route in routes:  # a field the added server must copy
        route["handle"][0]["upstreams"][0]["max_requests"] = 100
    caddy.load(config)
    first, second, third = caddy.servers
    second_app = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    threading.Thread(target=second_app.serve_forever, daemon=True).start()
    lb = caddy.lb()
    try:
        port = second_app.server_address[1]
        added = lb.add_server("ignored-surge", first, port)
        assert added == f"127.0.0.1:{port}"
        assert lb.add_server("ignored-surge", first, port) == added  # repeated after a crash: no change
        assert _parked(caddy) == [first, added, second, third] and _dials(caddy.live()) == [first, second, third]
        assert caddy.live()[0] == {"dial": first, "max_requests": 100}
        assert _parking_entries(caddy)[1] == {"dial": added, "max_requests": 100}
        assert caddy.counted()[added] == 0  # parked: Caddy counts it
        assert added not in {caddy.backend_of() for _ in range(9)}

        lb.set_state(added, "ready")
        assert _dials(caddy.live()) == [first, added, second, third]
        assert added in {caddy.backend_of() for _ in range(8)}

        lb.set_state(first, "drain")
        assert lb.move_server(first, port) == added
        assert lb.move_server(first, port) == added
        assert _parked(caddy) == _dials(caddy.live()) == [added, second, third]
        assert first not in caddy.counted()

        # The surge server's removal: refused in rotation, and while a request is in flight.
        with pytest.raises(LoadBalancerError, match=f"refusing to remove {added}: in rotation"):
            lb.remove_server(added)
        lb.set_state(second, "drain")
        lb.set_state(third, "drain")
        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(requests.get, caddy.url + "/slow?2", timeout=30)
            _wait(lambda: lb.server(added).sessions, "the slow request in flight")
            lb.set_state(second, "ready")
            lb.set_state(added, "drain")
            with pytest.raises(LoadBalancerError, match=f"refusing to remove {added}: drained .*, 1 requests"):
                lb.remove_server(added)
            assert slow.result(timeout=10).status_code == 200
        _wait(lambda: not lb.server(added).sessions, "the slow request to end")
        lb.remove_server(added)
        lb.remove_server(added)
        assert _parked(caddy) == [second, third] and _dials(caddy.live()) == [second]
        assert added not in caddy.counted()
        read_pools(json.loads(caddy.config_bytes()), UPSTREAMS_ID, PARKING_ID, "caddy")  # its checks still hold
    finally:
        second_app.shutdown()
        second_app.server_close()


def _dials(upstreams: list[dict[str, Any]]) -> list[str]:
    return [upstream["dial"] for upstream in upstreams]


def _parking_entries(caddy: Caddy) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = json.loads(caddy.call("GET", f"/id/{PARKING_ID}/upstreams").body)
    return listed


def _parked(caddy: Caddy) -> list[str]:
    return _dials(_parking_entries(caddy))
