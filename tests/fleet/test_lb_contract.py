"""The load-balancer contract, the same tests for every kind the test bed runs for real.

No failed request means none: a request that got an error or no answer fails the test.
The one exception every HTTP client makes is counted apart (`TrafficResult.retried`): a
GET sent on an idle kept-alive connection just as a reloading LB (nginx, Caddy) closed
it is sent again on a new connection, as browsers do. HAProxy must need no such retry.

Each LB (HAProxy, nginx, ...) stands in front of the same instances on the real bed;
traffic and slow requests go through it. What every adapter must do: a rollout with
no failed request, a rollback that leaves compose files byte-identical, a request
longer than the drain timeout never cut by default (and cut, counted, with `proceed`),
an unreachable LB or a server it does not have refused before anything is touched,
and `rollout status` showing the LB's view.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from compose_rollout.errors import DeployFailed, RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.bed import FRONTS, LB_KINDS
from compose_rollout.testbed.traffic import Traffic, TrafficResult
from tests.fleet.inflight import SlowRequests
from tests.fleet.test_faults import push_variant
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


def in_rotation(bed: Testbed, lb: str) -> str:
    """What `Testbed.lb_view` says of a server in rotation."""
    return "UP" if lb == "haproxy" else bed.front(lb).in_rotation


@pytest.fixture(params=LB_KINDS)
def lb(request: pytest.FixtureRequest, fresh_fleet: Testbed) -> str:
    kind: str = request.param
    fresh_fleet.front(kind) if kind != "haproxy" else None  # started (and reset) before the test
    return kind


# The four contract tests that run a deploy take the other kinds only: HAProxy runs the
# same proofs, with more asserted, in its fault matrix (test_rollout.py: a rollout under
# traffic, a broken image rolled back; test_faults.py: a request longer than the drain
# timeout, not cut by default and cut with `proceed`), and the suite has a time budget.
other_kinds = pytest.mark.parametrize("lb", FRONTS, indirect=True)


@dataclass(frozen=True)
class Seen:
    compose: dict[str, bytes]
    images: dict[str, str]
    lb: dict[str, str]


def seen(bed: Testbed, lb: str) -> Seen:
    return Seen(
        compose={i.name: i.compose_file.read_bytes() for i in bed.instances},
        images={i.name: bed.running_image(i.name) for i in bed.instances},
        lb=bed.lb_view(lb),
    )


def deploy(bed: Testbed, lb: str, fleet: str, tag: str) -> tuple[str, TrafficResult]:
    """A deploy under steady traffic through `lb`, three workers of which keep a 1 s
    request in flight all along (so every drain finds some): (failure or "", traffic seen)."""
    traffic = Traffic(bed.lb_url_of(lb))
    traffic.start()
    failure = ""
    try:
        rolling_deploy(fleet_file=fleet, tag=tag, triggered_by="test")
    except DeployFailed as error:
        failure = str(error)
    finally:
        result = traffic.stop()
    assert result.slow_ok > 0 and result.fast_ok > 0, result
    return failure, result


@other_kinds
@pytest.mark.timeout(300)
def test_a_rollout_through_the_lb_fails_no_request(fresh_fleet: Testbed, lb: str, tmp_path: Path) -> None:
    bed = fresh_fleet
    failure, traffic = deploy(bed, lb, fleet_file(bed, tmp_path, lb=lb), "v2")
    assert failure == ""
    assert traffic.failed == 0, traffic.failures  # slow requests in flight at each drain included
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    after = seen(bed, lb)
    assert set(after.images.values()) == {v2}
    assert set(after.lb.values()) == {in_rotation(bed, lb)}


@other_kinds
@pytest.mark.timeout(300)
def test_a_broken_image_is_rolled_back_through_the_lb(fresh_fleet: Testbed, lb: str, tmp_path: Path) -> None:
    bed = fresh_fleet
    push_variant(bed, "crashes", 'CMD ["/bin/sh", "-c", "httpd -p 8080 -h /www; sleep 1; exit 3"]')
    before = seen(bed, lb)
    health = {"timeout_seconds": 8, "consecutive_successes": 3, "interval_seconds": 0.5, "stabilization_seconds": 2}
    failure, traffic = deploy(bed, lb, fleet_file(bed, tmp_path, lb=lb, health=health), "crashes")
    assert "instance app-1" in failure and "await-healthy" in failure
    assert traffic.failed == 0, traffic.failures
    assert seen(bed, lb) == before  # same images, compose files byte for byte, all in rotation


@other_kinds
@pytest.mark.timeout(180)
def test_a_request_longer_than_the_drain_timeout_fails_the_step_and_is_not_cut(
    fresh_fleet: Testbed, lb: str, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = seen(bed, lb)
    slow = SlowRequests(bed, 20, lb=lb)  # long enough to outlast preflight and pre-pull on a busy machine
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet_file(bed, tmp_path, lb=lb, rollout={"drain_timeout_seconds": 2}), tag="v2")
    assert "instance app-1 at step wait-for-sessions" in str(raised.value)
    assert set(slow.codes()) == {200}
    assert seen(bed, lb) == before


@other_kinds
@pytest.mark.timeout(180)
def test_with_proceed_a_request_longer_than_the_drain_timeout_is_cut_and_counted(
    fresh_fleet: Testbed, lb: str, tmp_path: Path
) -> None:
    bed = fresh_fleet
    slow = SlowRequests(bed, 20, lb=lb)
    fleet = fleet_file(bed, tmp_path, lb=lb, rollout={"drain_timeout_seconds": 2, "on_drain_timeout": "proceed"})
    rows = rolling_deploy(fleet_file=fleet, tag="v2")
    assert sum(int(row["sessions cut"]) for row in rows) >= 1
    slow.codes()
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    after = seen(bed, lb)
    assert set(after.images.values()) == {v2}
    assert set(after.lb.values()) == {in_rotation(bed, lb)}


def unreachable(bed: Testbed, lb: str) -> dict[str, object]:
    """The fleet file's LB section pointing at an LB that does not answer."""
    if lb == "haproxy":
        return {"admin_address": "tcp://127.0.0.1:1"}
    if lb == "caddy":  # the SSH tunnel opens, but nothing listens at its end on the LB host
        return {"admin_url": "http://127.0.0.1:1"}
    return {"ssh_port": 1}  # nothing listens there on the LB host


