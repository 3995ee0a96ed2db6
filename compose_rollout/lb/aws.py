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

Adding and moving servers (`AddsServers`, the surge strategy): a target is named by where
it sends, TARGET:PORT, so a server added beside `i-0abc:8080` at port 8081 is the target
`i-0abc:8081`, and a server moved to another port becomes the target there: each call
returns the name, which the run must record. An added target starts drained, that is not
registered: AWS lists only registered and draining targets, so the adapter remembers the
targets it added or moved to for the run and lists them as drained
(`Target.NotRegistered`) until `set_state(..., "ready")` registers them. A new process does not know an added target
that is still unregistered; the run's journal records its name. Moving or removing a
target that is registered, or still draining, is refused: it would take it out of traffic
(or cut requests in flight) behind the run's back.

Tested here only against moto in server mode, with no traffic and no health checks (moto
reports a registered target `healthy` at once, and keeps one target per id, not per id
and port as AWS does), never against a real ALB or NLB.

Every call goes through one boto3 client with connect and read timeouts of
`timeout_seconds` and botocore's standard retry mode (`max_attempts` attempts per call,
throttling included). Credentials come only from boto3's standard chain (environment,
shared files, SSO, the instance or task role).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
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

        # Targets added or moved to that AWS may not list (not registered), for the run.
        self._added: set[str] = set()
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Adds, moves and removes targets (the surge strategy)."""
        return frozenset({"add_server", "remove_server", "move_server"})

    @property
    def backend(self) -> str:
        return f"target group {self.settings.target_group_arn}"

    def servers(self) -> dict[str, AwsTarget]:
        """Every registered target (and those draining), by TARGET:PORT, and the targets
        this adapter added or moved to that are not registered (drained)."""
        found = self._call("DescribeTargetHealth")["TargetHealthDescriptions"]
        views = {view.name: view for view in map(_view, found)}
        with self._lock:
            unlisted = sorted(self._added - views.keys())
        if unlisted:
            views.update(self._health(unlisted))
        return views

    def server(self, name: str) -> AwsTarget:
        """The target `name`, registered or not: a deregistered target is `unused`
        (`Target.NotRegistered`), still this instance's server."""
        return self._health([name])[name]

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

    def server_address(self, server: str) -> tuple[str, int]:
        """(TARGET, PORT) read from the name, whether or not the target is registered."""
        return self._target(server)

    def add_server(self, name: str, beside: str, port: int) -> str:
        """The target at `beside`'s TARGET and `port` (`name` is not used: a target is
        named by where it sends), drained: not registered until `set_state(..., "ready")`,
        and listed by `servers()` meanwhile. Adding it again changes nothing."""
        target_id, beside_port = self._target(beside)
        if port == beside_port:
            raise LoadBalancerError(f"{self.where}: cannot add a target beside {beside} at its own port {port}")
        added = _name(target_id, port)
        self._target(added)  # the port is one AWS accepts
        with self._lock:
            self._added.add(added)
        return added

    def move_server(self, server: str, port: int) -> str:
        """The target at `server`'s TARGET and `port`, which is `server`'s name from now on.
        `server` must be drained and out of the group (not registered, its draining over);
        the target it moves to stays as AWS has it: registered (the surge's added one), or
        not (then drained, listed by `servers()`, until `set_state(..., "ready")`)."""
        target_id, _ = self._target(server)
        moved = _name(target_id, port)
        if moved == server:
            return server
        views = self._health([server, moved])
        self._refuse_registered(server, views[server], "move")
        if views[server].state in DRAINING:
            raise LoadBalancerError(
                f"{self.where}: will not move target {server}: it is still draining, requests may be in flight "
                f"({views[server].describe()}); wait for its sessions first"
            )
        with self._lock:
            self._added.discard(server)
            if not views[moved].registered:
                self._added.add(moved)
        return moved

    def remove_server(self, name: str) -> None:
        """Forget `name` (AWS needs no call: a target out of the group is only an id and a
        port). Refused while it is registered; a target still draining is let go, AWS ends
        its deregistration by itself (waiting for its requests is the caller's, through
        `sessions`). Nothing to do for a target that is neither registered nor known."""
        self._refuse_registered(name, self.server(name), "remove")
        with self._lock:
            self._added.discard(name)

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

    def _refuse_registered(self, server: str, view: AwsTarget, verb: str) -> None:
        if view.registered:
            raise LoadBalancerError(
                f"{self.where}: will not {verb} target {server}: it is registered and takes new requests "
                f"({view.describe()}); drain it first"
            )

    def _health(self, names: Iterable[str]) -> dict[str, AwsTarget]:
        """AWS's view of each of `names`, registered or not, from one `DescribeTargetHealth`.
        AWS answers for exactly the targets asked; an answer for another one (moto keeps
        one target per id, so asked for `i-0abc:8081` it answers for `i-0abc:8080`) is
        refused rather than taken for the target asked about."""
        asked = {self._target(name): name for name in dict.fromkeys(names)}
        targets = [{"Id": target_id, "Port": port} for target_id, port in asked]
        found = self._call("DescribeTargetHealth", ", ".join(asked.values()), Targets=targets)
        views: dict[str, AwsTarget] = {}
        described = []
        for description in found["TargetHealthDescriptions"]:
            target = description.get("Target", {})
            key = (str(target.get("Id", "")), int(target.get("Port", 0) or 0))
            described.append(_name(*key))
            if key in asked:
                views[asked[key]] = _view(description, asked[key])
        if len(views) != len(asked) or len(described) != len(asked):
            raise LoadBalancerError(
                f"{self.where}: asked about target{'s' if len(asked) > 1 else ''} {', '.join(asked.values())}, "
                f"AWS described {', '.join(described) or 'none'}"
            )
        return views

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
