"""The surge strategy on the real test bed, under traffic through HAProxy.

Per instance, surge starts the new container beside the old one (the service publishes a
host port range, `Testbed.publish_port_range`), adds it to HAProxy as `<lb_server>-surge`,
drains and removes the old container, moves `<lb_server>` to the new container's port and
deletes the added server. What a person would check afterwards, and what these tests assert:

- no request failed, and HAProxy never sent requests to fewer servers than there are
  instances (`CapacitySampler.minimum >= 3`): each instance kept one server taking them;
- after a run: every instance runs the new image in one container (no leftover second
  container, running or not), `<lb_server>` points at the host port that container got,
  no `-surge` server is left, every server UP and ready, the compose files changed only in
  the image value, the fleet unlocked;
- after a rollback, or a killed run and `rollout recover`: the same, on v1, with the
  compose files byte-identical and the old container the same one, never stopped;
- what surge cannot do is refused before anything is touched, naming the instance and
  the problem: a fixed host port, `container_name`, `network_mode: host`, replicas, an LB
  that cannot add servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from compose_rollout.errors import DeployFailed, RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.capacity import CapacitySampler
from compose_rollout.testbed.traffic import Traffic
from tests.fleet.inflight import SlowRequests, wait_until
from tests.fleet.test_command_lb import actions, command_fleet
from tests.fleet.test_faults import CLI, cli_deploy, journal
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]

SURGE = {"strategy": "surge"}


@pytest.fixture
def surge_fleet(fresh_fleet: Testbed) -> Testbed:
    """The bed with every instance publishing the host port range 8080-8081 (on 8080)."""
    fresh_fleet.publish_port_range()
    return fresh_fleet


@dataclass(frozen=True)
class Container:
    id: str
    running: bool
    started_at: str  # a container stopped and started again has another
    image: str


@dataclass(frozen=True)
class Seen:
    """What a person would check, the surge's leftovers included."""

    compose: dict[str, bytes]
    containers: dict[str, tuple[Container, ...]]  # every container of each project, running or not
    lb_addresses: dict[str, tuple[str, int]]  # every server of the backend: where HAProxy sends it
    lb_status: dict[str, str]  # every server of the backend: `show stat` status
    lb_admin: dict[str, str]  # every server of the backend: srv_admin_state (0: ready)
    locks: tuple[str, ...]


def look(bed: Testbed) -> Seen:
    states = bed.haproxy_servers_state()
    return Seen(
        compose={i.name: i.compose_file.read_bytes() for i in bed.instances},
        containers={
            i.name: tuple(
                Container(c["Id"], c["State"]["Running"], c["State"]["StartedAt"], c["Image"])
                for c in bed.project_containers(i.name)
            )
            for i in bed.instances
        },
        lb_addresses=bed.haproxy_server_addresses(),
        lb_status={name: row["status"] for name, row in bed.haproxy_server_states().items()},
        lb_admin={name: row["srv_admin_state"] for name, row in states.items()},
        locks=tuple(sorted(str(p) for i in bed.instances for p in i.project_directory.glob(".compose-rollout-*.lock"))),
    )


def assert_settled(bed: Testbed, seen: Seen, image: str) -> None:
    """One running container per project on `image`, its server at its port, nothing more."""
    for instance in bed.instances:
        containers = seen.containers[instance.name]
        assert [(c.running, c.image) for c in containers] == [(True, image)], f"{instance.name}: {containers}"
        port = bed.published_port(instance.name)
        assert seen.lb_addresses.get(instance.lb_server) == (instance.address, port), seen.lb_addresses
    assert set(seen.lb_addresses) == {i.lb_server for i in bed.instances}, "a -surge server was left behind"
    assert set(seen.lb_status.values()) == {"UP"}, seen.lb_status
    assert set(seen.lb_admin.values()) == {"0"}, seen.lb_admin  # ready: neither drained nor in maintenance
    assert seen.locks == (), "the run left the fleet locked"


def only_the_image_changed(before: bytes, after: bytes, repository: str) -> bool:
    new_image = after.split(b"image: ")[1].split()[0]
    return after.replace(new_image, f"{repository}:v1".encode()) == before


def sampled(bed: Testbed) -> CapacitySampler:
    return CapacitySampler(bed.admin.server_stats, bed.lb_backend)


# --------------------------------------------------------------------------- a, e


