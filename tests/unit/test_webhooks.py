"""The registry push webhook receiver: authentication, parsing, filters, dedupe, coalescing.

The Prefect side is a stateful fake API behind httpx.MockTransport (it honours
idempotency keys as the real server does: 201 on create, 200 for a known key); the
real server is exercised by tests/integration/test_webhooks_prefect.py.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from asgi_lifespan import LifespanManager
from pydantic import SecretStr
from starlette.applications import Starlette

from compose_rollout.triggers.tag_policy import TagPolicy
from compose_rollout.triggers.webhooks import (
    RUN_TAG,
    Coalescer,
    PlannedRun,
    PrefectApi,
    PrefectApiError,
    PrefectRuns,
    Push,
    Receiver,
    WebhookRoute,
    WebhookSettings,
    create_app,
    github_signature,
    load_webhook_settings,
    main,
    parse_distribution,
    parse_dockerhub,
    parse_github,
    plan_runs,
)

REGISTRY_AUTH = "Bearer 4f0c1e9a7b2d48c6a1e5f3b7d9c2e8a0"
GITHUB_SECRET = "gh-webhook-secret-71c3e2a95d"
DOCKERHUB_TOKEN = "dh_6b1f0e3c2a9d8e7f6a5b4c3d2e1f0a9b8c7d"
DIGEST_1 = "sha256:" + "1a" * 32
DIGEST_2 = "sha256:" + "2b" * 32
DIGEST_3 = "sha256:" + "3c" * 32
DEPLOYMENT_ID = "7d3e2c1b-0a9f-4e8d-b7c6-a5f4e3d2c1b0"
API = "http://prefect.test/api"
REGISTRY_PUSH = "registry.example.com:5000/acme/app"

# ----------------------------------------------------------------------------- payloads


def pushed_a_minute_ago() -> datetime:
    return (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)


def distribution_envelope(
    *pushes: tuple[str, str, str], host: str = "registry.example.com:5000", pushed_at: datetime | None = None
) -> dict[str, Any]:
    """A notification envelope as distribution 2.8 sends it: a layer push, then the tagged
    manifest pushes (at `pushed_at`, default a minute ago), then a pull that must be skipped."""
    stamp = (pushed_at or pushed_a_minute_ago()).isoformat().replace("+00:00", "Z")
    events: list[dict[str, Any]] = [
        {
            "id": "a1f4c3a0-5b7e-4c1e-9f3f-0d1c2b3a4f5e",
            "timestamp": stamp,
            "action": "push",
            "target": {
                "mediaType": "application/octet-stream",
                "size": 3208942,
                "digest": "sha256:" + "9f" * 32,
                "length": 3208942,
                "repository": "acme/app",
                "url": f"https://{host}/v2/acme/app/blobs/sha256:" + "9f" * 32,
            },
            "request": {"id": "r-1", "addr": "10.0.3.7:51234", "host": host, "method": "PUT", "useragent": "docker"},
            "actor": {"name": "ci"},
            "source": {"addr": "registry-0:5000", "instanceID": "0e4f6a0c-8c52-4c4e-8f0c-7e7a2d2b6b9e"},
        }
    ]
    for repository, tag, digest in pushes:
        events.append(
            {
                "id": str(uuid.uuid4()),
                "timestamp": stamp,
                "action": "push",
                "target": {
                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "size": 1778,
                    "digest": digest,
                    "length": 1778,
                    "repository": repository,
                    "url": f"https://{host}/v2/{repository}/manifests/{digest}",
                    "tag": tag,
                },
                "request": {
                    "id": "r-2",
                    "addr": "10.0.3.7:51234",
                    "host": host,
                    "method": "PUT",
                    "useragent": "docker",
                },
                "actor": {"name": "ci"},
                "source": {"addr": "registry-0:5000", "instanceID": "0e4f6a0c-8c52-4c4e-8f0c-7e7a2d2b6b9e"},
            }
        )
    events.append(
        {
            "id": "c3d2e1f0-0000-4000-8000-000000000001",
            "timestamp": stamp,
            "action": "pull",
            "target": {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": DIGEST_3,
                "repository": "acme/app",
                "tag": "0.9.0",
            },
            "request": {"host": host, "method": "GET"},
        }
    )
    return {"events": events}


GITHUB_PACKAGE_PUBLISHED: dict[str, Any] = {
    "action": "published",
    "package": {
        "id": 2108764,
        "name": "app",
        "namespace": "Acme",
        "description": "",
        "ecosystem": "CONTAINER",
        "package_type": "CONTAINER",
        "html_url": "https://github.com/orgs/Acme/packages/container/package/app",
        "created_at": "2024-11-02T10:11:12Z",
        "updated_at": "2025-05-12T09:14:04Z",
        "owner": {"login": "Acme", "id": 38302899, "type": "Organization", "site_admin": False},
        "package_version": {
            "id": 417003311,
            "version": DIGEST_1,
            "name": DIGEST_1,
            "description": "",
            "summary": "",
            "manifest": "",
            "html_url": "https://github.com/orgs/Acme/packages/container/app/417003311",
            "target_commitish": "main",
            "target_oid": "6c62fb45fe66bfb1ea9a66abc38f6a0cc974292b",
            "created_at": "0001-01-01T00:00:00Z",
            "updated_at": "0001-01-01T00:00:00Z",
            "metadata": [],
            "container_metadata": {
                "tag": {"name": "1.4.2", "digest": DIGEST_1},
                "labels": {"description": "", "source": "https://github.com/Acme/app", "revision": "6c62fb45"},
                "manifest": {
                    "digest": DIGEST_1,
                    "media_type": "application/vnd.oci.image.index.v1+json",
                    "uri": f"repositories/Acme/app/manifests/{DIGEST_1}",
                    "size": 1609,
                },
            },
            "package_files": [],
            "installation_command": "docker pull ghcr.io/Acme/app:1.4.2",
            "package_url": "ghcr.io/Acme/app:1.4.2",
        },
        "registry": {
            "about_url": "https://docs.github.com/packages/learn-github-packages/introduction-to-github-packages",
            "name": "GitHub CONTAINER registry",
            "type": "CONTAINER",
            "url": "https://CONTAINER.pkg.github.com/Acme",
            "vendor": "GitHub Inc",
        },
    },
    "organization": {"login": "Acme", "id": 38302899},
    "sender": {"login": "github-actions[bot]", "id": 41898282, "type": "Bot"},
}

DOCKERHUB_PUSH: dict[str, Any] = {
    "callback_url": "https://registry.hub.docker.com/u/acme/app/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/",
    "push_data": {"pushed_at": 1747041244, "pusher": "acmebot", "tag": "1.4.2", "images": []},
    "repository": {
        "comment_count": 0,
        "date_created": 1700000000,
        "description": "",
        "full_description": "",
        "is_official": False,
        "is_private": True,
        "is_trusted": False,
        "name": "app",
        "namespace": "acme",
        "owner": "acme",
        "repo_name": "acme/app",
        "repo_url": "https://hub.docker.com/r/acme/app",
        "star_count": 0,
        "status": "Active",
    },
}


def github_event(tag: str = "1.4.2", digest: str = DIGEST_1, action: str = "published") -> dict[str, Any]:
    payload = copy.deepcopy(GITHUB_PACKAGE_PUBLISHED)
    payload["action"] = action
    version = payload["package"]["package_version"]
    version["container_metadata"]["tag"] = {"name": tag, "digest": digest}
    version["package_url"] = f"ghcr.io/Acme/app:{tag}"
    return payload


def dockerhub_event(tag: str = "1.4.2", pushed_at: int = 1747041244) -> dict[str, Any]:
    payload = copy.deepcopy(DOCKERHUB_PUSH)
    payload["push_data"].update(tag=tag, pushed_at=pushed_at)
    return payload


# ----------------------------------------------------------------------------- fakes


@dataclass
class FakePrefect:
    """The slice of Prefect's REST API the receiver uses, with idempotency keys honoured."""

    deployments: dict[str, str] = field(default_factory=lambda: {"rolling-deploy/acme": DEPLOYMENT_ID})
    fail_next: list[int] = field(default_factory=list)  # statuses to answer create calls with first
    requests: list[httpx.Request] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # idempotency key -> run
    creates: list[dict[str, Any]] = field(default_factory=list)
    condition: threading.Condition = field(default_factory=threading.Condition)

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.condition:
            self.requests.append(request)
            try:
                return self._answer(request)
            finally:
                self.condition.notify_all()

    def _answer(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/")
        if request.method == "GET" and path.startswith("deployments/name/"):
            name = "/".join(path.split("/")[2:])
            if name not in self.deployments:
                return httpx.Response(404, json={"detail": "Deployment not found"})
            return httpx.Response(200, json={"id": self.deployments[name], "name": name})
        if request.method == "POST" and path == "flow_runs/filter":
            query = json.loads(request.content)["flow_runs"]
            found = [
                run
                for run in self.runs.values()
                if run["deployment_id"] in query["deployment_id"]["any_"]
                and set(query["tags"]["all_"]) <= set(run["tags"])
                and run["state"]["type"] in query["state"]["type"]["any_"]
            ]
            return httpx.Response(200, json=found)
        if request.method == "POST" and path.startswith("flow_runs/") and path.endswith("/set_state"):
            [run] = [run for run in self.runs.values() if run["id"] == path.split("/")[1]]
            proposed = json.loads(request.content)["state"]
            run.setdefault("proposed", []).append(proposed)
            if proposed["type"] == "CANCELLING" and not run.get("infrastructure_pid"):
                # As Prefect 3.9's server does: no infrastructure to stop, so straight to Cancelled.
                run["state"] = {"type": "CANCELLED", "message": proposed.get("message")}
                return httpx.Response(200, json={"status": "REJECT", "state": run["state"]})
            run["state"] = proposed
            return httpx.Response(201, json={"status": "ACCEPT", "state": run["state"]})
        if request.method == "POST" and path.endswith("/create_flow_run"):
            deployment_id = path.split("/")[1]
            if deployment_id not in self.deployments.values():
                return httpx.Response(404, json={"detail": "Deployment not found"})
            if self.fail_next:
                status = self.fail_next.pop(0)
                return httpx.Response(status, json={"detail": f"induced {status}"})
            body = json.loads(request.content)
            key = body["idempotency_key"]
            if key in self.runs:
                return httpx.Response(200, json=self.runs[key])
            run = {
                "id": str(uuid.uuid4()),
                "name": f"run-{len(self.runs) + 1}",
                "deployment_id": deployment_id,
                "parameters": body["parameters"],
                "idempotency_key": key,
                "tags": body.get("tags", []),
                "state": body.get("state") or {"type": "SCHEDULED"},
                "body": body,
            }
            self.runs[key] = run
            self.creates.append(run)
            return httpx.Response(201, json=run)
        return httpx.Response(404, json={"detail": "Not Found"})

    def wait_for_creates(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.condition:
            if not self.condition.wait_for(lambda: len(self.creates) >= count, timeout):
                raise AssertionError(f"expected {count} runs, Prefect saw {len(self.creates)} in {timeout} s")
            return list(self.creates)

    def create_calls(self) -> int:
        with self.condition:
            return sum(1 for r in self.requests if r.url.path.endswith("/create_flow_run"))


def route(**overrides: Any) -> WebhookRoute:
    values: dict[str, Any] = {
        "repository": "registry.example.com:5000/acme/app",
        "fleet": "acme",
        "deployment": "rolling-deploy/acme",
        "fleet_file": "/etc/compose-rollout/acme.yaml",
    }
    return WebhookRoute.model_validate({**values, **overrides})


def settings(**overrides: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "prefect": {"api_url": API, "attempts": 3, "retry_delay_seconds": 0},
        "distribution": {"authorization": REGISTRY_AUTH},
        "github": {"secret": GITHUB_SECRET},
        "dockerhub": {"token": DOCKERHUB_TOKEN},
        "debounce_seconds": 0,
        "routes": [
            route(),
            route(repository="ghcr.io/acme/app", fleet="acme-ghcr"),
            route(repository="acme/app", fleet="acme-hub"),  # Docker Hub, written the short way
        ],
    }
    values.update(overrides)
    return WebhookSettings.model_validate(values)


class Harness:
    """The app on an event loop in a thread, its lifespan running, and an HTTP client for it
    (what starlette's TestClient does, without its deprecated httpx path)."""

    def __init__(self, app: Starlette, prefect: FakePrefect) -> None:
        self.prefect = prefect
        self.receiver: Receiver = app.state.receiver
        self._stack = ExitStack()
        self.portal: BlockingPortal = self._stack.enter_context(start_blocking_portal())
        lifespan = self.portal.call(partial(LifespanManager, app, shutdown_timeout=30))  # made on the loop
        self._stack.enter_context(self.portal.wrap_async_context_manager(lifespan))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://receiver.test")
        self._stack.callback(self.portal.call, self.http.aclose)

    def close(self) -> None:
        """Close the client, run the app's shutdown, stop the loop."""
        self._stack.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(partial(self.http.request, method, url, **kwargs))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def get(self, url: str) -> httpx.Response:
        return self.request("GET", url)

    def post_distribution(self, body: Any, **headers: str) -> httpx.Response:
        headers = {
            "Authorization": REGISTRY_AUTH,
            "Content-Type": "application/vnd.docker.distribution.events.v1+json",
        } | headers
        return self.post("/hooks/distribution", content=json.dumps(body).encode(), headers=headers)

    def post_github(self, body: Any, event: str = "package", secret: str = GITHUB_SECRET) -> httpx.Response:
        raw = json.dumps(body).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": github_signature(SecretStr(secret), raw),
        }
        return self.post("/hooks/github", content=raw, headers=headers)

    def post_dockerhub(self, body: Any, token: str = DOCKERHUB_TOKEN) -> httpx.Response:
        return self.post(f"/hooks/dockerhub/{token}", json=body)

    def on_loop(self, probe: Callable[[], Any]) -> Any:
        """Read the receiver's state on its own event loop thread."""
        return self.portal.call(probe)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until nothing is pending or being created (polling observed state, bounded)."""
        deadline = time.monotonic() + timeout
        while not self.on_loop(lambda: self.receiver.idle):
            assert time.monotonic() < deadline, "the receiver did not become idle"
            time.sleep(0.002)


@pytest.fixture(autouse=True)
def _state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default state_directory (~/.local/state/compose-rollout/webhooks) under the test's
    directory: a receiver made here never writes to the real home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path / ".local/state/compose-rollout/webhooks"


@pytest.fixture
def harness_factory() -> Iterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def make(
        prefect: FakePrefect | None = None,
        wall_clock: Callable[[], datetime] | None = None,
        clock: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> Harness:
        prefect = prefect or FakePrefect()
        clocks: dict[str, Any] = {"wall_clock": wall_clock} if wall_clock else {}
        if clock:
            clocks["clock"] = clock
        app = create_app(settings(**overrides), prefect_transport=httpx.MockTransport(prefect.handle), **clocks)
        harnesses.append(Harness(app, prefect))
        return harnesses[-1]

    yield make
    for harness in harnesses:
        harness.close()


@pytest.fixture
def harness(harness_factory: Callable[..., Harness]) -> Harness:
    return harness_factory()


# ----------------------------------------------------------------------------- authentication


def test_a_registry_notification_starts_a_run_with_the_pushed_tag(harness: Harness) -> None:
    pushed = pushed_a_minute_ago()
    response = harness.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1), pushed_at=pushed))
    assert response.status_code == 202
    assert response.json()["accepted"] == [{"fleet": "acme", "tag": "1.4.2", "outcome": "scheduled"}]
    [run] = harness.prefect.wait_for_creates(1)
    assert run["deployment_id"] == DEPLOYMENT_ID
    assert run["parameters"] == {
        "fleet_file": "/etc/compose-rollout/acme.yaml",
        "tag": "1.4.2",
        "triggered_by": f"webhook:distribution push of registry.example.com:5000/acme/app:1.4.2@{DIGEST_1}",
        # The registry's own time of the push: the flow orders it against other requests by it.
        "requested_at": pushed.isoformat(),
    }
    assert run["idempotency_key"] == f"compose-rollout/acme/1.4.2/{DIGEST_1}"
    harness.wait_idle()
    [started] = harness.on_loop(lambda: list(harness.receiver.started))
    assert (started.fleet, started.tag, started.flow_run.created) == ("acme", "1.4.2", True)


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer wrong-secret-0000000000000", REGISTRY_AUTH + "x", "bearer" + REGISTRY_AUTH[6:]]
)
def test_a_registry_notification_without_the_shared_secret_is_refused(
    harness: Harness, authorization: str | None
) -> None:
    headers = {"Content-Type": "application/vnd.docker.distribution.events.v1+json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = json.dumps(distribution_envelope(("acme/app", "1.4.2", DIGEST_1))).encode()
    response = harness.post("/hooks/distribution", content=body, headers=headers)
    assert response.status_code == 401
    harness.wait_idle()
    assert harness.prefect.requests == []


def test_a_github_package_event_needs_a_valid_signature_of_the_exact_body(harness: Harness) -> None:
    assert harness.post_github(github_event(), secret="not-the-secret-at-all").status_code == 401
    raw = json.dumps(github_event()).encode()
    signature = github_signature(SecretStr(GITHUB_SECRET), raw)
    tampered = raw.replace(b"1.4.2", b"1.4.3")
    headers = {"Content-Type": "application/json", "X-GitHub-Event": "package", "X-Hub-Signature-256": signature}
    assert harness.post("/hooks/github", content=tampered, headers=headers).status_code == 401
    headers.pop("X-Hub-Signature-256")
    assert harness.post("/hooks/github", content=raw, headers=headers).status_code == 401
    harness.wait_idle()
    assert harness.prefect.requests == []

    response = harness.post_github(github_event())
    assert response.status_code == 202
    [run] = harness.prefect.wait_for_creates(1)
    assert run["parameters"]["tag"] == "1.4.2"
    assert run["parameters"]["triggered_by"].startswith("webhook:github push of ghcr.io/acme/app:1.4.2@sha256:")


def test_github_ping_is_answered_once_signed(harness: Harness) -> None:
    ping = {"zen": "Design for failure.", "hook_id": 1, "hook": {"type": "Organization", "events": ["package"]}}
    assert harness.post_github(ping, event="ping").json() == {"pong": True}
    assert harness.post_github(ping, event="ping", secret="wrong-secret-wrong-secret").status_code == 401


def test_a_docker_hub_webhook_is_authenticated_by_the_token_in_its_path(harness: Harness) -> None:
    assert harness.post_dockerhub(dockerhub_event(), token=DOCKERHUB_TOKEN[:-1] + "x").status_code == 401
    assert harness.post_dockerhub(dockerhub_event(), token="short").status_code == 401
    harness.wait_idle()
    assert harness.prefect.requests == []
    response = harness.post_dockerhub(dockerhub_event())
    assert response.status_code == 202
    [run] = harness.prefect.wait_for_creates(1)
    assert run["parameters"]["tag"] == "1.4.2"
    assert run["idempotency_key"] == "compose-rollout/acme-hub/1.4.2/pushed-at-1747041244"


def test_a_source_that_is_not_configured_does_not_exist(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(github=None, dockerhub=None)
    assert h.post_github(github_event()).status_code == 404
    assert h.post_dockerhub(dockerhub_event()).status_code == 404
    assert h.get("/healthz").json() == {"ok": True, "pending": 0, "creating": 0}


def test_secrets_never_reach_the_logs_or_reprs(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    harness.post_distribution(
        distribution_envelope(("acme/app", "1.4.2", DIGEST_1)), Authorization="Bearer guess-guess-guess"
    )
    harness.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    harness.post_github(github_event("1.4.3"))
    harness.post_dockerhub(dockerhub_event("1.4.4"))
    harness.post_dockerhub(dockerhub_event("1.4.4"), token="x" * 40)
    harness.prefect.wait_for_creates(3)
    harness.wait_idle()
    # The test's own HTTP client logs the URLs it calls; everything else must be clean.
    logged = "\n".join(r.getMessage() for r in caplog.records if "http://receiver.test" not in r.getMessage())
    text = logged + repr(harness.receiver.settings) + str(harness.receiver.settings.model_dump())
    assert "refused an unauthenticated distribution request" in caplog.text
    for secret in (REGISTRY_AUTH, REGISTRY_AUTH.split()[1], GITHUB_SECRET, DOCKERHUB_TOKEN):
        assert secret not in text


# ----------------------------------------------------------------------------- malformed input


def test_an_oversized_body_is_refused_before_it_is_read(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(max_body_bytes=4096)
    pulled: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            pulled.append(i)
            yield b"x" * 1024

    headers = {
        "Authorization": REGISTRY_AUTH,
        "Content-Type": "application/json",
        "Content-Length": str(100 * 1024),
    }
    response = h.post("/hooks/distribution", content=body(), headers=headers)
    assert response.status_code == 413
    # Without a Content-Length (chunked), reading stops at the cap.
    headers.pop("Content-Length")
    pulled.clear()
    assert h.post("/hooks/distribution", content=body(), headers=headers).status_code == 413
    h.wait_idle()
    assert h.prefect.requests == []


def test_malformed_bodies_get_400_and_start_nothing(harness: Harness) -> None:
    for body in (b"{not json", b"[]", b'{"events": "push"}', b'{"events": [1, 2]}x'):
        response = harness.post(
            "/hooks/distribution",
            content=body,
            headers={"Authorization": REGISTRY_AUTH, "Content-Type": "application/json"},
        )
        assert response.status_code == 400, body
        assert "malformed" in response.json()["error"]
    assert harness.post_dockerhub({"push_data": {"tag": "1.4.2"}, "repository": {}}).status_code == 400
    harness.wait_idle()
    assert harness.prefect.requests == []


def test_a_malformed_tag_refuses_a_single_event_request(harness: Harness) -> None:
    response = harness.post_dockerhub(dockerhub_event("../../etc"))
    assert response.status_code == 422
    assert "invalid image tag '../../etc'" in response.json()["error"]
    assert harness.post_github(github_event("1.4.3;rm")).status_code == 422
    harness.wait_idle()
    assert harness.prefect.requests == []


def test_a_wrong_content_type_is_refused(harness: Harness) -> None:
    body = distribution_envelope(("acme/app", "1.4.2", DIGEST_1))
    assert harness.post_distribution(body, **{"Content-Type": "text/plain"}).status_code == 415
    assert (
        harness.post_distribution(
            body, **{"Content-Type": "application/vnd.docker.distribution.events.v2+json"}
        ).status_code
        == 202
    )


# ----------------------------------------------------------------------------- parsing


def test_parse_distribution_keeps_only_tag_pushes() -> None:
    pushed = pushed_a_minute_ago()
    envelope = distribution_envelope(
        ("acme/app", "1.4.2", DIGEST_1), ("acme/worker", "2.0.0", DIGEST_2), pushed_at=pushed
    )
    assert parse_distribution(json.dumps(envelope).encode()) == (
        [
            Push("distribution", "registry.example.com:5000/acme/app", "1.4.2", DIGEST_1, None, pushed),
            Push("distribution", "registry.example.com:5000/acme/worker", "2.0.0", DIGEST_2, None, pushed),
        ],
        [],
    )
    # Behind a proxy the host in the event may not be the one fleets use.
    [push], _ = parse_distribution(
        json.dumps(distribution_envelope(("acme/app", "1.4.2", DIGEST_1), host="registry:5000")).encode(),
        "registry.example.com:5000",
    )
    assert push.repository == "registry.example.com:5000/acme/app"


def test_parse_github_reads_the_container_tag_and_lowercases_the_repository() -> None:
    assert parse_github(json.dumps(github_event()).encode(), "package") == [
        Push("github", "ghcr.io/acme/app", "1.4.2", DIGEST_1)
    ]
    # The older event name carries the same payload under `registry_package`.
    legacy = github_event()
    legacy["registry_package"] = legacy.pop("package")
    assert parse_github(json.dumps(legacy).encode(), "registry_package")[0].tag == "1.4.2"


def test_parse_github_skips_what_is_not_a_tagged_container_push() -> None:
    assert parse_github(json.dumps(github_event(action="updated")).encode(), "package") == []
    assert (
        parse_github(json.dumps(github_event(tag="")).encode(), "package") == []
    )  # one platform of a multi-arch image
    npm = github_event()
    npm["package"]["package_type"] = npm["package"]["ecosystem"] = "npm"
    assert parse_github(json.dumps(npm).encode(), "package") == []
    assert parse_github(b'{"action": "opened"}', "issues") == []


def test_parse_dockerhub_uses_the_push_time_in_place_of_a_digest() -> None:
    assert parse_dockerhub(json.dumps(DOCKERHUB_PUSH).encode()) == [
        Push("dockerhub", "docker.io/acme/app", "1.4.2", None, "1747041244", datetime.fromtimestamp(1747041244, UTC))
    ]


# ----------------------------------------------------------------------------- filters


def test_latest_ci_tags_and_pre_releases_start_nothing(harness: Harness) -> None:
    envelope = distribution_envelope(
        ("acme/app", "latest", DIGEST_1),
        ("acme/app", "sha-3f2a9c1", DIGEST_1),
        ("acme/app", "1.5.0-rc.1", DIGEST_2),
        ("acme/app", "main", DIGEST_2),
        ("acme/other", "1.4.2", DIGEST_3),
    )
    response = harness.post_distribution(envelope)
    assert response.status_code == 200
    assert response.json() == {
        "accepted": [],
        "ignored": [
            {
                "repository": "registry.example.com:5000/acme/app",
                "tag": "latest",
                "reason": "fleet acme: tag latest `latest` is never deployed automatically",
            },
            {
                "repository": "registry.example.com:5000/acme/app",
                "tag": "sha-3f2a9c1",
                "reason": "fleet acme: tag sha-3f2a9c1 matches the ignore pattern 'sha-*'",
            },
            {
                "repository": "registry.example.com:5000/acme/app",
                "tag": "1.5.0-rc.1",
                "reason": "fleet acme: tag 1.5.0-rc.1 is a pre-release (allow_prereleases is off)",
            },
            {
                "repository": "registry.example.com:5000/acme/app",
                "tag": "main",
                "reason": "fleet acme: tag main is not a version",
            },
            {
                "repository": "registry.example.com:5000/acme/other",
                "tag": "1.4.2",
                "reason": "no route for this repository",
            },
        ],
        "refused": [],
    }
    harness.wait_idle()
    assert harness.prefect.requests == []


def test_a_route_can_allow_pre_releases_and_restrict_the_range() -> None:
    staging = route(fleet="staging", tags=TagPolicy(version_range=">=1.4", allow_prereleases=True))
    prod = route(fleet="prod", tags=TagPolicy(version_range=">=1.4,<1.5"))
    pushes = [
        Push("distribution", "registry.example.com:5000/acme/app", tag, DIGEST_1) for tag in ("1.5.0-rc.1", "1.4.7")
    ]
    planned, ignored = plan_runs(pushes, [staging, prod])
    assert [(run.fleet, run.push.tag) for run in planned] == [
        ("staging", "1.5.0-rc.1"),
        ("staging", "1.4.7"),
        ("prod", "1.4.7"),
    ]
    assert [i.reason for i in ignored] == ["fleet prod: tag 1.5.0-rc.1 is a pre-release (allow_prereleases is off)"]


def test_repositories_match_as_docker_names_them() -> None:
    hub = route(repository="docker.io/library/nginx", fleet="edge")
    planned, _ = plan_runs([Push("dockerhub", "docker.io/nginx", "1.27.0", None, "1")], [hub])
    assert [run.fleet for run in planned] == ["edge"]
    upper = route(repository="Registry.Example.com:5000/acme/app")
    planned, _ = plan_runs([Push("distribution", "registry.example.com:5000/acme/app", "1.0.0", DIGEST_1)], [upper])
    assert len(planned) == 1


# ----------------------------------------------------------------------------- dedupe


def test_the_same_push_delivered_twice_starts_one_run(harness: Harness) -> None:
    envelope = distribution_envelope(("acme/app", "1.4.2", DIGEST_1))
    harness.post_distribution(envelope)
    harness.prefect.wait_for_creates(1)
    harness.wait_idle()
    again = harness.post_distribution(envelope)
    assert again.json()["accepted"][0]["outcome"] == "duplicate of a push already received"
    harness.wait_idle()
    assert harness.prefect.create_calls() == 1


def test_with_its_memory_lost_prefect_still_returns_the_existing_run_for_a_known_push(
    harness_factory: Callable[..., Harness], _state_in_tmp: Path
) -> None:
    prefect = FakePrefect()
    first = harness_factory(prefect)
    first.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    prefect.wait_for_creates(1)
    first.wait_idle()
    first.close()
    (_state_in_tmp / "receiver-state.json").unlink()  # e.g. a new machine without the old state_directory
    restarted = harness_factory(prefect)
    restarted.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    restarted.wait_idle()
    assert prefect.create_calls() == 2
    assert len(prefect.creates) == 1
    [found] = restarted.on_loop(lambda: list(restarted.receiver.started))
    assert found.flow_run.created is False
    assert found.flow_run.id == prefect.creates[0]["id"]


def test_a_tag_moved_to_a_new_digest_is_a_new_push(harness: Harness) -> None:
    harness.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    harness.prefect.wait_for_creates(1)
    harness.wait_idle()
    harness.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_2)))
    assert [r["idempotency_key"][-8:] for r in harness.prefect.wait_for_creates(2)] == [DIGEST_1[-8:], DIGEST_2[-8:]]


# ----------------------------------------------------------------------------- coalescing (pure, fake clock)


def planned(tag: str, fleet: str = "acme", digest: str = DIGEST_1, debounce: float | None = None) -> PlannedRun:
    return PlannedRun(
        route(fleet=fleet, debounce_seconds=debounce),
        Push("distribution", "registry.example.com:5000/acme/app", tag, digest),
    )


def test_a_burst_coalesces_to_the_highest_version_after_the_quiet_period() -> None:
    coalescer = Coalescer(debounce_seconds=5, debounce_max_seconds=60)
    assert coalescer.offer(planned("1.4.2"), now=100.0) == "scheduled"
    assert coalescer.offer(planned("1.4.10", digest=DIGEST_2), now=101.0) == "scheduled, replacing 1.4.2"
    assert coalescer.offer(planned("1.4.3", digest=DIGEST_3), now=102.0) == "superseded by 1.4.10"
    assert coalescer.next_deadline() == 107.0  # 5 s after the last push
    assert coalescer.pop_due(106.9) == []
    [run] = coalescer.pop_due(107.0)
    assert run.push.tag == "1.4.10"
    assert coalescer.pending_count == 0


def test_tags_that_are_not_both_versions_coalesce_to_the_latest_received() -> None:
    coalescer = Coalescer(debounce_seconds=5, debounce_max_seconds=60)
    coalescer.offer(planned("1.4.2"), now=0.0)
    assert coalescer.offer(planned("hotfix-a", digest=DIGEST_2), now=1.0) == "scheduled, replacing 1.4.2"
    assert coalescer.offer(planned("1.4.1", digest=DIGEST_3), now=2.0) == "scheduled, replacing hotfix-a"
    # The same version pushed again with a new digest: the newer push wins.
    assert coalescer.offer(planned("1.4.1", digest=DIGEST_1), now=3.0) == "scheduled, replacing 1.4.1"
    assert coalescer.pending["acme"].push.digest == DIGEST_1


def test_a_continuous_stream_of_pushes_still_starts_after_debounce_max() -> None:
    coalescer = Coalescer(debounce_seconds=5, debounce_max_seconds=20)
    for second in range(0, 30, 2):
        coalescer.offer(planned(f"1.4.{second}", digest="sha256:" + f"{second:02d}" * 32), now=float(second))
        if second >= 20:
            break
    assert coalescer.next_deadline() == 20.0
    assert [run.push.tag for run in coalescer.pop_due(20.0)] == ["1.4.20"]


def test_fleets_are_debounced_independently_and_a_busy_fleet_waits() -> None:
    coalescer = Coalescer(debounce_seconds=5, debounce_max_seconds=60)
    coalescer.offer(planned("1.4.2", fleet="a"), now=0.0)
    coalescer.offer(planned("1.4.2", fleet="b", debounce=1.0), now=0.0)
    assert [run.fleet for run in coalescer.pop_due(1.0)] == ["b"]
    assert coalescer.next_deadline(busy=frozenset({"a"})) is None
    assert coalescer.pop_due(10.0, busy=frozenset({"a"})) == []
    assert [run.fleet for run in coalescer.pop_due(10.0)] == ["a"]


def test_a_late_delivery_of_an_older_version_is_ignored_once_a_newer_one_started() -> None:
    coalescer = Coalescer(debounce_seconds=0, debounce_max_seconds=0)
    coalescer.offer(planned("1.4.3"), now=0.0)
    [run] = coalescer.pop_due(0.0)
    coalescer.mark_started(run)
    assert (
        coalescer.offer(planned("1.4.2", digest=DIGEST_2), now=1.0)
        == "older than 1.4.3, the version of fleet acme's last webhook run (allow_downgrade is off)"
    )
    assert coalescer.pending_count == 0
    assert coalescer.offer(planned("1.4.4", digest=DIGEST_2), now=1.0) == "scheduled"


def test_remembered_keys_are_bounded() -> None:
    coalescer = Coalescer(debounce_seconds=0, debounce_max_seconds=0, remembered=16)
    for i in range(40):
        coalescer.offer(planned("1.4.2", digest="sha256:" + f"{i:064x}"), now=float(i))
        coalescer.pop_due(float(i))
    assert len(coalescer.memory.keys) == 16


def test_a_burst_through_the_app_starts_only_the_newest_tag(harness_factory: Callable[..., Harness]) -> None:
    # The receiver's clock stands still while the burst arrives, however slow the machine.
    now = [1000.0]
    h = harness_factory(debounce_seconds=0.2, clock=lambda: now[0])
    for tag, digest in (("1.4.2", DIGEST_1), ("1.4.10", DIGEST_2), ("1.4.3", DIGEST_3)):
        assert h.post_distribution(distribution_envelope(("acme/app", tag, digest))).status_code == 202
    assert h.on_loop(lambda: h.receiver.coalescer.pending["acme"].push.tag) == "1.4.10"
    assert h.prefect.create_calls() == 0
    now[0] += 0.2  # the quiet period is over; the receiver rechecks within 0.2 s of real time
    [run] = h.prefect.wait_for_creates(1)
    h.wait_idle()
    assert run["parameters"]["tag"] == "1.4.10"
    assert h.prefect.create_calls() == 1


def test_pending_pushes_are_started_on_shutdown(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(debounce_seconds=600, debounce_max_seconds=600)
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    assert h.on_loop(lambda: h.receiver.coalescer.pending_count) == 1
    h.close()
    assert [r["parameters"]["tag"] for r in h.prefect.creates] == ["1.4.2"]


def test_shutdown_is_bounded_even_when_prefect_hangs(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    never = asyncio.Event()  # Prefect accepts the connection and never answers

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        raise AssertionError("unreachable")

    app = create_app(settings(shutdown_grace_seconds=0.2), prefect_transport=httpx.MockTransport(hang))
    h = Harness(app, FakePrefect())
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    deadline = time.monotonic() + 10
    while h.on_loop(lambda: h.receiver.creating) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    # A second push for the same fleet waits for the first call to finish.
    h.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_2)))
    assert h.on_loop(lambda: (h.receiver.coalescer.pending_count, h.receiver.creating)) == (1, 1)
    closing = threading.Thread(target=h.close)
    closing.start()
    closing.join(timeout=60)  # a hang detector, far above the 0.2 s grace; no speed is asserted
    assert not closing.is_alive(), "shutdown waited for Prefect, which never answers"
    assert "1.4.3@" in caplog.text and "not started (a run is still being created)" in caplog.text


def test_a_push_outside_the_fleets_windows_is_scheduled_for_the_next_window(
    harness_factory: Callable[..., Harness],
) -> None:
    weeknights = {"cron": "0 22 * * MON-FRI", "duration_minutes": 120, "timezone": "Europe/Berlin"}
    now = [datetime(2025, 1, 11, 15, 0, tzinfo=UTC)]  # a Saturday afternoon
    h = harness_factory(wall_clock=lambda: now[0], routes=[route(maintenance_windows=[weeknights])])
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    [run] = h.prefect.wait_for_creates(1)
    # Monday 22:00 in Berlin is 21:00 UTC.
    assert run["body"]["state"] == {
        "type": "SCHEDULED",
        "state_details": {"scheduled_time": "2025-01-13T21:00:00+00:00"},
    }
    h.wait_idle()
    now[0] = datetime(2025, 1, 13, 21, 30, tzinfo=UTC)  # inside the window: run now
    h.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_2)))
    assert "state" not in h.prefect.wait_for_creates(2)[1]["body"]


def test_a_newer_push_cancels_the_fleets_older_runs_still_waiting(
    harness_factory: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    weeknights = {"cron": "0 22 * * MON-FRI", "duration_minutes": 120, "timezone": "Europe/Berlin"}
    saturday = datetime(2025, 1, 11, 15, 0, tzinfo=UTC)
    prefect = FakePrefect()
    # Runs nobody should touch: one a person created, one of another fleet on the same deployment.
    for key, tags, fleet_file in (
        ("by-hand", [], "/etc/compose-rollout/acme.yaml"),
        ("other", [RUN_TAG], "/other.yaml"),
    ):
        prefect.runs[key] = {
            "id": key,
            "deployment_id": DEPLOYMENT_ID,
            "parameters": {"fleet_file": fleet_file, "tag": "1.0.0"},
            "tags": tags,
            "state": {"type": "SCHEDULED"},
        }
    h = harness_factory(prefect, wall_clock=lambda: saturday, routes=[route(maintenance_windows=[weeknights])])
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    prefect.wait_for_creates(1)
    h.wait_idle()
    h.post_distribution(distribution_envelope(("acme/app", "1.4.3", DIGEST_2)))
    first, second = prefect.wait_for_creates(2)
    h.wait_idle()
    # Asked as Prefect's own cancel asks (a worker that picked the run up meanwhile stops it
    # properly); the server makes a run that has no infrastructure Cancelled at once.
    assert first["proposed"] == [
        {
            "type": "CANCELLING",
            "name": "Cancelling",
            "message": f"superseded by the webhook push of {REGISTRY_PUSH}:1.4.3@{DIGEST_2}",
        }
    ]
    assert first["state"]["type"] == "CANCELLED"
    assert f"cancelled flow run {first['id']} of fleet acme: superseded by {REGISTRY_PUSH}:1.4.3@" in caplog.text
    assert second["state"]["type"] == "SCHEDULED"
    assert prefect.runs["by-hand"]["state"] == prefect.runs["other"]["state"] == {"type": "SCHEDULED"}


def test_an_older_push_never_cancels_a_newer_waiting_run() -> None:
    prefect = FakePrefect()
    prefect.runs["newer"] = {
        "id": "newer",
        "deployment_id": DEPLOYMENT_ID,
        "parameters": {"fleet_file": "/etc/compose-rollout/acme.yaml", "tag": "1.4.9"},
        "tags": [RUN_TAG],
        "state": {"type": "SCHEDULED"},
    }

    async def scenario() -> list[str]:
        runs = prefect_runs(prefect)
        try:
            # E.g. a receiver restarted, so it does not know 1.4.9 was started.
            older = planned("1.4.2")
            return await runs.cancel_superseded(older, await runs.create_run(older))
        finally:
            await runs.aclose()

    assert run_async(scenario()) == []
    assert prefect.runs["newer"]["state"] == {"type": "SCHEDULED"}


# ----------------------------------------------------------------------------- the Prefect side


def run_async(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


async def _no_sleep(seconds: float) -> None:
    assert 0 <= seconds <= 30


def prefect_runs(prefect: FakePrefect, **api: Any) -> PrefectRuns:
    values = {"api_url": API, "attempts": 3, "retry_delay_seconds": 1} | api
    return PrefectRuns(PrefectApi.model_validate(values), API, httpx.MockTransport(prefect.handle), sleep=_no_sleep)


def test_transient_prefect_errors_are_retried_with_the_same_key() -> None:
    prefect = FakePrefect(fail_next=[503, 502])

    async def scenario() -> Any:
        runs = prefect_runs(prefect)
        try:
            return await runs.create_run(planned("1.4.2"))
        finally:
            await runs.aclose()

    ref = run_async(scenario())
    assert ref.created is True
    keys = [json.loads(r.content)["idempotency_key"] for r in prefect.requests if r.method == "POST"]
    assert keys == [f"compose-rollout/acme/1.4.2/{DIGEST_1}"] * 3
    # The deployment name was looked up once.
    assert sum(1 for r in prefect.requests if r.method == "GET") == 1


def test_a_permanent_prefect_refusal_is_not_retried_and_is_recorded(harness_factory: Callable[..., Harness]) -> None:
    prefect = FakePrefect(fail_next=[409])
    h = harness_factory(prefect)
    h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    h.wait_idle()
    assert prefect.create_calls() == 1
    [failed] = h.on_loop(lambda: list(h.receiver.failed))
    assert "Prefect answered 409" in failed.error
    # Once the cause is fixed, delivering the same push again starts its run.
    again = h.post_distribution(distribution_envelope(("acme/app", "1.4.2", DIGEST_1)))
    assert again.json()["accepted"][0]["outcome"] == "scheduled"
    assert [r["parameters"]["tag"] for r in prefect.wait_for_creates(1)] == ["1.4.2"]


def test_an_unreachable_prefect_fails_after_the_bounded_attempts() -> None:
    attempts: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> None:
        api = PrefectApi(api_url=API, attempts=4, retry_delay_seconds=0.5)
        runs = PrefectRuns(api, API, httpx.MockTransport(refuse), sleep=_no_sleep)
        try:
            await runs.create_run(PlannedRun(route(deployment=DEPLOYMENT_ID), planned("1.4.2").push))
        finally:
            await runs.aclose()

    with pytest.raises(PrefectApiError, match=r"unreachable: ConnectError: connection refused \(after 4 attempts\)"):
        run_async(scenario())
    assert len(attempts) == 4


def test_an_unknown_deployment_name_is_a_permanent_error() -> None:
    prefect = FakePrefect(deployments={})

    async def scenario() -> None:
        runs = prefect_runs(prefect)
        try:
            await runs.create_run(planned("1.4.2"))
        finally:
            await runs.aclose()

    with pytest.raises(PrefectApiError, match="Prefect has no deployment 'rolling-deploy/acme'"):
        run_async(scenario())
    assert len(prefect.requests) == 1


def test_the_prefect_auth_string_is_sent_as_prefects_client_sends_it() -> None:
    prefect = FakePrefect()

    async def scenario() -> None:
        runs = prefect_runs(prefect, auth_string="admin:s3cret-pass")
        try:
            await runs.create_run(planned("1.4.2"))
        finally:
            await runs.aclose()

    run_async(scenario())
    expected = "Basic " + base64.b64encode(b"admin:s3cret-pass").decode()
    assert {r.headers["authorization"] for r in prefect.requests} == {expected}


# ----------------------------------------------------------------------------- configuration


def test_the_config_file_loads_with_secrets_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "webhooks.yaml"
    config.write_text(
        "prefect:\n  api_url: http://127.0.0.1:4200/api\n"
        "github: {}\n"
        "debounce_seconds: 2\n"
        "routes:\n"
        "  - repository: ghcr.io/acme/app\n    fleet: acme\n    deployment: rolling-deploy/acme\n"
        "    fleet_file: /etc/compose-rollout/acme.yaml\n"
        "    tags: {version_range: '>=1.4,<2'}\n"
    )
    monkeypatch.setenv("ROLLOUT_WEBHOOK_GITHUB__SECRET", GITHUB_SECRET)
    loaded = load_webhook_settings(config)
    assert loaded.github is not None and loaded.github.secret.get_secret_value() == GITHUB_SECRET
    assert loaded.routes[0].tags.version_range == ">=1.4,<2"
    assert loaded.debounce_seconds == 2


GH = "github: {secret: 0123456789abcdef}\n"
ONE_ROUTE = "routes: [{repository: a/b, fleet: x, deployment: f/d, fleet_file: /x}]\n"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (GH + "routes: []\n", "routes: List should have at least 1 item"),
        (ONE_ROUTE, "configure at least one source"),
        (GH + "port: 1\n" + ONE_ROUTE, "port: unknown key"),
        ("github: {secret: short}\n" + ONE_ROUTE, "github.secret: secret must be 16-1024 characters"),
        ("dockerhub: {token: 'abc/def'}\n" + ONE_ROUTE, "dockerhub.token: token must be 32-256"),
        (GH + ONE_ROUTE.replace("f/d", "no-slash"), "routes[0].deployment: deployment must be an id"),
        (GH + ONE_ROUTE.replace("a/b", "A/B"), "routes[0].repository: invalid image repository"),
        (
            GH
            + "routes:\n  - {repository: a/b, fleet: x, deployment: f/d, fleet_file: /x}\n"
            + "  - {repository: docker.io/a/b, fleet: x, deployment: f/e, fleet_file: /y}\n",
            "duplicate route docker.io/a/b → x",
        ),
    ],
)
def test_a_bad_config_is_refused_naming_its_path(tmp_path: Path, yaml_text: str, message: str) -> None:
    from compose_rollout.errors import ConfigError

    config = tmp_path / "webhooks.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_webhook_settings(config)
    assert message in str(error.value)


def test_main_exits_2_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_signature_helper_matches_githubs_documented_example() -> None:
    # From GitHub's "Validating webhook deliveries" page.
    secret, payload = "It's a Secret to Everybody", b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert github_signature(SecretStr(secret), payload) == expected
    assert expected == "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
