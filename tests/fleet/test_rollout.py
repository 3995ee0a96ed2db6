"""Rolling deploys on the real test bed, under steady traffic through HAProxy.

Real Docker engine, registry, one sshd per instance, HAProxy and Prefect; the load
generator runs in its own process. Nothing here is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort

from compose_rollout.errors import DeployFailed
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.traffic import Traffic, TrafficResult
from tests.fleet.inflight import SlowRequests

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


@dataclass(frozen=True)
class FleetState:
    compose: dict[str, bytes]
    containers: dict[str, str]
    images: dict[str, str]
    lb: dict[str, str]
    locks: tuple[str, ...]  # fleet locks left beside the compose files (none between runs)


def observe(bed: Testbed) -> FleetState:
    """What a person would check: compose files, containers, images, the LB's view."""
    servers = bed.haproxy_server_states()
    return FleetState(
        compose={i.name: i.compose_file.read_bytes() for i in bed.instances},
        containers={i.name: bed.container_id(i.name) for i in bed.instances},
        images={i.name: bed.running_image(i.name) for i in bed.instances},
        lb={i.name: servers[i.lb_server]["status"] for i in bed.instances},
        locks=tuple(sorted(str(p) for i in bed.instances for p in i.project_directory.glob(".compose-rollout-*.lock"))),
    )


# Where a test is not about the health policy, a quick one: two passes 0.25 s apart and
# a quarter of a second of stability (the default takes about 3.5 s per instance).
FAST_HEALTH = {"consecutive_successes": 2, "interval_seconds": 0.25, "stabilization_seconds": 0.25}


def fleet_file(bed: Testbed, tmp_path: Path, lb: str = "haproxy", **overrides: Any) -> str:
    overrides["health"] = {**FAST_HEALTH, **overrides.get("health", {})}
    return str(bed.fleet_file(tmp_path / "fleet.yaml", lb=lb, state_directory=str(tmp_path / "state"), **overrides))


def latest_artifact(key: str) -> Artifact:
    """The newest Prefect artifact with `key` (a fleet's run summary: `rollout-<fleet>`)."""
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return artifact


def stop_local_server(env: dict[str, str]) -> None:
    """`prefect server stop` in the Prefect home of `env`: the local server a CLI run left."""
    subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], env=env, capture_output=True, timeout=60)


def deploy_under_traffic(
    bed: Testbed, fleet: str, tag: str
) -> tuple[list[dict[str, object]] | None, str, TrafficResult]:
    traffic = Traffic(bed.lb_url)
    traffic.start()
    rows, failure = None, ""
    try:
        rows = rolling_deploy(fleet_file=fleet, tag=tag, triggered_by="test")
    except DeployFailed as error:
        failure = str(error)
    finally:
        seen = traffic.stop()
    return rows, failure, seen


