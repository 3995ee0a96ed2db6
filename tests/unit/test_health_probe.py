"""The health probe talks to the instance itself: no proxy, no ~/.netrc credentials."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from compose_rollout.context import http_health


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]
    status = 200

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _serve(status: int) -> tuple[ThreadingHTTPServer, list[tuple[str, str | None]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen, "status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.fixture
def instance_and_proxy() -> Iterator[tuple[str, list[tuple[str, str | None]], str, list[tuple[str, str | None]]]]:
    instance, at_instance = _serve(200)
    proxy, at_proxy = _serve(502)  # a proxy that answers for everyone: a probe through it would "fail"
    try:
        yield (
            f"http://127.0.0.1:{instance.server_address[1]}/health",
            at_instance,
            (f"http://127.0.0.1:{proxy.server_address[1]}"),
            at_proxy,
        )
    finally:
        for server in (instance, proxy):
            server.shutdown()
            server.server_close()


def test_the_probe_ignores_proxy_settings_and_netrc(
    instance_and_proxy: tuple[str, list[tuple[str, str | None]], str, list[tuple[str, str | None]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, at_instance, proxy, at_proxy = instance_and_proxy
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login deploy password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))

    assert http_health(url, timeout=5) == (True, "HTTP 200")
    assert at_proxy == []
    assert at_instance == [("/health", None)]  # reached directly, and no password sent
