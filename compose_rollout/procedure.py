"""The domain: what it means to move one instance from one image to another.

Each public function is one verb of the seed procedure (drain, wait for sessions,
set image, ensure image, up, await healthy, await LB up, enable) acting through the
context's executors (`context.py`); Prefect tasks wrap them one to one. What the verbs
read of an instance (its container, ports, image) is in `inspection.py`. Every wait has
a deadline and the clock is injectable, so unit tests run instantly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from compose_rollout.config import Fleet, Instance
from compose_rollout.context import Context
from compose_rollout.errors import (
    ConfigError,
    HostKeyError,
    LoadBalancerError,
    PreflightError,
    RemoteError,
    RolloutError,
    WaitTimeout,
)
from compose_rollout.hosts import commands, env_file
from compose_rollout.hosts.compose_file import set_image
from compose_rollout.inspection import (
    ContainerState,
    Snapshot,
    compose_version,
    container_state,
    inspect,
    local_image_id,
    port_of,
    service_ports,
    snapshot,
)
from compose_rollout.lb.base import AddsServers, CountsResponses, ServerView, Weighs, require
from compose_rollout.ports import range_holding
from compose_rollout.state.journal import InstanceRecord, Ledger

# --- preflight -------------------------------------------------------------------------


def preflight_instance(ctx: Context, instance: Instance) -> Snapshot:
    """Host reachable (verified key), Compose present, service deployed and running."""
    compose_version(ctx, instance)
    found = snapshot(ctx, instance)
    if found.container.status != "running":
        raise PreflightError(f"{instance.name}: {found.container.describe()}, not running")
    followed = service_ports(ctx, instance, found)
    return found if followed is None else replace(found, ports=followed[0], port=followed[1])


def server_of(instance: Instance, ledger: Ledger) -> str:
    """The instance's LB server now: as the run recorded it (found at its start, renamed
    by a move), else as the fleet says."""
    record = ledger.records.get(instance.name)
    return (record.lb_server if record is not None else "") or instance.lb_server


def find_servers(ctx: Context) -> Fleet:
    """The fleet with each instance's LB server as the LB names it now.

    An LB that names servers by HOST:PORT (nginx, Caddy, Traefik, AWS) renamed the
    instance's server when its container moved to another port of a published range
    (every surge does), while the fleet file names the port it was on at first: the
    instance's server is then the one at its address on the port its container has now.
    """
    lb = ctx.lb
    if not isinstance(lb, AddsServers):
        return ctx.fleet
    names = set(lb.servers())
    found: dict[str, str] = {}
    for instance in ctx.fleet.instances:
        if instance.lb_server in names:
            continue
        try:
            address, port = lb.server_address(instance.lb_server)
        except LoadBalancerError:
            continue  # an LB that names servers itself: preflight says it has no such server
        container = container_state(ctx, instance)
        held = range_holding(inspect(ctx, instance, container.id), port) if container is not None else None
        if held is None:
            continue
        there = [name for name in names if lb.server_address(name) == (address, held[1])]
        if len(there) == 1:
            found[instance.name] = there[0]
    if not found:
        return ctx.fleet
    instances = [
        instance.model_copy(update={"lb_server": found[instance.name]}) if instance.name in found else instance
        for instance in ctx.fleet.instances
    ]
    return ctx.fleet.model_copy(update={"instances": instances})


def preflight_lb(ctx: Context) -> Mapping[str, ServerView]:
    """Every instance's server exists in the LB and is UP and in rotation; the LB can
    do what the fleet's policy needs of it."""
    if ctx.fleet.health.watch_seconds > 0:
        require(ctx.lb, ["response_counters"], "health.watch_seconds (the 5xx gate)")
    if ctx.fleet.rollout.canary_weight is not None:
        require(ctx.lb, ["weights", "response_counters"], "rollout.canary_weight (the weighted canary)")
    servers = ctx.lb.servers()
    problems = []
    for instance in ctx.fleet.instances:
        server = servers.get(instance.lb_server)
        if server is None:
            problems.append(f"{instance.name}: {ctx.lb.backend} has no server {instance.lb_server!r}")
        elif not server.in_rotation:
            problems.append(f"{instance.name}: LB server {instance.lb_server} is {server.describe()}, not in rotation")
    if problems:
        raise PreflightError("; ".join(problems))
    return servers


# --- the per-instance verbs ------------------------------------------------------------


