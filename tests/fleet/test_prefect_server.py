"""The deployments in prefect.yaml, on a real Prefect server with a real process worker."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compose_rollout.testbed import Testbed
from compose_rollout.testbed.traffic import Traffic
from tests.fleet.inflight import SlowRequests
from tests.fleet.test_faults import (
    CLI,
    assert_serving_v1,
    journal,
    push_variant,
    record,
    wait_for_journal,
)
from tests.fleet.test_rollout import fleet_file, observe
from tests.prefect_server import clean_env, free_port, prefect_server, spawn, stop, tail, wait_until_up
from tests.prefect_ui import browser_page, open_ui, start_custom_run

pytestmark = pytest.mark.fleet

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def prefect(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run([*PREFECT, *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(argv)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def run_and_wait(api: str, env: dict[str, str], *params: str, timeout: float = 240) -> dict[str, Any]:
    """`prefect deployment run` as a user would; wait for the run's final state."""
    return wait_for_final(api, start_run(env, "rolling-deploy/fleet", *params), timeout)


def call_api(method: str, url: str, body: Any = None) -> Any:
    """One call to Prefect's REST API, retried like Prefect's own client does on 503 (the
    server's answer when SQLite is busy: "retry"), at most 5 times; the decoded answer."""
    for attempt in range(5):
        response = httpx.request(method, url, json=body, timeout=30)
        if response.status_code != 503:
            break
        time.sleep(0.5 * 2**attempt)  # the back-off Prefect's client uses for a busy server
    response.raise_for_status()
    return response.json() if response.content else None


