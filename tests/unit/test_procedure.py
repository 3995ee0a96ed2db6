"""The domain's waits and decisions, with a fake clock, host and LB (instant)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from compose_rollout import procedure
from compose_rollout.context import Context
from compose_rollout.errors import Interrupted, PreflightError, RolloutError, StepFailed, WaitTimeout
from compose_rollout.flows.instance import _step
from compose_rollout.flows.rolling_deploy import batches
from compose_rollout.lb.haproxy import OP_STOPPED
from compose_rollout.state import journal as journal_module
from compose_rollout.state.journal import InstanceRecord, Ledger
from compose_rollout.target import repository_change, target_image
from tests.unit.fakes import FakeClock, FakeHost, FakeLB, container_json, fleet, scripted

NEW, OLD = "sha256:" + "b" * 64, "sha256:" + "a" * 64
COMPOSE = b"""# Terrateam
services:
  server:
    image: registry.example/demo/app:v1   # the only value a rollout changes
    ports: ["8080:8080"]
"""


def make_context(
    probes: list[bool] | None = None, containers: list[str] | None = None, **fleet_overrides: Any
) -> tuple[Context, FakeHost, FakeLB, FakeClock]:
    the_fleet = fleet(**fleet_overrides)
    hosts = {instance.name: FakeHost(instance.name) for instance in the_fleet.instances}
    host = hosts["app-1"]
    host.files["/srv/app-1/docker-compose.yml"] = COMPOSE
    host.on(["docker", "ps"], lambda argv: "c1\n")
    inspections = scripted(containers or [container_json("c1", NEW)])
    host.on(["docker", "container", "inspect"], lambda argv: next(inspections))
    answers = scripted(probes or [True])
    lb = FakeLB([instance.lb_server for instance in the_fleet.instances])
    clock = FakeClock()
    ctx = Context(
        fleet=the_fleet,
        hosts=hosts,  # type: ignore[arg-type]
        lb=lb,  # type: ignore[arg-type]
        clock=clock,
        probe=lambda url, timeout: (next(answers), "HTTP 200"),
    )
    return ctx, host, lb, clock


def make_ledger(ctx: Context) -> Ledger:
    ledger = Ledger("demo", "run-1", "registry.example/demo/app:v2")
    instance = ctx.fleet.instance("app-1")
    ledger.add(InstanceRecord("app-1", instance.compose_path, "registry.example/demo/app:v1", OLD, COMPOSE, 0o640))
    return ledger


def test_health_gate_needs_consecutive_successes_then_a_stable_window() -> None:
    ctx, _, _, clock = make_context(
        probes=[False, True, False, True, True, True], health={"consecutive_successes": 3, "stabilization_seconds": 2}
    )
    seconds = procedure.await_healthy(ctx, ctx.fleet.instance("app-1"), NEW)
    # 6 probes to reach three in a row (0.5 s apart), then 2 s of staying healthy.
    assert seconds == pytest.approx(5 * 0.5 + 2.0)
    assert clock.slept == pytest.approx(seconds)


def test_health_gate_catches_a_flap_inside_the_stabilisation_window() -> None:
    ctx, *_ = make_context(
        probes=[True, True, True, True, False], health={"consecutive_successes": 3, "stabilization_seconds": 5}
    )
    with pytest.raises(RolloutError, match="stabilisation window"):
        procedure.await_healthy(ctx, ctx.fleet.instance("app-1"), NEW)


def test_health_gate_catches_a_container_restarted_after_passing() -> None:
    ctx, *_ = make_context(
        containers=[container_json("c1", NEW)] * 3 + [container_json("c1", NEW, restarts=1)],
        health={"consecutive_successes": 2, "stabilization_seconds": 5},
    )
    with pytest.raises(RolloutError, match="restarted after passing"):
        procedure.await_healthy(ctx, ctx.fleet.instance("app-1"), NEW)


def test_health_gate_refuses_a_healthy_container_on_the_wrong_image() -> None:
    ctx, _, _, clock = make_context(containers=[container_json("c1", OLD)], health={"timeout_seconds": 10})
    with pytest.raises(WaitTimeout) as raised:
        procedure.await_healthy(ctx, ctx.fleet.instance("app-1"), NEW)
    assert "expected image" in str(raised.value) and "10 s" in str(raised.value)
    assert clock.slept == pytest.approx(10, abs=0.5)


def test_wait_for_sessions_returns_once_the_lb_counts_zero() -> None:
    ctx, _, lb, clock = make_context()
    lb.servers_["app-1"].sessions = [3, 2, 1, 0]
    assert procedure.wait_for_sessions(ctx, ctx.fleet.instance("app-1"), make_ledger(ctx)) == 0
    assert clock.slept == pytest.approx(0.3)


def test_drain_timeout_fails_by_default_naming_the_server_and_sessions() -> None:
    ctx, _, lb, _ = make_context(rollout={"drain_timeout_seconds": 5})
    lb.servers_["app-1"].sessions = [2]
    with pytest.raises(WaitTimeout, match="app-1 to finish its sessions") as raised:
        procedure.wait_for_sessions(ctx, ctx.fleet.instance("app-1"), make_ledger(ctx))
    assert "2 sessions" in str(raised.value)
    assert "shutdown" not in " ".join(lb.actions)


def test_drain_timeout_with_proceed_cuts_and_counts_the_sessions() -> None:
    ctx, _, lb, _ = make_context(rollout={"drain_timeout_seconds": 5, "on_drain_timeout": "proceed"})
    lb.servers_["app-1"].sessions = [2]
    ledger = make_ledger(ctx)
    assert procedure.wait_for_sessions(ctx, ctx.fleet.instance("app-1"), ledger) == 2
    assert lb.actions == ["app-1 shutdown"]
    assert ledger["app-1"].sessions_cut == 2


def test_an_interruption_stops_a_long_wait_at_its_next_poll() -> None:
    """A Prefect cancel gives 30 s before the kill: a 130 s drain wait must not run on."""
    ctx, _, lb, clock = make_context(rollout={"drain_timeout_seconds": 130})
    lb.servers_["app-1"].sessions = [1]  # a long request that will not end soon
    original_sleep = clock.sleep

    def sleep(seconds: float) -> None:
        original_sleep(seconds)
        if clock.slept >= 2:
            ctx.interrupt.set()  # Ctrl-C / SIGTERM arrives two seconds into the wait

    clock.sleep = sleep  # type: ignore[method-assign]
    with pytest.raises(Interrupted, match="interrupted"):
        procedure.wait_for_sessions(ctx, ctx.fleet.instance("app-1"), make_ledger(ctx))
    assert clock.slept == pytest.approx(2, abs=0.11)


def test_after_an_interruption_the_rollback_s_waits_end_by_its_deadline_and_never_cut_requests() -> None:
    ctx, _, lb, clock = make_context(rollout={"drain_timeout_seconds": 130, "on_drain_timeout": "proceed"})
    lb.servers_["app-1"].sessions = [1]
    ctx.interrupt.set()
    calm = ctx.for_rollback(5)
    with pytest.raises(WaitTimeout, match=r"waited 5 s for app-1 to finish its sessions \(the run was interrupted\)"):
        procedure.wait_for_sessions(calm, calm.fleet.instance("app-1"), make_ledger(calm))
    assert clock.slept == pytest.approx(5, abs=0.11)
    assert lb.actions == []  # proceed cuts requests only at the drain timeout itself, never here
    assert ctx.for_rollback(None).deadline is None and not ctx.for_rollback(None).interrupt.is_set()


def test_set_image_then_restore_gives_back_the_original_bytes_and_mode() -> None:
    ctx, host, _, _ = make_context()
    ledger = make_ledger(ctx)
    instance = ctx.fleet.instance("app-1")
    new = "registry.example/demo/app:v2@" + "sha256:" + "c" * 64
    procedure.write_compose(ctx, instance, ledger, new)
    written = host.files[instance.compose_path]
    assert written == COMPOSE.replace(b"registry.example/demo/app:v1", new.encode())
    assert ledger["app-1"].file_written
    procedure.restore_compose(ctx, instance, ledger["app-1"])
    assert host.files[instance.compose_path] == COMPOSE
    assert host.modes[instance.compose_path] == 0o640


def test_a_failed_write_leaves_the_original_and_a_rollback_with_nothing_to_rewrite() -> None:
    ctx, host, _, _ = make_context()
    ledger = make_ledger(ctx)
    host.fail_writes = True  # a full disk: every write fails
    with pytest.raises(RolloutError, match="original left intact"):
        procedure.write_compose(ctx, ctx.fleet.instance("app-1"), ledger, "registry.example/demo/app:v2")
    assert host.files["/srv/app-1/docker-compose.yml"] == COMPOSE
    # The ledger recorded the attempt, so a rollback checks the file; it finds the
    # original bytes and does not try to write (which would fail again).
    assert ledger["app-1"].file_written
    procedure.restore_compose(ctx, ctx.fleet.instance("app-1"), ledger["app-1"])
    assert host.files["/srv/app-1/docker-compose.yml"] == COMPOSE


def test_lb_wait_reports_the_last_state_seen() -> None:
    ctx, _, lb, _ = make_context(health={"lb_timeout_seconds": 3})
    lb.servers_["app-1"].op_state = OP_STOPPED
    with pytest.raises(WaitTimeout, match=r"the LB to see app-1 UP.*DOWN"):
        procedure.await_lb_up(ctx, ctx.fleet.instance("app-1"))


def test_release_all_re_enables_every_drained_server_and_only_those() -> None:
    ctx, _, lb, _ = make_context()
    ledger = make_ledger(ctx)
    procedure.drain(ctx, ctx.fleet.instance("app-1"), ledger)
    assert lb.servers_["app-1"].admin == "drain"
    assert procedure.release_all(ctx, ledger) == []
    assert lb.servers_["app-1"].admin == "ready"
    assert lb.actions == ["app-1 drain", "app-1 ready"]


def test_release_all_goes_on_when_the_journal_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator's disk fills during a run: every drained server still goes back."""
    ctx, _, lb, _ = make_context()
    ledger = Ledger("demo", "run-1", "registry.example/demo/app:v2", tmp_path / "run-1.json")
    for name in ("app-1", "app-2"):
        instance = ctx.fleet.instance(name)
        ledger.add(InstanceRecord(name, instance.compose_path, "registry.example/demo/app:v1", OLD, COMPOSE, 0o640))
        procedure.drain(ctx, instance, ledger)

    def full_disk(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "replace", full_disk)
    failures = procedure.release_all(ctx, ledger)
    assert lb.servers_["app-1"].admin == "ready" and lb.servers_["app-2"].admin == "ready"
    assert len(failures) == 2 and all("No space left" in failure for failure in failures)


