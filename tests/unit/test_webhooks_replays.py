"""The receiver's memory across restarts (replays, downgrades), the push time it sends as
`requested_at`, and requests that are only partly good.

Uses the app harness and fake Prefect API of test_webhooks.py; every receiver keeps its
state under the test's own directory (the `state_directory` fixture moves HOME there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from compose_rollout.errors import ConfigError
from compose_rollout.triggers.webhooks import RUN_TAG, create_app, github_signature
from compose_rollout.triggers.webhooks.state import Memory, StateFile
from tests.unit.test_webhooks import (  # the shared fakes and helpers (not its fixtures)
    DEPLOYMENT_ID,
    DIGEST_1,
    DIGEST_2,
    DIGEST_3,
    DOCKERHUB_TOKEN,
    GITHUB_SECRET,
    REGISTRY_AUTH,
    FakePrefect,
    Harness,
    distribution_envelope,
    dockerhub_event,
    github_event,
    planned,
    prefect_runs,
    route,
    run_async,
    settings,
)

Factory = Callable[..., Harness]


@pytest.fixture(autouse=True)
def state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default state_directory (~/.local/state/compose-rollout/webhooks), under the test's directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / ".local/state/compose-rollout/webhooks"


@pytest.fixture
def receivers() -> Iterator[Factory]:
    """Makes receivers (the app, its lifespan running) against a fake Prefect; closes them after the test."""
    made: list[Harness] = []

    def make(prefect: FakePrefect | None = None, **overrides: Any) -> Harness:
        prefect = prefect or FakePrefect()
        clocks = {name: overrides.pop(name) for name in ("clock", "wall_clock") if name in overrides}
        app = create_app(settings(**overrides), prefect_transport=httpx.MockTransport(prefect.handle), **clocks)
        made.append(Harness(app, prefect))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


def restart(harness: Harness, factory: Factory, **overrides: Any) -> Harness:
    """Stop `harness` and start a new receiver process-alike with the same Prefect and state_directory."""
    harness.close()
    return factory(harness.prefect, **overrides)


def post_github(h: Harness, body: Any, delivery: str) -> httpx.Response:
    raw = json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "package",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": github_signature(SecretStr(GITHUB_SECRET), raw),
    }
    return h.post("/hooks/github", content=raw, headers=headers)


# ----------------------------------------------------------------------------- replays and downgrades


def test_the_same_push_is_still_a_duplicate_after_a_restart(receivers: Factory) -> None:
    first = receivers()
    first.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    first.prefect.wait_for_creates(1)
    first.wait_idle()
    restarted = restart(first, receivers)
    again = restarted.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    assert again.json()["accepted"][0]["outcome"] == "duplicate of a push already received"
    restarted.wait_idle()
    assert restarted.prefect.create_calls() == 1


def test_an_older_version_than_the_fleets_last_webhook_run_starts_nothing_even_after_a_restart(
    receivers: Factory,
) -> None:
    first = receivers()
    first.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_1)))
    first.prefect.wait_for_creates(1)
    first.wait_idle()
    restarted = restart(first, receivers)
    # A late delivery, or a captured notification replayed: 1.4.2 would be a downgrade.
    late = restarted.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_2)))
    assert late.json()["accepted"][0]["outcome"] == (
        "older than 1.4.3, the version of fleet acme's last webhook run (allow_downgrade is off)"
    )
    restarted.wait_idle()
    assert [r["parameters"]["tag"] for r in restarted.prefect.creates] == ["1.4.3"]
    # Newer versions, and the same version with a new digest, still start.
    restarted.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_3)))
    restarted.prefect.wait_for_creates(2)
    restarted.wait_idle()
    restarted.post_distribution(distribution_envelope(("acme/app", "1.4.4", DIGEST_2)))
    assert [r["parameters"]["tag"] for r in restarted.prefect.wait_for_creates(3)] == ["1.4.3", "1.4.3", "1.4.4"]


def test_a_route_that_allows_downgrades_starts_an_older_version(receivers: Factory) -> None:
    h = receivers(routes=[route(allow_downgrade=True)])
    h.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_1)))
    h.prefect.wait_for_creates(1)
    h.wait_idle()
    assert h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_2))).status_code == 202
    assert [r["parameters"]["tag"] for r in h.prefect.wait_for_creates(2)] == ["1.4.3", "1.4.2"]


def test_an_older_push_that_waited_while_a_newer_run_was_being_created_starts_nothing() -> None:
    prefect = FakePrefect()
    gate = asyncio.Event()  # Prefect holds the first create until the test opens it

    async def slow_first_create(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/create_flow_run") and not prefect.creates:
            await gate.wait()
        return prefect.handle(request)

    h = Harness(create_app(settings(), prefect_transport=httpx.MockTransport(slow_first_create)), prefect)
    try:
        h.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_1)))
        deadline = time.monotonic() + 10
        while h.on_loop(lambda: h.receiver.creating) == 0:
            assert time.monotonic() < deadline, "the first run was never being created"
            time.sleep(0.002)
        waiting = h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_2)))
        assert waiting.json()["accepted"][0]["outcome"] == "scheduled"  # 1.4.3 is not created yet
        h.on_loop(gate.set)
        h.wait_idle()
        assert [r["parameters"]["tag"] for r in prefect.creates] == ["1.4.3"]
    finally:
        h.close()


def test_a_repeated_github_delivery_starts_nothing_even_after_a_restart(receivers: Factory) -> None:
    first = receivers()
    delivery = str(uuid.uuid4())
    assert post_github(first, github_event("1.4.2"), delivery).status_code == 202
    first.prefect.wait_for_creates(1)
    first.wait_idle()
    restarted = restart(first, receivers)
    again = post_github(restarted, github_event("1.4.2"), delivery)
    assert again.status_code == 200
    assert again.json() == {"accepted": [], "ignored": [], "duplicate_delivery": delivery}
    restarted.wait_idle()
    assert restarted.prefect.create_calls() == 1


@pytest.mark.parametrize("delivery", [None, "", "x" * 65, "not a guid;"])
def test_a_github_event_without_a_well_formed_delivery_id_is_refused(receivers: Factory, delivery: str | None) -> None:
    h = receivers()
    raw = json.dumps(github_event()).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "package",
        "X-Hub-Signature-256": github_signature(SecretStr(GITHUB_SECRET), raw),
    }
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    response = h.post("/hooks/github", content=raw, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": "missing or malformed X-GitHub-Delivery"}
    h.wait_idle()
    assert h.prefect.requests == []


def test_githubs_redeliver_of_a_delivery_whose_run_failed_is_tried_again(receivers: Factory) -> None:
    h = receivers(FakePrefect(fail_next=[409]))
    delivery = str(uuid.uuid4())
    post_github(h, github_event("1.4.2"), delivery)
    h.wait_idle()
    assert h.prefect.creates == []
    again = post_github(h, github_event("1.4.2"), delivery)
    assert again.json()["accepted"][0]["outcome"] == "scheduled"
    assert [r["parameters"]["tag"] for r in h.prefect.wait_for_creates(1)] == ["1.4.2"]


class _BrokenOnce(FakePrefect):
    """Answers the first create with a body that is not a flow run (no id)."""

    broken: bool = True

    def _answer(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/create_flow_run") and self.broken:
            self.broken = False
            return httpx.Response(201, json={"unexpected": True})
        return super()._answer(request)


def test_a_push_whose_run_creation_failed_unexpectedly_is_tried_again_when_redelivered(
    receivers: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    h = receivers(_BrokenOnce())
    envelope = distribution_envelope(("acme/app", "1.4.2", DIGEST_1))
    h.post_distribution(envelope)
    h.wait_idle()
    [failed] = h.on_loop(lambda: list(h.receiver.failed))
    assert failed.error == "KeyError: 'id'"
    assert "no run started for fleet acme, tag 1.4.2: unexpected error" in caplog.text
    again = h.post_distribution(envelope)  # the registry's retry
    assert again.json()["accepted"][0]["outcome"] == "scheduled"
    assert [r["parameters"]["tag"] for r in h.prefect.wait_for_creates(1)] == ["1.4.2"]


def test_a_superseded_run_a_worker_already_holds_is_left_cancelling_for_the_worker_to_stop() -> None:
    prefect = FakePrefect()
    prefect.runs["older"] = {
        "id": "older",
        "deployment_id": DEPLOYMENT_ID,
        "parameters": {"fleet_file": "/etc/compose-rollout/acme.yaml", "tag": "1.4.2"},
        "tags": [RUN_TAG],
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry"},
        "infrastructure_pid": "4242",  # a process worker's run, scheduled again for a retry
    }

    async def scenario() -> list[str]:
        runs = prefect_runs(prefect)
        try:
            newer = planned("1.4.3")
            return await runs.cancel_superseded(newer, await runs.create_run(newer))
        finally:
            await runs.aclose()

    assert run_async(scenario()) == ["older"]
    assert prefect.runs["older"]["state"]["type"] == "CANCELLING"


# ----------------------------------------------------------------------------- the state file


def test_the_state_file_is_bounded_private_and_replaced_whole(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state", remembered=16)
    memory = Memory(
        keys=OrderedDict.fromkeys(f"compose-rollout/acme/1.4.{i}/{DIGEST_1}" for i in range(40)),
        deliveries=OrderedDict.fromkeys(str(uuid.UUID(int=i)) for i in range(40)),
        started=OrderedDict(acme="1.4.39"),
    )
    state.save(memory)
    loaded = state.load()
    assert list(loaded.keys) == [f"compose-rollout/acme/1.4.{i}/{DIGEST_1}" for i in range(24, 40)]
    assert len(loaded.deliveries) == 16
    assert dict(loaded.started) == {"acme": "1.4.39"}
    assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in state.directory.iterdir()) == ["receiver-state.json"]  # no temp file left


def test_a_damaged_state_file_stops_the_receiver_naming_it(receivers: Factory, state_directory: Path) -> None:
    state_directory.mkdir(parents=True)
    (state_directory / "receiver-state.json").write_text('{"format": 1, "keys": [')
    with pytest.raises(ConfigError, match=r"receiver-state.json is damaged .*move it aside"):
        receivers()


# ----------------------------------------------------------------------------- requested_at


def test_a_push_time_in_the_future_is_replaced_by_the_time_it_was_received(receivers: Factory) -> None:
    received = datetime.now(UTC).replace(microsecond=0)
    h = receivers(wall_clock=lambda: received)
    ahead = received + timedelta(minutes=10)  # a registry whose clock runs ahead
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1), pushed_at=ahead))
    [run] = h.prefect.wait_for_creates(1)
    assert run["parameters"]["requested_at"] == received.isoformat()


def test_github_pushes_carry_the_time_received_and_docker_hub_pushes_their_push_time(
    receivers: Factory,
) -> None:
    received = datetime.now(UTC).replace(microsecond=0)
    h = receivers(wall_clock=lambda: received)
    post_github(h, github_event("1.4.2"), str(uuid.uuid4()))  # GitHub gives no push time
    pushed = int((received - timedelta(seconds=30)).timestamp())
    h.post_dockerhub(dockerhub_event("1.4.2", pushed_at=pushed))
    requested = {
        r["parameters"]["triggered_by"].partition(" ")[0]: r["parameters"]["requested_at"]
        for r in h.prefect.wait_for_creates(2)
    }
    assert requested == {
        "webhook:github": received.isoformat(),
        "webhook:dockerhub": datetime.fromtimestamp(pushed, UTC).isoformat(),
    }


# ----------------------------------------------------------------------------- partly good requests


@pytest.mark.parametrize("pushed_at", [b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1", b"1e13"])
def test_a_docker_hub_push_time_that_is_not_a_time_is_refused_clearly(receivers: Factory, pushed_at: bytes) -> None:
    h = receivers()
    body = json.dumps(dockerhub_event()).encode().replace(b"1747041244", pushed_at)
    response = h.post(f"/hooks/dockerhub/{DOCKERHUB_TOKEN}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("malformed DockerHubEvent: push_data.pushed_at: ")
    h.wait_idle()
    assert h.prefect.requests == []


def test_one_bad_event_does_not_refuse_the_good_ones_of_an_envelope(
    receivers: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    h = receivers()
    envelope = distribution_envelope(
        ("acme/app", "1.4.2", DIGEST_1), ("acme/app", "1.4.3;rm -rf /", DIGEST_2), ("acme/app", "1.4.4", "sha256:12")
    )
    envelope["events"][2]["id"] = "event-with-a-bad-tag"  # [0] is a layer push, [1] the good one
    envelope["events"].insert(1, {"action": "push", "id": "event-without-a-target"})
    response = h.post_distribution(envelope)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == [{"fleet": "acme", "tag": "1.4.2", "outcome": "scheduled"}]
    assert [(r["event"], r["id"]) for r in body["refused"]] == [
        (1, "event-without-a-target"),
        (3, "event-with-a-bad-tag"),
        (4, envelope["events"][4]["id"]),
    ]
    assert body["refused"][0]["error"] == "malformed DistributionEvent: target: Field required"
    assert "invalid image tag '1.4.3;rm -rf /'" in body["refused"][1]["error"]
    assert "invalid image digest 'sha256:12'" in body["refused"][2]["error"]
    assert "refused event 3 (id 'event-with-a-bad-tag') of a distribution request" in caplog.text
    assert [r["parameters"]["tag"] for r in h.prefect.wait_for_creates(1)] == ["1.4.2"]


def test_an_envelope_of_only_bad_events_is_answered_2xx_so_the_registry_stops_resending_it(
    receivers: Factory,
) -> None:
    h = receivers()
    response = h.post(
        "/hooks/distribution",
        content=json.dumps({"events": [{"action": "push", "id": "e-1", "target": {"tag": "x"}}]}).encode(),
        headers={"Authorization": REGISTRY_AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json()["refused"] == [
        {"event": 0, "id": "e-1", "error": "malformed DistributionEvent: target.repository: Field required"}
    ]
    h.wait_idle()
    assert h.prefect.requests == []


def test_refusals_are_logged_without_secrets(receivers: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = receivers()
    h.post_distribution(distribution_envelope(("acme/app", "bad;tag", DIGEST_1)))
    assert "refused event 1" in caplog.text
    assert REGISTRY_AUTH.split()[1] not in caplog.text
