"""What only the traefik adapter promises, on the real test bed's Traefik (the shared
LB contract is in test_lb_contract.py): the user's dynamic file comes back byte for byte
after a rollout, and a file or service it cannot work with is refused before anything
is touched, naming what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.traefik import TraefikFront
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


@pytest.fixture
def traefik(fresh_fleet: Testbed) -> TraefikFront:
    front = fresh_fleet.front("traefik")
    assert isinstance(front, TraefikFront)
    return front


def record_of(front: TraefikFront) -> Path:
    return front.dynamic_file.with_name(f".{front.dynamic_file.name}.compose-rollout.json")


@pytest.mark.timeout(300)
def test_a_rollout_gives_the_dynamic_file_back_byte_for_byte(
    fresh_fleet: Testbed, traefik: TraefikFront, tmp_path: Path
) -> None:
    before = traefik.dynamic_file.read_bytes()
    mode = traefik.dynamic_file.stat().st_mode
    rows = rolling_deploy(fleet_file=fleet_file(fresh_fleet, tmp_path, lb="traefik"), tag="v2")
    assert {row["result"] for row in rows} == {"updated"}
    assert traefik.dynamic_file.read_bytes() == before and traefik.dynamic_file.stat().st_mode == mode
    assert not record_of(traefik).exists()
    assert list(traefik.directory.glob(".*.rollout-tmp")) == []
    assert set(traefik.view().values()) == {"UP"}


@pytest.mark.timeout(120)
def test_a_service_not_in_the_file_is_refused_before_anything_is_touched(
    fresh_fleet: Testbed, traefik: TraefikFront, tmp_path: Path
) -> None:
    before = traefik.dynamic_file.read_bytes()
    fleet = fleet_file(fresh_fleet, tmp_path, lb="traefik", load_balancer={"service": "web"})
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet, tag="v2")
    assert "has no service 'web' under http.services (services: app)" in str(raised.value)
    assert traefik.dynamic_file.read_bytes() == before and not record_of(traefik).exists()


@pytest.mark.timeout(120)
def test_a_transport_that_keeps_idle_connections_is_refused_naming_the_fix(
    fresh_fleet: Testbed, traefik: TraefikFront, tmp_path: Path
) -> None:
    """Traefik's default transport keeps idle connections 90 s: each would count as a
    request in flight, and every drain would wait for them."""
    pooled = traefik.dynamic_file.read_text().replace("maxIdleConnsPerHost: -1", "maxIdleConnsPerHost: 2")
    temp = traefik.dynamic_file.with_name(".pooled.tmp")
    temp.write_text(pooled)
    temp.replace(traefik.dynamic_file)
    with pytest.raises(RolloutError, match="refused before any instance was touched") as raised:
        rolling_deploy(fleet_file=fleet_file(fresh_fleet, tmp_path, lb="traefik"), tag="v2")
    assert "serversTransport no-idle keeps idle connections 90 s" in str(raised.value)
    assert "`maxIdleConnsPerHost: -1`" in str(raised.value)
    assert traefik.dynamic_file.read_text() == pooled
