"""Published ports, from `docker inspect`: where a container's service is reached.

A service that publishes a host port range (`"8080-8081:8080"`) lands on either port of
it (Docker picks one when the container is created), so compose-rollout follows the
port each container got rather than trusting the one the fleet file names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


@dataclass(frozen=True)
class Ports:
    """The container port the LB's server reaches, and the host port range it is
    published on (low == high for a fixed port)."""

    container_port: str  # "8080/tcp"
    low: int
    high: int

    def url_at(self, url: str, port: int) -> str:
        """`url` at `port` when it addresses a port of the published range (else as is)."""
        parts = urlsplit(url)
        if parts.port is None or not self.low <= parts.port <= self.high:
            return url
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def host_ports(info: Mapping[str, Any]) -> dict[str, int]:
    """Container port -> the host port it got (what `docker port` prints)."""
    bound = (info.get("NetworkSettings") or {}).get("Ports") or {}
    ports = {}
    for container_port, bindings in bound.items():
        for binding in bindings or []:
            if str(binding.get("HostPort", "")).isdigit():
                ports[container_port] = int(binding["HostPort"])
                break
    return ports


def published_range(info: Mapping[str, Any], container_port: str) -> tuple[int, int] | None:
    """The host port range configured for `container_port` ("8080-8081" -> (8080, 8081))."""
    bindings = (info.get("HostConfig") or {}).get("PortBindings") or {}
    for binding in bindings.get(container_port) or []:
        match = _RANGE.fullmatch(str(binding.get("HostPort", "")))
        if match:
            low = int(match.group(1))
            return low, int(match.group(2) or low)
    return None


def reached_at(info: Mapping[str, Any], port: int) -> Ports | None:
    """The container port published on host `port`, with its configured range; None if none is."""
    for container_port, bound in host_ports(info).items():
        if bound == port:
            low, high = published_range(info, container_port) or (port, port)
            return Ports(container_port, low, high)
    return None


def range_holding(info: Mapping[str, Any], port: int) -> tuple[Ports, int] | None:
    """The container port whose published host range holds `port`, that range, and the
    host port the container got (None if no range holds it): where a container is now
    that an LB server once reached at `port`."""
    for container_port, bound in host_ports(info).items():
        low, high = published_range(info, container_port) or (bound, bound)
        if low <= port <= high:
            return Ports(container_port, low, high), bound
    return None
