"""The fault matrix (issue 4) on the real test bed, under traffic through HAProxy.

Each test causes a real fault (a host cut off, the registry stopped, a full disk, a
killed orchestrator...) and asserts what a person would check afterwards: the fleet
serves on one version, no server is left drained, every compose file is the new one
or byte-identical to the old, no request failed, and the message names what broke.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.traffic import Traffic, TrafficResult
from tests.fleet.inflight import SlowRequests, wait_until
from tests.fleet.test_rollout import deploy_under_traffic, fleet_file, observe

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]

CLI = [sys.executable, "-m", "compose_rollout.cli"]


def docker(*argv: str, stdin: str | None = None) -> str:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the 28.x client has no buildx plugin here
    done = subprocess.run(
        ["docker", *argv], input=stdin, capture_output=True, text=True, timeout=120, check=True, env=env
    )
    return done.stdout.strip()


def push_variant(bed: Testbed, tag: str, *dockerfile: str) -> str:
    """Build an image FROM v2 with extra Dockerfile lines, push it as `tag`; its digest."""
    ref = f"{bed.image_repository}:{tag}"
    docker("build", "-q", "-t", ref, "-", stdin="\n".join([f"FROM {bed.image_repository}:v2", *dockerfile]) + "\n")
    pushed = docker("push", ref)
    digest = next(word for word in pushed.split() if word.startswith("sha256:"))
    return digest


def journal(state: Path, fleet: str = "demo", run_id: str | None = None) -> dict[str, Any] | None:
    """A run's journal under a state directory: run `run_id`'s, or else the newest."""
    runs = state / fleet / "runs"
    if run_id is not None:
        path = runs / f"{run_id}.json"
        return json.loads(path.read_text()) if path.exists() else None
    newest = sorted(runs.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest[-1].read_text()) if newest else None


def wait_for_journal(
    state: Path,
    ready: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
    fleet: str = "demo",
    run_id: str | None = None,
) -> dict[str, Any]:
    """Poll the run journal (observed state) until `ready` holds, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = journal(state, fleet, run_id)
        except (ValueError, OSError):  # caught between write and rename: read again
            found = None
        if found is not None and ready(found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"journal never reached the awaited state; last: {journal(state, fleet, run_id)}")


def record(found: dict[str, Any], name: str) -> dict[str, Any]:
    return next((r for r in found["records"] if r["name"] == name), {})


