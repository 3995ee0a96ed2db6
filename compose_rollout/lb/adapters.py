"""From `load_balancer.kind` to the adapter that speaks to that LB."""

from __future__ import annotations

from collections.abc import Callable

from compose_rollout.errors import LoadBalancerError
from compose_rollout.hosts.ssh import Executor
from compose_rollout.lb.aws import AwsTargetGroup
from compose_rollout.lb.base import LoadBalancer
from compose_rollout.lb.haproxy import HaproxyClient
from compose_rollout.lb.nginx import NginxLoadBalancer
from compose_rollout.lb.settings import (
    AwsSettings,
    HaproxySettings,
    LoadBalancerSettings,
    NginxSettings,
    TraefikSettings,
)
from compose_rollout.lb.traefik import TraefikLoadBalancer, TunnelHost

# (hostname, port or None for ssh.port, user or None for ssh.user) -> a pinned SSH connection
SshTo = Callable[[str, int | None, str | None], Executor]


def connect(settings: LoadBalancerSettings, ssh_to: SshTo) -> tuple[LoadBalancer, Executor | None]:
    """The adapter for `settings`, and the LB host's SSH connection if it uses one (to close)."""
    if isinstance(settings, HaproxySettings):
        host = None
        if settings.admin_address.startswith("ssh://"):
            hostname, _, port = settings.admin_address.removeprefix("ssh://").split("/", 1)[0].partition(":")
            host = ssh_to(hostname, int(port) if port else None, None)
        return HaproxyClient(settings.admin_address, settings.backend, settings.timeout_seconds, host), host
    if isinstance(settings, NginxSettings):
        host = ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)
        return NginxLoadBalancer(settings, host), host
    if isinstance(settings, TraefikSettings):
        host = ssh_to(settings.ssh_host, settings.ssh_port, settings.ssh_user)
        if not isinstance(host, TunnelHost):  # SshHost is one: its API is reached through the SSH connection
            raise LoadBalancerError(f"kind traefik needs an SSH connection that opens tunnels, not {host!r}")
        return TraefikLoadBalancer(settings, host), host
    if isinstance(settings, AwsSettings):
        return AwsTargetGroup(settings), None  # an API over HTTPS: no LB host to reach
    raise AssertionError(f"no adapter for load_balancer.kind {settings.kind}")  # settings.KINDS has it: a bug
