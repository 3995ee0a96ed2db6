"""Deploy policy on the real fleet: the failure budget (rollout.max_failed_instances)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compose_rollout.testbed import Testbed
from tests.fleet.test_rollout import deploy_under_traffic, fleet_file, observe

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


def journals(state: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted(state.glob("*/runs/*.json"))]


@pytest.mark.timeout(300)
def test_within_the_failure_budget_a_failed_instance_is_rolled_back_alone_and_the_run_goes_on(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    fleet = Path(fleet_file(bed, tmp_path, rollout={"max_failed_instances": 1}, health={"timeout_seconds": 5}))
    document = yaml.safe_load(fleet.read_text())
    # app-2's health URL answers 404 whatever runs: app-2 alone fails its health gate.
    document["instances"][1]["health_url"] = document["instances"][1]["health_url"] + "-nowhere"
    fleet.write_text(yaml.safe_dump(document, sort_keys=False))

    rows, failure, seen = deploy_under_traffic(bed, str(fleet), "v2")

    assert rows is None
    assert "ended partial: 2 of 3 instances run it (app-1, app-3)" in failure
    assert "app-2 (rolled back: instance app-2, step await-healthy" in failure and "404" in failure
    after = observe(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert after.images["app-1"] == after.images["app-3"] == v2
    assert after.images["app-2"] == before.images["app-2"]  # its old container, back
    assert after.compose["app-2"] == before.compose["app-2"]  # byte for byte
    assert set(after.lb.values()) == {"UP"} and after.locks == ()  # nothing left out of rotation, unlocked
    assert seen.failed == 0, seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["status"] == "partial"


@pytest.mark.timeout(300)
def test_a_second_failure_beyond_the_budget_rolls_back_every_instance(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    fleet = Path(fleet_file(bed, tmp_path, rollout={"max_failed_instances": 1}, health={"timeout_seconds": 5}))
    document = yaml.safe_load(fleet.read_text())
    for index in (1, 2):  # app-2 and app-3 fail: one more than the budget
        document["instances"][index]["health_url"] += "-nowhere"
    fleet.write_text(yaml.safe_dump(document, sort_keys=False))

    rows, failure, seen = deploy_under_traffic(bed, str(fleet), "v2")

    assert rows is None and "failed on instance app-3 at step await-healthy" in failure
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["status"] == "rolled back"
