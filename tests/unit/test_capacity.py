"""The test bed's capacity measure: which HAProxy `status` values count as taking requests,
and the time spent below a count, with a fake `show stat` and a fake clock."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import pytest

from compose_rollout.testbed import TestbedError
from compose_rollout.testbed.capacity import CapacitySampler, Sample, seconds_below, takes_requests


@pytest.mark.parametrize(
    ("status", "weight", "taking"),
    [
        ("UP", "1", True),
        ("UP 1/2", "1", True),  # going down: HAProxy still sends it requests
        ("no check", "1", True),
        ("UP", "0", False),  # weight 0: HAProxy says UP and sends nothing
        ("DRAIN", "1", False),
        ("DRAIN 1/2", "1", False),
        ("NOLB", "1", False),
        ("MAINT", "1", False),
        ("MAINT (resolution)", "1", False),
        ("MAINT(via)", "1", False),
        ("DOWN", "1", False),
        ("DOWN 1/2", "1", False),  # going up: not in rotation yet
        ("DOWN (agent)", "1", False),
        ("UPPER", "1", False),
    ],
)
def test_a_server_takes_requests_only_when_haproxy_would_send_it_some(status: str, weight: str, taking: bool) -> None:
    assert takes_requests({"status": status, "weight": weight}) is taking


def test_a_row_without_a_weight_is_judged_by_its_status() -> None:
    assert takes_requests({"status": "UP", "weight": ""}) and not takes_requests({"status": "DRAIN"})


def _sample(at: float, *serving: str) -> Sample:
    return Sample(at, frozenset(serving))


def test_seconds_below_holds_each_count_until_the_next_sample() -> None:
    samples = [
        _sample(0.0, "a", "b", "c"),
        _sample(1.0, "a", "b"),  # 1.0 -> 1.5 below 3
        _sample(1.5, "a"),  # 1.5 -> 3.5 below 3, and below 2
        _sample(3.5, "a", "b", "c", "a-surge"),
        _sample(4.0, "a", "b"),  # the last sample holds for no time
    ]
    assert seconds_below(samples, 3) == pytest.approx(2.5)
    assert seconds_below(samples, 2) == pytest.approx(2.0)
    assert seconds_below(samples, 1) == 0
    assert seconds_below([], 3) == 0


class FakeStat:
    """`show stat` rows by server name, played back one answer per call (the last repeats);
    an exception in the script is raised instead, as a refused connection would be."""

    def __init__(self, *answers: Mapping[str, str] | Exception) -> None:
        self._answers = list(answers)
        self.calls = 0

    def __call__(self, backend: str) -> dict[str, dict[str, str]]:
        assert backend == "app"
        answer = self._answers[min(self.calls, len(self._answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return {name: {"status": status, "weight": "1"} for name, status in answer.items()}


def _clock() -> Iterator[float]:
    tick = 0.0
    while True:
        yield tick
        tick += 0.5


def test_samples_record_the_servers_taking_requests_and_skip_failed_queries() -> None:
    stat = FakeStat(
        {"app-1": "UP", "app-2": "UP"},
        {"app-1": "UP", "app-2": "UP", "app-1-surge": "DRAIN"},
        ConnectionRefusedError("admin socket down"),
        {"app-1": "DRAIN", "app-2": "UP", "app-1-surge": "UP"},
        {"app-1": "DOWN", "app-2": "UP", "app-1-surge": "UP"},
        {"app-1": "UP", "app-2": "UP", "app-1-surge": "UP"},
    )
    ticks = _clock()
    capacity = CapacitySampler(stat, "app", clock=lambda: next(ticks))
    for _ in range(6):
        capacity.sample()
    assert [sample.count for sample in capacity.samples] == [2, 2, 2, 2, 3]
    assert capacity.minimum == 2 and capacity.maximum == 3
    assert capacity.ever_serving("app-1-surge") and not capacity.ever_serving("app-3")
    assert capacity.lowest().serving == {"app-1", "app-2"}
    assert capacity.seconds_below(3) == pytest.approx(2.0)  # from 0.0 until the sample at 2.0
    assert capacity.errors == ["ConnectionRefusedError: admin socket down"]


def test_a_sampler_without_a_sample_says_so_instead_of_a_minimum() -> None:
    capacity = CapacitySampler(FakeStat(ConnectionRefusedError("down")), "app")
    capacity.sample()
    with pytest.raises(TestbedError, match="no sample of backend app was taken"):
        _ = capacity.minimum


def test_the_sampler_samples_in_the_background_between_start_and_stop() -> None:
    stat = FakeStat({"app-1": "UP"})
    deadline = time.monotonic() + 10
    with CapacitySampler(stat, "app", interval=0.001) as capacity:
        while stat.calls < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
    taken = stat.calls
    assert len(capacity.samples) == taken >= 5
    capacity.stop()  # idempotent: no sample after the end
    assert stat.calls == taken
