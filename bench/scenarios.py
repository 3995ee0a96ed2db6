"""The measurements: each one a rollout (or a probe) on the real test bed under load.

Every measured run has the same shape (see `measure`): start the HAProxy monitor and
the load generator, let steady-state load flow for a few seconds, run the rollout,
let load flow a moment longer, stop both. Wall time is the rollout alone; latency is
compared between the steady window and the rollout window of the same run.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadResult, LoadRun, WindowStats
from bench.monitor import OP_RUNNING, LbMonitor, Outage
from compose_rollout.testbed import Testbed
from compose_rollout.testbed._util import http_status

# What the load generator sends, for every runner alike: the project's own traffic
# defaults (4 fast loops with a 20 ms pause, 3 slow requests of 3 s always in flight).
FAST_WORKERS, SLOW_WORKERS, SLOW_SECONDS, FAST_INTERVAL = 4, 3, 3, 0.02


@dataclass
class ActionResult:
    """What a runner reported about its own rollout."""

    ok: bool
    error: str = ""
    flow_run_id: str | None = None


@dataclass
class Run:
    """One rollout measured under load."""

    runner: str
    label: str
    instances: int
    batch: str
    ok: bool
    error: str
    began: float
    ended: float
    steady: WindowStats
    during: WindowStats
    requests: int
    failed: int
    outages: dict[str, list[Outage]]
    ssh_logins: dict[str, int]
    load: LoadResult | None = None
    monitor: LbMonitor | None = None
    task_runs: dict[str, int] = field(default_factory=dict)
    journal: dict[str, Any] | None = None
    fleet_on_target: bool | None = None
    lb: str = "haproxy"  # the LB the load went through (the monitor watches HAProxy only)
    strategy: str = "in-place"  # compose-rollout's rollout.strategy (the peers replace in place)
    # Seconds of the rollout with fewer servers taking requests than instances, and the
    # fewest / most servers taking requests at once (HAProxy's view; None behind another LB).
    capacity_lost: float | None = None
    serving: tuple[int, int] | None = None
    servers_left: list[str] = field(default_factory=list)  # servers the run added and did not delete
    task_seconds: dict[str, float] = field(default_factory=dict)  # task run time by task name, summed

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Results saved before a field existed re-render with its default.
        self.__dict__.update({"servers_left": [], "task_seconds": {}} | state)

    @property
    def wall(self) -> float:
        return self.ended - self.began

    def planned(self) -> list[Outage]:
        """The outages the runner caused (it drained the server): one per instance."""
        return [o for outs in self.outages.values() for o in outs if o.planned]

    def unplanned(self) -> list[Outage]:
        """Outages HAProxy's own check caused (the server failed its checks)."""
        return [o for outs in self.outages.values() for o in outs if not o.planned]

    def out_of_rotation(self) -> list[float]:
        """Seconds out of rotation of each instance the runner took out: as HAProxy's
        monitor saw it, or, behind another LB, from compose-rollout's journal (drain
        asked → put back done)."""
        if self.lb != "haproxy":
            records = (self.journal or {}).get("records", [])
            return [r["enabled_at"] - r["drained_at"] for r in records if r.get("enabled_at") and r.get("drained_at")]
        return [o.seconds for o in self.planned()]

    def drain_waits(self) -> list[float]:
        return [o.drain_seconds for o in self.planned()]

    def first_drain(self) -> float | None:
        lefts = [o.left for o in self.planned()]
        return min(lefts) if lefts else None

    def flow_phases(self) -> tuple[float | None, float | None]:
        """compose-rollout only, from its journal: (flow start until the run's ledger
        exists, ledger until the first drain = preflight + pre-pull)."""
        if not self.journal or "started_at" not in self.journal:
            return None, None
        started = float(self.journal["started_at"])
        drains = [r["drained_at"] for r in self.journal.get("records", []) if r.get("drained_at")]
        return started - self.began, (min(drains) - started) if drains else None