@pytest.mark.timeout(300)
def test_fleet_moves_to_the_new_tag_without_a_failed_request(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    logins = {i.name: bed.ssh_logins(i.name) for i in bed.instances}
    slow = SlowRequests(bed, 10)  # one in flight on every instance as the run starts, for certain
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path), "v2")

    assert failure == ""
    # One SSH connection per host served the whole run (counted by each sshd).
    assert {i.name: bed.ssh_logins(i.name) - logins[i.name] for i in bed.instances} == {
        i.name: 1 for i in bed.instances
    }
    after = observe(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert after.images == {name: v2 for name in after.images}
    for name, text in after.compose.items():
        # Only the image value changed, pinned to the digest, the tag still readable.
        assert f"{bed.image_repository}:v2@sha256:".encode() in text
        old_line = f"{bed.image_repository}:v1".encode()
        assert text.replace(text.split(b"image: ")[1].split()[0], old_line) == before.compose[name]
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert rows is not None and {row["result"] for row in rows} == {"updated"}

    assert seen.failed == 0, seen.failures
    assert seen.retried == 0, seen  # HAProxy's runtime API closes no client connection
    assert seen.slow_ok > 0 and seen.slow_failed == 0
    assert seen.versions.get("v2", 0) > 0
    # Requests were in flight when instances were drained (app-1's at least), and they completed.
    assert int(rows[0]["sessions at drain"]) > 0  # type: ignore[call-overload]
    assert set(slow.codes()) == {200}
    # The run left its summary in Prefect, per instance.
    artifact = latest_artifact("rollout-demo")
    assert "runs" in (artifact.description or "")
    assert [row["result"] for row in json.loads(str(artifact.data))] == ["updated"] * 3
    # And its progress, moved as instances finished.
    progress = latest_artifact("rollout-demo-progress")
    assert progress.type == "progress" and float(str(progress.data)) == 100.0
    assert (progress.description or "").startswith("3 of 3 instances done (app-1, app-2, app-3)")


@pytest.mark.timeout(300)
def test_a_broken_image_rolls_the_whole_fleet_back_without_a_failed_request(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 8})
    rows, failure, seen = deploy_under_traffic(bed, fleet, "broken")

    assert rows is None
    assert "instance app-1" in failure and "step await-healthy" in failure and "/health" in failure
    assert "Rolled back app-1" in failure
    after = observe(bed)
    assert after.images == before.images  # every instance back on v1
    assert after.compose == before.compose  # byte for byte
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(300)
def test_a_failure_on_a_later_instance_rolls_back_the_ones_already_moved(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    # app-3 fails /health on v2 only: app-1 and app-2 move, app-3 fails, all roll back.
    app3 = bed.instance("app-3").compose_file
    app3.write_text(app3.read_text().replace("LOG_LEVEL: info", "LOG_LEVEL: info\n      UNHEALTHY_ON_VERSION: v2"))
    bed.compose("app-3", "up", "-d")
    bed.wait_all_up()
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 6})
    _, failure, seen = deploy_under_traffic(bed, fleet, "v2")

    assert "instance app-3" in failure and "await-healthy" in failure
    assert "Rolled back app-3, app-2, app-1" in failure
    after = observe(bed)
    assert after.images == before.images
    assert after.compose == before.compose
    assert set(after.lb.values()) == {"UP"}
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(300)
def test_cli_deploy_exits_0_on_success_and_1_with_a_summary_after_rollback(
    fresh_fleet: Testbed, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    bed = fresh_fleet
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 6})
    rollout = [sys.executable, "-m", "compose_rollout.cli", "deploy", "--fleet", fleet]
    # The path a new user takes: no Prefect server, so the first call starts a local one in
    # the background and the next finds it (the other CLI tests share the session's server).
    home = tmp_path / "prefect-home"
    home.mkdir()
    alone = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    request.addfinalizer(lambda: stop_local_server(alone))
    # The fleet file says batches of one, no canary; the flags say otherwise for this run.
    good = subprocess.run(
        [*rollout, "--tag", "v2", "--canary", "--batch-size", "2"],
        env=alone,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert "Prefect: started a local Prefect server at http://127.0.0.1:" in good.stderr
    assert good.stdout.count("updated") == 3
    assert "batch 1/2: app-1" in good.stdout + good.stderr and "batch 2/2: app-2, app-3" in good.stdout + good.stderr
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}

    before = observe(bed)
    bad = subprocess.run([*rollout, "--tag", "broken"], env=alone, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 1
    assert "Prefect: using the local Prefect server an earlier run started" in bad.stderr
    summary = next(line for line in bad.stderr.splitlines() if line.startswith("FAILED: "))
    assert summary.startswith("FAILED: Rollout of fleet demo")
    assert "instance app-1 at step await-healthy" in summary and "Rolled back app-1" in summary
    after = observe(bed)  # app-1 runs v2 again in a new container; the others were never touched
    assert (after.images, after.compose, after.lb) == (before.images, before.compose, before.lb)
    assert {name: after.containers[name] == before.containers[name] for name in after.containers} == {
        "app-1": False,
        "app-2": True,
        "app-3": True,
    }


@pytest.mark.timeout(300)
def test_history_records_runs_and_rollback_returns_to_the_previous_image_once(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path)
    rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="test")
    cli = [sys.executable, "-m", "compose_rollout.cli"]

    back = subprocess.run([*cli, "rollback", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"Rolling back to {bed.image_repository}:v1" in back.stdout
    after = observe(bed)
    assert after.images == before.images  # back on v1, now pinned like any deploy:
    assert all(f"{bed.image_repository}:v1@sha256:".encode() in text for text in after.compose.values())

    again = subprocess.run([*cli, "rollback", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("unchanged") == 3  # a rollback is never rolled back

    shown = subprocess.run([*cli, "history", "--fleet", fleet], capture_output=True, text=True, timeout=60)
    lines = shown.stdout.splitlines()
    assert len(lines) == 1 + 3  # header and three runs, newest first
    assert "via rollback" in lines[1] and "3 unchanged" in lines[1]
    assert "via rollback" in lines[2] and "3 updated" in lines[2] and ":v1" in lines[2]
    assert "via test" in lines[3] and "succeeded" in lines[3] and ":v2@sha256:" in lines[3]


@pytest.mark.timeout(300)
def test_an_older_request_that_starts_late_never_undoes_a_newer_deploy(fresh_fleet: Testbed, tmp_path: Path) -> None:
    """As when a run re-scheduled into a window starts after an urgent deploy made
    meanwhile, or the worker starts two queued runs out of order."""
    bed = fresh_fleet
    fleet = fleet_file(bed, tmp_path)
    rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="hotfix")
    moved = observe(bed)

    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    rows = rolling_deploy(fleet_file=fleet, tag="v1", triggered_by="window", requested_at=hour_ago)

    assert rows == [] and observe(bed) == moved  # nothing touched, every instance serving
    cli = [sys.executable, "-m", "compose_rollout.cli", "history", "--fleet", fleet]
    lines = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert "via window" in lines[1] and "superseded" in lines[1]
    assert "via hotfix" in lines[2] and "succeeded" in lines[2]


@pytest.mark.timeout(300)
def test_the_lb_admin_socket_can_be_a_unix_socket_reached_over_ssh(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    # HAProxy's unix stats socket, never on a network: reached through an SSH host + socat.
    address = f"ssh://127.0.1.2:2222{bed.lb_admin_unix_socket}"
    fleet = fleet_file(bed, tmp_path, load_balancer={"admin_address": address})
    rows, failure, seen = deploy_under_traffic(bed, fleet, "v2")
    assert failure == "" and rows is not None
    assert [row["result"] for row in rows] == ["updated"] * 3
    assert all(float(str(row["seconds out of rotation"])) > 0 for row in rows)  # it really drained
    assert set(observe(bed).lb.values()) == {"UP"}
    assert seen.failed == 0, seen.failures
