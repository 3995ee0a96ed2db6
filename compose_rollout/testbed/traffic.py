"""Load generator through the load balancer, to prove a rollout drops nothing.

Run as a separate process (so a stalled or killed orchestrator cannot stall
the measurement, and the measurement cannot hide the orchestrator's bugs):

    python -m compose_rollout.testbed.traffic --url http://127.0.0.1:18080 \\
        --duration-seconds 120 --out results.json

Fast workers GET ``/`` in a loop; slow workers GET ``/cgi-bin/slow?N``, which
holds a request in flight for N seconds, so a rollout that stops a container
before it is drained shows up as failures. A failure is any exception or any
status other than 200. On SIGTERM (or when the duration is over) no new
requests start, the ones in flight finish (bounded), the JSON result is
written and the process exits.

From Python, ``Traffic(url).start()`` spawns that process and ``stop()``
returns a ``TrafficResult``. Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests

MAX_RECORDED_FAILURES = 50
FAST_PATH = "/"
READY_LINE = "traffic: started"


@dataclass
class TrafficResult:
    """What a traffic run saw. Times are Unix timestamps (seconds)."""

    url: str
    total: int = 0
    failed: int = 0
    fast_ok: int = 0
    fast_failed: int = 0
    slow_ok: int = 0
    slow_failed: int = 0
    # The first MAX_RECORDED_FAILURES failures: {"time", "path", "error"}.
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Count of 200 responses to "/" per body (the version string: v1, v2, ...).
    versions: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    ended_at: float = 0.0
    # One entry per second since started_at: {"t": second, "ok": n, "failed": n}.
    per_second: list[dict[str, int]] = field(default_factory=list)
    # Requests still in flight when the shutdown deadline passed (counted as failed).
    abandoned: int = 0
    # Requests sent again, once, on a new connection because the LB closed the idle
    # kept-alive connection they were sent on before answering (what browsers and most
    # HTTP clients do for a GET, RFC 9110 9.2.2). An LB that reloads its configuration
    # (nginx, Caddy) closes idle client connections; HAProxy's runtime API never does.
    # A retried request that then succeeded is not counted as failed.
    retried: int = 0

    @property
    def ok(self) -> int:
        """Number of successful requests."""
        return self.total - self.failed

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-serialisable data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrafficResult:
        """Rebuild a result from ``to_dict()`` data (unknown keys ignored)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: Path) -> TrafficResult:
        """Read a result JSON file written by the traffic process."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_loopback_url(url: str) -> str:
    """Return ``url`` if it is plain http to a loopback address, else raise
    ValueError: this generator must never send load anywhere else."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"traffic URL must be http://<loopback>:port, got {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"traffic URL host must be a loopback IP address, got {host!r}") from None
        if not address.is_loopback:
            raise ValueError(f"traffic URL host {host} is not a loopback address")
    return url.rstrip("/")


class _Recorder:
    """Thread-safe tally of request outcomes."""

    def __init__(self, url: str) -> None:
        self.result = TrafficResult(url=url, started_at=time.time())
        self._lock = threading.Lock()
        self._buckets: dict[int, list[int]] = {}
        self.first_outcome = threading.Event()
        self.in_flight = 0
        self._closed = False

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def retry(self) -> None:
        with self._lock:
            self.result.retried += 1

    def record(self, *, slow: bool, path: str, error: str | None, body: str | None = None) -> None:
        now = time.time()
        with self._lock:
            if self._closed:
                # finish() already counted this request as abandoned.
                return
            self.in_flight -= 1
            r = self.result
            r.total += 1
            bucket = self._buckets.setdefault(int(now - r.started_at), [0, 0])
            if error is None:
                bucket[0] += 1
                if slow:
                    r.slow_ok += 1
                else:
                    r.fast_ok += 1
                    if body is not None:
                        version = body.strip()
                        r.versions[version] = r.versions.get(version, 0) + 1
            else:
                bucket[1] += 1
                r.failed += 1
                if slow:
                    r.slow_failed += 1
                else:
                    r.fast_failed += 1
                if len(r.failures) < MAX_RECORDED_FAILURES:
                    r.failures.append({"time": now, "path": path, "error": error})
        self.first_outcome.set()

    def finish(self) -> TrafficResult:
        with self._lock:
            self._closed = True
            r = self.result
            r.ended_at = time.time()
            # Requests that never returned before the deadline did not succeed.
            r.abandoned = self.in_flight
            r.total += self.in_flight
            r.failed += self.in_flight
            last = max(self._buckets, default=-1)
            r.per_second = [
                {"t": t, "ok": self._buckets.get(t, [0, 0])[0], "failed": self._buckets.get(t, [0, 0])[1]}
                for t in range(last + 1)
            ]
            return r


