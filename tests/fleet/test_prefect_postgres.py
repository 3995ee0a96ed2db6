"""The deployments on a Prefect server backed by PostgreSQL, the production option the
README documents (several workers on several machines against one server), with the
API protected by an auth string as the README asks for a server others can reach."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compose_rollout.testbed import Testbed
from tests.fleet.test_prefect_server import PREFECT, REPO, prefect, start_run
from tests.fleet.test_rollout import fleet_file, observe
from tests.prefect_server import (
    basic_auth,
    clean_env,
    postgres_server,
    prefect_server,
    spawn,
    stop,
    tail,
    wait_for_final_state,
)

pytestmark = pytest.mark.fleet

AUTH_STRING = "rollout-admin:Auth-String-5d0c71"  # what an operator sets on the server and its clients


@dataclass(frozen=True)
class AuthenticatedStack:
    api: str
    env: dict[str, str]  # a client's environment, PREFECT_API_AUTH_STRING included
    server_log: Path
    worker_log: Path


@contextmanager
def authenticated_stack(bed: Testbed, home: Path, files: Path, database: str) -> Iterator[AuthenticatedStack]:
    """The README's production setup: a server on PostgreSQL with
    PREFECT_SERVER_API_AUTH_STRING, the work pool and deployments made by the CLI and a
    process worker, every client given PREFECT_API_AUTH_STRING."""
    with prefect_server(
        home, PREFECT_SERVER_API_AUTH_STRING=AUTH_STRING, PREFECT_API_DATABASE_CONNECTION_URL=database
    ) as api:
        env = clean_env(
            PREFECT_API_URL=api,
            PREFECT_API_AUTH_STRING=AUTH_STRING,
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            COMPOSE_ROLLOUT_FLEET=fleet_file(bed, files, health={"timeout_seconds": 8}),
        )
        prefect(env, "work-pool", "create", "compose-rollout", "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        log = files / "worker.log"
        worker = spawn([*PREFECT, "worker", "start", "--pool", "compose-rollout"], env, log, cwd=REPO)
        try:
            yield AuthenticatedStack(api, env, home / "server.log", log)
        finally:
            stop(worker)


@pytest.mark.timeout(400)
def test_a_server_on_postgresql_with_an_auth_string_runs_only_authenticated_deploys(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    home = tmp_path / "home"
    home.mkdir()
    with postgres_server() as database, authenticated_stack(bed, home, tmp_path / "stack", database) as stack:
        deployment_url = f"{stack.api}/deployments/name/rolling-deploy/fleet"
        found = httpx.get(deployment_url, headers=basic_auth(AUTH_STRING), timeout=30)
        deployment = found.raise_for_status().json()
        create_run = f"{stack.api}/deployments/{deployment['id']}/create_flow_run"
        # Nobody without the auth string starts a deploy: not over the API, with or without a wrong one ...
        for headers in ({}, basic_auth("rollout-admin:guessed"), {"Authorization": "Bearer anything"}):
            refused = httpx.post(create_run, json={"parameters": {"tag": "v2"}}, headers=headers, timeout=30)
            assert refused.status_code == 401, refused.text
        # ... nor with Prefect's own CLI.
        argv = [*PREFECT, "deployment", "run", "rolling-deploy/fleet", "--param", "tag=v2"]
        anonymous = {key: value for key, value in stack.env.items() if key != "PREFECT_API_AUTH_STRING"}
        cli = subprocess.run(argv, env=anonymous, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert cli.returncode != 0, cli.stdout
        runs = httpx.post(f"{stack.api}/flow_runs/filter", json={}, headers=basic_auth(AUTH_STRING), timeout=30)
        assert runs.json() == [], "a refused request created a run"
        assert observe(bed).images == before.images

        # With it, the CLI starts the run and the worker (and the flow it runs) reach the server.
        run = wait_for_final_state(
            stack.api, start_run(stack.env, "rolling-deploy/fleet", "tag=v2"), basic_auth(AUTH_STRING)
        )
        assert run["state"]["type"] == "COMPLETED", tail(stack.worker_log)
        # The run is a row in PostgreSQL, not in a SQLite file somewhere.
        psql = ["psql", database.replace("+asyncpg", ""), "-tA", "-F", " ", "-c", "select id, state_type from flow_run"]
        rows = subprocess.run(psql, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        assert f"{run['id']} COMPLETED" in rows
        assert not list(home.glob("*.db")), "the server wrote a SQLite database"
        for log in (stack.server_log, stack.worker_log):
            assert AUTH_STRING.split(":")[1] not in log.read_text(errors="replace"), f"{log.name} shows the secret"
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert {bed.running_image(i.name) for i in bed.instances} == {v2}
    assert set(observe(bed).lb.values()) == {"UP"}