def pull_image(ctx: Context, instance: Instance, image: str) -> str:
    """Make sure the host has `image`; return its local image ID."""
    existing = local_image_id(ctx, instance, image)
    if existing:
        return existing
    timeout = ctx.fleet.compose.pull_timeout_seconds
    ctx.run(instance, commands.with_timeout(commands.image_pull(image), timeout), timeout=timeout + 15)
    pulled = local_image_id(ctx, instance, image)
    if not pulled:
        raise RemoteError(f"{instance.name}: `docker pull {image}` succeeded but the image is not there")
    return pulled


def drain(ctx: Context, instance: Instance, ledger: Ledger) -> int:
    """Stop new connections to the instance; return the sessions it still had.

    The ledger records the drain before it is asked of the LB (write-ahead), so an
    interruption between the two still leaves it known and re-enabled by `release_all`.
    """
    record = ledger[instance.name]
    ledger.update(instance.name, drained=True, drained_at=record.drained_at or time.time())
    server = server_of(instance, ledger)
    ctx.lb.set_state(server, "drain")
    sessions = ctx.lb.server(server).sessions
    ledger.update(instance.name, sessions_at_drain=sessions)
    return sessions


def wait_for_sessions(ctx: Context, instance: Instance, ledger: Ledger, server_name: str = "") -> int:
    """Wait until the LB counts no active session on the instance's server (or
    `server_name`); return sessions cut."""
    policy = ctx.fleet.rollout
    name = server_name or server_of(instance, ledger)
    deadline, limit = ctx.wait_until(policy.drain_timeout_seconds)
    while True:
        server = ctx.lb.server(name)
        if server.sessions == 0:
            return 0
        if ctx.clock.monotonic() >= deadline:
            # A rollback cut short by an interruption never cuts requests: it stops instead.
            if policy.on_drain_timeout == "proceed" and limit >= policy.drain_timeout_seconds:
                ctx.lb.shutdown_sessions(name)
                ledger.update(instance.name, sessions_cut=ledger[instance.name].sessions_cut + server.sessions)
                return server.sessions
            why = (
                "rollout.on_drain_timeout: fail" if limit >= policy.drain_timeout_seconds else "the run was interrupted"
            )
            raise WaitTimeout(f"{name} to finish its sessions ({why})", limit, server.describe())
        ctx.pause(0.1)


def edit(record: InstanceRecord, service: str, image: str, where: str) -> bytes:
    """The edited file's bytes with `image` for the service: the compose file's image
    value, or the `.env` line of the variable its tag comes from."""
    if not record.image_variable:
        return set_image(record.original, service, image, where)
    if not image.startswith(record.image_prefix):
        raise ConfigError(
            f"{where}: the image's repository is written in the compose file ({record.image_prefix}${{"
            f"{record.image_variable}}}): {image} would need another; change it there by hand"
        )
    return env_file.set_value(record.original, record.image_variable, image[len(record.image_prefix) :], where)


def write_compose(ctx: Context, instance: Instance, ledger: Ledger, image: str) -> None:
    """Write the compose file (or `.env`) with `image` for the service (atomically, original kept in the ledger)."""
    record = ledger[instance.name]
    where = f"{instance.name}:{record.compose_path}"
    if image == record.old_image:
        return
    content = edit(record, ctx.fleet.service, image, where)
    # Write-ahead: recorded before the write, so an interrupted write is still checked by
    # the rollback (which compares the bytes and rewrites only if they differ).
    ledger.update(instance.name, file_written=True)
    ctx.hosts[instance.name].write_file_atomic(record.compose_path, content, record.mode)


def restore_compose(ctx: Context, instance: Instance, record: InstanceRecord) -> None:
    """Put back the file the run edited (compose file or `.env`) exactly as it was, byte for byte."""
    host = ctx.hosts[instance.name]
    if host.read_file(record.compose_path) != record.original:
        host.write_file_atomic(record.compose_path, record.original, record.mode)


def up(ctx: Context, instance: Instance, ledger: Ledger) -> bool:
    """`up -d --no-deps SERVICE`: recreate the container from the compose file.

    Then the LB forgets what its check saw before (`LoadBalancer.recheck`), so the later
    "LB sees it UP" is about the new container. Returns False when the LB has no health
    check for the instance's server.
    """
    timeout = ctx.fleet.compose.up_timeout_seconds
    argv = commands.compose_up(instance, compose_version(ctx, instance), ctx.fleet.service)
    ledger.update(instance.name, restarted=True, up_at=time.time())
    ctx.run(instance, commands.with_timeout(argv, timeout), timeout=timeout + 15)
    follow_port(ctx, instance, ledger)
    return ctx.lb.recheck(server_of(instance, ledger))


