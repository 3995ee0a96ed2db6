"""The webhook receiver against a real `prefect server start` (SQLite, its own home).

Two real processes per module: the Prefect server and `python -m compose_rollout.triggers.webhooks`.
A deployment of the real `rolling-deploy` flow is registered through the REST API with
its parameter schema enforced, so a run with parameters the flow would not accept
fails here. No worker is needed: the tests assert that the flow runs exist, with the
right parameters, and how long after the push they did.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compose_rollout.triggers.webhooks import PlannedRun, PrefectApi, PrefectRuns, Push, WebhookRoute
from tests.prefect_server import clean_env, free_port, prefect_server, spawn, stop, tail, wait_until_up

AUTH = "Bearer 9e7d5c3b1a0f2e4d6c8b0a1f3e5d7c9b"
REGISTRY = "registry.example.com:5000"


@dataclass(frozen=True)
class Prefect:
    api: str
    acme_id: str
    burst_id: str

    def runs_of(self, deployment_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200}
        response = httpx.post(f"{self.api}/flow_runs/filter", json=body, timeout=10)
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        return runs

    def wait_for_run(
        self, deployment_id: str, match: Callable[[dict[str, Any]], bool], seconds: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [run for run in self.runs_of(deployment_id) if match(run)]
            if found:
                return found[0]
            time.sleep(0.005)  # polling Prefect's API for the run: the observed state is the point
        pytest.fail(f"no matching flow run of deployment {deployment_id} within {seconds:g} s")


class _Busy(Exception):
    pass


def _raise_unless_busy(response: httpx.Response) -> None:
    if response.status_code == 503:
        raise _Busy(str(response.url))


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    for attempt in range(10):
        try:
            return client.post(url, json=body).raise_for_status()
        except _Busy:
            time.sleep(0.5 * (attempt + 1))  # backing off from a busy server, bounded
    return client.post(url, json=body).raise_for_status()


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    """A real Prefect server on a free port with two deployments of `rolling-deploy`."""
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_server(home) as api:
        from compose_rollout.flows.rolling_deploy import rolling_deploy

        schema = rolling_deploy.parameters.model_dump_for_openapi()
        # A Prefect server on a loaded machine may answer 503 while busy: retry, bounded.
        with httpx.Client(base_url=api, timeout=10, event_hooks={"response": [_raise_unless_busy]}) as client:
            flow_id = _post(client, "/flows/", {"name": rolling_deploy.name}).json()["id"]
            ids = []
            for name in ("acme", "acme-burst"):
                deployment = {
                    "name": name,
                    "flow_id": flow_id,
                    "parameter_openapi_schema": schema,
                    "enforce_parameter_schema": True,
                }
                ids.append(_post(client, "/deployments/", deployment).json()["id"])
        yield Prefect(api, *ids)


@dataclass(frozen=True)
class Receiver:
    url: str
    log: Path

    def push(
        self, repository: str, tag: str, digest: str, authorization: str = AUTH, pushed_at: dt.datetime | None = None
    ) -> httpx.Response:
        pushed_at = pushed_at or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        event = {
            "id": str(uuid.uuid4()),
            "timestamp": pushed_at.isoformat().replace("+00:00", "Z"),
            "action": "push",
            "target": {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "size": 1778,
                "digest": digest,
                "length": 1778,
                "repository": repository,
                "url": f"https://{REGISTRY}/v2/{repository}/manifests/{digest}",
                "tag": tag,
            },
            "request": {"id": str(uuid.uuid4()), "addr": "10.0.3.7:51234", "host": REGISTRY, "method": "PUT"},
            "actor": {"name": "ci"},
            "source": {"addr": "registry-0:5000", "instanceID": "0e4f6a0c-8c52-4c4e-8f0c-7e7a2d2b6b9e"},
        }
        headers = {"Authorization": authorization, "Content-Type": "application/vnd.docker.distribution.events.v1+json"}
        return httpx.post(
            f"{self.url}/hooks/distribution", content=json.dumps({"events": [event]}), headers=headers, timeout=10
        )

    def wait_idle(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            health = httpx.get(f"{self.url}/healthz", timeout=5).json()
            if health["pending"] == 0 and health["creating"] == 0:
                return
            time.sleep(0.01)  # polling the receiver's reported state
        pytest.fail(f"the receiver still had work after {seconds:g} s:\n{tail(self.log)}")


@pytest.fixture(scope="module")
def receiver(prefect: Prefect, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """`python -m compose_rollout.triggers.webhooks` for three fleets: no debounce, a 1 s debounce, and
    maintenance windows."""
    workdir = tmp_path_factory.mktemp("webhooks")
    port = free_port()
    config = {
        "listen_host": "127.0.0.1",
        "listen_port": port,
        "debounce_seconds": 0,
        "prefect": {"api_url": prefect.api, "timeout_seconds": 10},
        "state_directory": str(workdir / "state"),
        "distribution": {"authorization": AUTH},
        "routes": [
            {
                "repository": f"{REGISTRY}/acme/app",
                "fleet": "acme",
                "deployment": "rolling-deploy/acme",  # looked up by name
                "fleet_file": "/etc/compose-rollout/acme.yaml",
            },
            {
                "repository": f"{REGISTRY}/acme/burst",
                "fleet": "acme-burst",
                "deployment": prefect.burst_id,  # addressed by id
                "fleet_file": "/etc/compose-rollout/acme-burst.yaml",
                "debounce_seconds": 1.0,
            },
            {
                "repository": f"{REGISTRY}/acme/later",
                "fleet": "acme-later",
                "deployment": prefect.acme_id,
                "fleet_file": "/etc/compose-rollout/acme-later.yaml",
                # Opens on February 29th only (UTC): a push waits for the next leap year's.
                "maintenance_windows": [{"cron": "0 3 29 2 *", "duration_minutes": 60}],
            },
        ],
    }
    (workdir / "webhooks.yaml").write_text(yaml.safe_dump(config))
    log = workdir / "receiver.log"
    argv = [sys.executable, "-m", "compose_rollout.triggers.webhooks", "--config", str(workdir / "webhooks.yaml")]
    process = spawn(argv, clean_env(PYTHONUNBUFFERED="1"), log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/healthz", process, log, 30)
        yield Receiver(url, log)
    finally:
        stop(process)


def _has_tag(run: dict[str, Any], tag: str) -> bool:
    return bool(run["parameters"].get("tag") == tag)


def digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


@pytest.mark.timeout(180)
def test_a_registry_push_creates_a_flow_run_with_the_pushed_tag(
    prefect: Prefect, receiver: Receiver, record_property: Callable[[str, object], None]
) -> None:
    latencies = []
    for patch in range(2, 7):
        tag = f"1.4.{patch}"
        pushed_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        started = time.perf_counter()
        assert receiver.push("acme/app", tag, digest(patch), pushed_at=pushed_at).status_code == 202
        run = prefect.wait_for_run(prefect.acme_id, partial(_has_tag, tag=tag), 30)
        latencies.append(time.perf_counter() - started)
        # The deployment enforces the flow's parameter schema: requested_at is a datetime it accepts.
        assert run["parameters"] == {
            "fleet_file": "/etc/compose-rollout/acme.yaml",
            "tag": tag,
            "triggered_by": f"webhook:distribution push of {REGISTRY}/acme/app:{tag}@{digest(patch)}",
            "requested_at": pushed_at.isoformat(),
        }
        assert run["idempotency_key"] == f"compose-rollout/acme/{tag}/{digest(patch)}"
        assert run["state"]["type"] == "SCHEDULED"
        assert "compose-rollout-webhook" in run["tags"]
    median, worst = statistics.median(latencies), max(latencies)
    record_property("webhook_to_run_seconds_median", round(median, 4))
    record_property("webhook_to_run_seconds_max", round(worst, 4))
    # Recorded, not asserted: how fast is the benchmarks' business (BENCHMARKS.md).
    print(f"\nwebhook-to-run latency (debounce 0): median {median * 1000:.0f} ms, max {worst * 1000:.0f} ms")


@pytest.mark.timeout(180)
def test_the_same_push_delivered_twice_starts_one_run(prefect: Prefect, receiver: Receiver) -> None:
    assert receiver.push("acme/app", "1.4.20", digest(20)).status_code == 202
    prefect.wait_for_run(prefect.acme_id, lambda r: r["parameters"].get("tag") == "1.4.20", 30)
    again = receiver.push("acme/app", "1.4.20", digest(20))
    assert again.json()["accepted"][0]["outcome"] == "duplicate of a push already received"
    receiver.wait_idle()
    assert [r["parameters"]["tag"] for r in prefect.runs_of(prefect.acme_id)].count("1.4.20") == 1

    # A restarted receiver remembers nothing; Prefect's idempotency key still holds.
    async def as_a_restarted_receiver() -> tuple[bool, str]:
        route = WebhookRoute(
            repository=f"{REGISTRY}/acme/app",
            fleet="acme",
            deployment=prefect.acme_id,
            fleet_file="/etc/compose-rollout/acme.yaml",
        )
        runs = PrefectRuns(PrefectApi(api_url=prefect.api), prefect.api)
        try:
            ref = await runs.create_run(
                PlannedRun(route, Push("distribution", f"{REGISTRY}/acme/app", "1.4.20", digest(20)))
            )
        finally:
            await runs.aclose()
        return ref.created, ref.id

    created, run_id = asyncio.run(as_a_restarted_receiver())
    assert created is False
    runs = [r for r in prefect.runs_of(prefect.acme_id) if r["parameters"]["tag"] == "1.4.20"]
    assert [r["id"] for r in runs] == [run_id]


@pytest.mark.timeout(180)
def test_a_burst_of_pushes_starts_only_the_newest_tag(prefect: Prefect, receiver: Receiver) -> None:
    for n, tag in enumerate(("1.5.0", "1.5.2", "1.5.1")):
        assert receiver.push("acme/burst", tag, digest(100 + n)).status_code == 202
    prefect.wait_for_run(prefect.burst_id, lambda r: True, 30)
    receiver.wait_idle()
    assert [r["parameters"]["tag"] for r in prefect.runs_of(prefect.burst_id)] == ["1.5.2"]


def next_february_29th_at_3() -> str:
    """When the window `0 3 29 2 *` (UTC) opens next, as Prefect writes it."""
    now = dt.datetime.now(dt.UTC)
    year = now.year
    while True:
        try:
            opens = dt.datetime(year, 2, 29, 3, tzinfo=dt.UTC)
        except ValueError:  # not a leap year
            year += 1
            continue
        if opens > now:
            return opens.strftime("%Y-%m-%dT%H:%M:%S")
        year += 1


@pytest.mark.timeout(180)
def test_a_push_outside_the_maintenance_windows_waits_for_the_next_one(prefect: Prefect, receiver: Receiver) -> None:
    pushed_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    assert receiver.push("acme/later", "3.0.0", digest(300), pushed_at=pushed_at).status_code == 202
    run = prefect.wait_for_run(prefect.acme_id, partial(_has_tag, tag="3.0.0"), 30)
    assert run["state"]["type"] == "SCHEDULED"
    assert run["expected_start_time"].startswith(next_february_29th_at_3())
    # The run still says when the push came, not when its window opens.
    assert run["parameters"]["requested_at"] == pushed_at.isoformat()
    assert run["parameters"]["fleet_file"] == "/etc/compose-rollout/acme-later.yaml"
    # A newer push while it waits replaces it: the older run is cancelled, not left to start too.
    assert receiver.push("acme/later", "3.0.1", digest(301)).status_code == 202
    newer = prefect.wait_for_run(prefect.acme_id, partial(_has_tag, tag="3.0.1"), 30)
    receiver.wait_idle()
    states = {r["parameters"]["tag"]: r["state"]["type"] for r in prefect.runs_of(prefect.acme_id)}
    # The receiver asks for Cancelling, as `prefect flow-run cancel` does; the server makes a
    # Scheduled run that no worker holds Cancelled at once.
    assert (states["3.0.0"], states["3.0.1"]) == ("CANCELLED", "SCHEDULED")
    assert f"cancelled flow run {run['id']} of fleet acme-later" in receiver.log.read_text()
    assert newer["expected_start_time"].startswith(next_february_29th_at_3())


@pytest.mark.timeout(180)
def test_an_unauthenticated_push_starts_nothing(prefect: Prefect, receiver: Receiver) -> None:
    before = len(prefect.runs_of(prefect.acme_id))
    response = receiver.push("acme/app", "1.9.0", digest(900), authorization="Bearer not-the-shared-secret-000000")
    assert response.status_code == 401
    receiver.wait_idle()
    assert len(prefect.runs_of(prefect.acme_id)) == before
    assert AUTH.split()[1] not in receiver.log.read_text()
