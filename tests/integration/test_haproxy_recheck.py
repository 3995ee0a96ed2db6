"""`recheck` against a real HAProxy: after `up`, "the LB sees it UP" must come from checks
of the new container, not from what HAProxy saw of the old one before it restarted."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from compose_rollout.lb.haproxy import HaproxyClient

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HaproxyClient]:
    app = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    Thread(target=app.serve_forever, daemon=True).start()
    port = app.server_address[1]
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
backend app
    option httpchk GET /health
    server checked 127.0.0.1:{port} check inter 200ms rise 2 fall 2
    server unchecked 127.0.0.1:{port}
"""
    )
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stdout=output, stderr=subprocess.STDOUT)
    client = HaproxyClient(f"unix://{socket_path}", "app", timeout=3)
    try:
        _wait(
            lambda: socket_path.exists() and client.server("checked").up,
            f"HAProxy to start and see `checked` UP ({log})",
        )
        yield client
    finally:
        process.terminate()
        process.wait(timeout=10)
        app.shutdown()
        app.server_close()


def _wait(condition: object, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001, S110 - not ready yet; the deadline bounds it
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_after_a_recheck_up_comes_only_from_new_checks(haproxy: HaproxyClient) -> None:
    haproxy.set_state("checked", "drain")
    assert haproxy.recheck("checked") is True
    forgotten = haproxy.server("checked")
    assert not forgotten.up and forgotten.drained  # what HAProxy saw before counts no more; still drained
    _wait(lambda: haproxy.server("checked").up, "two passing checks of what runs now")
    assert haproxy.server("checked").drained  # a recheck never puts a server back in rotation


def test_a_server_without_a_health_check_says_so_and_stays_as_it_was(haproxy: HaproxyClient) -> None:
    assert haproxy.recheck("unchecked") is False
    assert haproxy.server("unchecked").in_rotation