@pytest.mark.timeout(120)
def test_an_unreachable_lb_is_refused_before_anything_is_touched(fresh_fleet: Testbed, lb: str, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = seen(bed, lb)
    fleet = fleet_file(bed, tmp_path, lb=lb, load_balancer=unreachable(bed, lb))
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet, tag="v2")
    assert "unreachable" in str(raised.value) or "connect" in str(raised.value)
    assert seen(bed, lb) == before


@pytest.mark.timeout(120)
def test_a_server_the_lb_does_not_have_is_refused_naming_it(fresh_fleet: Testbed, lb: str, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = seen(bed, lb)
    path = Path(fleet_file(bed, tmp_path, lb=lb))
    document = yaml.safe_load(path.read_text())
    missing = {"haproxy": "app-9", "caddy": "127.0.1.99:8080"}.get(lb, "127.0.1.99:8080")
    document["instances"][1]["lb_server"] = missing
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=str(path), tag="v2")
    assert "app-2" in str(raised.value) and missing in str(raised.value)
    assert seen(bed, lb) == before


@pytest.mark.timeout(120)
def test_rollout_status_shows_the_lbs_view(fresh_fleet: Testbed, lb: str, tmp_path: Path) -> None:
    bed = fresh_fleet
    bed_lb_view = "UP/READY" if lb == "haproxy" else bed.front(lb).status_in_rotation
    status = subprocess.run(
        [sys.executable, "-m", "compose_rollout.cli", "status", "--fleet", fleet_file(bed, tmp_path, lb=lb)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(bed_lb_view) == 3, status.stdout
