"""The deployments in prefect.yaml, on a real Prefect server with a real process worker."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compose_rollout.testbed import Testbed
from compose_rollout.traffic import Traffic
from tests.fleet.test_faults import assert_serving_v1, push_variant, record, wait_for_journal
from tests.fleet.test_rollout import fleet_file, observe
from tests.prefect_server import clean_env, free_port, prefect_server, stop, tail, wait_until_up

pytestmark = pytest.mark.fleet

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]


def prefect(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run([*PREFECT, *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(argv)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def run_and_wait(api: str, env: dict[str, str], *params: str, timeout: float = 240) -> dict[str, Any]:
    """`prefect deployment run` as a user would; wait for the run's final state."""
    argv = ["deployment", "run", "rolling-deploy/fleet"]
    for param in params:
        argv += ["--param", param]
    output = prefect(env, *argv)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert run_id, output
    return wait_for_final(api, run_id.group(1), timeout)


def wait_for_final(api: str, run_id: str, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).raise_for_status().json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return dict(run)
        time.sleep(0.5)  # polling the run's observed state in Prefect's API
    raise AssertionError(f"flow run {run_id} did not finish within {timeout:g} s")


def wait_for_run(api: str, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=10).raise_for_status().json()
        found = [run for run in runs if match(run)]
        if found:
            return dict(found[0])
        time.sleep(0.05)  # polling Prefect's API for the run the push should create
    raise AssertionError(f"no matching flow run within {timeout:g} s")


@dataclass(frozen=True)
class Stack:
    api: str
    env: dict[str, str]
    state: Path
    worker_log: Path


@pytest.fixture(scope="module")
def stack(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real Prefect server, the process work pool, `prefect deploy --all` from this
    checkout (as the README says), and a real worker."""
    home = tmp_path_factory.mktemp("prefect-home")
    files = tmp_path_factory.mktemp("stack")
    with prefect_server(home) as api:
        env = clean_env(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            COMPOSE_ROLLOUT_FLEET=fleet_file(testbed, files, health={"timeout_seconds": 8}),
        )
        prefect(env, "work-pool", "create", "compose-rollout", "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        log = files / "worker.log"
        with log.open("wb") as output:
            worker = subprocess.Popen(
                [*PREFECT, "worker", "start", "--pool", "compose-rollout"],
                env=env,
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield Stack(api, env, files / "state", log)
        finally:
            stop(worker)


@pytest.mark.timeout(600)
def test_prefect_deploy_all_and_a_real_worker_move_the_fleet(fresh_fleet: Testbed, stack: Stack) -> None:
    bed = fresh_fleet
    before = observe(bed)
    deployment = httpx.get(f"{stack.api}/deployments/name/rolling-deploy/fleet", timeout=10).raise_for_status().json()
    assert deployment["global_concurrency_limit"]["limit"] == 1 and deployment["enforce_parameter_schema"] is True
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert "tag" in deployment["parameter_openapi_schema"]["properties"]

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
    with log.open("wb") as output:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "compose_rollout.webhooks", "--config", str(config)],
            env=env,
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", receiver, log, 30)
        bed.notify_registry_pushes(f"http://127.0.0.1:{port}/hooks/distribution", {"Authorization": [secret]})
        pushed_at = time.monotonic()
        push_variant(bed, "v3.0.0", "RUN echo v3 > /www/version")
        run = wait_for_run(api, lambda r: r["parameters"].get("tag") == "v3.0.0", timeout=60)
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