@pytest.mark.timeout(360)
@pytest.mark.parametrize("batch_size", [1, "100%"])
def test_a_surge_and_a_surge_back_from_the_port_it_got_lose_no_server_and_no_request(
    surge_fleet: Testbed, tmp_path: Path, batch_size: int | str
) -> None:
    """Expected: v1 -> v2 with slow requests in flight; with batches of one and with the
    whole fleet at once (allowed for surge only), HAProxy always has 3 servers taking
    requests, each instance's `-surge` server took some, and the old containers are gone.
    Then every container serves on 8081, not on the 8080 the fleet file's health_url
    names: `rollout status` still shows each instance healthy (it asks the port Docker
    gave), and a surge back (v2 -> v1) starts beside it on 8080 again, without losing a
    server or a request."""
    bed = surge_fleet
    before = look(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    fleet = fleet_file(bed, tmp_path, rollout={**SURGE, "batch_size": batch_size})
    # One 10 s request in flight on every instance as the run starts: sent before the load,
    # whose own slow requests would otherwise already count as "one on every instance".
    slow = SlowRequests(bed, 10)
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with sampled(bed) as capacity:
        rows = rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="test")
    seen = traffic.stop()

    assert [row["result"] for row in rows] == ["updated"] * 3
    assert seen.failed == 0, seen.failures
    assert set(slow.codes()) == {200}  # the old containers outlived the requests they had
    assert seen.versions.get("v2", 0) > 0
    assert capacity.minimum >= 3, f"fewest servers taking requests: {capacity.lowest()}"
    assert capacity.seconds_below(3) == 0
    assert all(capacity.ever_serving(f"{i.lb_server}-surge") for i in bed.instances), "no surge server took requests"

    after = look(bed)
    assert_settled(bed, after, v2)
    for instance in bed.instances:
        old, new = before.containers[instance.name][0], after.containers[instance.name][0]
        assert new.id != old.id
        # Started beside the old one, which held 8080: Docker gave it the other port of the range.
        assert bed.published_port(instance.name) == 8081
        assert only_the_image_changed(before.compose[instance.name], after.compose[instance.name], bed.image_repository)
        assert f"{bed.image_repository}:v2@sha256:".encode() in after.compose[instance.name]

    v1 = bed.image_id(f"{bed.image_repository}:v1")
    status = subprocess.run([*CLI, "status", "--fleet", fleet], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    assert status.stdout.count("HTTP 200") == 3 and status.stdout.count("UP/READY") == 3, status.stdout

    traffic = Traffic(bed.lb_url)
    traffic.start()
    with sampled(bed) as capacity:
        rows = rolling_deploy(fleet_file=fleet, tag="v1", triggered_by="test")
    seen = traffic.stop()
    assert [row["result"] for row in rows] == ["updated"] * 3
    assert seen.failed == 0, seen.failures
    assert capacity.minimum >= 3, f"fewest servers taking requests: {capacity.lowest()}"
    assert_settled(bed, look(bed), v1)
    assert {bed.published_port(i.name) for i in bed.instances} == {8080}


# ------------------------------------------------------------------------------ b


def deploy_broken(fleet: str, url: str, capacity: CapacitySampler) -> None:
    """A surge to the image whose /health never passes, under traffic through `url`: it
    fails at app-1's health gate, no request fails, and `capacity` never sees fewer than
    3 servers taking requests."""
    traffic = Traffic(url)
    traffic.start()
    with capacity, pytest.raises(DeployFailed) as raised:
        rolling_deploy(fleet_file=fleet, tag="broken", triggered_by="test")
    seen = traffic.stop()
    message = str(raised.value)
    assert "instance app-1" in message and "/health" in message, message
    assert seen.failed == 0, seen.failures
    assert capacity.minimum >= 3, f"fewest servers taking requests: {capacity.lowest()}"


@pytest.mark.timeout(300)
def test_a_broken_image_with_surge_is_rolled_back_and_the_old_container_never_stops(
    surge_fleet: Testbed, tmp_path: Path
) -> None:
    """Expected: the new container of app-1 fails its health gate on its own port; it is
    removed (and its `-surge` server, if it got that far), the compose file restored byte
    for byte, and app-1's old container kept serving all along: same id, same start."""
    bed = surge_fleet
    before = look(bed)
    v1 = bed.image_id(f"{bed.image_repository}:v1")
    deploy_broken(fleet_file(bed, tmp_path, rollout=SURGE, health={"timeout_seconds": 8}), bed.lb_url, sampled(bed))
    after = look(bed)
    assert_settled(bed, after, v1)
    assert after.compose == before.compose  # byte for byte
    assert after.containers == before.containers  # the same containers, never stopped or restarted
    assert after.lb_addresses == before.lb_addresses


# ------------------------------------------------------------------------------ c


def running_containers(bed: Testbed, name: str) -> int:
    return sum(1 for c in bed.project_containers(name) if c["State"]["Running"])


@pytest.mark.timeout(360)
@pytest.mark.parametrize("moment", ["second container running", "surge server added"])
def test_a_killed_surge_is_recovered_by_rollout_recover(surge_fleet: Testbed, tmp_path: Path, moment: str) -> None:
    """Expected: SIGKILL of `rollout deploy --strategy surge` while app-2 is mid-surge (app-1
    already moved), then `rollout recover`: the stray second container and the half-registered
    `app-2-surge` server are gone, app-1 is back on v1, app-2's old container never stopped,
    every server in rotation, the fleet unlocked, no request failed."""
    bed = surge_fleet
    before = look(bed)
    v1 = bed.image_id(f"{bed.image_repository}:v1")
    state = tmp_path / "state"
    fleet = fleet_file(bed, tmp_path)  # the strategy comes from the command line
    traffic = Traffic(bed.lb_url)
    traffic.start()
    with cli_deploy(fleet, "v2", tmp_path / "deploy.log", "--strategy", "surge") as process:
        if moment == "second container running":
            wait_until(lambda: running_containers(bed, "app-2") == 2, "a second container for app-2", timeout=180)
        else:
            wait_until(lambda: "app-2-surge" in bed.haproxy_server_states(), "HAProxy to list app-2-surge", 180)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    killed = look(bed)
    # The fault is real: app-2 is mid-surge, and the fleet stays locked until recovered.
    if moment == "second container running":
        assert len(killed.containers["app-2"]) == 2, (tmp_path / "deploy.log").read_text()[-3000:]
    else:
        assert "app-2-surge" in killed.lb_addresses
    assert killed.locks != ()

    recovered = subprocess.run([*CLI, "recover", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    seen = traffic.stop()
    assert recovered.returncode == 0, recovered.stdout[-3000:] + recovered.stderr[-3000:]
    assert "recovered" in recovered.stdout
    after = look(bed)
    assert_settled(bed, after, v1)
    assert after.compose == before.compose
    assert after.containers["app-2"] == before.containers["app-2"]  # the old one kept serving
    assert after.containers["app-3"] == before.containers["app-3"]  # never touched
    assert seen.failed == 0, seen.failures
    found = journal(state)
    assert found is not None and found["status"] == "recovered"


# ------------------------------------------------------------------------------ d


@pytest.mark.timeout(180)
def test_surge_on_a_fixed_host_port_is_refused_before_anything_is_touched(fresh_fleet: Testbed, tmp_path: Path) -> None:
    """Expected: the bed's own compose files publish the fixed 127.0.1.N:8080, where a second
    container cannot start; preflight says so per instance and advises a range. Through
    the flow's parameter and through `rollout deploy --strategy surge` alike."""
    bed = fresh_fleet
    before = look(bed)
    fleet = fleet_file(bed, tmp_path)
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet, tag="v2", strategy="surge", triggered_by="test")
    message = str(raised.value)
    assert "app-1" in message and "fixed host port" in message and "range" in message, message
    assert look(bed) == before

    cli = subprocess.run(
        [*CLI, "deploy", "--fleet", fleet, "--tag", "v2", "--strategy", "surge"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert cli.returncode == 1 and "fixed host port" in cli.stderr, cli.stdout[-2000:] + cli.stderr[-2000:]
    assert look(bed) == before


COMPOSE_EDITS = {
    "container_name": "    container_name: app-2-server\n",
    "network_mode": "    network_mode: host\n",
    "replicas": "    deploy:\n      replicas: 2\n",
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("key", sorted(COMPOSE_EDITS))
def test_a_service_surge_cannot_run_twice_is_refused_naming_the_instance_and_the_key(
    surge_fleet: Testbed, tmp_path: Path, key: str
) -> None:
    """Expected: app-2's compose file (port range and all) asks for a container that cannot
    have a second beside it; preflight refuses naming app-2 and the key, touching nothing
    (the file as the person left it, no container started or stopped)."""
    bed = surge_fleet
    app2 = bed.instance("app-2").compose_file
    app2.write_text(app2.read_text().replace("  server:\n", "  server:\n" + COMPOSE_EDITS[key], 1))
    before = look(bed)
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet_file(bed, tmp_path, rollout=SURGE), tag="v2", triggered_by="test")
    message = str(raised.value)
    assert "app-2" in message and key in message, message
    assert look(bed) == before


@pytest.mark.timeout(180)
def test_surge_through_an_lb_that_cannot_add_servers_is_refused(surge_fleet: Testbed, tmp_path: Path) -> None:
    """Expected: the `command` adapter (the fleet owner's commands, here driving the bed's
    HAProxy) has no add_server; the refusal names it and the setting that needs it,
    touching nothing: no command ran."""
    bed = surge_fleet
    before = look(bed)
    log = tmp_path / "commands.log"
    fleet = command_fleet(bed, tmp_path, log, rollout=SURGE)
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="test")
    message = str(raised.value)
    assert "add_server" in message and "rollout.strategy: surge" in message, message
    assert look(bed) == before
    assert actions(log) == []  # no drain, ready, recheck or shutdown was asked
