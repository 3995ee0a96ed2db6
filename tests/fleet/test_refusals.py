"""Bad input is refused before anything is touched, on the real test bed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from tests.fleet.test_rollout import FleetState, fleet_file, observe

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


def refused(bed: Testbed, fleet: str, tag: str) -> str:
    """Run a deploy that must be refused; check nothing changed; return the message."""
    before = observe(bed)
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet, tag=tag, triggered_by="test")
    assert_untouched(bed, before)
    return str(raised.value)


def assert_untouched(bed: Testbed, before: FleetState) -> None:
    after = observe(bed)
    assert after == before  # same compose bytes, same containers, same images, all UP
    assert set(after.lb.values()) == {"UP"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tag", ["v1;rm -rf /", "v 2", "-v2", "v2@sha256:" + "A" * 64, "$(reboot)"])
def test_malformed_tags_are_refused(fresh_fleet: Testbed, tmp_path: Path, tag: str) -> None:
    message = refused(fresh_fleet, fleet_file(fresh_fleet, tmp_path), tag)
    assert "invalid image" in message


@pytest.mark.timeout(120)
def test_a_tag_missing_from_the_registry_is_refused(fresh_fleet: Testbed, tmp_path: Path) -> None:
    message = refused(fresh_fleet, fleet_file(fresh_fleet, tmp_path), "v9")
    assert "refused before any instance was touched" in message and "tag v9 does not exist" in message


@pytest.mark.timeout(120)
def test_an_unknown_host_key_is_refused_with_its_fingerprint(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    known = tmp_path / "known_hosts"
    lines = bed.known_hosts_file.read_text().splitlines()
    known.write_text("\n".join(line for line in lines if "127.0.1.3" not in line) + "\n")
    fleet = fleet_file(bed, tmp_path, ssh={"known_hosts_file": str(known)})
    message = refused(bed, fleet, "v2")
    assert "app-2" in message and "SHA256:" in message and "not in" in message


@pytest.mark.timeout(120)
def test_a_changed_host_key_is_refused(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    known = tmp_path / "known_hosts"
    lines = bed.known_hosts_file.read_text().splitlines()
    app1 = next(line for line in lines if "127.0.1.2" in line)
    app2_key = next(line for line in lines if "127.0.1.3" in line).split(maxsplit=1)[1]
    forged = app1.split(maxsplit=1)[0] + " " + app2_key  # app-1's name with app-2's key
    known.write_text("\n".join(forged if line == app1 else line for line in lines) + "\n")
    fleet = fleet_file(bed, tmp_path, ssh={"known_hosts_file": str(known)})
    message = refused(bed, fleet, "v2")
    assert "app-1" in message and "CHANGED" in message


@pytest.mark.timeout(120)
def test_a_compose_file_without_the_service_is_refused(fresh_fleet: Testbed, tmp_path: Path) -> None:
    message = refused(fresh_fleet, fleet_file(fresh_fleet, tmp_path, service="worker"), "v2")
    assert "has no service 'worker'" in message and "server" in message


@pytest.mark.timeout(120)
def test_an_unreachable_lb_is_refused(fresh_fleet: Testbed, tmp_path: Path) -> None:
    fleet = fleet_file(fresh_fleet, tmp_path, load_balancer={"admin_address": "tcp://127.0.0.1:1"})
    message = refused(fresh_fleet, fleet, "v2")
    assert "HAProxy admin socket tcp://127.0.0.1:1 unreachable" in message


@pytest.mark.timeout(120)
def test_a_fleet_file_with_an_unknown_key_is_refused(fresh_fleet: Testbed, tmp_path: Path) -> None:
    fleet = Path(fleet_file(fresh_fleet, tmp_path))
    fleet.write_text(fleet.read_text() + "drain_timeout: 30\n")
    message = refused(fresh_fleet, str(fleet), "v2")
    assert "drain_timeout: unknown key" in message


@pytest.mark.timeout(180)
def test_cli_plan_and_status_show_the_change_and_touch_nothing(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    fleet = fleet_file(bed, tmp_path)
    before = observe(bed)
    rollout = [sys.executable, "-m", "compose_rollout.cli"]
    plan = subprocess.run(
        [*rollout, "plan", "--fleet", fleet, "--tag", "v2"], capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("update") == 3
    assert f"-    image: {bed.image_repository}:v1" in plan.stdout
    assert f"+    image: {bed.image_repository}:v2@sha256:" in plan.stdout
    status = subprocess.run([*rollout, "status", "--fleet", fleet], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(f"{bed.image_repository}@sha256:") == 3
    assert status.stdout.count("HTTP 200") == 3 and status.stdout.count("UP/READY") == 3
    assert_untouched(bed, before)

    bad = subprocess.run(
        [*rollout, "deploy", "--fleet", fleet, "--tag", "v1;id"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "invalid image tag" in bad.stderr


@pytest.mark.timeout(120)
def test_a_server_out_of_rotation_in_the_lb_is_refused_naming_it(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    bed.set_server_state("app-2", "maint")  # someone took it out by hand
    before = observe(bed)
    with pytest.raises(RolloutError) as raised:
        rolling_deploy(fleet_file=fleet_file(bed, tmp_path), tag="v2", triggered_by="test")
    message = str(raised.value)
    assert "refused before any instance was touched" in message
    assert "app-2: LB server app-2 is" in message and "MAINT" in message and "not in rotation" in message
    assert observe(bed) == before  # left as the person left it: still in maintenance, nothing else moved
