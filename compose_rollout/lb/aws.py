"""AWS Application and Network Load Balancers: the instances are targets of one target
group, driven through the elbv2 API with boto3.

Drain is `DeregisterTargets`: AWS sends the target no new requests and keeps it
`draining` for the group's deregistration delay (`deregistration_delay.timeout_seconds`,
300 s unless changed) while those in flight finish. Ready is `RegisterTargets`: the
target starts `initial` and must pass the group's health check its healthy-threshold
count of times; `set_state` waits, bounded, until AWS reports it `healthy`.

What AWS cannot tell: the requests in flight to one target (CloudWatch has per-minute
sums per group, nothing per target). `sessions` is 1 while AWS holds the target
`draining` and 0 once it has left, so the procedure's wait for sessions is a wait for
AWS's own drain. AWS may show `draining` until the whole delay has passed even when
nothing is in flight: `rollout.drain_timeout_seconds` must be longer than the group's
deregistration delay.

Every call goes through one boto3 client with connect and read timeouts of
`timeout_seconds` and botocore's standard retry mode (`max_attempts` attempts per call,
throttling included). Credentials come only from boto3's standard chain (environment,
shared files, SSO, the instance or task role).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from compose_rollout.errors import LoadBalancerError
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.settings import AwsSettings, aws_target

NOT_REGISTERED = "Target.NotRegistered"
# `unhealthy.draining`: an NLB target failing its checks while its connections drain.
DRAINING = frozenset({"draining", "unhealthy.draining"})


@dataclass(frozen=True)
class AwsTarget:
    """One target as AWS's `DescribeTargetHealth` reports it."""

    name: str  # TARGET:PORT, as the instance's lb_server
    state: str  # initial, healthy, unhealthy, unhealthy.draining, unused, draining, unavailable
    reason: str = ""
    description: str = ""

    @property
    def registered(self) -> bool:
        """In the group: not `Target.NotRegistered`, and not `draining` (deregistration in progress)."""
        return self.reason != NOT_REGISTERED and self.state != "draining"

    @property
    def up(self) -> bool | None:
        """AWS's health check passes (`healthy`); False while it fails or has not passed yet
        (`initial`, `unhealthy`, a stopped instance); None when AWS checks nothing: the target
        is not registered (or is draining), or its group has health checks off (`unavailable`)."""
        if not self.registered or self.state == "unavailable":
            return None
        return self.state == "healthy"

    @property
    def drained(self) -> bool:
        """Deregistered: AWS sends it no new requests."""
        return not self.registered

    @property
    def in_rotation(self) -> bool:
        return self.registered and self.state == "healthy"

    @property
    def sessions(self) -> int:
        """AWS cannot count the requests in flight to one target: 1 while AWS holds it
        draining (it does so while requests finish), 0 once it has left."""
        return 1 if self.state in DRAINING else 0

    def describe(self) -> str:
        why = ": ".join(part for part in (self.reason, self.description) if part)
        text = f"AWS target health {self.state}" + (f" ({why})" if why else "")
        if self.state in DRAINING:
            text += ", held until requests finish or the group's deregistration delay ends"
        return text


def _name(target_id: str, port: object) -> str:
    return f"[{target_id}]:{port}" if ":" in target_id else f"{target_id}:{port}"


def _view(description: dict[str, Any], name: str | None = None) -> AwsTarget:
    target, health = description.get("Target", {}), description.get("TargetHealth", {})
    return AwsTarget(
        name=name or _name(str(target.get("Id", "")), target.get("Port", "")),
        state=str(health.get("State", "")),
        reason=str(health.get("Reason", "")),
        description=str(health.get("Description", "")),
    )


