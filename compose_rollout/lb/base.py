"""What the procedure needs from a load balancer.

The procedure, the flow and the CLI speak to this interface only. Each adapter is one
module (`haproxy.py`, `nginx.py`, ...), its settings a class in `settings.py`, and
`adapters.connect` picks it by `load_balancer.kind`. An adapter keeps each instance's
server (`Instance.lb_server`) as the LB names it and answers for it.

To write one: implement `LoadBalancer` (and a `ServerView`), add a settings class with
its `kind` to `settings.py`, a branch to `adapters.connect`, and run the shared contract
tests against it (README, "Writing an adapter").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol, runtime_checkable

from compose_rollout.errors import PreflightError

ServerAction = Literal["ready", "drain"]

# What some adapters can do beyond the contract every one keeps, declared in their
# `capabilities` and checked in preflight by what needs it (`require`): a surge strategy
# adds and removes servers, a metric gate reads per-server response counters.
Capability = Literal["add_server", "remove_server", "move_server", "response_counters", "weights"]
SURGE_NEEDS: tuple[Capability, ...] = ("add_server", "remove_server", "move_server")


class ServerView(Protocol):
    """One server as the load balancer sees it now."""

    @property
    def name(self) -> str: ...

    @property
    def up(self) -> bool | None:
        """The LB's own health check passes, whether or not the server takes traffic;
        None when this LB has no health check it can be asked about (open-source nginx)."""
        ...

    @property
    def drained(self) -> bool:
        """Asked to take no new connections (those in flight go on)."""
        ...

    @property
    def in_rotation(self) -> bool:
        """Up and taking new connections."""
        ...

    @property
    def sessions(self) -> int:
        """Requests still in flight to the server, or, for an LB that cannot count them,
        the LB host's TCP connections to it (`connections.py`): never fewer than in flight."""
        ...

    def describe(self) -> str:
        """One line for people: check state, admin state, what is in flight."""
        ...


class LoadBalancer(Protocol):
    """The instances' servers in one load balancer.

    Every call is bounded by the adapter's own timeout and raises
    `errors.LoadBalancerError` naming the LB when it cannot answer or refuses.
    """

    @property
    def capabilities(self) -> frozenset[Capability]:
        """What this adapter can do beyond the contract (see `Capability`)."""
        ...

    @property
    def backend(self) -> str:
        """The group of servers the fleet's instances are in, for people: `backend app`,
        `upstream app in nginx lb1:/etc/nginx/conf.d/app.conf`."""
        ...

    def servers(self) -> Mapping[str, ServerView]:
        """Every server of the group, by name."""
        ...

    def server(self, name: str) -> ServerView:
        """One server; LoadBalancerError if the group has none by that name."""
        ...

    def set_state(self, server: str, state: ServerAction) -> None:
        """`drain`: no new connections, those in flight finish; `ready`: back in rotation."""
        ...

    def shutdown_sessions(self, server: str) -> None:
        """Cut whatever is still in flight to `server` (`rollout.on_drain_timeout: proceed`)."""
        ...

    def recheck(self, server: str) -> bool:
        """Forget what the LB's health check saw of `server` (which is out of rotation), so
        that the next `up` comes from checks made after this call: a container that
        restarted faster than the check's fall count never looked down. False when the
        LB has no health check for the server, whose `up` then observes nothing."""
        ...


@runtime_checkable
class CountsResponses(Protocol):
    """An LB that counts each server's responses (capability `response_counters`)."""

    def response_counts(self, server: str) -> Mapping[str, int]:
        """Responses sent from `server` since the LB started, by class: `1xx` ... `5xx`, `other`."""
        ...


@runtime_checkable
class AddsServers(Protocol):
    """An LB that adds, moves and removes servers at run time (capabilities `add_server`,
    `move_server`, `remove_server`): what the surge strategy needs, and what follows a
    container to another port of a published range. An added server sends to the same
    address as the server it is added beside, at another port (the port Docker gave the
    second container).

    Two ways of naming servers: HAProxy names each server, and a server keeps its name
    when it moves; nginx, Caddy and Traefik know a server by its address `HOST:PORT`, so
    a server that moves, or is added, is named by where it sends. Each call returns the
    name the server has afterwards, and the run records it (`InstanceRecord.lb_server`)."""

    def server_address(self, server: str) -> tuple[str, int]:
        """(address, port) the LB sends `server`'s requests to (for an LB that names
        servers by address: read from the name, whether or not the LB has it)."""
        ...

    def add_server(self, name: str, beside: str, port: int) -> str:
        """A new server at `beside`'s address and `port`, with `beside`'s parameters,
        health-checked where the LB checks, drained (taking no new requests) until
        `set_state(..., "ready")`; its name: `name`, or its address for an LB that
        names servers by address."""
        ...

    def move_server(self, server: str, port: int) -> str:
        """Send `server`'s requests to `port` at the same address (it is drained, none
        in flight); its name afterwards. Where servers are named by address and the LB
        already has a server there (the surge's), `server` is removed and that one is
        the instance's server from now on, in the state it is in."""
        ...

    def remove_server(self, name: str) -> None:
        """Remove a server that takes no new requests and has none in flight; nothing
        to do if it is not there."""
        ...


@runtime_checkable
class Weighs(Protocol):
    """An LB whose servers have weights it can be told (capability `weights`): the
    weighted canary."""

    def weight(self, server: str) -> int:
        """The server's weight now."""
        ...

    def set_weight(self, server: str, weight: int) -> None:
        """Give the server this weight (its share of new requests among those in rotation)."""
        ...


def require(lb: LoadBalancer, needed: Iterable[Capability], why: str) -> None:
    """PreflightError naming what `lb` lacks of `needed`, and what needs it."""
    missing = sorted(set(needed) - lb.capabilities)
    if missing:
        raise PreflightError(f"{lb.backend} cannot {', '.join(missing)}, which {why} needs")