@contextmanager
def cli_deploy(fleet: str, tag: str, out: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """`rollout deploy` (with `flags`, e.g. "--strategy", "surge") in its own process group
    (its temporary Prefect server is a child)."""
    with open(out, "wb") as log:
        process = subprocess.Popen(
            [*CLI, "deploy", "--fleet", fleet, "--tag", tag, *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the orphaned Prefect server, if any
            except ProcessLookupError:
                pass


def assert_serving_v1(bed: Testbed, before: Any, seen: TrafficResult) -> None:
    after = observe(bed)
    assert after.images == before.images
    assert after.compose == before.compose
    assert set(after.lb.values()) == {"UP"}, after.lb
    assert after.locks == (), "the run left the fleet locked"
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(120)
def test_a_host_down_before_the_run_is_refused_in_preflight(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    bed.stop_sshd("app-2")
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet_file(bed, tmp_path), tag="v2", triggered_by="test")
    assert "refused before any instance was touched" in str(raised.value)
    assert "app-2" in str(raised.value) and "cannot connect" in str(raised.value)
    assert observe(bed) == before


@pytest.mark.timeout(240)
def test_a_host_cut_off_after_its_drain_is_rolled_back_and_re_enabled(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path, ssh={"connect_timeout_seconds": 2})
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log") as process:
        # app-2 drained, compose not yet written: cut the host off right there.
        wait_for_journal(state, lambda j: record(j, "app-2").get("drained") is True)
        bed.cut_host("app-2")
        process.wait(timeout=180)
    seen = traffic.stop()
    output = (tmp_path / "deploy.log").read_text()
    assert process.returncode == 1
    assert "failed on instance app-2" in output and "COULD NOT REACH app-2" in output
    # app-2 could not be reached, but it was drained by this run: it is back in rotation
    # and, never changed, still serves v1; app-1 was rolled back anyway.
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose
    assert set(after.lb.values()) == {"UP"}, after.lb
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(180)
def test_the_registry_down_during_pre_pull_drains_nothing(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    # Unique content: an image the engine already holds (another tag, an earlier run) would
    # need no pull at all, and the outage would go unnoticed.
    digest = push_variant(bed, "v3-prepull", f"RUN echo v3-prepull-{uuid.uuid4()} > /www/version")
    docker("rmi", f"{bed.image_repository}:v3-prepull")
    with pytest.raises(subprocess.CalledProcessError):  # no host has it now: it must be pulled
        docker("image", "inspect", f"{bed.image_repository}@{digest}")
    bed.stop_registry()
    before = observe(bed)
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(
            fleet_file=fleet_file(bed, tmp_path), image=f"{bed.image_repository}:v3-prepull@{digest}", triggered_by="t"
        )
    message = str(raised.value)
    assert "pre-pull" in message and "nothing was drained" in message
    assert observe(bed) == before


@pytest.mark.timeout(240)
def test_a_container_that_crashes_after_starting_is_rolled_back(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    push_variant(bed, "crashes", 'CMD ["/bin/sh", "-c", "httpd -p 8080 -h /www; sleep 1; exit 3"]')
    before = observe(bed)
    # The default policy: three passes 0.5 s apart and 2 s of stability outlast the crash.
    health = {"timeout_seconds": 8, "consecutive_successes": 3, "interval_seconds": 0.5, "stabilization_seconds": 2}
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, health=health), "crashes")
    assert rows is None and "instance app-1" in failure and "await-healthy" in failure
    assert_serving_v1(bed, before, seen)


@pytest.mark.timeout(240)
def test_health_that_passes_then_fails_is_caught_by_the_stabilisation_window(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    # /health answers for 5 s after start, then 404: it passes the gate, then flaps.
    push_variant(bed, "flaps", 'CMD ["/bin/sh", "-c", "(sleep 5; rm /www/health) & exec /bin/sh /entrypoint.sh"]')
    before = observe(bed)
    health = {"consecutive_successes": 2, "interval_seconds": 0.25, "stabilization_seconds": 12, "timeout_seconds": 20}
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, health=health), "flaps")
    assert rows is None and "instance app-1" in failure and "stabilisation window" in failure
    assert_serving_v1(bed, before, seen)


@pytest.mark.timeout(240)
def test_when_the_lb_never_sees_the_new_container_up_the_wait_times_out_and_rolls_back(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    # The new version serves / (what compose-rollout's own gate probes here) but not the
    # /health that HAProxy checks: only the LB's own check can catch it.
    push_variant(bed, "no-lb-health", "RUN rm /www/health")
    path = Path(fleet_file(bed, tmp_path, health={"lb_timeout_seconds": 4}))
    document = yaml.safe_load(path.read_text())
    for instance in document["instances"]:
        instance["health_url"] = instance["health_url"].removesuffix("health")
    path.write_text(yaml.safe_dump(document))
    before = observe(bed)
    rows, failure, seen = deploy_under_traffic(bed, str(path), "no-lb-health")
    assert rows is None and "instance app-1 at step await-lb-up" in failure
    assert "waited 4 s for the LB to see app-1 UP" in failure
    assert_serving_v1(bed, before, seen)


@pytest.mark.timeout(300)
def test_with_on_locked_wait_a_second_run_waits_for_the_first_then_runs(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)
    with cli_deploy(fleet, "v2", tmp_path / "first.log") as first:
        wait_for_journal(state, lambda j: record(j, "app-1").get("drained") is True)
        second = subprocess.run(
            [*CLI, "deploy", "--fleet", fleet, "--tag", "v1", "--on-locked", "wait"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        first.wait(timeout=240)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = sorted(
        (json.loads(p.read_text()) for p in (state / "demo" / "runs").glob("*.json")), key=itemgetter("started_at")
    )
    assert [(r["target"].split("@")[0].rsplit(":", 1)[1], r["status"]) for r in runs] == [
        ("v2", "succeeded"),
        ("v1", "succeeded"),
    ]
    assert runs[1]["records"][0]["drained_at"] > runs[0]["finished_at"]  # never interleaved
    v1 = bed.image_id(f"{bed.image_repository}:v1")
    assert {bed.running_image(i.name) for i in bed.instances} == {v1}  # the later request won
    assert observe(bed).locks == ()


@pytest.mark.timeout(180)
def test_a_request_longer_than_the_drain_timeout_fails_the_run_by_default_and_completes(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    slow = SlowRequests(bed, 12)
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet_file(bed, tmp_path, rollout={"drain_timeout_seconds": 2}), tag="v2")
    assert "instance app-1 at step wait-for-sessions" in str(raised.value)
    assert "on_drain_timeout: fail" in str(raised.value)
    assert set(slow.codes()) == {200}  # the long requests were never cut
    assert observe(bed) == before


@pytest.mark.timeout(180)
def test_with_proceed_a_request_longer_than_the_drain_timeout_is_cut_and_counted(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    slow = SlowRequests(bed, 12)
    fleet = fleet_file(bed, tmp_path, rollout={"drain_timeout_seconds": 2, "on_drain_timeout": "proceed"})
    rows = rolling_deploy(fleet_file=fleet, tag="v2")
    assert sum(int(row["sessions cut"]) for row in rows) >= 1
    slow.codes()
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}
    assert set(observe(bed).lb.values()) == {"UP"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moment", ["compose file written", "new container running"])
def test_a_killed_orchestrator_is_recovered_by_rollout_recover(
    fresh_fleet: Testbed, tmp_path: Path, moment: str
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log") as process:
        # Mid-instance: app-2 drained and its compose file (maybe) written, then SIGKILL;
        # or later, once `up` has replaced app-2's container with the new version.
        wait_for_journal(state, lambda j: record(j, "app-2").get("file_written") is True)
        if moment == "new container running":
            wait_for_journal(state, lambda j: record(j, "app-2").get("restarted") is True)
            wait_until(lambda: bed.running_image("app-2") == v2, "app-2 to run v2")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert int(bed.haproxy_servers_state()["app-2"]["srv_admin_state"]) & 0x08  # drained: the fault is real
    assert observe(bed).locks != ()  # and the fleet stays locked until recovered
    recovered = subprocess.run([*CLI, "recover", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    seen = traffic.stop()
    assert recovered.returncode == 0, recovered.stdout[-3000:] + recovered.stderr[-3000:]
    assert "recovered" in recovered.stdout
    assert_serving_v1(bed, before, seen)
    found = journal(state)
    assert found is not None and found["status"] == "recovered"


@pytest.mark.timeout(300)
def test_ctrl_c_rolls_back_and_leaves_nothing_drained(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    state = tmp_path / "state"
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet_file(bed, tmp_path), "v2", tmp_path / "deploy.log") as process:
        wait_for_journal(state, lambda j: record(j, "app-2").get("drained") is True)
        process.send_signal(signal.SIGINT)  # to the CLI only, as a terminal's Ctrl-C would
        process.wait(timeout=180)
    seen = traffic.stop()
    assert process.returncode != 0
    assert_serving_v1(bed, before, seen)
    found = journal(state)
    assert found is not None and found["status"] == "rolled back"


@pytest.mark.timeout(420)
def test_a_run_killed_on_one_worker_machine_is_reverted_by_the_next_deploy_from_another(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    """Worker B keeps its state apart from worker A's (no shared filesystem). Its next
    deploy finds A's killed run on the fleet, reverts it, then deploys; A sees both."""
    bed = fresh_fleet
    state_a = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)
    worker_b = {**os.environ, "ROLLOUT_STATE_DIRECTORY": str(tmp_path / "worker-b")}
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log") as process:
        killed = wait_for_journal(state_a, lambda j: record(j, "app-2").get("file_written") is True)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert observe(bed).locks != ()
    deployed = subprocess.run(
        [*CLI, "deploy", "--fleet", fleet, "--tag", "v2"], env=worker_b, capture_output=True, text=True, timeout=240
    )
    seen = traffic.stop()
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    said = deployed.stdout + deployed.stderr
    assert f"run {killed['run_id']} (to " in said and "did not finish; reverting" in said
    assert journal(tmp_path / "worker-b", run_id=killed["run_id"])["status"] == "recovered"  # type: ignore[index]
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    after = observe(bed)
    assert set(after.images.values()) == {v2} and set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures
    seen_from_a = subprocess.run([*CLI, "history", "--fleet", fleet], capture_output=True, text=True, timeout=60)
    assert seen_from_a.returncode == 0, seen_from_a.stderr[-2000:]
    assert "recovered" in seen_from_a.stdout and "succeeded" in seen_from_a.stdout, seen_from_a.stdout


@pytest.mark.timeout(420)
def test_an_interrupt_during_the_rollback_leaves_the_fleet_locked_for_recover_not_succeeded(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    """Ctrl-C, then a TERM (a supervisor stopping the process) while it rolls back. (A
    second SIGINT is not used: while the main thread is inside one of Prefect's API calls,
    anyio's runner turns SIGINT into a cancel of that call, and it may arrive late.)"""
    bed = fresh_fleet
    before = observe(bed)
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log") as process:
        # app-1 moved to v2; app-2 is being updated: Ctrl-C, then TERM once the rollback
        # has begun (app-2 first, so app-1 is still on v2 when it stops).
        wait_for_journal(state, lambda j: record(j, "app-2").get("drained") is True)
        process.send_signal(signal.SIGINT)
        wait_for_journal(state, lambda j: record(j, "app-2").get("rollback_attempted") is True)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=180)
    output = (tmp_path / "deploy.log").read_text()
    assert process.returncode != 0
    found = journal(state)
    assert found is not None and found["status"] is None, f"recorded {found and found['status']!r}: {output[-2000:]}"
    assert record(found, "app-1")["outcome"] == "updated"  # mixed versions: not a success, not rolled back
    assert observe(bed).locks != (), "an interrupted rollback must leave the fleet locked"
    assert set(observe(bed).lb.values()) == {"UP"}  # nothing left drained, even so
    assert "rollout recover" in output

    recovered = subprocess.run([*CLI, "recover", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    seen = traffic.stop()
    assert recovered.returncode == 0, recovered.stdout[-3000:] + recovered.stderr[-3000:]
    assert_serving_v1(bed, before, seen)
    assert journal(state, run_id=found["run_id"])["status"] == "recovered"  # type: ignore[index]


@pytest.mark.timeout(300)
def test_a_second_run_for_the_same_fleet_is_refused_while_the_first_goes_on(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)
    with cli_deploy(fleet, "v2", tmp_path / "first.log") as first:
        running = wait_for_journal(state, lambda j: record(j, "app-1").get("drained") is True)
        second = subprocess.run(
            [*CLI, "deploy", "--fleet", fleet, "--tag", "v1"], capture_output=True, text=True, timeout=240
        )
        first.wait(timeout=240)
    assert second.returncode == 1 and "refusing to interleave" in second.stderr
    assert f"is locked by run {running['run_id']} to " in second.stderr, second.stderr[-2000:]  # names the first
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}


@pytest.mark.timeout(240)
def test_a_full_disk_while_writing_the_compose_file_leaves_the_old_file_intact(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    app2 = bed.instance("app-2").project_directory
    saved = {path.name: path.read_bytes() for path in app2.iterdir()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(app2)], check=True, timeout=30)
    try:
        for name, data in saved.items():
            (app2 / name).write_bytes(data)
        (app2 / "ssh_host_ed25519_key").chmod(0o600)
        with open(app2 / "filler", "wb", buffering=0) as filler:  # fill the disk for real
            try:
                while True:
                    filler.write(b"\0" * 1024)
            except OSError:
                pass
        before = observe(bed)
        rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path), "v2")
        assert rows is None and "instance app-2 at step set-image" in failure
        assert f"{app2} has 0 KiB free" in failure, failure  # SFTP only says "Failure"; df says why
        assert_serving_v1(bed, before, seen)
        assert not any(name.endswith(".rollout-tmp") for name in os.listdir(app2))
    finally:
        subprocess.run(["umount", "-l", str(app2)], check=True, timeout=30)
    assert sorted(os.listdir(app2)) == sorted(saved)


@pytest.mark.timeout(300)
def test_a_failed_rollback_stops_keeps_the_others_serving_and_says_what_needs_a_person(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    # app-3 is unhealthy on v2 (app-1 and app-2 move and serve v2). While app-3's health is
    # checked, v1 disappears: the registry stops and no host has the image any more, so
    # bringing app-3 back to v1 fails.
    app3 = bed.instance("app-3").compose_file
    app3.write_text(app3.read_text().replace("LOG_LEVEL: info", "LOG_LEVEL: info\n      UNHEALTHY_ON_VERSION: v2"))
    bed.compose("app-3", "up", "-d")
    bed.wait_all_up()
    v1 = bed.image_id(f"{bed.image_repository}:v1")
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path, health={"timeout_seconds": 10})
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log") as process:
        wait_for_journal(state, lambda j: record(j, "app-3").get("step") == "await-healthy", timeout=180)
        bed.stop_registry()
        docker("image", "rm", "-f", v1)
        process.wait(timeout=240)
    seen = traffic.stop()
    output = (tmp_path / "deploy.log").read_text()
    assert process.returncode == 1
    assert "ROLLBACK FAILED on app-3" in output and "A person must check app-3" in output
    assert "still on the new image: app-2, app-1" in output
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert bed.running_image("app-1") == v2 and bed.running_image("app-2") == v2  # left serving, not half-reverted
    states = bed.haproxy_server_states()
    assert states["app-1"]["status"] == "UP" and states["app-2"]["status"] == "UP"
    assert not states["app-3"]["status"].startswith("DRAIN")  # re-enabled; its own check keeps it out
    assert seen.failed == 0, seen.failures
    found = journal(state)
    assert found is not None and found["status"] == "needs attention"

    # The fleet stays locked for a person: the next run (a schedule, a webhook) must not
    # take it over and roll back over a manual fix.
    assert observe(bed).locks != ()
    refused = subprocess.run(
        [*CLI, "deploy", "--fleet", fleet, "--tag", "v1"], capture_output=True, text=True, timeout=240
    )
    assert refused.returncode == 1
    assert "ended needing a person" in refused.stderr and "--i-checked" in refused.stderr, refused.stderr[-2000:]
    assert bed.running_image("app-1") == v2 and bed.running_image("app-2") == v2
    released = subprocess.run(
        [*CLI, "recover", "--fleet", fleet, "--i-checked"], capture_output=True, text=True, timeout=240
    )
    assert released.returncode == 0, released.stdout[-2000:] + released.stderr[-2000:]
    assert "released as a person checked" in released.stdout
    assert observe(bed).locks == () and journal(state, run_id=found["run_id"])["status"] == "resolved"  # type: ignore[index]
    assert bed.running_image("app-1") == v2  # nothing rolled back on the person's word
