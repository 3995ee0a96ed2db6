"""How many servers the load balancer sends requests to, sampled while a rollout runs.

    with CapacitySampler(bed.admin, bed.lb_backend) as capacity:
        rolling_deploy(...)
    assert capacity.minimum >= len(bed.instances)
    lost = capacity.seconds_below(len(bed.instances))  # "capacity lost", in seconds

A background thread asks HAProxy `show stat` every 50 ms and records, per sample, the
servers of the backend that are *taking requests*. From HAProxy's `status` column
(stats.c, `srv_hlt_st`, and the admin states before it) a server takes new requests when:

- `UP`: healthy and ready;
- `UP n/m`: still UP, going down (n of `fall` checks failed): HAProxy keeps sending it
  requests until the last one fails, so it counts; whether they succeed is for the
  traffic generator to tell, not this measure;
- `no check`: no health check, ready: always in rotation;

and its effective `weight` is above 0 (with weight 0 HAProxy still says `UP`, but sends
it nothing). It does not with `DRAIN` (ready for its open sessions only; a drained server
whose check fails shows `DOWN` instead), `NOLB` (up, but out of load balancing), `MAINT`
(any of its variants), `DOWN` and `DOWN n/m` (going up: not yet in rotation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import TracebackType

from ._util import TestbedError

SAMPLE_INTERVAL_SECONDS = 0.05


def takes_requests(row: Mapping[str, str]) -> bool:
    """Whether a server's `show stat` row says HAProxy sends it new requests (module docstring)."""
    status = row.get("status", "")
    in_rotation = status in ("UP", "no check") or status.startswith("UP ")
    weight = row.get("weight", "")
    return in_rotation and (not weight.isdigit() or int(weight) > 0)


@dataclass(frozen=True)
class Sample:
    """One look at the backend: when (time.monotonic()), and which servers took requests."""

    at: float
    serving: frozenset[str]

    @property
    def count(self) -> int:
        return len(self.serving)


def seconds_below(samples: Sequence[Sample], n: int) -> float:
    """Total time with fewer than `n` servers taking requests: each sample's count holds
    until the next sample (the last one holds for no time)."""
    return sum(later.at - sample.at for sample, later in pairwise(samples) if sample.count < n)


class CapacitySampler:
    """Samples the servers of `backend` that take requests, from `start()` (or entering
    the `with` block) to `stop()` (or leaving it). `stat` is what gives the backend's
    `show stat` rows by server name, e.g. `HaproxyAdmin.server_stats`. A sample whose
    query fails (HAProxy restarting, say) is counted in `errors` and not recorded."""

    def __init__(
        self,
        stat: Callable[[str], Mapping[str, Mapping[str, str]]],
        backend: str,
        interval: float = SAMPLE_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stat = stat
        self.backend = backend
        self.interval = interval
        self._clock = clock
        self._samples: list[Sample] = []
        self.errors: list[str] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> Sample | None:
        """Take one sample now and record it (None if HAProxy did not answer)."""
        try:
            rows = self._stat(self.backend)
        except (OSError, RuntimeError) as error:
            with self._lock:
                self.errors.append(f"{type(error).__name__}: {error}")
            return None
        taken = Sample(self._clock(), frozenset(name for name, row in rows.items() if takes_requests(row)))
        with self._lock:
            self._samples.append(taken)
        return taken

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.sample()
            self._stopping.wait(self.interval)

    def start(self) -> None:
        """Take a first sample (so the state before anything happens is known), then
        sample in a background thread."""
        if self._thread is not None:
            raise TestbedError("this CapacitySampler was started already")
        self.sample()
        self._thread = threading.Thread(target=self._run, name=f"capacity-{self.backend}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (after one last sample); idempotent."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        self._thread.join(timeout=10)
        self.sample()

    def __enter__(self) -> CapacitySampler:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def samples(self) -> list[Sample]:
        """The samples so far, oldest first."""
        with self._lock:
            return list(self._samples)

    def _counts(self) -> list[int]:
        counts = [sample.count for sample in self.samples]
        if not counts:
            raise TestbedError(f"no sample of backend {self.backend} was taken; errors: {self.errors[-3:]}")
        return counts

    @property
    def minimum(self) -> int:
        """The fewest servers seen taking requests at once."""
        return min(self._counts())

    @property
    def maximum(self) -> int:
        """The most servers seen taking requests at once (a surge shows one more)."""
        return max(self._counts())

    def seconds_below(self, n: int) -> float:
        """Total time with fewer than `n` servers taking requests (see `seconds_below`)."""
        return seconds_below(self.samples, n)

    def ever_serving(self, server: str) -> bool:
        """Whether any sample saw `server` taking requests."""
        return any(server in sample.serving for sample in self.samples)

    def lowest(self) -> Sample:
        """The first sample with the fewest servers taking requests (for a failure message)."""
        fewest = self.minimum
        return next(sample for sample in self.samples if sample.count == fewest)
