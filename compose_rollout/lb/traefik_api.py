"""Traefik's API as the traefik adapter reads it: one service as Traefik runs it (its
servers, its health check, each server's status), fetched with HTTP/1.1 through an SSH
tunnel to the LB host, so the API can listen on the LB host's loopback only.

`GET /api/http/services/NAME@file` answers, for Traefik 3.7:
`{"loadBalancer": {"servers": [{"url": ...}], "healthCheck": {"path", "interval",
"timeout", ...}, "serversTransport": ...}, "serverStatus": {URL: "UP" | "DOWN"}, ...}`.
`serverStatus` is there only while a router uses the service (and it lists servers); every
server is UP in it when the service has no healthCheck.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.hosts.ssh import Stream, TunnelHost
from compose_rollout.lb.connections import split_address
from compose_rollout.lb.traefik_file import go_duration

MAX_API_BYTES = 4 * 1024 * 1024


class _TunnelConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a stream that is already connected (an SSH tunnel)."""

    def __init__(self, stream: Stream, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._stream = stream

    def connect(self) -> None:
        self.sock = self._stream


@dataclass(frozen=True)
class HealthCheck:
    """The service's healthCheck as Traefik applied it (its defaults filled in)."""

    path: str
    interval_seconds: float
    timeout_seconds: float


@dataclass(frozen=True)
class RunningService:
    """A service as Traefik runs it now."""

    urls: list[str]
    health_check: HealthCheck | None
    statuses: dict[str, str] | None  # serverStatus by URL; None when Traefik reports none

    @property
    def checked(self) -> bool:
        """Traefik health-checks the servers and reports what it sees."""
        return self.health_check is not None and self.statuses is not None


class TraefikApi:
    """Traefik's API at `address` (HOST:PORT as the LB host reaches it) through `host`."""

    def __init__(self, host: TunnelHost, address: str, timeout: float, where: str) -> None:
        self.host = host
        self.address = address
        self.timeout = timeout
        self.where = where
        self.api = f"Traefik's API at {address} on {host.name}"

    def service(self, name: str) -> RunningService:
        """The service `name` (`NAME@file`) as Traefik runs it."""
        status, body = self._get(f"/api/http/services/{name}")
        if status == 404:
            raise LoadBalancerError(
                f"{self.where}: Traefik has no service {name}: does its file provider read this file "
                "(providers.file.filename or .directory), and does the file load without errors (Traefik's log)?"
            )
        if status != 200 or not isinstance(body, dict):
            raise LoadBalancerError(f"{self.where}: {self.api} answered GET service {name} with {status}: {body}")
        balancer = body.get("loadBalancer")
        if not isinstance(balancer, dict):
            raise LoadBalancerError(f"{self.where}: Traefik runs {name} as no loadBalancer service")
        servers = balancer.get("servers") or []
        urls = [str(server.get("url")) for server in servers if isinstance(server, dict)]
        check = balancer.get("healthCheck")
        health_check = None
        if isinstance(check, dict):
            what = f"{self.where}: service {name} healthCheck"
            health_check = HealthCheck(
                path=str(check.get("path", "")),
                interval_seconds=go_duration(check.get("interval", "30s"), f"{what} interval"),
                timeout_seconds=go_duration(check.get("timeout", "5s"), f"{what} timeout"),
            )
        statuses = body.get("serverStatus")
        return RunningService(
            urls, health_check, {str(k): str(v) for k, v in statuses.items()} if isinstance(statuses, dict) else None
        )

    def _get(self, path: str) -> tuple[int, Any]:
        """(status, JSON body or the text's tail) of one GET, on a tunnel of its own."""
        address, port = split_address(self.address)
        try:
            stream = self.host.open_tunnel(address, port, self.timeout)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot reach {self.api}: {error}") from None
        connection = _TunnelConnection(stream, address, port, self.timeout)
        try:
            connection.request("GET", path, headers={"Accept": "application/json", "Connection": "close"})
            response = connection.getresponse()
            body = response.read(MAX_API_BYTES + 1)  # each read bounded by the tunnel's timeout
        except (OSError, http.client.HTTPException) as error:
            raise LoadBalancerError(
                f"{self.where}: GET {path} on {self.api} failed: {error or type(error).__name__}"
            ) from None
        finally:
            connection.close()
        if len(body) > MAX_API_BYTES:
            raise LoadBalancerError(
                f"{self.where}: {self.api} answered GET {path} with more than {MAX_API_BYTES} bytes"
            )
        if response.status != 200:
            return response.status, body.decode(errors="replace")[-300:]
        try:
            return 200, json.loads(body)
        except ValueError:
            raise LoadBalancerError(f"{self.where}: {self.api} answered GET {path} with no JSON") from None
