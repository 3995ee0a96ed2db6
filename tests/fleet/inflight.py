"""Requests held in flight through the LB, on every instance, for the tests that need one at
a drain for certain (round robin and the load generator's own slow requests only make it likely)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import requests

from compose_rollout.testbed import Testbed, TestbedError


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll observed state; a bed query that fails while a container is being replaced is "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except TestbedError:
            pass
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class SlowRequests:
    """Slow requests through the LB, sent one at a time until every instance has one in
    flight. Round robin alone does not promise one per instance (a server that the LB
    just re-checked, or the robin's position, can send two to one), so each request is
    sent only after the previous one is seen in flight, until the LB shows a request in
    flight on every instance (through HAProxy, to an instance that has none)."""

    def __init__(self, bed: Testbed, seconds: int, timeout: float = 30, lb: str = "haproxy") -> None:
        url = f"{bed.lb_url_of(lb)}/cgi-bin/slow?{seconds}"
        self._lb = lb
        limit = 3 * len(bed.instances)
        self._pool = ThreadPoolExecutor(max_workers=limit)
        self._sent: list[Future[int]] = []
        # Every instance healthy and UP first: a container recreated just before (a fixture's)
        # can still be marked DOWN by HAProxy's next checks, and round robin skips it then.
        bed.wait_all_up()
        deadline = time.monotonic() + timeout
        try:
            while not all(n > 0 for n in self._in_flight(bed).values()):
                if len(self._sent) >= limit or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{len(self._sent)} slow requests never reached every instance: {self._in_flight(bed)}; "
                        f"the LB's view: {bed.lb_view(lb)}"
                    )
                self._send_and_see_it_land(bed, url, seconds)
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def _send_and_see_it_land(self, bed: Testbed, url: str, seconds: int) -> None:
        in_flight = self._in_flight(bed)
        before = sum(in_flight.values())
        # Through HAProxy, the instances that have one are drained while this one is sent, so it
        # goes to one that has none: round robin alone twice skipped a server that was UP, 9
        # times in a row, late in the suite (cause not found).
        covered = [name for name, n in in_flight.items() if n > 0] if self._lb == "haproxy" else []
        for name in covered:
            bed.set_server_state(name, "drain")
        try:
            self._sent.append(self._pool.submit(lambda: requests.get(url, timeout=seconds + 60).status_code))
            wait_until(lambda: sum(self._in_flight(bed).values()) > before, "a slow request in flight", timeout=10)
        finally:
            for name in covered:
                bed.set_server_state(name, "ready")

    def _in_flight(self, bed: Testbed) -> dict[str, int]:
        return bed.in_flight(self._lb)

    def codes(self, timeout: float = 120) -> list[int]:
        """Each request's status code, once all have ended."""
        try:
            return [sent.result(timeout=timeout) for sent in self._sent]
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
