"""The surge strategy: the new container starts beside the old one, so no capacity is lost.

Per instance (each verb a step of the flow, recorded write-ahead in the ledger):

    set image → start second (`up --no-recreate --scale SERVICE=2`) → await healthy on the
    port Docker gave it → add its server to the LB (`<lb_server>-surge`) → await LB up →
    ready → drain the instance's own server → wait for its sessions → move it to the new
    port → await LB up → ready → remove the old container → retire the surge server

The instance's own server ends pointing at the container that runs. In HAProxy it keeps
its name (the fleet file's `lb_server`). An LB that names servers by HOST:PORT (nginx,
Caddy, Traefik, AWS) adds the surge's server as NEW_HOST:PORT, and moving the own server
onto it removes the drained own one: the surge's server is the instance's server from
then on, and the run records its name (`InstanceRecord.lb_server`; the next run finds it
by the port the container has, `procedure.find_servers`). At every moment one of the two
servers takes requests.

The service publishes a host port range (`"8080-8081:8080"`): the second container needs
a port of its own, and Docker picks either port of the range, so every run follows the
port each container got (`docker port`).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from compose_rollout.config import Instance
from compose_rollout.context import Context
from compose_rollout.errors import LoadBalancerError, PreflightError, RemoteError
from compose_rollout.hosts import commands
from compose_rollout.hosts.compose_file import services_of
from compose_rollout.inspection import Snapshot, compose_version, port_of
from compose_rollout.lb.base import SURGE_NEEDS, AddsServers, require
from compose_rollout.ports import Ports
from compose_rollout.procedure import server_of, wait_for_sessions
from compose_rollout.state.journal import Ledger

SUFFIX = "-surge"
_MEMORY = re.compile(r"([0-9.]+)\s*([KMGT]?i?B)")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def surge_server(instance: Instance) -> str:
    """The name of the server added for the instance's second container."""
    return f"{instance.lb_server}{SUFFIX}"


def adds_servers(ctx: Context) -> AddsServers:
    """The LB as one that adds servers; PreflightError if it cannot."""
    require(ctx.lb, SURGE_NEEDS, "rollout.strategy: surge")
    if not isinstance(ctx.lb, AddsServers):  # an adapter declaring capabilities it does not implement
        raise PreflightError(f"{ctx.lb.backend} declares it adds servers but does not implement it")
    return ctx.lb


# --- preflight ------------------------------------------------------------------------


def _memory_bytes(text: str) -> int | None:
    match = _MEMORY.search(text)
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS.get(match.group(2).upper(), 1))


def preflight(ctx: Context, instance: Instance, found: Snapshot, also_on_host: int = 1) -> Ports:
    """Refuse surge, naming the exact problem, when the service cannot run twice on the
    host; the ports to follow. `also_on_host`: second containers the batch starts on
    this instance's host at once (for the memory check)."""
    lb = adds_servers(ctx)
    name, service = instance.name, ctx.fleet.service
    definition = services_of(found.compose.decode(), f"{name}:{instance.compose_path}").get(service) or {}
    if "container_name" in definition:
        raise PreflightError(
            f"{name}: service {service} sets container_name {definition['container_name']!r}, so a second "
            "container cannot exist beside it; remove container_name to use rollout.strategy: surge"
        )
    if str(definition.get("network_mode", "")) == "host":
        raise PreflightError(
            f"{name}: service {service} uses network_mode: host, so a second container would bind the same "
            "ports; surge needs published ports (a host port range)"
        )
    replicas = (definition.get("deploy") or {}).get("replicas", 1)
    if replicas != 1 or definition.get("scale", 1) != 1:
        raise PreflightError(
            f"{name}: service {service} asks for {replicas} replicas; compose-rollout updates one container "
            "per instance"
        )
    server = instance.lb_server
    address, lb_port = lb.server_address(server)
    ports = found.ports
    if ports is None:
        raise PreflightError(
            f"{name}: LB server {server} sends to {address}:{lb_port}, which is no host port the container of "
            f"{service} publishes; surge cannot tell which port a second container serves on"
        )
    if ports.low == ports.high:
        raise PreflightError(
            f"{name}: service {service} publishes {ports.container_port} on the fixed host port {ports.low}, which "
            f'a second container cannot bind: publish a range such as "{ports.low}-{ports.low + 1}:'
            f'{ports.container_port.split("/")[0]}" (README, surge)'
        )
    others = set(ctx.lb.servers()) - {i.lb_server for i in ctx.fleet.instances}
    for other in sorted(others):
        there, port = lb.server_address(other)
        if there == address and ports.low <= port <= ports.high:
            raise PreflightError(
                f"{name}: {ctx.lb.backend} already has a server {other!r} at {address}:{port}, a port of the range "
                f"(left by an interrupted surge?): run `rollout recover`, or remove it"
            )
    health_port = urlsplit(instance.health_url).port
    if health_port is None or not ports.low <= health_port <= ports.high:
        raise PreflightError(
            f"{name}: health_url {instance.health_url} is not on the published range {ports.low}-{ports.high}, "
            "so the health gate could not probe the second container"
        )
    _check_memory(ctx, instance, found, also_on_host)
    return ports


