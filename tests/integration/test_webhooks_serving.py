"""The receiver as it is served: `python -m compose_rollout.triggers.webhooks` on 127.0.0.1.

Real sockets against the real process (uvicorn, its protocol, the receiver's bounds).
The Prefect side is a small HTTP server on 127.0.0.1 that records the runs it is asked
to create (the real Prefect server is tests/integration/test_webhooks_prefect.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.prefect_server import clean_env, free_port, spawn, stop, tail

AUTH = "Bearer 6c1d9e0f3a2b4c5d7e8f9a0b1c2d3e4f"
REGISTRY = "registry.example.com:5000"
DEPLOYMENT_ID = "0b9c8d7e-6f5a-4b3c-9d2e-1f0a9b8c7d6e"
ROOT = Path(__file__).resolve().parents[2]


class FakePrefect:
    """Prefect's create_flow_run and flow_runs/filter on a real socket, recording the runs."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.condition = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self.path.endswith("/create_flow_run"):
                    with fake.condition:
                        fake.created.append(body)
                        fake.condition.notify_all()
                    self._answer(201, {"id": str(uuid.uuid4()), "name": "a-run"})
                else:  # flow_runs/filter: nothing is waiting
                    self._answer(200, [])

            def _answer(self, status: int, payload: object) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for_runs(self, count: int, seconds: float = 30) -> list[dict[str, Any]]:
        with self.condition:
            if not self.condition.wait_for(lambda: len(self.created) >= count, seconds):
                pytest.fail(f"expected {count} runs, Prefect was asked for {len(self.created)} in {seconds:g} s")
            return list(self.created)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def envelope(tag: str, digest: str) -> bytes:
    event = {
        "id": str(uuid.uuid4()),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        "action": "push",
        "target": {
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "digest": digest,
            "repository": "acme/app",
            "tag": tag,
        },
        "request": {"host": REGISTRY, "method": "PUT"},
    }
    return json.dumps({"events": [event]}).encode()


HEADERS = {"Authorization": AUTH, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}


class Served:
    """A running receiver process."""

    def __init__(self, port: int, scheme: str, log: Path) -> None:
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.log = log


@pytest.fixture
def prefect() -> Iterator[FakePrefect]:
    fake = FakePrefect()
    yield fake
    fake.close()


@pytest.fixture
def serve_receiver(tmp_path: Path, prefect: FakePrefect) -> Iterator[Callable[..., Served]]:
    """Start `python -m compose_rollout.triggers.webhooks` with the given extra settings."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(verify: ssl.SSLContext | bool = False, **extra: Any) -> Served:
        port = free_port()
        config = {
            "listen_host": "127.0.0.1",
            "listen_port": port,
            "debounce_seconds": 0,
            "prefect": {"api_url": prefect.api, "timeout_seconds": 10},
            "distribution": {"authorization": AUTH},
            "routes": [
                {
                    "repository": f"{REGISTRY}/acme/app",
                    "fleet": "acme",
                    "deployment": DEPLOYMENT_ID,
                    "fleet_file": "/etc/compose-rollout/acme.yaml",
                }
            ],
        } | extra
        workdir = tmp_path / f"receiver-{port}"
        workdir.mkdir()
        (workdir / "webhooks.yaml").write_text(yaml.safe_dump(config))
        log = workdir / "receiver.log"
        argv = [sys.executable, "-m", "compose_rollout.triggers.webhooks", "--config", str(workdir / "webhooks.yaml")]
        # HOME: the default state_directory (~/.local/state/...) lands in the test's directory.
        env = clean_env(PYTHONUNBUFFERED="1", HOME=str(workdir), PYTHONPATH=str(ROOT))
        processes.append(spawn(argv, env, log, cwd=ROOT))
        scheme = "https" if "tls_certfile" in extra else "http"
        served = Served(port, scheme, log)
        deadline = time.monotonic() + 30
        while True:  # polling a starting process for its answer, bounded
            if processes[-1].poll() is not None:
                pytest.fail(f"the receiver exited with {processes[-1].returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{served.url}/healthz", timeout=2, verify=verify).status_code == 200:
                    return served
            except httpx.HTTPError:
                assert time.monotonic() < deadline, f"the receiver did not answer within 30 s:\n{tail(log)}"
                time.sleep(0.1)

    yield start
    for process in processes:
        stop(process)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_peer(connection: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the server closes `connection` within `seconds`, sending it one byte of
    `trickle` every 0.2 s meanwhile (a client that never finishes its request head)."""
    deadline = time.monotonic() + seconds
    for index in range(10**6):
        if time.monotonic() > deadline:
            return False
        readable, _, _ = select.select([connection], [], [], 0.2)  # paces the trickle
        try:
            if readable and connection.recv(4096) == b"":
                return True
            if trickle:
                connection.sendall(trickle[index % len(trickle) : index % len(trickle) + 1])
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


