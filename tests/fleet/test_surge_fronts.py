"""The surge strategy through the LBs that know a server by its address (nginx, Caddy,
Traefik), each running for real in front of the bed's instances, with surge's two
promises: no failed request, and never fewer servers taking requests than instances
(sampled from the LB every 50 ms), and a killed one recovered. HAProxy runs the same in
test_surge.py.

Such an LB names a server HOST:PORT, so a surge renames each instance's server: after
the first run app-1's server is 127.0.0.x:8081 while the fleet file still says :8080,
and the next run must find it there. A kind takes part once its adapter declares what
surge needs (`SURGE_NEEDS`).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.lb.base import SURGE_NEEDS, Capability
from compose_rollout.lb.caddy import CaddyLoadBalancer
from compose_rollout.lb.nginx import NginxLoadBalancer
from compose_rollout.lb.traefik import TraefikLoadBalancer
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.capacity import CapacitySampler
from compose_rollout.testbed.fronts import FRONTS
from compose_rollout.testbed.traffic import Traffic
from tests.fleet.inflight import SlowRequests, wait_until
from tests.fleet.test_faults import CLI, cli_deploy, journal
from tests.fleet.test_rollout import fleet_file
from tests.fleet.test_surge import SURGE, deploy_broken, only_the_image_changed

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]

CAPABILITIES: dict[str, frozenset[Capability]] = {
    "nginx": NginxLoadBalancer.capabilities,
    "caddy": CaddyLoadBalancer.capabilities,
    "traefik": TraefikLoadBalancer.capabilities,
}
SURGE_KINDS = [kind for kind in FRONTS if set(SURGE_NEEDS) <= CAPABILITIES[kind]]


@pytest.fixture(params=SURGE_KINDS)
def lb(request: pytest.FixtureRequest, fresh_fleet: Testbed) -> str:
    """The LB in front, its instances publishing the port range 8080-8081 (on 8080)."""
    kind: str = request.param
    fresh_fleet.front(kind)  # started (and reset) before the range is published
    fresh_fleet.publish_port_range()
    return kind


def sampled(bed: Testbed, kind: str) -> CapacitySampler:
    """The servers the LB of `kind` sends new requests to, every 50 ms."""
    front = bed.front(kind)
    return CapacitySampler(lambda _: {name: {"status": "UP"} for name in front.serving()}, kind)


def containers(bed: Testbed) -> dict[str, list[tuple[str, str, bool, str]]]:
    """Every container of each project: id, start time, running, image ID."""
    return {
        i.name: [
            (c["Id"], c["State"]["StartedAt"], c["State"]["Running"], c["Image"])
            for c in bed.project_containers(i.name)
        ]
        for i in bed.instances
    }


def assert_settled(bed: Testbed, kind: str, image_id: str) -> None:
    """One running container per project on `image_id`, and the LB has exactly one server
    per instance, at the port its container got, in rotation."""
    for name, found in containers(bed).items():
        assert [(running, image) for _, _, running, image in found] == [(True, image_id)], f"{name}: {found}"
    where = {f"{i.address}:{bed.published_port(i.name)}" for i in bed.instances}
    front = bed.front(kind)
    assert front.known() == where, "a server was left behind, or one is missing"
    assert front.serving() == where
    assert not [p for i in bed.instances for p in i.project_directory.glob(".compose-rollout-*.lock")]


@pytest.mark.timeout(480)
def test_a_surge_through_the_lb_loses_nothing_and_the_next_one_killed_from_the_renamed_servers_is_recovered(
    fresh_fleet: Testbed, lb: str, tmp_path: Path
) -> None:
    """Expected: v1 -> v2 under traffic, with a 10 s request in flight on every instance:
    the LB always sends to 3 servers (4 while a new one serves beside the old one) and
    each instance ends on 8081 with one server there, which `rollout status` finds (the
    fleet file still says 8080). Then a surge back to v1 starts from those servers and is
    SIGKILLed once app-2's new server (at 8080) is in the LB; `rollout recover` removes
    it and app-2's second container, puts app-1 (done, renamed again) back on v2, and
    leaves app-2's and app-3's containers as they were: no request failed, one server
    per instance, the fleet unlocked."""
    bed = fresh_fleet
    front = bed.front(lb)
    compose = {i.name: i.compose_file.read_bytes() for i in bed.instances}
    fleet = fleet_file(bed, tmp_path, lb=lb, rollout=SURGE)
    slow = SlowRequests(bed, 10, lb=lb)
    traffic = Traffic(bed.lb_url_of(lb))
    traffic.start()
    with sampled(bed, lb) as capacity:
        rows = rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="test")
    seen = traffic.stop()

    assert [row["result"] for row in rows] == ["updated"] * 3, rows
    assert seen.failed == 0, seen.failures
    assert seen.versions.get("v2", 0) > 0
    assert set(slow.codes()) == {200}  # the old containers outlived the requests they had
    assert capacity.minimum >= 3, f"fewest servers taking requests: {capacity.lowest()}"
    assert capacity.maximum == 4, "no new container ever served beside an old one"
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert_settled(bed, lb, v2)
    assert {bed.published_port(i.name) for i in bed.instances} == {8081}
    on_v2 = {i.name: i.compose_file.read_bytes() for i in bed.instances}
    for instance in bed.instances:
        assert only_the_image_changed(compose[instance.name], on_v2[instance.name], bed.image_repository)
    status = subprocess.run([*CLI, "status", "--fleet", fleet], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    shown = status.stdout
    assert shown.count("HTTP 200") == 3 and shown.count(front.status_in_rotation) == 3, shown
    assert shown.count("8081 (8080/tcp)") == 3 and "also has" not in shown, shown

    before = containers(bed)
    app2_new = f"{bed.instance('app-2').address}:8080"
    traffic = Traffic(bed.lb_url_of(lb))
    traffic.start()
    with cli_deploy(fleet, "v1", tmp_path / "deploy.log") as process:
        wait_until(lambda: app2_new in front.known(), f"{lb} to have {app2_new}", timeout=180)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert len(containers(bed)["app-2"]) == 2, (tmp_path / "deploy.log").read_text()[-3000:]
    recovered = subprocess.run([*CLI, "recover", "--fleet", fleet], capture_output=True, text=True, timeout=240)
    seen = traffic.stop()
    assert recovered.returncode == 0, recovered.stdout[-3000:] + recovered.stderr[-3000:]
    assert "recovered" in recovered.stdout
    assert_settled(bed, lb, v2)
    assert {i.name: i.compose_file.read_bytes() for i in bed.instances} == on_v2
    after = containers(bed)
    assert after["app-2"] == before["app-2"] and after["app-3"] == before["app-3"]
    assert seen.failed == 0, seen.failures
    found = journal(tmp_path / "state")
    assert found is not None and found["status"] == "recovered"


@pytest.mark.timeout(300)
def test_a_broken_image_with_surge_through_the_lb_is_rolled_back_and_the_old_containers_never_stop(
    fresh_fleet: Testbed, lb: str, tmp_path: Path
) -> None:
    """Expected: app-1's new container fails its health gate on its own port; it and its
    server (if it got one) are removed, the compose file is restored byte for byte, and
    the old containers kept serving all along: same ids, same start times, same servers."""
    bed = fresh_fleet
    compose = {i.name: i.compose_file.read_bytes() for i in bed.instances}
    before, servers = containers(bed), bed.front(lb).known()
    fleet = fleet_file(bed, tmp_path, lb=lb, rollout=SURGE, health={"timeout_seconds": 8})
    deploy_broken(fleet, bed.lb_url_of(lb), sampled(bed, lb))
    assert containers(bed) == before
    assert {i.name: i.compose_file.read_bytes() for i in bed.instances} == compose
    assert bed.front(lb).known() == servers
    assert_settled(bed, lb, bed.image_id(f"{bed.image_repository}:v1"))
