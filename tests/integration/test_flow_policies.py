"""Flow-level policies that act before any host is contacted (no fleet needed).

The fleet files point at hosts that do not exist: a policy that let the run go on would
fail with a connection error instead of the refusal asserted here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
import yaml
from prefect.exceptions import ParameterTypeError

from compose_rollout.errors import RolloutError
from compose_rollout.flows.rolling_deploy import rolling_deploy

pytestmark = pytest.mark.usefixtures("prefect_server")


def write_fleet(tmp_path: Path, **extra: object) -> str:
    data = {
        "name": "demo",
        "image_repository": "registry.invalid/demo/app",
        "load_balancer": {"admin_address": "tcp://127.0.0.1:9", "backend": "app"},
        "state_directory": str(tmp_path / "state"),
        "instances": [
            {
                "name": f"app-{n}",
                "host": "192.0.2.1",  # TEST-NET-1: never contacted by these tests
                "project_directory": f"/srv/app-{n}",
                "lb_server": f"app-{n}",
                "health_url": f"http://192.0.2.1:{8080 + n}/health",
            }
            for n in (1, 2)
        ],
        **extra,
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def window_not_now() -> dict[str, object]:
    """A daily one-hour window that starts three hours from now (so now is outside it)."""
    start = datetime.now(UTC) + timedelta(hours=3)
    return {"cron": f"{start.minute} {start.hour} * * *", "duration_minutes": 60, "timezone": "UTC"}


@pytest.mark.timeout(120)
def test_a_direct_run_outside_every_window_is_refused_with_the_next_start(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path, maintenance_windows=[window_not_now()])
    with pytest.raises(RolloutError, match=r"outside its maintenance windows; the next one starts .* UTC"):
        rolling_deploy(fleet_file=fleet, tag="v2")
    assert not (tmp_path / "state").exists()  # nothing started: no journal, no lock


@pytest.mark.timeout(120)
def test_a_request_time_in_the_future_is_refused_before_anything_is_touched(tmp_path: Path) -> None:
    """Otherwise every later request would count as older and end "superseded"."""
    fleet = write_fleet(tmp_path)
    with pytest.raises(RolloutError, match=r"requested_at .* is in the future"):
        rolling_deploy(fleet_file=fleet, tag="v2", requested_at=datetime.now(UTC) + timedelta(days=365))
    assert not (tmp_path / "state").exists()  # nothing started: no journal, no lock


@pytest.mark.timeout(120)
def test_an_image_of_another_registry_is_refused_and_that_registry_never_hears_of_it(tmp_path: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    class Registry(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    Thread(target=other.serve_forever, daemon=True).start()
    try:
        fleet = write_fleet(tmp_path, registry={"username": "deploy", "password": "hunter2-registry-password"})
        with pytest.raises(RolloutError, match=r"image repository 127\.0\.0\.1:\d+/demo/app is not allowed"):
            rolling_deploy(fleet_file=fleet, image=f"127.0.0.1:{other.server_address[1]}/demo/app:v2")
    finally:
        other.shutdown()
        other.server_close()
    assert seen == []  # no request at all, so no password either
    assert not (tmp_path / "state").exists()  # nothing started


@pytest.mark.timeout(120)
def test_without_a_tag_or_a_tag_policy_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="give a tag or an image"):
        rolling_deploy(fleet_file=write_fleet(tmp_path))


@pytest.mark.timeout(120)
def test_the_run_form_s_policy_knobs_override_the_fleet_file_and_are_checked_like_it(tmp_path: Path) -> None:
    fleet = write_fleet(tmp_path, rollout={"batch_size": 1})
    # The override reaches the fleet's own validation: two at once would empty this fleet.
    with pytest.raises(RolloutError, match=r"rollout\.batch_size: 2 would take all 2 instances out of rotation"):
        rolling_deploy(fleet_file=fleet, tag="v2", batch_size=2)
    # Out-of-range or unknown values are refused by the flow's parameter schema.
    with pytest.raises(ParameterTypeError, match="on_drain_timeout"):
        rolling_deploy(fleet_file=fleet, tag="v2", on_drain_timeout="ignore")  # type: ignore[arg-type]
    with pytest.raises(ParameterTypeError, match="pause_between_batches_seconds"):
        rolling_deploy(fleet_file=fleet, tag="v2", pause_between_batches_seconds=-1)
    with pytest.raises(RolloutError, match="invalid image tag"):
        rolling_deploy(fleet_file=fleet, tag="v1;rm -rf /")
    assert not (tmp_path / "state").exists()  # nothing started
