"""From `load_balancer.kind` to the adapter that speaks to that LB."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from compose_rollout.config import Instance
from compose_rollout.hosts.shell import LocalShell, RemoteShell, Shell
from compose_rollout.hosts.ssh import Executor, Stream, TunnelHost
from compose_rollout.lb.admin_http import HttpAdmin, tcp_stream
from compose_rollout.lb.aws import AwsTargetGroup
from compose_rollout.lb.base import LoadBalancer
from compose_rollout.lb.caddy import CaddyLoadBalancer
from compose_rollout.lb.command import CommandLoadBalancer, Target, url_port
from compose_rollout.lb.haproxy import HaproxyClient
from compose_rollout.lb.nginx import NginxLoadBalancer
from compose_rollout.lb.settings import (
    AwsSettings,
    CaddySettings,
    CommandSettings,
    HaproxySettings,
    LoadBalancerSettings,
    NginxSettings,
    TraefikSettings,
    admin_url_parts,
)
from compose_rollout.lb.traefik import TraefikLoadBalancer

# (hostname, port or None for ssh.port, user or None for ssh.user) -> a pinned SSH connection
SshTo = Callable[[str, int | None, str | None], TunnelHost]


def command_target(instance: Instance) -> Target:
    """What the `command` kind's commands are told about an instance's server."""
    return Target(
        server=instance.lb_server,
        instance=instance.name,
        host=instance.host,
        port=url_port(instance.health_url),
        health_url=instance.health_url,
    )


def connect(
    settings: LoadBalancerSettings, ssh_to: SshTo, instances: Sequence[Instance]
) -> tuple[LoadBalancer, Executor | None]:
    """The adapter for `settings` and the fleet's `instances`, and the LB host's SSH
    connection if it uses one (to close)."""
    if isinstance(settings, HaproxySettings):
        host = None
        if settings.admin_address.startswith("ssh://"):
            hostname, _, port = settings.admin_address.removeprefix("ssh://").split("/", 1)[0].partition(":")
            host = ssh_to(hostname, int(port) if port else None, None)
        check = settings.surge_check
        client = HaproxyClient(
            settings.admin_address,
            settings.backend,
            settings.timeout_seconds,
            host,
            surge_check=(check.inter_ms, check.rise, check.fall),
        )
        return client, host
    if isinstance(settings, NginxSettings):
        host = ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)
        return NginxLoadBalancer(settings, host), host
    if isinstance(settings, CaddySettings):
        admin_host, admin_port = admin_url_parts(settings.admin_url)
        if settings.ssh_host is None:
            admin = HttpAdmin(
                admin_host, admin_port, tcp_stream, settings.timeout_seconds, f"caddy admin {settings.admin_url}"
            )
            return CaddyLoadBalancer(settings, admin), None
        tunnel_host = ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)

        def through_tunnel(to: str, to_port: int, timeout: float) -> Stream:
            stream: Stream = tunnel_host.open_tunnel(to, to_port, timeout)
            return stream

        where = f"caddy admin {settings.admin_url} through SSH to {tunnel_host.name}"
        admin = HttpAdmin(admin_host, admin_port, through_tunnel, settings.timeout_seconds, where)
        return CaddyLoadBalancer(settings, admin), tunnel_host
    if isinstance(settings, TraefikSettings):
        host = ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)
        return TraefikLoadBalancer(settings, host), host
    if isinstance(settings, AwsSettings):
        return AwsTargetGroup(settings), None  # an API over HTTPS: no LB host to reach
    if isinstance(settings, CommandSettings):
        host = None if settings.ssh_host is None else ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)
        shell: Shell = LocalShell() if host is None else RemoteShell(host)
        return CommandLoadBalancer(settings, [command_target(i) for i in instances], shell), host
    raise AssertionError(f"no adapter for load_balancer.kind {settings.kind}")  # settings.KINDS has it: a bug
