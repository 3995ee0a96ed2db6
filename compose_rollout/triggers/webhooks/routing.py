"""Which fleet a push is for and what run it would start (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from compose_rollout.images import validate_digest, validate_repository, validate_tag
from compose_rollout.triggers.tag_policy import rejection_reason
from compose_rollout.triggers.webhooks.payloads import Push
from compose_rollout.triggers.webhooks.settings import WebhookRoute, repository_key


@dataclass(frozen=True)
class PlannedRun:
    """An accepted push for one fleet: what would be started for it."""

    route: WebhookRoute
    push: Push
    received_at: float = 0.0  # the receiver's clock, for the webhook-to-run latency
    # When the push was asked for: the source's push time, or when it was received (aware, UTC).
    requested_at: datetime | None = None
    delivery: str | None = None  # the source's delivery id (GitHub's X-GitHub-Delivery), if any

    @property
    def fleet(self) -> str:
        """The fleet this run deploys."""
        return self.route.fleet

    @property
    def idempotency_key(self) -> str:
        """Same fleet, tag and digest (or Docker Hub push time) → same key → one run."""
        identity = self.push.digest or f"pushed-at-{self.push.pushed_at}"
        return f"compose-rollout/{self.route.fleet}/{self.push.tag}/{identity}"

    @property
    def parameters(self) -> dict[str, str]:
        """The flow run's parameters (`rolling_deploy(fleet_file, tag, triggered_by=..., requested_at=...)`).

        `requested_at` lets the flow's newest-request rule order this push against runs
        asked for by other means (an urgent deploy made while this one waits for a window).
        """
        parameters = {
            "fleet_file": self.route.fleet_file,
            "tag": self.push.tag,
            "triggered_by": f"webhook:{self.push.source} push of {self.push}",
        }
        if self.requested_at is not None:
            parameters["requested_at"] = self.requested_at.astimezone(UTC).isoformat()
        return parameters


@dataclass(frozen=True)
class Ignored:
    """A push that starts nothing, and why."""

    repository: str
    tag: str
    reason: str


def validate_push(push: Push) -> None:
    """Raise ConfigError if the push's repository, tag or digest is malformed."""
    validate_repository(push.repository)
    validate_tag(push.tag)
    if push.digest is not None:
        validate_digest(push.digest)


def requested_time(push: Push, received: datetime) -> datetime:
    """When `push` was asked for: the source's own push time if it gives one that is not
    after `received` (a registry clock running ahead must not make a push look newer than
    it is), else `received`."""
    received = received.astimezone(UTC)
    if push.pushed_time is not None and push.pushed_time <= received:
        return push.pushed_time.astimezone(UTC)
    return received


def plan_runs(
    pushes: Sequence[Push],
    routes: Sequence[WebhookRoute],
    received_at: float = 0.0,
    received_wall: datetime | None = None,
    delivery: str | None = None,
) -> tuple[list[PlannedRun], list[Ignored]]:
    """Which pushes start runs for which fleets; the rest with the reason they start nothing.

    `received_wall` (aware) is when the request came, for the runs' `requested_at`;
    `delivery` the source's delivery id. Call `validate_push` on every push first: this
    assumes well-formed values.
    """
    planned: list[PlannedRun] = []
    ignored: list[Ignored] = []
    for push in pushes:
        key = repository_key(push.repository)
        matching = [route for route in routes if repository_key(route.repository) == key]
        if not matching:
            ignored.append(Ignored(push.repository, push.tag, "no route for this repository"))
        for route in matching:
            reason = rejection_reason(push.tag, route.tags)
            if reason is None:
                requested = None if received_wall is None else requested_time(push, received_wall)
                planned.append(PlannedRun(route, push, received_at, requested, delivery))
            else:
                ignored.append(Ignored(push.repository, push.tag, f"fleet {route.fleet}: tag {push.tag} {reason}"))
    return planned, ignored