def _check_memory(ctx: Context, instance: Instance, found: Snapshot, count: int) -> None:
    """The host has free memory for `count` more containers the size of the running one."""
    usage = ctx.run(
        instance, ["docker", "container", "stats", "--no-stream", "--format", "{{.MemUsage}}", found.container.id]
    )
    used = _memory_bytes(usage.split("/")[0])
    meminfo = ctx.run(instance, ["cat", "/proc/meminfo"])
    available = next(
        (int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None
    )
    if used is None or available is None:
        raise PreflightError(f"{instance.name}: could not read the memory the container uses ({usage.strip()!r})")
    if available < used * count:
        raise PreflightError(
            f"{instance.name}: the host has {available / 2**20:.0f} MiB available, and {count} more container(s) "
            f"of {ctx.fleet.service} need {used * count / 2**20:.0f} MiB (the running one uses {used / 2**20:.0f} MiB)"
        )


# --- the per-instance verbs -----------------------------------------------------------


def start_second(ctx: Context, instance: Instance, ledger: Ledger) -> str:
    """Start a second container of the service from the compose file (the new image),
    leaving the old one running; its ID."""
    record = ledger[instance.name]
    timeout = ctx.fleet.compose.up_timeout_seconds
    argv = commands.compose_scale_up(instance, compose_version(ctx, instance), ctx.fleet.service)
    ledger.update(instance.name, surge_started=True)
    ctx.run(instance, commands.with_timeout(argv, timeout), timeout=timeout + 15)
    ids = ctx.run(instance, commands.service_containers(instance, ctx.fleet.service)).split()
    new = [found for found in ids if found != record.old_container]
    if len(new) != 1:
        raise RemoteError(
            f"{instance.name}: expected one new container of {ctx.fleet.service} beside "
            f"{record.old_container[:12]}, found {len(new)}"
        )
    ledger.update(instance.name, surge_container=new[0])
    return new[0]


def second_port(ctx: Context, instance: Instance, ledger: Ledger) -> int:
    """The host port the second container got; recorded."""
    record = ledger[instance.name]
    port = port_of(ctx, instance, record.surge_container, record.container_port)
    ledger.update(instance.name, surge_port=port)
    return port


def register(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Add the second container's server to the LB (drained until it is UP)."""
    record = ledger[instance.name]
    ledger.update(instance.name, surge_server=surge_server(instance))  # the name asked for; see surge_servers
    name = adds_servers(ctx).add_server(surge_server(instance), server_of(instance, ledger), record.surge_port)
    ledger.update(instance.name, surge_server=name)


def surge_servers(ctx: Context, instance: Instance, ledger: Ledger) -> list[str]:
    """The LB servers of the second container: the one recorded, and any other than the
    instance's own at its port (an LB naming servers by address named it so, and an
    interruption may have come before the run recorded that name)."""
    record = ledger[instance.name]
    lb = adds_servers(ctx)
    own = server_of(instance, ledger)
    address, _ = lb.server_address(own)
    servers = set(ctx.lb.servers()) - {own}
    if record.surge_server in servers or not record.surge_port:
        return [record.surge_server] if record.surge_server in servers else []
    found = []
    for name in sorted(servers):
        try:
            if lb.server_address(name) == (address, record.surge_port):
                found.append(name)
        except LoadBalancerError:
            continue  # removed meanwhile (by another instance of the batch)
    return found


def settle_names(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Before a rollback: if a move onto the surge's server (an LB naming servers by
    address) happened but was not recorded (the run was interrupted), record it."""
    record = ledger[instance.name]
    if not record.moved or not record.surge_server:
        return
    servers = ctx.lb.servers()
    if server_of(instance, ledger) not in servers and record.surge_server in servers:
        ledger.update(instance.name, lb_server=record.surge_server, surge_server="", port=record.surge_port)


def retire_old(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Stop and remove the old container (drained, its sessions done)."""
    record = ledger[instance.name]
    ledger.update(instance.name, old_removed=True)
    remove_container(ctx, instance, record.old_container)


def remove_container(ctx: Context, instance: Instance, container_id: str) -> None:
    """`docker stop` then `docker rm` one container; nothing if it is gone."""
    if not container_id:
        return
    timeout = ctx.fleet.compose.up_timeout_seconds
    host = ctx.hosts[instance.name]
    if not host.run(commands.inspect_container(container_id), timeout=30, check=False).ok:
        return
    ctx.run(instance, commands.with_timeout(commands.stop_container(container_id), timeout), timeout=timeout + 15)
    ctx.run(instance, commands.remove_container(container_id))


def move(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Point the instance's own server (drained, no sessions) at the new container.

    No re-check: the LB's own check of the surge server, at this same address and port,
    already saw the new container UP; the server keeps its UP state and is checked at the
    new port from now on (the old container still runs, so no check ever fails on the way).
    Where servers are named by address, the move lands on the surge's server, in rotation
    already: it is the instance's server from now on, and there is no surge server left."""
    record = ledger[instance.name]
    ledger.update(instance.name, moved=True)
    server = adds_servers(ctx).move_server(server_of(instance, ledger), record.surge_port)
    if server == record.surge_server:
        ledger.update(instance.name, lb_server=server, surge_server="", port=record.surge_port)
        ledger.update(instance.name, drained=not ctx.lb.server(server).in_rotation)
    else:
        ledger.update(instance.name, lb_server=server, port=record.surge_port)


def move_back(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Rollback: point the instance's own server (drained) at the old container again (still running)."""
    record = ledger[instance.name]
    port = port_of(ctx, instance, record.old_container, record.container_port)
    server = adds_servers(ctx).move_server(server_of(instance, ledger), port)
    ledger.update(instance.name, port=port, moved=False, lb_server=server)


def unregister(ctx: Context, instance: Instance, ledger: Ledger) -> list[str]:
    """Drain the surge server, let its requests finish, remove it from the LB; the names removed."""
    record = ledger[instance.name]
    if not record.surge_server and not record.surge_port:
        return []
    lb = adds_servers(ctx)
    names = surge_servers(ctx, instance, ledger)
    for name in names:
        ctx.lb.set_state(name, "drain")
        wait_for_sessions(ctx, instance, ledger, server_name=name)
        lb.remove_server(name)
    ledger.update(instance.name, surge_server="")
    return names


def remove_strays(ctx: Context, instance: Instance, ledger: Ledger) -> None:
    """Remove every container of the service but the old one (a second one this run started)."""
    record = ledger[instance.name]
    if not record.old_container:
        raise RemoteError(f"{instance.name}: the journal does not say which container is the old one; nothing removed")
    ids = ctx.run(instance, commands.service_containers(instance, ctx.fleet.service)).split()
    for found in ids:
        if found != record.old_container:
            remove_container(ctx, instance, found)
