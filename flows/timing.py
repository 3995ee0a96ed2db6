"""When a run may go, and what the flow does when it may not.

Outside every maintenance window a deployment's run re-schedules itself for the next
window start (a direct call is refused, naming that time); a window that closes
between two batches stops the run without rolling back (`WindowClosed`); a request
never runs after a newer one for the same fleet has run (`Superseded`). The windows
themselves are computed in `triggers/windows.py`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import deployment as deployment_runtime

from compose_rollout.config import Fleet
from compose_rollout.errors import RolloutError


class WindowClosed(RolloutError):
    """The maintenance window closed between two batches: stop, without rolling back."""


class Superseded(RolloutError):
    """A newer request for the fleet has already run: this older one must not undo it."""


def outside_window(fleet: Fleet, when: datetime, parameters: dict[str, Any], triggered_by: str) -> list[dict[str, Any]]:
    """Outside every maintenance window: a deployment's run re-schedules itself, with the
    same `parameters`, for the next window start; a direct call (CLI, Python) is refused
    with that time."""
    deployment = deployment_runtime.get_id()
    if deployment is None:
        raise RolloutError(
            f"fleet {fleet.name} is outside its maintenance windows; the next one starts "
            f"{when:%Y-%m-%d %H:%M} UTC. Deploy then, or now with urgent (--urgent)."
        )
    scheduled = run_deployment(
        name=deployment,
        parameters={**parameters, "triggered_by": f"{triggered_by} (re-scheduled to a window)"},
        scheduled_time=when,
        timeout=0,
        as_subflow=False,
    )
    run_id = getattr(scheduled, "id", "?")  # a sync call returns the FlowRun (typed as maybe-coroutine)
    get_run_logger().info("outside the maintenance windows: scheduled run %s for %s", run_id, when)
    return []
