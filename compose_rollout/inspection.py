"""What runs on an instance now, as read from its host: nothing here changes anything.

The service's container (`docker inspect`), the port it publishes for the LB, its
image and that image's digest, the Compose flavour on the host, the health URL of the
container that serves, and the snapshot a run takes of each instance before it
touches any: its compose file (and `.env` when the image's tag is set there) and the
container it runs.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from compose_rollout.config import Instance
from compose_rollout.context import Context
from compose_rollout.errors import ConfigError, PreflightError, RemoteError
from compose_rollout.hosts import commands, env_file
from compose_rollout.hosts.commands import ComposeVersion
from compose_rollout.hosts.compose_file import current_image, image_value
from compose_rollout.images import parse_reference
from compose_rollout.lb.base import AddsServers
from compose_rollout.ports import Ports, host_ports, reached_at
from compose_rollout.state.journal import InstanceRecord


@dataclass(frozen=True)
class ContainerState:
    """The service's container on one host, from `docker inspect`."""

    id: str
    image_id: str
    image: str
    status: str
    restart_count: int
    health: str
    # The whole `docker inspect` answer it was read from (ports, labels): asked once.
    inspected: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> str:
        health = f", docker health {self.health}" if self.health else ""
        return f"container {self.id[:12]} {self.status}, image {self.image_id[:19]}{health}"


def compose_version(ctx: Context, instance: Instance) -> ComposeVersion:
    """The Compose flavour on the instance's host (configured, or detected once)."""
    if ctx.fleet.compose.command != "auto":
        return ctx.fleet.compose.command
    if instance.name not in ctx.compose_versions:
        found = ctx.hosts[instance.name].run(commands.COMPOSE_PROBE, timeout=30, check=False)
        version = found.stdout.strip()
        if not found.ok or version not in ("v2", "v1"):
            raise RemoteError(f"{instance.name}: neither `docker compose` nor `docker-compose` works")
        ctx.compose_versions[instance.name] = "v2" if version == "v2" else "v1"
    return ctx.compose_versions[instance.name]


def container_state(
    ctx: Context, instance: Instance, known_id: str | None = None, exact: bool = False
) -> ContainerState | None:
    """The service's container, or None if there is none.

    With `known_id` (the container seen last time) one `docker inspect` suffices while
    it still exists; otherwise the container is found by its Compose labels first
    (`exact`: not looked for; None if `known_id` is gone, as the service may have two).
    """
    info = None
    if known_id is not None:
        found = ctx.hosts[instance.name].run(
            commands.inspect_container(known_id), timeout=ctx.fleet.ssh.command_timeout_seconds, check=False
        )
        info = json.loads(found.stdout)[0] if found.ok else None
        if info is None and exact:
            return None
    if info is None:
        ids = ctx.run(instance, commands.service_containers(instance, ctx.fleet.service)).split()
        if not ids:
            return None
        if len(ids) > 1:
            raise RemoteError(
                f"{instance.name}: service {ctx.fleet.service} has {len(ids)} containers; "
                "compose-rollout updates one container per instance"
            )
        info = json.loads(ctx.run(instance, commands.inspect_container(ids[0])))[0]
    state = info["State"]
    return ContainerState(
        id=info["Id"],
        image_id=info["Image"],
        image=info["Config"]["Image"],
        status=state["Status"],
        restart_count=int(info.get("RestartCount", 0)),
        health=(state.get("Health") or {}).get("Status", ""),
        inspected=info,
    )


def inspect(ctx: Context, instance: Instance, container_id: str) -> dict[str, Any]:
    """`docker inspect` of one container."""
    found: dict[str, Any] = json.loads(ctx.run(instance, commands.inspect_container(container_id)))[0]
    return found


def port_of(ctx: Context, instance: Instance, container_id: str, container_port: str) -> int:
    """The host port `container_id` got for `container_port`."""
    port = host_ports(inspect(ctx, instance, container_id)).get(container_port)
    if port is None:
        raise RemoteError(f"{instance.name}: container {container_id[:12]} publishes no host port for {container_port}")
    return port


def service_ports(ctx: Context, instance: Instance, found: Snapshot) -> tuple[Ports, int] | None:
    """The container port behind the instance's LB server, its published range, and the
    port the running container has; None when the LB cannot say where it sends (only
    an LB that can move a server follows ports) or sends to no published port."""
    if not isinstance(ctx.lb, AddsServers):
        return None
    _, lb_port = ctx.lb.server_address(instance.lb_server)
    ports = reached_at(found.container.inspected or inspect(ctx, instance, found.container.id), lb_port)
    return (ports, lb_port) if ports is not None else None