class AwsTargetGroup:
    """The target group `settings.target_group_arn`; an instance's server is its target
    `TARGET:PORT` (an EC2 instance id or an IP, and the port it is registered on)."""

    def __init__(
        self,
        settings: AwsSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.where = f"aws target group {settings.target_group_arn}"
        self._monotonic = monotonic
        self._sleep = sleep
        config = Config(
            connect_timeout=settings.timeout_seconds,
            read_timeout=settings.timeout_seconds,
            # `total_max_attempts` counts the first attempt; botocore's `max_attempts` key
            # in this dict counts retries only (one attempt more than the setting says).
            retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        )
        # A session of its own: boto3's default session is shared module state. Creating
        # the client reads the local configuration only; nothing is sent before a call.
        self._client = boto3.session.Session().client(
            "elbv2", region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
        )

    @property
    def capabilities(self) -> frozenset[Capability]:
        """None yet (registering a target at a new address is possible: the surge strategy)."""
        return frozenset()

    @property
    def backend(self) -> str:
        return f"target group {self.settings.target_group_arn}"

    def servers(self) -> dict[str, AwsTarget]:
        """Every registered target (and those draining), by TARGET:PORT."""
        found = self._call("DescribeTargetHealth")["TargetHealthDescriptions"]
        return {view.name: view for view in map(_view, found)}

    def server(self, name: str) -> AwsTarget:
        """The target `name`, registered or not: a deregistered target is `unused`
        (`Target.NotRegistered`), still this instance's server."""
        target_id, port = self._target(name)
        found = self._call("DescribeTargetHealth", name, Targets=[{"Id": target_id, "Port": port}])
        descriptions = found["TargetHealthDescriptions"]
        if len(descriptions) != 1:
            raise LoadBalancerError(f"{self.where}: AWS described {len(descriptions)} targets for {name}, not one")
        return _view(descriptions[0], name)

    def set_state(self, server: str, state: ServerAction) -> None:
        """`drain`: deregister the target (unless it already is); `ready`: register it and
        wait until AWS's health check reports it `healthy`, or raise LoadBalancerError with
        what AWS last reported once `healthy_timeout_seconds` have passed."""
        target_id, port = self._target(server)
        targets = [{"Id": target_id, "Port": port}]
        if state == "drain":
            if self.server(server).registered:
                self._call("DeregisterTargets", server, Targets=targets)
            return
        self._call("RegisterTargets", server, Targets=targets)
        self._await_healthy(server)

    def shutdown_sessions(self, server: str) -> None:
        """AWS cannot cut one target's requests before its deregistration delay ends (only
        an NLB can, and only at the end of the delay); stopping the container does."""

    def recheck(self, server: str) -> bool:
        """True when the target is out of the group, as after a drain: AWS keeps no health
        state for a deregistered target, and `set_state("ready")` registers it again, where
        it starts `initial`, and waits for `healthy` from checks AWS makes after that (`up`
        is None meanwhile, so the wait for the LB does not wait on it). False when the
        target is still registered: AWS's earlier checks carry over, and only deregistering
        it would reset them, which would take it out of traffic."""
        return not self.server(server).registered

    def _await_healthy(self, server: str) -> None:
        limit = self.settings.healthy_timeout_seconds
        deadline = self._monotonic() + limit
        while True:
            seen = self.server(server)
            if seen.in_rotation:
                return
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                raise LoadBalancerError(
                    f"{self.where}: target {server} was not healthy {limit:g} s after RegisterTargets; "
                    f"AWS last reported {seen.describe()}"
                )
            self._sleep(min(self.settings.poll_interval_seconds, remaining))

    def _target(self, name: str) -> tuple[str, int]:
        try:
            return aws_target(name)
        except ValueError as error:
            raise LoadBalancerError(f"{self.where}: {error}") from None

    def _call(self, operation: str, target: str = "", **params: Any) -> dict[str, Any]:
        """One elbv2 call on the group (retried by botocore up to `max_attempts` times)."""
        what = f"{operation} for target {target}" if target else operation
        try:
            answer: dict[str, Any] = getattr(self._client, xform_name(operation))(
                TargetGroupArn=self.settings.target_group_arn, **params
            )
        except ClientError as error:
            detail = error.response.get("Error", {})
            code, message = detail.get("Code", "unknown error"), detail.get("Message", "")
            if code == "TargetGroupNotFound":
                raise LoadBalancerError(
                    f"aws: target group {self.settings.target_group_arn} not found in region "
                    f"{self.settings.region} ({operation}: {code}: {message}); check load_balancer.target_group_arn, "
                    "load_balancer.region, and that the credentials are for the group's account"
                ) from None
            attempts = int(error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) + 1
            raise LoadBalancerError(
                f"{self.where}: {what} failed after {attempts} attempt{'s' if attempts > 1 else ''}: {code}: {message}"
            ) from None
        except BotoCoreError as error:
            raise LoadBalancerError(
                f"{self.where}: {what} failed (up to {self.settings.max_attempts} attempts): "
                f"{type(error).__name__}: {error}"
            ) from None
        return answer
