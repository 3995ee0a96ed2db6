"""Load through the load balancer with a latency for every request.

`compose_rollout.testbed.traffic` counts outcomes per second but keeps no latencies, and the
benchmarks need p50/p99 per time window (steady state vs. during a rollout) and a
request-rate/error curve at sub-second resolution for the timeline plot. This module
generates the same kind of load (fast ``GET /`` loops plus slow ``/cgi-bin/slow?N``
requests always in flight) and records, per request, when it started, how long it
took and whether it failed. Like the project's generator it runs in its own process,
so a busy orchestrator cannot stall the measurement (and vice versa).

    python -m bench.load --url http://127.0.0.1:18080 --out load.json --duration-seconds 600

From Python: ``LoadRun(url).start()`` ... ``.stop()`` returns a ``LoadResult``.
Only loopback targets are accepted (see ``check_loopback_url``).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from compose_rollout.testbed.traffic import check_loopback_url

READY_LINE = "bench-load: started"
MAX_RECORDED_ERRORS = 50


@dataclass
class LoadResult:
    """Every request of one load run, as parallel columns (compact to store and slice).

    ``start`` is a Unix timestamp, ``latency`` seconds, ``slow`` marks the slow
    requests, ``ok`` is False for any exception or non-200 answer (and for requests
    abandoned at shutdown, whose latency is then the time they were left in flight).
    """

    url: str
    start: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    slow: list[bool] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "start": self.start,
            "latency": self.latency,
            "slow": self.slow,
            "ok": self.ok,
            "errors": self.errors,
            "versions": self.versions,
        }

    @classmethod
    def load(cls, path: Path) -> LoadResult:
        data = json.loads(path.read_text())
        return cls(**data)

    def window(self, begin: float, end: float) -> WindowStats:
        """Statistics of the requests that *started* in [begin, end)."""
        chosen = [i for i, t in enumerate(self.start) if begin <= t < end]
        fast = sorted(self.latency[i] for i in chosen if not self.slow[i] and self.ok[i])
        return WindowStats(
            seconds=max(0.0, end - begin),
            total=len(chosen),
            failed=sum(1 for i in chosen if not self.ok[i]),
            slow_total=sum(1 for i in chosen if self.slow[i]),
            slow_failed=sum(1 for i in chosen if self.slow[i] and not self.ok[i]),
            p50_ms=percentile(fast, 50) * 1000,
            p99_ms=percentile(fast, 99) * 1000,
            max_ms=(fast[-1] * 1000) if fast else 0.0,
        )

    def failures_between(self, begin: float, end: float) -> int:
        """Failed requests that started in [begin, end)."""
        return sum(1 for t, good in zip(self.start, self.ok, strict=True) if begin <= t < end and not good)

    def rate_series(self, begin: float, end: float, bin_seconds: float) -> tuple[list[float], list[int], list[int]]:
        """(bin start relative to `begin`, ok completions, failed completions) per bin,
        binned by completion time, which is when a client sees the outcome."""
        count = max(1, int((end - begin) / bin_seconds) + 1)
        good, bad = [0] * count, [0] * count
        for t, lat, success in zip(self.start, self.latency, self.ok, strict=True):
            index = int((t + lat - begin) / bin_seconds)
            if 0 <= index < count:
                (good if success else bad)[index] += 1
        return [i * bin_seconds for i in range(count)], good, bad


@dataclass(frozen=True)
class WindowStats:
    """Requests started in one time window; latencies of successful fast requests."""

    seconds: float
    total: int
    failed: int
    slow_total: int
    slow_failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def per_second(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-pct * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


class _Recorder:
    """Thread-safe columns of request outcomes."""

    def __init__(self, url: str) -> None:
        self.result = LoadResult(url=url)
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[float, bool, str]] = {}
        self._next = 0
        self.first = threading.Event()

    def begin(self, slow: bool, path: str) -> tuple[int, float]:
        now = time.time()
        with self._lock:
            token = self._next
            self._next += 1
            self._in_flight[token] = (now, slow, path)
        return token, now

    def end(self, token: int, error: str | None, body: str | None) -> None:
        now = time.time()
        with self._lock:
            entry = self._in_flight.pop(token, None)
            if entry is None:  # already counted as abandoned by finish()
                return
            started, slow, path = entry
            r = self.result
            r.start.append(started)
            r.latency.append(now - started)
            r.slow.append(slow)
            r.ok.append(error is None)
            if error is not None and len(r.errors) < MAX_RECORDED_ERRORS:
                r.errors.append({"time": now, "path": path, "error": error})
            if error is None and not slow and body is not None:
                version = body.strip()
                r.versions[version] = r.versions.get(version, 0) + 1
        self.first.set()

    def finish(self) -> LoadResult:
        """Close the books: requests still in flight count as failed."""
        now = time.time()
        with self._lock:
            for started, slow, path in self._in_flight.values():
                self.result.start.append(started)
                self.result.latency.append(now - started)
                self.result.slow.append(slow)
                self.result.ok.append(False)
                self.result.errors.append({"time": now, "path": path, "error": "abandoned at shutdown"})
            self._in_flight.clear()
            return self.result


def _worker(
    base: str, path: str, slow: bool, timeout: tuple[float, float], pause: float, stop: threading.Event, rec: _Recorder
) -> None:
    """One client loop: GET base+path, record, pause; until `stop` is set."""
    session = requests.Session()
    session.trust_env = False  # loopback load never goes through a proxy from the environment
    try:
        while not stop.is_set():
            token, _ = rec.begin(slow, path)
            try:
                response = session.get(base + path, timeout=timeout)
                if response.status_code == 200:
                    rec.end(token, None, response.text)
                else:
                    rec.end(token, f"HTTP {response.status_code}", None)
            except requests.RequestException as error:
                rec.end(token, f"{type(error).__name__}: {str(error)[:200]}", None)
            if pause > 0:
                stop.wait(pause)  # a rate limit that ends at once on stop
    finally:
        session.close()


def run_load(
    url: str,
    *,
    out: Path,
    duration_seconds: float,
    fast_workers: int,
    slow_workers: int,
    slow_seconds: int,
    fast_interval_seconds: float,
    request_timeout_seconds: float = 10.0,
) -> LoadResult:
    """Generate load until SIGTERM or the duration, let requests in flight finish
    (bounded), write the result JSON to `out`. Call from the main thread."""
    base = check_loopback_url(url)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rec = _Recorder(base)
    fast_timeout = (2.0, request_timeout_seconds)
    slow_timeout = (2.0, slow_seconds + request_timeout_seconds)
    threads = [
        threading.Thread(
            target=_worker,
            args=(base, "/", False, fast_timeout, fast_interval_seconds, stop, rec),
            daemon=True,
        )
        for _ in range(fast_workers)
    ] + [
        threading.Thread(
            target=_worker,
            args=(base, f"/cgi-bin/slow?{slow_seconds}", True, slow_timeout, 0.0, stop, rec),
            daemon=True,
        )
        for _ in range(slow_workers)
    ]
    deadline = time.monotonic() + duration_seconds
    for thread in threads:
        thread.start()
    rec.first.wait(min(10.0, duration_seconds))
    print(READY_LINE, flush=True)
    stop.wait(max(0.0, deadline - time.monotonic()))
    stop.set()
    join_deadline = time.monotonic() + sum(slow_timeout) + 2
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.monotonic()))
    result = rec.finish()
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(out.name + ".tmp")
    temp.write_text(json.dumps(result.to_dict()))
    os.replace(temp, out)
    return result


@dataclass
class LoadRun:
    """`python -m bench.load` as a child process: start(), then stop() -> LoadResult."""

    url: str
    fast_workers: int = 4
    slow_workers: int = 3
    slow_seconds: int = 3
    fast_interval_seconds: float = 0.02
    max_seconds: float = 1800.0
    process: subprocess.Popen[str] | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def out(self) -> Path:
        assert self._dir is not None
        return Path(self._dir.name) / "load.json"

    def start(self, timeout: float = 30.0) -> None:
        """Spawn the generator; return once load flows (bounded by `timeout`)."""
        check_loopback_url(self.url)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-load-")
        argv = [
            sys.executable, "-m", "bench.load", "--url", self.url, "--out", str(self.out),
            "--duration-seconds", str(self.max_seconds), "--fast-workers", str(self.fast_workers),
            "--slow-workers", str(self.slow_workers), "--slow-seconds", str(self.slow_seconds),
            "--fast-interval-seconds", str(self.fast_interval_seconds),
        ]  # fmt: skip
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.kill()
                    raise RuntimeError(f"load generator did not start within {timeout} s")
                line = self.process.stdout.readline()
                if READY_LINE in line:
                    return
                if line == "":
                    raise RuntimeError(f"load generator exited with {self.process.wait(10)} before starting")

    def stop(self) -> LoadResult:
        """SIGTERM, wait (bounded) for the in-flight requests and the result."""
        assert self.process is not None and self._dir is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.slow_seconds + 30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("load generator did not stop within its bound") from None
        if self.process.stdout is not None:
            self.process.stdout.close()
        if code != 0 or not self.out.exists():
            raise RuntimeError(f"load generator exited with {code} and no result")
        result = LoadResult.load(self.out)
        self._dir.cleanup()
        return result

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration-seconds", type=float, required=True, help="hard bound on the run")
    parser.add_argument("--fast-workers", type=int, default=4)
    parser.add_argument("--slow-workers", type=int, default=3)
    parser.add_argument("--slow-seconds", type=int, default=3)
    parser.add_argument("--fast-interval-seconds", type=float, default=0.02)
    args = parser.parse_args(argv)
    run_load(
        args.url,
        out=args.out,
        duration_seconds=args.duration_seconds,
        fast_workers=args.fast_workers,
        slow_workers=args.slow_workers,
        slow_seconds=args.slow_seconds,
        fast_interval_seconds=args.fast_interval_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
