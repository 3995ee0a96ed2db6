"""The deployments on a Prefect server backed by PostgreSQL, the production option the
README documents (several workers on several machines against one server)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from compose_rollout.testbed import Testbed
from tests.fleet.test_prefect_server import run_and_wait, running_stack
from tests.fleet.test_rollout import observe
from tests.prefect_server import postgres_server, tail

pytestmark = pytest.mark.fleet


@pytest.mark.timeout(400)
def test_a_server_on_postgresql_runs_the_deployment_and_moves_the_fleet(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    home = tmp_path / "home"
    home.mkdir()
    with (
        postgres_server() as database,
        running_stack(bed, home, tmp_path / "stack", PREFECT_API_DATABASE_CONNECTION_URL=database) as stack,
    ):
        run = run_and_wait(stack.api, stack.env, "tag=v2")
        assert run["state"]["type"] == "COMPLETED", tail(stack.worker_log)
        # The run is a row in PostgreSQL, not in a SQLite file somewhere.
        psql = ["psql", database.replace("+asyncpg", ""), "-tA", "-F", " ", "-c", "select id, state_type from flow_run"]
        rows = subprocess.run(psql, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        assert f"{run['id']} COMPLETED" in rows
        assert not list(home.glob("*.db")), "the server wrote a SQLite database"
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}
    assert set(observe(bed).lb.values()) == {"UP"}