@pytest.mark.timeout(120)
def test_idle_and_slow_header_connections_do_not_block_a_push(
    serve_receiver: Callable[..., Served], prefect: FakePrefect
) -> None:
    # The defaults: 64 requests in progress at most, a 10 s deadline for a request head.
    receiver = serve_receiver()
    stop_trickling = threading.Event()
    with ExitStack() as sockets:
        idle = [sockets.enter_context(closing(_connect(receiver.port))) for _ in range(200)]
        slow = [sockets.enter_context(closing(_connect(receiver.port))) for _ in range(20)]
        for connection in slow:
            connection.sendall(b"POST /hooks/distribution HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

        def trickle() -> None:
            while not stop_trickling.wait(0.2):  # one header byte per socket every 0.2 s
                for connection in slow:
                    try:
                        connection.sendall(b"a")
                    except OSError:
                        pass  # closed by the receiver: what the deadline is for

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            response = httpx.post(
                f"{receiver.url}/hooks/distribution",
                content=envelope("1.4.2", "sha256:" + "1a" * 32),
                headers=HEADERS,
                timeout=10,
            )
        finally:
            stop_trickling.set()
            trickler.join(timeout=10)
        assert response.status_code == 202, response.text
        assert len(idle) == 200
    [run] = prefect.wait_for_runs(1)
    assert run["parameters"]["tag"] == "1.4.2"


@pytest.mark.timeout(120)
def test_a_connection_that_does_not_complete_its_request_head_in_time_is_closed(
    serve_receiver: Callable[..., Served],
) -> None:
    receiver = serve_receiver(header_timeout_seconds=1, keep_alive_seconds=1)
    with closing(_connect(receiver.port)) as idle, closing(_connect(receiver.port)) as slow:
        slow.sendall(b"POST /hooks/distribution HTTP/1.1\r\n")
        assert _closed_by_peer(slow, 30, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
        assert _closed_by_peer(idle, 30)
    # A kept-alive connection: its next request head has the same deadline.
    with closing(_connect(receiver.port)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b" 200 " in kept.recv(4096)
        kept.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_by_peer(kept, 30, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
    # An idle kept-alive connection is closed too.
    with closing(_connect(receiver.port)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b" 200 " in kept.recv(4096)
        assert _closed_by_peer(kept, 30)
    # And the receiver still serves.
    assert httpx.get(f"{receiver.url}/healthz", timeout=10).status_code == 200


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    keyfile.chmod(0o600)
    return certfile, keyfile


@pytest.mark.timeout(120)
def test_with_a_certificate_the_receiver_serves_https_only(
    serve_receiver: Callable[..., Served], prefect: FakePrefect, tmp_path: Path
) -> None:
    certfile, keyfile = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(certfile))
    receiver = serve_receiver(verify=trust, tls_certfile=str(certfile), tls_keyfile=str(keyfile))
    assert receiver.url.startswith("https://")
    push = httpx.post(
        f"{receiver.url}/hooks/distribution",
        content=envelope("1.4.2", "sha256:" + "1a" * 32),
        headers=HEADERS,
        timeout=10,
        verify=trust,
    )
    assert push.status_code == 202
    assert prefect.wait_for_runs(1)[0]["parameters"]["tag"] == "1.4.2"
    # The secret is never accepted in clear on the TLS port: the server drops the connection
    # (seen by the client as a disconnect, or as a reset when the request was still unread).
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError), match=r"disconnected|reset by peer"):
        httpx.post(
            f"http://127.0.0.1:{receiver.port}/hooks/distribution",
            content=envelope("1.4.3", "sha256:" + "2b" * 32),
            headers=HEADERS,
            timeout=10,
        )
    assert len(prefect.created) == 1


def test_a_missing_tls_key_file_stops_the_receiver_before_it_listens(tmp_path: Path) -> None:
    config = {
        "distribution": {"authorization": AUTH},
        "tls_certfile": str(tmp_path / "missing-cert.pem"),
        "tls_keyfile": str(tmp_path / "missing-key.pem"),
        "prefect": {"api_url": "http://127.0.0.1:9/api"},
        "routes": [{"repository": f"{REGISTRY}/acme/app", "fleet": "acme", "deployment": "f/d", "fleet_file": "/x"}],
    }
    (tmp_path / "webhooks.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "compose_rollout.triggers.webhooks", "--config", str(tmp_path / "webhooks.yaml")]
    env = clean_env(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert done.returncode == 2
    assert b"tls_certfile/tls_keyfile:" in done.stderr and b"No such file" in done.stderr