def measure(
    bed: Testbed,
    runner: str,
    label: str,
    batch: str,
    action: Callable[[], ActionResult],
    *,
    steady_seconds: float,
    tail_seconds: float = 1.5,
    keep_series: bool = False,
    lb: str = "haproxy",
    strategy: str = "in-place",
) -> Run:
    """Run `action` under load through the LB of kind `lb` with the HAProxy monitor on;
    see the module docstring."""
    logins = {i.name: bed.ssh_logins(i.name) for i in bed.instances}
    own_servers = {i.lb_server for i in bed.instances}
    monitor = LbMonitor(bed.admin, bed.lb_backend)
    load = LoadRun(
        bed.lb_url_of(lb),
        fast_workers=FAST_WORKERS,
        slow_workers=SLOW_WORKERS,
        slow_seconds=SLOW_SECONDS,
        fast_interval_seconds=FAST_INTERVAL,
    )
    monitor.start()
    try:
        load.start()
    except BaseException:
        monitor.stop()
        raise
    load_started = time.time()
    try:
        time.sleep(steady_seconds)
        began = time.time()
        try:
            outcome = action()
        except Exception as error:  # noqa: BLE001 - a failed runner is a result, not a crash of the bench
            outcome = ActionResult(False, f"{type(error).__name__}: {error}")
        ended = time.time()
        time.sleep(tail_seconds)
    finally:
        result = load.stop()
        monitor.stop()
    # The first half second of load warms connections up; keep it out of "steady".
    steady = result.window(load_started + 0.5, began)
    during = result.window(began, ended)
    # Capacity is HAProxy's view: behind another LB HAProxy takes no requests, so none is measured.
    watched = lb == "haproxy"
    return Run(
        runner=runner,
        label=label,
        instances=len(bed.instances),
        batch=batch,
        ok=outcome.ok,
        error=outcome.error,
        began=began,
        ended=ended,
        steady=steady,
        during=during,
        requests=len(result.ok),
        failed=sum(1 for good in result.ok if not good),
        outages={name: outs for name, outs in monitor.all_outages().items() if outs},
        ssh_logins={i.name: bed.ssh_logins(i.name) - logins[i.name] for i in bed.instances},
        load=result if keep_series else None,
        monitor=monitor if keep_series else None,
        journal={"flow_run_id": outcome.flow_run_id} if outcome.flow_run_id else None,
        lb=lb,
        strategy=strategy,
        capacity_lost=monitor.capacity_lost(len(bed.instances), began, ended) if watched else None,
        serving=monitor.serving_range(began, ended) if watched else None,
        servers_left=sorted(set(bed.haproxy_server_states()) - own_servers),
    )


# --- compose-rollout ------------------------------------------------------------------


def compose_rollout_action(fleet_file: Path, tag: str) -> Callable[[], ActionResult]:
    """The `rolling-deploy` flow in-process, as `rollout deploy` runs it."""

    def action() -> ActionResult:
        from compose_rollout.flows.rolling_deploy import rolling_deploy

        state = rolling_deploy(fleet_file=str(fleet_file), tag=tag, triggered_by="bench", return_state=True)
        flow_run_id = str(state.state_details.flow_run_id)
        if state.is_completed():
            return ActionResult(True, flow_run_id=flow_run_id)
        return ActionResult(False, str(state.message or state.name), flow_run_id=flow_run_id)

    return action


def attach_flow_details(run: Run, state_directory: Path, fleet: str = "demo") -> None:
    """Read the run's journal and count its Prefect task runs (from the API)."""
    if run.journal is None:
        return
    flow_run_id = run.journal["flow_run_id"]
    journal = state_directory / fleet / "runs" / f"{flow_run_id}.json"
    if journal.exists():
        data = json.loads(journal.read_text())
        for record in data["records"]:
            record.pop("original", None)  # compose bytes: not needed for timing
        run.journal = {"flow_run_id": flow_run_id, **data}
    run.task_runs, run.task_seconds = count_task_runs(flow_run_id)