def test_preflight_lb_names_every_server_out_of_rotation() -> None:
    ctx, _, lb, _ = make_context()
    lb.servers_["app-2"].admin = "drain"
    lb.servers_["app-3"].op_state = OP_STOPPED
    with pytest.raises(RolloutError) as raised:
        procedure.preflight_lb(ctx)
    assert "app-2" in str(raised.value) and "app-3" in str(raised.value) and "app-1" not in str(raised.value)


def test_target_image_refuses_hostile_tags_before_anything_runs() -> None:
    the_fleet = fleet()
    for tag in ("v1;rm -rf /", "v 1", "", "-v1", "$(id)"):
        with pytest.raises(RolloutError, match="invalid image tag"):
            target_image(the_fleet, tag, None)
    assert str(target_image(the_fleet, "1.4.2", None)) == "registry.example/demo/app:1.4.2"
    with pytest.raises(RolloutError, match="exactly one"):
        target_image(the_fleet, "v1", "registry.example/demo/app:v1")
    # An image of another repository (and its registry) is refused before any registry call.
    with pytest.raises(RolloutError, match=r"image repository evil\.example/demo/app is not allowed for fleet demo"):
        target_image(the_fleet, None, "evil.example/demo/app:v1")


@pytest.mark.parametrize(
    ("names", "size", "canary", "expected"),
    [
        (["a", "b", "c"], 1, False, [["a"], ["b"], ["c"]]),
        (["a", "b", "c", "d", "e"], 2, False, [["a", "b"], ["c", "d"], ["e"]]),
        (["a", "b", "c", "d", "e"], 2, True, [["a"], ["b", "c"], ["d", "e"]]),
        ([], 2, True, []),
    ],
)
def test_batches_never_exceed_the_batch_size_and_keep_order(
    names: list[str], size: int, canary: bool, expected: list[list[str]]
) -> None:
    assert batches(names, size, canary) == expected