def wait_for_final(api: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = call_api("GET", f"{api}/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return dict(run)
        time.sleep(0.5)  # polling the run's observed state in Prefect's API
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:g} s")


def wait_for_run(
    api: str, match: Callable[[dict[str, Any]], bool], timeout: float, poll: float = 0.5
) -> dict[str, Any]:
    """The first run `match` accepts; `poll` small only where a latency is measured (each
    poll is a query on the server's database, which the runs under test also write to)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = call_api("POST", f"{api}/flow_runs/filter", {"limit": 200})
        found = [run for run in runs if match(run)]
        if found:
            return dict(found[0])
        time.sleep(poll)  # polling Prefect's API for the run to appear
    raise AssertionError(f"no matching flow run within {timeout:g} s")


@dataclass(frozen=True)
class Stack:
    api: str
    env: dict[str, str]
    state: Path
    worker_log: Path


@contextmanager
def running_stack(testbed: Testbed, home: Path, files: Path, **server_settings: str) -> Iterator[Stack]:
    """A real Prefect server (with its UI), the process work pool, `prefect deploy --all`
    from this checkout (as the README says), and a real worker."""
    with prefect_server(home, ui=True, **server_settings) as api:
        env = clean_env(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            COMPOSE_ROLLOUT_FLEET=fleet_file(testbed, files, health={"timeout_seconds": 8}),
            PREFECT_WORKER_QUERY_SECONDS="1",  # the worker picks a new run up within a second
        )
        prefect(env, "work-pool", "create", "compose-rollout", "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        log = files / "worker.log"
        worker = spawn([*PREFECT, "worker", "start", "--pool", "compose-rollout"], env, log, cwd=REPO)
        try:
            yield Stack(api, env, files / "state", log)
        finally:
            stop(worker)


@pytest.fixture(scope="module")
def stack(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The scheduler service looks for due schedules every 2 s instead of every minute,
    # so a schedule made by a test is acted on at once.
    with running_stack(
        testbed,
        tmp_path_factory.mktemp("prefect-home"),
        tmp_path_factory.mktemp("stack"),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        # A run queued behind the fleet's concurrency limit asks again after 1 s, not 30 s.
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="1",
    ) as started:
        yield started


ACTIVE = ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", "PAUSED"]


@pytest.fixture(autouse=True)
def nothing_left_running(stack: Stack) -> Iterator[None]:
    """After each test: no schedule it made, no run still waiting or running. A test that
    failed half-way must not leave a run that moves the next test's fleet."""
    yield
    for deployment in call_api("POST", f"{stack.api}/deployments/filter", {"limit": 50}):
        for schedule in deployment["schedules"]:
            if (schedule.get("slug") or "").startswith("test-"):
                call_api("DELETE", f"{stack.api}/deployments/{deployment['id']}/schedules/{schedule['id']}")
    stop_active_runs(stack.api)


def stop_active_runs(api: str) -> None:
    """Cancel every run still waiting or running, and wait until they have ended."""
    active = {"flow_runs": {"state": {"type": {"any_": ACTIVE}}}, "limit": 200}
    for run in call_api("POST", f"{api}/flow_runs/filter", active):
        # A running one is stopped the way the UI's Cancel does it (the worker kills it; the flow rolls back).
        state = "CANCELLING" if run["state"]["type"] == "RUNNING" else "CANCELLED"
        call_api("POST", f"{api}/flow_runs/{run['id']}/set_state", {"state": {"type": state}, "force": True})
    deadline = time.monotonic() + 120
    while call_api("POST", f"{api}/flow_runs/filter", active):
        assert time.monotonic() < deadline, "runs left by the test did not stop within 120 s"
        time.sleep(0.5)  # polling Prefect's API for the runs to end


@pytest.mark.timeout(600)
def test_prefect_deploy_all_and_a_real_worker_move_the_fleet(fresh_fleet: Testbed, stack: Stack) -> None:
    bed = fresh_fleet
    before = observe(bed)
    deployment = call_api("GET", f"{stack.api}/deployments/name/rolling-deploy/fleet")
    assert deployment["global_concurrency_limit"]["limit"] == 1 and deployment["enforce_parameter_schema"] is True
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # prefect.yaml's weekly schedule arrives as written: cron, off until turned on, no tag.
    [weekly] = [s for s in deployment["schedules"] if s["slug"] == "weekly"]
    assert weekly["schedule"]["cron"] == "0 3 * * 2" and weekly["active"] is False
    assert weekly["parameters"] == {"triggered_by": "schedule"}
    form = deployment["parameter_openapi_schema"]["properties"]  # what the UI's run form shows
    for knob in ("tag", "batch_size", "canary", "drain_timeout_seconds", "on_drain_timeout", "on_locked", "urgent"):
        assert form[knob]["description"], knob

    # A malformed tag is refused by the server (the deployment enforces the schema): no run exists.
    argv = [*PREFECT, "deployment", "run", "rolling-deploy/fleet", "--param", "tag=v1;rm -rf /"]
    refused = subprocess.run(argv, env=stack.env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0, refused.stdout
    runs = call_api("POST", f"{stack.api}/flow_runs/filter", {"limit": 200})
    assert not [run for run in runs if run["parameters"].get("tag") == "v1;rm -rf /"]

    bad = run_and_wait(stack.api, stack.env, "tag=broken")
    assert bad["state"]["type"] == "FAILED", tail(stack.worker_log)
    after_bad = observe(bed)
    assert (after_bad.images, after_bad.compose, after_bad.lb) == (before.images, before.compose, before.lb)

    good = run_and_wait(stack.api, stack.env, "tag=v2")
    assert good["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}
    assert set(observe(bed).lb.values()) == {"UP"}


@pytest.mark.timeout(300)
def test_a_cancel_stops_a_long_drain_wait_at_once_and_rolls_back_before_the_workers_kill(
    fresh_fleet: Testbed, stack: Stack
) -> None:
    """Prefect 3.9's worker kills a cancelled run 30 s after its SIGTERM. A drain wait for a
    50 s request must stop at once, so the run rolls back by itself, cutting nothing."""
    bed = fresh_fleet
    before = observe(bed)
    slow = SlowRequests(bed, 50)  # a 50 s request on every instance
    output = prefect(
        stack.env,
        "deployment",
        "run",
        "rolling-deploy/fleet",
        "--param",
        "tag=v2",
        "--param",
        "drain_timeout_seconds=120",
    )
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert run_id, output
    wait_for_journal(stack.state, lambda j: record(j, "app-1").get("step") == "wait-for-sessions", timeout=180)
    prefect(stack.env, "flow-run", "cancel", run_id.group(1))
    wait_for_final(stack.api, run_id.group(1))
    found = journal(stack.state, run_id=run_id.group(1))
    assert found is not None and found["status"] == "rolled back", tail(stack.worker_log)
    assert set(slow.codes()) == {200}  # the long requests were never cut
    assert observe(bed) == before


@pytest.mark.timeout(300)
def test_cancelling_a_run_in_prefect_rolls_it_back(fresh_fleet: Testbed, stack: Stack) -> None:
    bed = fresh_fleet
    before = observe(bed)
    traffic = Traffic(bed.lb_url)
    traffic.start()
    output = prefect(stack.env, "deployment", "run", "rolling-deploy/fleet", "--param", "tag=v2")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert run_id, output
    wait_for_journal(stack.state, lambda j: record(j, "app-2").get("drained") is True, timeout=180)
    prefect(stack.env, "flow-run", "cancel", run_id.group(1))  # what the UI's Cancel does
    final = wait_for_final(stack.api, run_id.group(1))
    seen = traffic.stop()
    assert final["state"]["type"] in ("CANCELLED", "FAILED", "CRASHED"), tail(stack.worker_log)
    assert_serving_v1(bed, before, seen)
    # Whatever state Prefect shows, the run itself rolled back and said so.
    found = journal(stack.state, run_id=run_id.group(1))
    assert found is not None and found["status"] == "rolled back", tail(stack.worker_log)


@pytest.mark.timeout(300)
def test_a_push_to_the_registry_moves_the_fleet(fresh_fleet: Testbed, stack: Stack, tmp_path: Path) -> None:
    """A push to the registry -> its notification -> the webhook receiver -> a run of the
    deployment -> the worker moves the fleet to the pushed tag."""
    bed, api, env = fresh_fleet, stack.api, stack.env
    port = free_port()
    secret = "Bearer " + "7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c1e"
    config = tmp_path / "webhooks.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen_port": port,
                "debounce_seconds": 0.5,
                "state_directory": str(tmp_path / "webhook-state"),
                "prefect": {"api_url": api},
                "distribution": {"authorization": secret, "registry_host": bed.registry},
                "routes": [
                    {
                        "repository": bed.image_repository,
                        "fleet": "demo",
                        "deployment": "rolling-deploy/fleet",
                        "fleet_file": env["COMPOSE_ROLLOUT_FLEET"],
                    }
                ],
            }
        )
    )
    log = tmp_path / "receiver.log"
    receiver = spawn(
        [sys.executable, "-m", "compose_rollout.triggers.webhooks", "--config", str(config)], env, log, cwd=REPO
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", receiver, log, 30)
        bed.notify_registry_pushes(f"http://127.0.0.1:{port}/hooks/distribution", {"Authorization": [secret]})
        pushed_at = time.monotonic()
        push_variant(bed, "v3.0.0", "RUN echo v3 > /www/version")
        run = wait_for_run(api, lambda r: r["parameters"].get("tag") == "v3.0.0", timeout=60, poll=0.05)
        created = time.monotonic() - pushed_at
        finished = wait_for_final(api, run["id"])
        moved = time.monotonic() - pushed_at
        assert finished["state"]["type"] == "COMPLETED", tail(log)
        v3 = bed.image_id(f"{bed.image_repository}:v3.0.0")
        assert {bed.running_image(i.name) for i in bed.instances} == {v3}
        print(f"push -> run created {created:.2f} s (0.5 s debounce), push -> fleet moved {moved:.1f} s")
    finally:
        bed.notify_registry_pushes(None)
        stop(receiver)


def deployment_id(api: str, name: str = "rolling-deploy/fleet") -> str:
    return str(call_api("GET", f"{api}/deployments/name/{name}")["id"])


def start_run(env: dict[str, str], deployment: str, *params: str) -> str:
    """`prefect deployment run NAME --param k=v ...`; the new run's ID."""
    argv = ["deployment", "run", deployment]
    for param in params:
        argv += ["--param", param]
    output = prefect(env, *argv)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert run_id, output
    return run_id.group(1)


def run_journal(state: Path, fleet: str, run_id: str) -> dict[str, Any]:
    return dict(json.loads((state / fleet / "runs" / f"{run_id}.json").read_text()))


def scheduled_run(api: str, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Give the deployment a schedule whose first run is due in a few seconds (the next one
    a day later), as a user would in the UI or prefect.yaml; wait until Prefect's scheduler
    has created that run and the worker has taken it; then remove the schedule.

    The scheduler (every 2 s here) creates runs from its own "now" on: one that looks at
    the schedule after the first date passed creates the day-later run only. 2 s of lead
    once lost that race (the server's SQLite was busy); 6 s leaves room for a late loop."""
    anchor = datetime.now(UTC) + timedelta(seconds=6)
    schedule = {"interval": 86400, "anchor_date": anchor.isoformat(), "timezone": "UTC"}
    body = [{"schedule": schedule, "active": True, "parameters": parameters, "slug": f"test-{uuid.uuid4().hex[:8]}"}]
    schedule_id = call_api("POST", f"{api}/deployments/{deployment}/schedules", body)[0]["id"]
    try:
        return wait_for_run(
            api,
            lambda r: (r.get("created_by") or {}).get("id") == schedule_id and r["state"]["type"] != "SCHEDULED",
            timeout=90,
        )
    finally:  # also deletes the day-later run still waiting
        call_api("DELETE", f"{api}/deployments/{deployment}/schedules/{schedule_id}")


@pytest.mark.timeout(400)
def test_a_scheduled_run_without_a_tag_takes_the_policy_tag_then_does_nothing(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    bed = fresh_fleet
    for tag in ("2.1.0", "2.2.0-rc.1", "3.1.0"):  # the highest 2.x release is 2.1.0
        push_variant(bed, tag, f"RUN echo {tag} > /www/version")
    fleet = fleet_file(bed, tmp_path, tag_policy={"version_range": ">=2,<3"}, health={"timeout_seconds": 8})
    deployment = deployment_id(stack.api)
    parameters = {"fleet_file": fleet, "triggered_by": "schedule"}

    first = scheduled_run(stack.api, deployment, parameters)
    assert first["auto_scheduled"] is True and first["parameters"].get("tag") is None
    assert wait_for_final(stack.api, first["id"])["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    chosen = bed.image_id(f"{bed.image_repository}:2.1.0")
    assert {bed.running_image(i.name) for i in bed.instances} == {chosen}
    moved = observe(bed)

    second = scheduled_run(stack.api, deployment, parameters)
    assert wait_for_final(stack.api, second["id"])["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    assert observe(bed) == moved  # no container recreated, no compose file written, all UP
    found = run_journal(tmp_path / "state", "demo", second["id"])
    assert found["status"] == "succeeded" and ":2.1.0@sha256:" in found["target"]
    assert {r["outcome"] for r in found["records"]} == {"unchanged"}


# The window opens at the first whole minute more than this ahead (Prefect's cron has
# minutes, not seconds). Within it: the worker starts the run asked for, which re-schedules
# itself, and the test sees that run still waiting (4.5 s measured; the CLI's own start is
# left out of it), all before the last 10 s ahead of the window, in which a run that begins
# waits for it (windows.EARLY_START_TOLERANCE) and the worker takes its scheduled run
# (Prefect's worker prefetch).
WINDOW_LEAD = timedelta(seconds=30)


def held_until(gate: Path, instance: str = "") -> dict[str, Any]:
    """A per-instance hook (before_instance, after_instance) that holds the run until the
    file `gate` exists, only at `instance` if one is named: the test lets the run go on
    once it has seen what the run must wait for. Bounded: at its timeout the instance
    fails (a test that fails first creates the file in its `finally`)."""
    wait = f"until [ -e {shlex.quote(str(gate))} ]; do sleep 0.1; done"
    if instance:
        wait = f'[ "$ROLLOUT_INSTANCE" != {instance} ] || {wait}'
    return {"command": wait, "timeout_seconds": 240}


@pytest.mark.timeout(420)
def test_a_run_outside_the_window_waits_for_it_and_stops_when_the_window_closes(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    url = f"{stack.api}/deployments/{deployment_id(stack.api)}/create_flow_run"  # what the UI's Run does
    opens = (datetime.now(UTC) + WINDOW_LEAD).replace(second=0, microsecond=0) + timedelta(minutes=1)
    closes = opens + timedelta(minutes=1)
    window = {"cron": f"{opens.minute} {opens.hour} * * *", "duration_minutes": 1, "timezone": "UTC"}
    # Batches of one; the first batch is held (after app-1's new container is healthy) until
    # the test has seen the window close, so the window has closed when the second batch
    # would start, however fast the machine.
    gate = tmp_path / "window-closed"
    fleet = fleet_file(
        bed,
        tmp_path,
        maintenance_windows=[window],
        rollout={"batch_size": 1},
        hooks={"after_instance": held_until(gate)},
        health={"timeout_seconds": 8},
    )
    requested = call_api("POST", url, {"parameters": {"fleet_file": fleet, "tag": "v2"}})["id"]
    asked = wait_for_final(stack.api, requested)
    assert asked["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    assert observe(bed) == before  # nothing touched outside the window

    later = wait_for_run(stack.api, lambda r: r["parameters"].get("fleet_file") == fleet and r["id"] != requested, 30)
    assert later["state"]["type"] == "SCHEDULED"
    assert datetime.fromisoformat(later["expected_start_time"]) == opens
    assert later["parameters"]["tag"] == "v2" and "re-scheduled" in later["parameters"]["triggered_by"]
    # It keeps the time of the request, so a newer deploy made meanwhile is never undone.
    when = datetime.fromisoformat(later["parameters"]["requested_at"])
    assert when == datetime.fromisoformat(asked["expected_start_time"])

    traffic = Traffic(bed.lb_url)
    traffic.start()
    try:
        # The clock the run reads too: once it is past the window's end, the first batch may end.
        while (left := (closes - datetime.now(UTC)).total_seconds()) > 0:
            time.sleep(left)  # waiting for the window to close
    finally:
        gate.touch()
    final = wait_for_final(stack.api, later["id"])
    seen = traffic.stop()
    assert final["state"]["type"] == "FAILED", tail(stack.worker_log)
    assert "maintenance window closed before batch 2/3" in final["state"]["message"]
    found = run_journal(tmp_path / "state", "demo", later["id"])
    assert found["status"] == "stopped" and found["started_at"] >= opens.timestamp()
    outcomes = {r["name"]: r["outcome"] for r in found["records"]}
    assert outcomes == {"app-1": "updated", "app-2": "pending", "app-3": "pending"}
    after = observe(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert after.images == before.images | {"app-1": v2}
    assert set(after.lb.values()) == {"UP"} and seen.failed == 0, seen.failures


@pytest.mark.timeout(400)
def test_runs_for_one_fleet_queue_in_order_and_other_fleets_do_not_wait(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    """Two fleets on the bed: left (app-1, app-2, batches of one; the first run is held
    before app-2 until the test lets it go) behind the `fleet` deployment, right (app-3)
    behind a second deployment made as the README says (a copy of the entry in prefect.yaml)."""
    bed = fresh_fleet
    whole = yaml.safe_load(Path(fleet_file(bed, tmp_path / "whole")).read_text())

    def subset(name: str, instances: set[str], file: str = "", **extra: Any) -> str:
        members = [i for i in whole["instances"] if i["name"] in instances]
        document = whole | {"name": name, "instances": members, "health": {"timeout_seconds": 8}} | extra
        path = tmp_path / f"{file or name}.yaml"
        path.write_text(yaml.safe_dump(document))
        return str(path)

    gate = tmp_path / "go-on"
    held = {"before_instance": held_until(gate, "app-2")}
    left = subset("left", {"app-1", "app-2"}, rollout={"batch_size": 1}, hooks=held)
    left_again = subset("left", {"app-1", "app-2"}, file="left-not-held")  # the same fleet, nothing held
    right = subset("right", {"app-3"}, rollout={"allow_single_instance": True})  # app-1/2 serve meanwhile
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entry = project["deployments"][0] | {"name": "fleet-right", "schedules": []}
    entry["parameters"] = entry["parameters"] | {"fleet_file": right}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(project | {"deployments": [entry]}))
    prefect(stack.env, "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
    state = Path(whole["state_directory"])

    first = start_run(stack.env, "rolling-deploy/fleet", f"fleet_file={left}", "tag=v2")
    # Asked for once the first runs: two runs the worker picks up in one poll start in either order.
    wait_for_run(stack.api, lambda r: r["id"] == first and r["state"]["type"] == "RUNNING", 60)
    queued = start_run(stack.env, "rolling-deploy/fleet", f"fleet_file={left_again}", "tag=v1")
    try:
        # Once the first run has moved app-1 and is held before app-2, the other fleet's run starts and ends.
        wait_for_journal(
            state,
            lambda j: (
                record(j, "app-1").get("outcome") == "updated" and record(j, "app-2").get("step") == "before_instance"
            ),
            fleet="left",
            run_id=first,
        )
        other = start_run(stack.env, "rolling-deploy/fleet-right", "tag=v2")
        assert wait_for_final(stack.api, other)["state"]["type"] == "COMPLETED", tail(stack.worker_log)
        during = run_journal(state, "left", first)
        assert during["finished_at"] is None, "the other fleet's run waited for this fleet's run"
        queued_now = call_api("GET", f"{stack.api}/flow_runs/{queued}")
        assert queued_now["state"]["type"] in ("SCHEDULED", "PENDING"), queued_now["state"]
    finally:
        gate.touch()

    assert wait_for_final(stack.api, first)["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    assert wait_for_final(stack.api, queued)["state"]["type"] == "COMPLETED", tail(stack.worker_log)
    ended, began = run_journal(state, "left", first)["finished_at"], run_journal(state, "left", queued)["started_at"]
    assert began >= ended, "the queued run of the same fleet started before the first one ended"
    v1, v2 = (bed.image_id(f"{bed.image_repository}:{tag}") for tag in ("v1", "v2"))
    assert {i.name: bed.running_image(i.name) for i in bed.instances} == {"app-1": v1, "app-2": v1, "app-3": v2}
    assert set(observe(bed).lb.values()) == {"UP"}


@pytest.mark.timeout(400)
def test_two_runs_asked_for_at_once_leave_the_fleet_on_the_newer_request(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    """The worker picks both up in one poll and may start either first; they never
    interleave, and the fleet ends on the one asked for last (v1, where it started)."""
    bed = fresh_fleet
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 8})
    url = f"{stack.api}/deployments/{deployment_id(stack.api)}/create_flow_run"
    older, newer = (call_api("POST", url, {"parameters": {"fleet_file": fleet, "tag": t}})["id"] for t in ("v2", "v1"))
    for run in (older, newer):
        assert wait_for_final(stack.api, run)["state"]["type"] == "COMPLETED", tail(stack.worker_log)

    assert observe(bed).images == before.images
    journals = [run_journal(tmp_path / "state", "demo", run) for run in (older, newer)]
    first, second = sorted(journals, key=itemgetter("started_at"))
    assert second["started_at"] >= first["finished_at"], "the two runs of one fleet interleaved"
    print(f"the worker started the {'newer' if first['run_id'] == newer else 'older'} request first")
    if first["run_id"] == newer:  # the older one came too late: it touched nothing
        assert second["status"] == "superseded" and second["records"] == []


@pytest.mark.timeout(300)
def test_the_prefect_ui_starts_a_run_with_a_custom_tag_and_the_fleet_moves(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    bed = fresh_fleet
    deployment = deployment_id(stack.api)
    record: list[str] = []
    with browser_page(record) as page:
        try:
            run_id = start_custom_run(page, stack.api.removesuffix("/api"), deployment, "v2", record)
        except Exception as error:
            page.screenshot(path=tmp_path / "ui.png", full_page=True)
            text = page.locator("body").inner_text()[:2000]
            seen = "\n".join(record[-40:])
            raise AssertionError(
                f"{error}\nscreenshot: {tmp_path / 'ui.png'}\npage text:\n{text}\nbrowser:\n{seen}"
            ) from error
        final = wait_for_final(stack.api, run_id)
        assert final["state"]["type"] == "COMPLETED", tail(stack.worker_log)
        # What the user sees on the run's page once it is done.
        open_ui(
            page,
            f"{stack.api.removesuffix('/api')}/v2/runs/flow-run/{run_id}",
            page.get_by_text("Completed").first,
            record,
        )
    assert final["parameters"]["tag"] == "v2"
    assert final["parameters"]["fleet_file"] == stack.env["COMPOSE_ROLLOUT_FLEET"]  # the deployment's default
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}
    assert set(observe(bed).lb.values()) == {"UP"}


@contextmanager
def worker_machine(env: dict[str, str], name: str, pool: str, queue: str, state: Path, log: Path) -> Iterator[int]:
    """A process worker as if on a machine of its own: its own host name (a UTS namespace;
    the host name is what tells the fleet lock that a holder is on another machine), its
    own state directory (ROLLOUT_STATE_DIRECTORY), polling only `queue` of the pool.
    Yields the worker's pid; the runs it starts are its children, in its namespace."""
    argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *PREFECT, "worker", "start"]
    argv += ["--pool", pool, "--work-queue", queue, "--name", name]
    worker = spawn(argv, env | {"ROLLOUT_STATE_DIRECTORY": str(state)}, log, cwd=REPO)
    try:
        yield worker.pid  # unshare and sh exec: this pid is the worker's
    finally:
        stop(worker)


def run_on(api: str, deployment: str, queue: str, parameters: dict[str, Any]) -> str:
    """A run of `deployment` put on one work queue, so only that queue's worker takes it."""
    url = f"{api}/deployments/{deployment_id(api, deployment)}/create_flow_run"
    return str(call_api("POST", url, {"parameters": parameters, "work_queue_name": queue})["id"])


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.timeout(600)
def test_a_run_killed_on_one_prefect_worker_is_recovered_and_redeployed_from_another(
    fresh_fleet: Testbed, stack: Stack, tmp_path: Path
) -> None:
    """Issue 9 item 4 with two real process workers on one Prefect server, each with its
    own host name and state directory: nothing shared between them but the fleet itself.

    A's run is SIGKILLed mid-instance (the flow-run process, as an OOM kill or `kill -9`
    would; worker A lives on and reports the crash). B's next deploy does not take the lock
    over: from B, A's process is on another machine and not known dead. B's recover-fleet,
    on a person's word (i_checked), reverts A's run from the journal copy on the fleet, and
    B's deploy then moves the fleet. A, whose disk has none of B's runs, still sees B's
    deploy: its older request ends superseded, touching nothing."""
    bed = fresh_fleet
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 8})
    # The deployments of prefect.yaml, copied into a pool of their own (the module's worker
    # never sees them) whose queues a and b each have one worker.
    pool = f"two-workers-{uuid.uuid4().hex[:8]}"
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entries = [
        entry
        | {
            "name": f"{entry['name']}-two-workers",
            "work_pool": {"name": pool, "work_queue_name": "a"},
            "schedules": [],
            "parameters": entry["parameters"] | {"fleet_file": fleet},
        }
        for entry in project["deployments"]
    ]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(project | {"deployments": entries}))
    prefect(stack.env, "work-pool", "create", pool, "--type", "process")
    for queue in ("a", "b"):
        prefect(stack.env, "work-queue", "create", queue, "--pool", pool)
    prefect(stack.env, "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
    deploy, recover = "rolling-deploy/fleet-two-workers", "recover-fleet/fleet-recover-two-workers"
    state_a, state_b = tmp_path / "worker-a", tmp_path / "worker-b"
    log_a, log_b = tmp_path / "worker-a.log", tmp_path / "worker-b.log"
    holder_file = bed.instances[0].project_directory / ".compose-rollout-demo.lock" / "holder.json"
    copies = bed.instances[0].project_directory / ".compose-rollout-demo.runs"  # the journals on the fleet
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with (
        worker_machine(stack.env, "worker-a", pool, "a", state_a, log_a) as worker_a,
        worker_machine(stack.env, "worker-b", pool, "b", state_b, log_b),
    ):
        try:
            killed = run_on(stack.api, deploy, "a", {"tag": "v2"})
            wait_for_journal(
                state_a, lambda j: record(j, "app-2").get("file_written") is True, timeout=180, run_id=killed
            )
            holder = json.loads(holder_file.read_text())
            # The lock's holder is the flow-run process worker A started for this run, on "worker-a".
            assert holder["run_id"] == killed and holder["hostname"] == "worker-a", holder
            assert call_api("GET", f"{stack.api}/flow_runs/{killed}")["infrastructure_pid"] == str(holder["pid"])
            assert parent_pid(holder["pid"]) == worker_a
            os.kill(holder["pid"], signal.SIGKILL)
            assert wait_for_final(stack.api, killed)["state"]["type"] == "CRASHED", tail(log_a)
            assert int(bed.haproxy_servers_state()["app-2"]["srv_admin_state"]) & 0x08  # left drained: a real fault
            left = observe(bed)
            assert left.locks != ()
            assert json.loads((copies / f"{killed}.json").read_text())["status"] is None
            assert not state_b.exists()  # B has nothing of A's on its disk

            # B's next deploy cannot know A's process is dead (another machine): it touches nothing.
            refused = wait_for_final(stack.api, run_on(stack.api, deploy, "b", {"tag": "v2"}))
            assert refused["state"]["type"] == "FAILED", tail(log_b)
            message = refused["state"]["message"]
            assert f"locked by run {killed} to " in message and "root@worker-a" in message, message
            assert "--i-checked" in message, message
            assert observe(bed) == left

            # A person checked that worker A's run is gone: recover-fleet on B reverts it from the fleet's copy.
            recovered = wait_for_final(stack.api, run_on(stack.api, recover, "b", {"i_checked": True}))
            assert recovered["state"]["type"] == "COMPLETED", tail(log_b)
            assert run_journal(state_b, "demo", killed)["status"] == "recovered"
            assert json.loads((copies / f"{killed}.json").read_text())["status"] == "recovered"
            assert run_journal(state_a, "demo", killed)["status"] is None  # A's own disk never saw the recovery
            back = observe(bed)
            assert (back.images, back.compose, back.locks) == (before.images, before.compose, ())
            assert set(back.lb.values()) == {"UP"}

            deployed = run_on(stack.api, deploy, "b", {"tag": "v2"})
            assert wait_for_final(stack.api, deployed)["state"]["type"] == "COMPLETED", tail(log_b)
            seen = traffic.stop()
            after = observe(bed)
            assert set(after.images.values()) == {v2} and set(after.lb.values()) == {"UP"} and after.locks == ()
            assert seen.failed == 0, seen.failures

            # The newest-request rule from A: a request older than B's deploy sees it on the fleet.
            asked = call_api("GET", f"{stack.api}/flow_runs/{killed}")["expected_start_time"]
            older = run_on(stack.api, deploy, "a", {"tag": "v1", "requested_at": asked})
            assert wait_for_final(stack.api, older)["state"]["type"] == "COMPLETED", tail(log_a)
            superseded = run_journal(state_a, "demo", older)
            assert superseded["status"] == "superseded" and superseded["records"] == [], superseded
            assert not (state_a / "demo" / "runs" / f"{deployed}.json").exists()  # known only from the fleet
            assert observe(bed) == after
        finally:
            stop_active_runs(stack.api)  # while the workers are there to stop their runs

    # History, from B's machine: A's killed run, recovered, and B's deploy.
    history = subprocess.run(
        [*CLI, "history", "--fleet", fleet],
        env=stack.env | {"ROLLOUT_STATE_DIRECTORY": str(state_b)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert history.returncode == 0, history.stderr[-2000:]
    lines = {line.split()[2]: line for line in history.stdout.splitlines()[1:]}
    assert "root@worker-a" in lines[killed[:12]] and "recovered" in lines[killed[:12]], history.stdout
    assert "root@worker-b" in lines[deployed[:12]] and "succeeded" in lines[deployed[:12]], history.stdout
    assert "superseded" in lines[older[:12]], history.stdout