def count_task_runs(flow_run_id: str, settle_seconds: float = 20.0) -> tuple[dict[str, int], dict[str, float]]:
    """Task runs of one flow run by task name (instance suffix stripped), and their run
    time (start to end) summed by task name, from the API.

    Prefect 3 ships task-run states as events the server writes asynchronously, so
    the count is read until it stops changing (bounded by `settle_seconds`)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    deadline = time.monotonic() + settle_seconds
    previous: Counter[str] | None = None
    with get_client(sync_client=True) as client:
        while True:
            names: Counter[str] = Counter()
            seconds: dict[str, float] = {}
            offset = 0
            while True:
                page = client.read_task_runs(flow_run_filter=flt, limit=200, offset=offset)
                for task_run in page:
                    name = re.sub(r"-app-\d+$", "", task_run.name)
                    names[name] += 1
                    if task_run.start_time is not None and task_run.end_time is not None:
                        seconds[name] = (
                            seconds.get(name, 0.0) + (task_run.end_time - task_run.start_time).total_seconds()
                        )
                if len(page) < 200:
                    break
                offset += 200
            if (previous is not None and names == previous) or time.monotonic() >= deadline:
                return dict(names), dict(seconds)
            previous = names
            time.sleep(1.0)


# --- the floor ------------------------------------------------------------------------


@dataclass(frozen=True)
class FloorSample:
    """The inherent cost of replacing one instance's container, measured directly on
    this machine with tight (20 ms) polls and no orchestration at all."""

    instance: str
    restart: float  # `docker-compose up -d --no-deps server` with the new image, start to return
    ready: float  # from then until /health first answers 200
    rise: float  # from then until HAProxy's own check reports it UP (0 if it never saw it DOWN)
    lb_saw_down: bool

    @property
    def total(self) -> float:
        return self.restart + self.ready + self.rise


def _wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"bench: timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _op_state(bed: Testbed, server: str) -> int:
    return int(bed.haproxy_servers_state()[server]["srv_op_state"])


def measure_floor(bed: Testbed, tag: str) -> list[FloorSample]:
    """Per instance: drain, wait for zero sessions (not timed: that wait is counted per
    run), then time restart, app ready and the LB's rise checks; put it back."""
    samples = []
    for instance in bed.instances:
        server = instance.lb_server
        bed.set_server_state(instance.name, "drain")

        def drained(server: str = server) -> bool:
            return bed.haproxy_server_states()[server]["scur"] == "0"

        _wait(drained, 30, f"{server} to drain")
        text = instance.compose_file.read_text()
        new = re.sub(r"(image: )\S+", rf"\g<1>{bed.image_repository}:{tag}", text, count=1)
        t0 = time.time()
        instance.compose_file.write_text(new)
        bed.compose(instance.name, "up", "-d", "--no-deps", "server", timeout=120)
        t1 = time.time()
        saw_down = False
        t2: float | None = None
        deadline = time.monotonic() + 60
        while True:
            # A short probe timeout: right after `up`, a connection through the port
            # proxy can hang until the container's network is wired; a long timeout
            # would count that hang, not the app, as "not ready".
            if t2 is None and http_status(instance.health_url, timeout=0.25) == 200:
                t2 = time.time()
            op = _op_state(bed, server)
            saw_down = saw_down or op != OP_RUNNING
            if t2 is not None and op == OP_RUNNING:
                t3 = time.time() if saw_down else t2
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"bench: {instance.name} not ready and UP within 60 s of its restart")
            time.sleep(0.02)
        samples.append(FloorSample(instance.name, t1 - t0, t2 - t1, t3 - t2, saw_down))
        bed.set_server_state(instance.name, "ready")
    return samples


def fleet_on(bed: Testbed, tag: str) -> bool:
    """Every instance runs the image built for `tag` and is in rotation."""
    want = bed.tag_image_id(tag)
    states = bed.haproxy_server_states()
    return all(
        bed.running_image(i.name) == want and states.get(i.lb_server, {}).get("status") == "UP" for i in bed.instances
    )


@dataclass
class Results:
    """Everything one bench run measured, for the report."""

    quick: bool
    command: str
    surge_only: bool = False  # `--surge`: the runs the surge strategy is compared with, and surge
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    prefect_startup: float = 0.0
    bed_startup: dict[int, float] = field(default_factory=dict)
    lock_wait: float = 0.0  # seconds waiting for another test bed to release the machine
    runs: list[Run] = field(default_factory=list)
    floor: list[FloorSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    timeline: Run | None = None

    def find(self, runner: str, label: str, instances: int | None = None, batch: str | None = None) -> Run | None:
        return next(
            (
                r
                for r in self.runs
                if r.runner == runner
                and r.label == label
                and instances in (None, r.instances)
                and batch in (None, r.batch)
            ),
            None,
        )