def test_a_tag_only_run_on_a_fleet_switched_to_another_edition_is_refused_naming_both() -> None:
    the_fleet = fleet()
    running = {
        "app-1": "registry.example/demo/app-ee:1.4.2@sha256:" + "c" * 64,
        "app-2": "registry.example/demo/app-ee:1.4.2",
        "app-3": "registry.example/demo/app:1.4.1",
    }
    tag_run = target_image(the_fleet, "1.4.3", None)
    with pytest.raises(
        PreflightError,
        match=r"runs registry\.example/demo/app-ee on app-1, app-2, not its image_repository registry\.example/demo/app"
        r": a run given only a tag would switch it to registry\.example/demo/app\. Set image_repository",
    ):
        repository_change(the_fleet, running, tag_run, tag_only=True)


def test_a_run_switching_repository_on_purpose_says_so() -> None:
    the_fleet = fleet(allowed_repositories=["registry.example/demo/app-ee"])
    running = {"app-1": "registry.example/demo/app:1.4.2", "app-2": "registry.example/demo/app:1.4.2"}
    switch = target_image(the_fleet, None, "registry.example/demo/app-ee:1.4.2")
    assert repository_change(the_fleet, running, switch, tag_only=False) == (
        "it switches repository: registry.example/demo/app on app-1, app-2 -> registry.example/demo/app-ee"
    )
    same = target_image(the_fleet, "1.4.3", None)
    assert repository_change(the_fleet, running, same, tag_only=True) == ""


