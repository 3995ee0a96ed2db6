"""What only the nginx adapter does, on the real test bed's nginx."""

from __future__ import annotations

from pathlib import Path

import pytest

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from tests.fleet.test_lb_contract import seen
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


@pytest.mark.timeout(180)
def test_a_change_nginx_t_refuses_is_put_back_and_fails_the_step(fresh_fleet: Testbed, tmp_path: Path) -> None:
    """Someone left the main configuration broken: `nginx -t` fails on the drain's change,
    the upstream file is put back byte for byte, and the run says why, touching nothing."""
    bed = fresh_fleet
    front = bed.front("nginx")
    main = Path(str(front.fleet_settings("", 0)["main_config"]))
    upstream = Path(str(front.fleet_settings("", 0)["upstream_file"]))
    good = main.read_text()
    before = seen(bed, "nginx")
    upstream_bytes = upstream.read_bytes()
    main.write_text(good + "\nthis is not a directive;\n")
    try:
        with pytest.raises(RolloutError) as raised:
            rolling_deploy(fleet_file=fleet_file(bed, tmp_path, lb="nginx"), tag="v2")
    finally:
        main.write_text(good)
    message = str(raised.value)
    assert "instance app-1 at step drain" in message
    assert "`nginx -t` refused the change, file put back" in message and "unknown directive" in message
    assert upstream.read_bytes() == upstream_bytes
    assert seen(bed, "nginx") == before