def _closed_before_answer(error: requests.ConnectionError) -> bool:
    """The server closed the connection before any byte of an answer (not a refused or
    timed-out connection): the request may be sent again on a new one."""
    text = str(error)
    return "RemoteDisconnected" in text or "Connection reset by peer" in text or "BadStatusLine" in text


def _worker(
    base_url: str,
    path: str,
    *,
    slow: bool,
    timeout: tuple[float, float],
    pause: float,
    stop: threading.Event,
    recorder: _Recorder,
) -> None:
    session = requests.Session()
    # Never route loopback load through a proxy from the environment.
    session.trust_env = False
    kept_alive = False  # the last response left its connection open for the next request
    try:
        while not stop.is_set():
            recorder.begin()
            try:
                try:
                    response = session.get(base_url + path, timeout=timeout)
                except requests.ConnectionError as exc:
                    if not (kept_alive and _closed_before_answer(exc)):
                        raise
                    recorder.retry()
                    session.close()  # a new connection, as a browser's retry would open
                    response = session.get(base_url + path, timeout=timeout)
                kept_alive = response.headers.get("Connection", "").lower() != "close"
                body = response.text
                if response.status_code == 200:
                    recorder.record(slow=slow, path=path, error=None, body=body)
                else:
                    recorder.record(slow=slow, path=path, error=f"HTTP {response.status_code}: {body.strip()[:100]}")
            except requests.RequestException as exc:
                kept_alive = False
                recorder.record(slow=slow, path=path, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if pause > 0:
                # Rate limit that ends at once when the run is stopped.
                stop.wait(pause)
    finally:
        session.close()


def run_traffic(
    url: str,
    *,
    duration_seconds: float,
    out: Path,
    fast_workers: int = 4,
    slow_workers: int = 3,
    slow_seconds: int = 3,
    fast_interval_seconds: float = 0.02,
    request_timeout_seconds: float = 10.0,
    announce: bool = False,
) -> TrafficResult:
    """Generate load until SIGTERM/SIGINT or ``duration_seconds``, let the
    requests in flight finish (bounded), write the JSON result to ``out`` and
    return it. Installs signal handlers, so call it from the main thread."""
    base_url = check_loopback_url(url)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    recorder = _Recorder(base_url)
    slow_path = f"/cgi-bin/slow?{slow_seconds}"
    fast_timeout = (2.0, request_timeout_seconds)
    # A slow request legitimately takes slow_seconds before its first byte.
    slow_timeout = (2.0, slow_seconds + request_timeout_seconds)
    threads = [
        threading.Thread(
            target=_worker,
            name=f"fast-{i}",
            args=(base_url, FAST_PATH),
            kwargs=dict(slow=False, timeout=fast_timeout, pause=fast_interval_seconds, stop=stop, recorder=recorder),
            daemon=True,
        )
        for i in range(fast_workers)
    ] + [
        threading.Thread(
            target=_worker,
            name=f"slow-{i}",
            args=(base_url, slow_path),
            kwargs=dict(slow=True, timeout=slow_timeout, pause=0.0, stop=stop, recorder=recorder),
            daemon=True,
        )
        for i in range(slow_workers)
    ]
    deadline = time.monotonic() + duration_seconds
    for thread in threads:
        thread.start()
    if announce:
        # Tell the parent that load is flowing: after the first outcome, or
        # after a bound so a dead target does not hang the parent's start().
        recorder.first_outcome.wait(min(10.0, duration_seconds))
        print(READY_LINE, flush=True)
    # Signal handlers run in this thread and set the event, ending this wait.
    stop.wait(max(0.0, deadline - time.monotonic()))
    stop.set()

    # In-flight requests end on their own within their timeouts.
    join_deadline = time.monotonic() + slow_timeout[0] + slow_timeout[1] + 5
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.monotonic()))
    result = recorder.finish()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2))
    # Atomic: a reader never sees a half-written file.
    os.replace(tmp, out)
    return result


