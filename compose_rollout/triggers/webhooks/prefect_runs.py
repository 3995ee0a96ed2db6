"""Creating and cancelling flow runs through Prefect's REST API."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from compose_rollout.errors import RolloutError
from compose_rollout.triggers.tag_policy import version_key
from compose_rollout.triggers.webhooks.routing import PlannedRun
from compose_rollout.triggers.webhooks.settings import PrefectApi, deployment_uuid

RUN_TAG = "compose-rollout-webhook"


class PrefectApiError(RolloutError):
    """The Prefect API refused or did not answer; `permanent` when retrying cannot help."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class FlowRunRef:
    """A flow run Prefect created (or already had, for a repeated idempotency key)."""

    id: str
    name: str
    created: bool


class RunCreator(Protocol):
    """Creates a flow run for a planned run (PrefectRuns; fakes in tests)."""

    async def create_run(self, run: PlannedRun, scheduled_time: datetime | None = None) -> FlowRunRef:
        """Create the run (to start at `scheduled_time`, default now), or return the one
        that already has its idempotency key."""
        ...

    async def cancel_superseded(self, run: PlannedRun, keep: FlowRunRef) -> list[str]:
        """Cancel the not-yet-started webhook runs of the same fleet for older versions; their ids."""
        ...


def prefect_headers(api: PrefectApi) -> dict[str, str]:
    """Authorization headers as Prefect's own client sends them (auth string wins)."""
    if api.auth_string is not None:
        token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if api.api_key is not None:
        return {"Authorization": f"Bearer {api.api_key.get_secret_value()}"}
    return {}


class PrefectRuns:
    """Creates flow runs through Prefect's REST API (one HTTP client, every call bounded)."""

    def __init__(
        self,
        api: PrefectApi,
        api_url: str,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            base_url=api_url.rstrip("/") + "/",
            headers=prefect_headers(api),
            timeout=httpx.Timeout(api.timeout_seconds),
            transport=transport,
        )
        self._deployment_ids: dict[str, str] = {}

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def deployment_id(self, deployment: str) -> str:
        """The id of `deployment` (an id, or 'flow-name/deployment-name' looked up once)."""
        known = deployment_uuid(deployment) or self._deployment_ids.get(deployment)
        if known:
            return known
        flow_name, _, name = deployment.partition("/")
        response = await self._client.get(f"deployments/name/{quote(flow_name, safe='')}/{quote(name, safe='')}")
        if response.status_code == 404:
            raise PrefectApiError(f"Prefect has no deployment {deployment!r}", permanent=True)
        _raise_for_status(response, f"looking up deployment {deployment!r}")
        self._deployment_ids[deployment] = str(response.json()["id"])
        return self._deployment_ids[deployment]

    async def create_run(self, run: PlannedRun, scheduled_time: datetime | None = None) -> FlowRunRef:
        """Create the flow run for `run` (Scheduled for `scheduled_time`, default now),
        retrying transient failures with the same idempotency key."""
        body: dict[str, Any] = {"parameters": run.parameters, "idempotency_key": run.idempotency_key, "tags": [RUN_TAG]}
        if scheduled_time is not None:
            body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": scheduled_time.isoformat()}}
        last: PrefectApiError | None = None
        for attempt in range(1, self.api.attempts + 1):
            try:
                deployment_id = await self.deployment_id(run.route.deployment)
                response = await self._client.post(f"deployments/{deployment_id}/create_flow_run", json=body)
                if response.status_code == 404:
                    # A deployment deleted and re-created under the same name has a new id.
                    self._deployment_ids.pop(run.route.deployment, None)
                    raise PrefectApiError(f"Prefect has no deployment {run.route.deployment!r}", permanent=False)
                _raise_for_status(response, f"creating a run of {run.route.deployment!r}")
                data = response.json()
                return FlowRunRef(str(data["id"]), str(data.get("name", "")), created=response.status_code == 201)
            except httpx.HTTPError as error:
                last = PrefectApiError(f"Prefect API unreachable: {type(error).__name__}: {error}", permanent=False)
            except PrefectApiError as error:
                if error.permanent:
                    raise
                last = error
            if attempt < self.api.attempts:
                await self._sleep(min(self.api.retry_delay_seconds * 2 ** (attempt - 1), 30.0))
        assert last is not None
        raise PrefectApiError(f"{last} (after {self.api.attempts} attempts)", permanent=False)

    async def cancel_superseded(self, run: PlannedRun, keep: FlowRunRef) -> list[str]:
        """Cancel this deployment's webhook-created runs for the same fleet that are still
        Scheduled (not yet picked up) for a version no newer than `run`'s, except `keep`,
        by setting them Cancelling (what Prefect's own cancel does; a worker finishes it).

        Without this, pushes outside a maintenance window would pile up runs that all
        start when it opens, in no guaranteed order. Runs created by anything else
        (without the `compose-rollout-webhook` tag) are never touched. One bounded pass,
        not retried; returns the ids cancelled.
        """
        new = version_key(run.push.tag)
        if new is None:
            return []
        deployment_id = await self.deployment_id(run.route.deployment)
        query = {
            "flow_runs": {
                "deployment_id": {"any_": [deployment_id]},
                "tags": {"all_": [RUN_TAG]},
                "state": {"type": {"any_": ["SCHEDULED"]}},
            },
            "limit": 50,
        }
        response = await self._client.post("flow_runs/filter", json=query)
        _raise_for_status(response, "listing scheduled runs")
        cancelled = []
        for other in response.json():
            parameters = other.get("parameters") or {}
            old = version_key(str(parameters.get("tag", "")))
            if (
                other["id"] == keep.id
                or parameters.get("fleet_file") != run.route.fleet_file
                or old is None
                or old > new
            ):
                continue
            # CANCELLING, as `prefect flow-run cancel` sends: a worker that picked the run up
            # between the query and now stops it properly, instead of it running on unseen.
            state = {
                "type": "CANCELLING",
                "name": "Cancelling",
                "message": f"superseded by the webhook push of {run.push}",
            }
            answer = await self._client.post(f"flow_runs/{other['id']}/set_state", json={"state": state})
            _raise_for_status(answer, f"cancelling superseded run {other['id']}")
            # A Scheduled run with no infrastructure is turned Cancelled by the server itself
            # (a REJECT carrying that state); one with infrastructure stays Cancelling.
            result = answer.json()
            if (result.get("state") or {}).get("type") in ("CANCELLING", "CANCELLED"):
                cancelled.append(str(other["id"]))
        return cancelled


def _raise_for_status(response: httpx.Response, doing: str) -> None:
    if response.status_code < 400:
        return
    detail = response.text[:300].replace("\n", " ")
    # 429 and 5xx may pass; anything else (401, 403, 409 parameter schema, 422) will not.
    transient = response.status_code == 429 or response.status_code >= 500
    raise PrefectApiError(f"Prefect answered {response.status_code} {doing}: {detail}", permanent=not transient)