def health_url(instance: Instance, record: InstanceRecord, port: int | None = None) -> str:
    """The health URL of the container on `port` (default: the one serving now), when the
    fleet file's URL addresses the published range; else the fleet file's URL."""
    port = port or record.port
    if not record.container_port or not port:
        return instance.health_url
    return Ports(record.container_port, record.port_low, record.port_high).url_at(instance.health_url, port)


def local_image_id(ctx: Context, instance: Instance, image: str) -> str | None:
    """The ID of `image` on the host, or None if the host does not have it."""
    host = ctx.hosts[instance.name]
    result = host.run(commands.image_id(image), timeout=ctx.fleet.ssh.command_timeout_seconds, check=False)
    return result.stdout.strip() if result.ok else None


def running_digest(ctx: Context, instance: Instance, container: ContainerState) -> str:
    """`repo@sha256:...` of the image the container runs (its ID if the host has no digest)."""
    result = ctx.hosts[instance.name].run(commands.image_repo_digests(container.image_id), timeout=30, check=False)
    digests = json.loads(result.stdout or "[]") if result.ok else []
    try:
        repository = parse_reference(container.image).repository
    except ConfigError:
        repository = ""
    matching = [d for d in digests if d.split("@")[0] == repository]
    return str((matching or digests or [container.image_id])[0])


@dataclass(frozen=True)
class Snapshot:
    """An instance as found before the run: its compose file and what it runs."""

    instance: Instance
    compose: bytes
    mode: int
    image: str
    container: ContainerState
    # The file a run edits: the compose file, or `.env` when the image's tag is a variable
    # set there (`hosts/env_file.py`); `edited_path` "" means the compose file.
    edited_path: str = ""
    edited: bytes = b""
    variable: str = ""
    image_prefix: str = ""
    # Where the LB reaches the container, when followed (`service_ports`), and its host port now.
    ports: Ports | None = None
    port: int = 0


def snapshot(ctx: Context, instance: Instance) -> Snapshot:
    """Read the compose file (and `.env` when the tag is set there) and the running
    container; refuse anything unexpected."""
    host = ctx.hosts[instance.name]
    where = f"{instance.name}:{instance.compose_path}"
    compose = host.read_file(instance.compose_path)
    try:
        raw = image_value(compose.decode("utf-8"), ctx.fleet.service, where)
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8") from None
    variable = env_file.tag_variable(raw, where)
    container = container_state(ctx, instance)
    if container is None:
        raise PreflightError(f"{instance.name}: service {ctx.fleet.service} has no container; is it deployed?")
    if variable is None:
        image = current_image(compose, ctx.fleet.service, where)
        return Snapshot(instance, compose, host.file_mode(instance.compose_path), image, container)
    env_path, env, value = _env_tag(ctx, instance, compose, raw, variable)
    return Snapshot(
        instance,
        compose,
        host.file_mode(env_path),
        f"{variable.repository}:{value}",
        container,
        edited_path=env_path,
        edited=env,
        variable=variable.name,
        image_prefix=f"{variable.repository}:",
    )


def _env_tag(
    ctx: Context, instance: Instance, compose: bytes, raw: str, variable: env_file.TagVariable
) -> tuple[str, bytes, str]:
    """(path of `.env`, its bytes, the tag it sets) for an image whose tag is `variable`; ConfigError
    when compose-rollout could not change it there alone."""
    where = f"{instance.name}:{instance.compose_path}"
    lines = env_file.uses(compose.decode("utf-8"), variable.name)
    if len(lines) > 1:
        raise ConfigError(
            f"{where}: ${{{variable.name}}} is used on lines {', '.join(map(str, lines))}: changing it would change "
            f"more than the image of {ctx.fleet.service} ({raw}); give that image a variable of its own"
        )
    env_path = posixpath.join(instance.project_directory, ".env")
    host = ctx.hosts[instance.name]
    try:
        env = host.read_file(env_path)
    except RemoteError as error:
        raise ConfigError(
            f"{where}: the image {raw} takes its tag from {variable.name}, and {error}: compose-rollout changes "
            "the tag where it is set, in .env (not in a shell environment)"
        ) from None
    value = env_file.value_of(env, variable.name, f"{instance.name}:{env_path}")
    if host.run(["printenv", variable.name], timeout=ctx.fleet.ssh.command_timeout_seconds, check=False).ok:
        raise ConfigError(
            f"{instance.name}: {variable.name} is set in the environment Compose runs in over SSH, which wins over "
            f"{env_path}: a change there would not take effect; unset it"
        )
    return env_path, env, value