class Traffic:
    """Runs ``python -m compose_rollout.testbed.traffic`` as a child process.

    Use start() then stop() (or wait() for a run to end at its duration), or
    as a context manager (stop() on exit; the result is in ``.result``).

    Slow requests last 1 s unless asked otherwise: each slow worker always has one in
    flight, so a drain meets them as often as it would meet longer ones, and every drain
    and every stop waits less for them (the demo asks for 3 s, to make them visible)."""

    def __init__(
        self,
        url: str,
        *,
        duration_seconds: float = 600,
        fast_workers: int = 4,
        slow_workers: int = 3,
        slow_seconds: int = 1,
        fast_interval_seconds: float = 0.02,
        request_timeout_seconds: float = 10.0,
        out: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.url = check_loopback_url(url)
        self.duration_seconds = duration_seconds
        self.fast_workers = fast_workers
        self.slow_workers = slow_workers
        self.slow_seconds = slow_seconds
        self.fast_interval_seconds = fast_interval_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if out is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="compose-rollout-traffic-")
            out = Path(self._tmpdir.name) / "traffic.json"
        self.out = Path(out)
        self.python = python
        self.process: subprocess.Popen[str] | None = None
        self.result: TrafficResult | None = None

    def _shutdown_bound(self) -> float:
        # What the child may need after being told to stop: the slowest
        # request's timeout plus the join margin, plus interpreter exit.
        return 2.0 + self.slow_seconds + self.request_timeout_seconds + 15.0

    def start(self, timeout: float = 30.0) -> None:
        """Spawn the load generator and return once it reports load flowing."""
        if self.process is not None:
            raise RuntimeError("traffic already started")
        self.out.unlink(missing_ok=True)
        argv = [
            self.python,
            "-m",
            "compose_rollout.testbed.traffic",
            "--url",
            self.url,
            "--duration-seconds",
            str(self.duration_seconds),
            "--out",
            str(self.out),
            "--fast-workers",
            str(self.fast_workers),
            "--slow-workers",
            str(self.slow_workers),
            "--slow-seconds",
            str(self.slow_seconds),
            "--fast-interval-seconds",
            str(self.fast_interval_seconds),
            "--request-timeout-seconds",
            str(self.request_timeout_seconds),
            "--announce",
        ]
        env = dict(os.environ)
        # The child must import this very package, installed or not.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            line = ""
            while READY_LINE not in line:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self._kill()
                    raise RuntimeError(f"traffic generator did not start within {timeout}s")
                line = self.process.stdout.readline()
                if line == "":
                    code = self.process.wait(timeout=10)
                    raise RuntimeError(f"traffic generator exited with code {code} before starting")

    def stop(self) -> TrafficResult:
        """SIGTERM the generator, wait (bounded) for it to finish its
        in-flight requests and write its result, and return the result."""
        process = self._require_process()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        return self._collect(self._shutdown_bound())

    def wait(self, timeout: float | None = None) -> TrafficResult:
        """Wait for a run to end by itself at its duration and return the result."""
        bound = self.duration_seconds + self._shutdown_bound() if timeout is None else timeout
        return self._collect(bound)

    def _require_process(self) -> subprocess.Popen[str]:
        if self.process is None:
            raise RuntimeError("traffic not started")
        return self.process

    def _collect(self, timeout: float) -> TrafficResult:
        process = self._require_process()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RuntimeError(f"traffic generator did not finish within {timeout}s") from None
        if process.stdout is not None:
            process.stdout.close()
        if code != 0 or not self.out.exists():
            raise RuntimeError(f"traffic generator exited with code {code} without a result at {self.out}")
        self.result = TrafficResult.load(self.out)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
        return self.result

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Traffic:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            if exc_type is None:
                self.stop()
            else:
                self._kill()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m compose_rollout.testbed.traffic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--url", required=True, help="load balancer URL on a loopback address")
    parser.add_argument("--duration-seconds", type=float, required=True, help="hard bound on the run")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--fast-workers", type=int, default=4)
    parser.add_argument("--slow-workers", type=int, default=3)
    parser.add_argument("--slow-seconds", type=int, default=3)
    parser.add_argument(
        "--fast-interval-seconds", type=float, default=0.02, help="pause between two fast requests of one worker"
    )
    parser.add_argument("--request-timeout-seconds", type=float, default=10.0)
    parser.add_argument("--announce", action="store_true", help=f"print {READY_LINE!r} once load flows")
    args = parser.parse_args(argv)
    try:
        check_loopback_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    result = run_traffic(
        args.url,
        duration_seconds=args.duration_seconds,
        out=args.out,
        fast_workers=args.fast_workers,
        slow_workers=args.slow_workers,
        slow_seconds=args.slow_seconds,
        fast_interval_seconds=args.fast_interval_seconds,
        request_timeout_seconds=args.request_timeout_seconds,
        announce=args.announce,
    )
    print(
        f"traffic: {result.total} requests, {result.failed} failed, {result.retried} retried, "
        f"versions {result.versions}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
