"""In flight, for an LB that cannot count its own requests: the LB host's established
TCP connections to a server, counted over SSH with `ss` (iproute2).

A connection is not a request: an idle keep-alive connection from the LB to the server
counts too. That errs on the safe side (a drain waits longer, never cuts a request);
an LB that keeps idle connections open to its servers (nginx `keepalive`, Traefik's
idle pool) makes the wait last until it closes them, so the adapters' docs say how to
turn that off for the instances' upstream.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.fields import HOST_RE


class RemoteRunner(Protocol):
    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Any: ...


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); LoadBalancerError if it is neither."""
    host, colon, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise LoadBalancerError(f"{address!r} is not HOST:PORT")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not HOST_RE.fullmatch(host):
            raise LoadBalancerError(f"{address!r} is not HOST:PORT") from None
    return host, int(port)


ESTABLISHED = ("established",)
# A connection still being opened carries a request the LB has already sent that server:
# on a network slower than loopback it spends a round trip in syn-sent.
OPENING_OR_ESTABLISHED = ("syn-sent", "established")


def ss_argv(address: str, states: tuple[str, ...] = ESTABLISHED) -> list[str]:
    """`ss` listing the TCP connections in `states` whose far end is `address` (HOST:PORT)."""
    host, port = split_address(address)
    far_end = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ["ss", "-H", "-t", "-n", *(word for state in states for word in ("state", state)), "dst", far_end]


def count_connections(
    runner: RemoteRunner, address: str, timeout: float, where: str, states: tuple[str, ...] = ESTABLISHED
) -> int:
    """How many TCP connections in `states` (established) the LB host has to `address`."""
    try:
        result = runner.run(ss_argv(address, states), timeout=timeout)
    except RolloutError as error:
        raise LoadBalancerError(f"{where}: cannot count connections to {address} with `ss`: {error}") from None
    return sum(1 for line in str(result.stdout).splitlines() if line.strip())
