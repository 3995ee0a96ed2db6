"""Steps that converge on a state retry twice on transient errors, never on bad input
(real Prefect task runs; the load balancer is a fake that fails on cue)."""

from __future__ import annotations

import pytest
from prefect import flow

from compose_rollout.context import Context
from compose_rollout.errors import ConfigError, LoadBalancerError, StepFailed
from compose_rollout.state.journal import InstanceRecord, Ledger
from compose_rollout.tasks import steps
from tests.unit.fakes import FakeClock, FakeHost, FakeLB, fleet

pytestmark = pytest.mark.usefixtures("prefect_server")


class FlakyLB(FakeLB):
    """Refuses `set_state` with the given errors, one per call, then works."""

    def __init__(self, names: list[str], failures: list[Exception]) -> None:
        super().__init__(names)
        self.failures = failures
        self.attempts = 0

    def set_state(self, server: str, state: str) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        super().set_state(server, state)


def drain_once(failures: list[Exception]) -> tuple[FlakyLB, BaseException | None]:
    the_fleet = fleet()
    lb = FlakyLB([i.lb_server for i in the_fleet.instances], failures)
    hosts = {i.name: FakeHost(i.name) for i in the_fleet.instances}
    ctx = Context(fleet=the_fleet, hosts=hosts, lb=lb, clock=FakeClock())  # type: ignore[arg-type]
    ledger = Ledger("demo", "run-1", "app:v2")
    ledger.add(InstanceRecord("app-1", "/srv/app-1/docker-compose.yml", "app:v1", "sha256:" + "a" * 64, b"x", 0o644))

    @flow(name="drain-once")
    def run() -> None:
        steps.drain(ctx, "app-1", ledger)

    try:
        run()
    except (RuntimeError, StepFailed, LoadBalancerError, ConfigError) as error:
        return lb, error
    return lb, None


@pytest.mark.timeout(120)
def test_a_transient_error_is_retried_and_the_step_succeeds() -> None:
    lb, error = drain_once([LoadBalancerError("HAProxy admin socket unreachable")] * 2)
    assert error is None and lb.attempts == 3 and lb.servers_["app-1"].admin == "drain"


@pytest.mark.timeout(120)
def test_retries_are_bounded() -> None:
    lb, error = drain_once([LoadBalancerError("HAProxy admin socket unreachable")] * 5)
    assert isinstance(error, LoadBalancerError) and lb.attempts == 3


@pytest.mark.timeout(120)
def test_bad_input_is_never_retried() -> None:
    lb, error = drain_once([ConfigError("instances[0].lb_server: no such server")])
    assert isinstance(error, ConfigError) and lb.attempts == 1