def follow_port(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """After `up`: the recreated container may have got another port of a published range;
    the instance's LB server (drained) is moved to it, and the health gate probes it."""
    record = ledger[instance.name]
    if not record.container_port:
        return
    container = container_state(ctx, instance)
    if container is None:
        return  # the health gate says "no container"
    port = port_of(ctx, instance, container.id, record.container_port)
    if port != record.port:
        if not isinstance(ctx.lb, AddsServers):
            raise LoadBalancerError(f"{instance.name} now listens on port {port}, and {ctx.lb.backend} cannot follow")
        server = ctx.lb.move_server(server_of(instance, ledger), port)
        ledger.update(instance.name, port=port, lb_server=server)


def await_healthy(
    ctx: Context, instance: Instance, image_id: str, url: str = "", container_id: str | None = None
) -> float:
    """Wait for N consecutive healthy probes from a container running `image_id`, then a
    stabilisation window in which it must stay so (same container, no restart).

    `url`: where to probe (default: the fleet file's health URL); `container_id`: that
    container, not the service's only one (the surge strategy runs two).
    Returns the seconds it took. Raises WaitTimeout with the last state seen.
    """
    url = url or instance.health_url
    health = ctx.fleet.health
    started = ctx.clock.monotonic()
    deadline, limit = ctx.wait_until(health.timeout_seconds)
    passes, last = 0, "nothing yet"
    stable_since: float | None = None
    stable_container: ContainerState | None = None
    seen_id: str | None = container_id
    while True:
        tick = ctx.clock.monotonic()
        container = container_state(ctx, instance, seen_id, exact=container_id is not None)
        seen_id = container.id if container else container_id
        if container is None:
            ok, last = False, "no container"
        elif container.image_id != image_id:
            ok, last = False, f"{container.describe()}, expected image {image_id[:19]}"
        elif container.status != "running":
            ok, last = False, container.describe()
        elif stable_container and (container.id, container.restart_count) != (
            stable_container.id,
            stable_container.restart_count,
        ):
            ok, last = False, f"{container.describe()} restarted after passing"
        else:
            ok, seen = ctx.probe(url, health.request_timeout_seconds)
            last = f"{url}: {seen}; {container.describe()}"
        now = ctx.clock.monotonic()
        if not ok and stable_since is not None:
            raise RolloutError(
                f"{instance.name} passed its health check, then failed within the "
                f"{health.stabilization_seconds:g} s stabilisation window: {last}"
            )
        passes = passes + 1 if ok else 0
        if passes >= health.consecutive_successes and stable_since is None:
            stable_since, stable_container = now, container
        if stable_since is not None and now - stable_since >= health.stabilization_seconds:
            return now - started
        if now >= deadline:
            raise WaitTimeout(f"{instance.name} to become healthy", limit, last)
        # Probes are paced by period, not by a pause after each round's own work.
        ctx.pause(max(0.0, tick + health.interval_seconds - ctx.clock.monotonic()))


def await_lb_up(ctx: Context, instance: Instance, server_name: str = "") -> bool:
    """Wait until the LB's own health check reports the instance's server (or
    `server_name`) UP (it stays drained). False at once when the LB cannot tell (it has
    no health check to ask)."""
    name = server_name or instance.lb_server
    deadline, limit = ctx.wait_until(ctx.fleet.health.lb_timeout_seconds)
    while True:
        server = ctx.lb.server(name)
        if server.up is None:
            return False
        if server.up:
            return True
        if ctx.clock.monotonic() >= deadline:
            raise WaitTimeout(f"the LB to see {name} UP", limit, server.describe())
        ctx.pause(0.1)


def watch_responses(ctx: Context, instance: Instance, ledger: Ledger, seconds: float | None = None) -> tuple[int, int]:
    """The 5xx gate: watch the instance's server's responses in the LB for `seconds`
    (default `health.watch_seconds`) after it is back in rotation; RolloutError with the
    counts when more than `max_5xx_ratio` of at least `min_requests` are 5xx. (responses, 5xx)."""
    health = ctx.fleet.health
    if not isinstance(ctx.lb, CountsResponses):
        raise PreflightError(f"{ctx.lb.backend} counts no responses, which health.watch_seconds needs")
    server = server_of(instance, ledger)
    before = ctx.lb.response_counts(server)
    started = ctx.clock.monotonic()
    deadline, _ = ctx.wait_until(health.watch_seconds if seconds is None else seconds)
    while True:
        ctx.pause(max(0.0, min(0.5, deadline - ctx.clock.monotonic())))
        now = ctx.lb.response_counts(server)
        total = sum(now[kind] - before.get(kind, 0) for kind in now)
        errors = now.get("5xx", 0) - before.get("5xx", 0)
        ledger.update(instance.name, watched_responses=total, watched_5xx=errors)
        if total >= health.min_requests and errors > health.max_5xx_ratio * total:
            raise RolloutError(
                f"{instance.name} answered {errors} of {total} requests with 5xx ({errors / total:.0%}) in its first "
                f"{ctx.clock.monotonic() - started:.1f} s back in rotation, above health.max_5xx_ratio "
                f"{health.max_5xx_ratio:.0%}"
            )
        if ctx.clock.monotonic() >= deadline:
            return total, errors


def canary_weights(share: float, others: Mapping[str, int]) -> tuple[int, int]:
    """(multiplier of the other servers' weights, the canary's weight) that give the
    canary about `share` of new requests. Weights are whole numbers up to 256, so the
    others' are multiplied (by a power of two) until the canary's is at least 10."""
    total = sum(others.values())
    if total == 0:
        raise RolloutError("no other server has a weight above 0: a weighted canary would take every request")
    top = max(others.values())
    factor = 1
    while round(share * factor * total / (1 - share)) < 10 and top * factor * 2 <= 256:
        factor *= 2
    return factor, min(256, max(1, round(share * factor * total / (1 - share))))


def weigh_canary(ctx: Context, instance: Instance, ledger: Ledger) -> float:
    """Before the canary (drained) goes back in rotation: weights that give it about
    `rollout.canary_weight` of new requests, every original weight recorded first (put
    back by `restore_weights`, also by the safety net and by recovery). Its share."""
    lb = ctx.lb
    if not isinstance(lb, Weighs):
        raise PreflightError(f"{lb.backend} cannot set weights, which rollout.canary_weight needs")
    share = ctx.fleet.rollout.canary_share or 0.0
    others = {i: lb.weight(i.lb_server) for i in ctx.fleet.instances if i.name != instance.name}
    factor, weight = canary_weights(share, {i.name: w for i, w in others.items()})
    for other, original in others.items():
        if factor != 1:
            ledger.update(other.name, weight=original)
            lb.set_weight(other.lb_server, original * factor)
    ledger.update(instance.name, weight=lb.weight(instance.lb_server))
    lb.set_weight(instance.lb_server, weight)
    return weight / (weight + factor * sum(others.values()))


def restore_weights(ctx: Context, ledger: Ledger) -> list[str]:
    """Put back every weight this run changed; the failures."""
    failures = []
    for record in list(ledger.records.values()):
        if record.weight is None:
            continue
        try:
            if not isinstance(ctx.lb, Weighs):
                raise RolloutError(f"{ctx.lb.backend} cannot set weights")
            ctx.lb.set_weight(ctx.fleet.instance(record.name).lb_server, record.weight)
            ledger.update(record.name, weight=None)
        except Exception as error:  # noqa: BLE001 - one server's failure must not stop the others'
            failures.append(f"{record.name}: could not put its LB weight back to {record.weight}: {error}")
    return failures


def enable(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Put the instance back in rotation."""
    ctx.lb.set_state(server_of(instance, ledger), "ready")
    ledger.update(instance.name, drained=False, enabled_at=time.time())


def release_all(ctx: Context, ledger: Ledger) -> list[str]:
    """Safety net: put every server this run drained back in rotation; the failures.

    A server whose instance is unhealthy stays out of traffic by the LB's own checks.
    """
    failures = restore_weights(ctx, ledger)
    for record in list(ledger.records.values()):
        if record.drained:
            try:
                enable(ctx, ctx.fleet.instance(record.name), ledger)
            except Exception as error:  # noqa: BLE001 - one server's failure must not stop the others'
                # An OSError here is the journal's disk (the LB action came first).
                failures.append(f"{record.name}: could not re-enable in the LB: {error}")
    return failures


def is_permanent(error: BaseException) -> bool:
    """Errors a retry cannot fix: bad input, an unknown host key, a failed precondition."""
    return isinstance(error, (ConfigError, HostKeyError, PreflightError))