class CountingLB(FakeLB):
    """The fake LB, counting responses: each reading adds the next (2xx, 5xx) step."""

    def __init__(self, names: list[str], steps: list[tuple[int, int]]) -> None:
        super().__init__(names)
        self.steps = scripted(steps)
        self.counts = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "other": 0}

    def response_counts(self, server: str) -> dict[str, int]:
        good, bad = next(self.steps)
        self.counts["2xx"] += good
        self.counts["5xx"] += bad
        return dict(self.counts)


def watched(steps: list[tuple[int, int]], **health: Any) -> tuple[tuple[int, int], Ledger]:
    ctx, _, _, _ = make_context(health={"watch_seconds": 5, "min_requests": 20, "max_5xx_ratio": 0.1, **health})
    ctx.lb = CountingLB(["app-1", "app-2", "app-3"], [(100, 100), *steps])  # type: ignore[assignment]
    ledger = make_ledger(ctx)
    return procedure.watch_responses(ctx, ctx.fleet.instance("app-1"), ledger), ledger


def test_the_5xx_gate_rolls_back_an_instance_whose_5xx_share_passes_the_limit() -> None:
    with pytest.raises(RolloutError, match=r"app-1 answered 12 of 24 requests with 5xx \(50%\) in its first 1\.0 s"):
        watched([(6, 6)])


def test_the_5xx_gate_passes_below_the_limit_and_does_not_judge_too_few_requests() -> None:
    counts, ledger = watched([(10, 0), (9, 1)])  # a reading every 0.5 s for 5 s: 9 % of 5xx
    assert counts == (100, 9) and (ledger["app-1"].watched_responses, ledger["app-1"].watched_5xx) == (100, 9)
    assert watched([(1, 1)], min_requests=21)[0] == (20, 10)  # half are 5xx, but too few to judge


@pytest.mark.parametrize(
    ("share", "others", "expected", "actual"),
    [
        (0.10, {"a": 1, "b": 1}, (64, 14), 14 / 142),  # others to 64 each, the canary 14: 9.9 %
        (0.25, {"a": 1, "b": 1, "c": 1}, (16, 16), 16 / 64),
        (0.50, {"a": 100}, (1, 100), 0.5),  # weights large enough already: untouched
        (0.01, {"a": 1, "b": 1}, (256, 5), 5 / 517),  # as close as whole weights up to 256 allow
    ],
)
def test_canary_weights_give_the_canary_about_its_share(
    share: float, others: dict[str, int], expected: tuple[int, int], actual: float
) -> None:
    factor, weight = procedure.canary_weights(share, others)
    assert (factor, weight) == expected
    assert weight / (weight + factor * sum(others.values())) == pytest.approx(actual)
    assert abs(actual - share) < 0.012


def _raised_while_handling(interrupt: KeyboardInterrupt) -> Exception:
    """What Prefect raises when a Ctrl-C lands as it starts a task run: its own error,
    raised while handling the interrupt (the interrupt is its context)."""
    try:
        try:
            raise interrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")  # noqa: B904 - the implicit context is the point
    except ValueError as error:
        return error


def test_a_step_interrupted_as_prefect_starts_it_stops_the_run_as_interrupted_not_as_a_failed_step() -> None:
    interrupted = _raised_while_handling(KeyboardInterrupt("signal 15"))
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        _step(make_ledger(make_context()[0]), "app-1", "restore-compose", threading.Event(), _raise, interrupted)


def test_a_step_that_fails_on_its_own_is_a_failed_step() -> None:
    with pytest.raises(StepFailed, match="instance app-1, step up: boom"):
        _step(make_ledger(make_context()[0]), "app-1", "up", threading.Event(), _raise, RuntimeError("boom"))


def _raise(error: BaseException) -> None:
    raise error
