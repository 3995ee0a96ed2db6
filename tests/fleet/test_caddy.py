"""What only kind caddy has, on the real bed (Caddy in front of the instances, its admin
API reached through the LB host's SSH tunnel): a Caddy config the adapter cannot drain
safely is refused before anything is touched, naming what it lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.caddy import CaddyFront
from tests.fleet.test_lb_contract import seen
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def caddy(fresh_fleet: Testbed) -> CaddyFront:
    front = fresh_fleet.front("caddy")
    assert isinstance(front, CaddyFront)
    return front


def refused(bed: Testbed, tmp_path: Path, **load_balancer: Any) -> str:
    before = seen(bed, "caddy")
    fleet = fleet_file(bed, tmp_path, lb="caddy", load_balancer=load_balancer)
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet, tag="v2")
    assert seen(bed, "caddy") == before
    return str(raised.value)


@pytest.mark.timeout(120)
def test_a_config_without_the_handlers_id_is_refused_naming_it(
    fresh_fleet: Testbed, caddy: CaddyFront, tmp_path: Path
) -> None:
    message = refused(fresh_fleet, tmp_path, upstreams_id="terrateam_upstreams")
    assert 'no object with "@id": "terrateam_upstreams"' in message
    assert "load_balancer.upstreams_id" in message


@pytest.mark.timeout(120)
def test_a_parking_handler_lacking_an_instance_is_refused_naming_it(
    fresh_fleet: Testbed, caddy: CaddyFront, tmp_path: Path
) -> None:
    config = caddy.initial_config
    parking = config["apps"]["http"]["servers"]["app"]["routes"][1]["handle"][0]
    lacking = parking["upstreams"].pop(1)["dial"]
    caddy.load(config)
    message = refused(fresh_fleet, tmp_path)
    assert f'the parking handler "@id": "rollout_parking" lacks {lacking}' in message
