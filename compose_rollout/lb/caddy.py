"""Caddy through its admin API: the instances are the upstreams of one `reverse_proxy`
handler, found by the `@id` the user gives it in Caddy's JSON config.

Drain takes the instance's upstream out of that handler's `upstreams` list; ready puts
it back. Caddy counts the requests in flight per dial address (`GET
/reverse_proxy/upstreams`, `num_requests`), but only while some handler of the running
config names the address: once the last one stops naming it, Caddy forgets the address,
even with a request to it still running. So a second `reverse_proxy` handler, the
*parking* handler, in a route that never matches (`"match": [{"expression": "false"}]`),
lists every upstream too, with the same fields: it keeps a drained upstream counted
until its last request ends, and its entry is what ready puts back (at the place the
parking list's order gives it). A config without either handler, with a parking handler
that could match, that lacks an upstream of the handler or lists it with other fields,
is refused when the servers are read (in preflight), naming what is wrong.

Every change is one PATCH of the handler's list, computed from the config it replaces
and sent with `If-Match` on that config's hash, so a change someone made in between is
refused (HTTP 412): the adapter reads again and computes again, a bounded number of
times. It does the same when the PATCH's answer is lost (Caddy replaces its admin server
on every config load and may reset a connection meanwhile): the next read shows whether
the change applied, and a change computed from a read is never applied twice.
Caddy applies a change by loading its whole config again: requests in flight go on,
new ones follow the new list, idle client keep-alive connections and upgraded
(WebSocket) connections through any reverse_proxy are closed. A drain returns a moment
after the PATCH (`DRAIN_SETTLE_SECONDS`), once requests the old config had accepted are
counted. The last upstream of the
handler is never taken out (Caddy would answer every request 503).

What Caddy cannot tell: whether an upstream is healthy. Its active health check keeps
the state in memory only (logs and a Prometheus gauge refreshed every 10 s), an upstream
put back starts healthy before its first check, and every config load (every drain and
ready) resets every upstream to healthy. `up` is None: compose-rollout's own health gate
probes the instance before it is put back.

The surge strategy's servers are named by their dial address too. Adding one parks a
copy of the entry it is added beside, at the new port, right after it: drained until
ready puts it in the handler's list. Moving a drained server rewrites the dial of its
parked entry; where the surge's server is parked at that address already, the drained
entry is dropped and the surge's server is the instance's from then on. Removing one
drops its parked entry once it is out of the handler's list with no request in flight.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from compose_rollout.errors import AnswerLost, LoadBalancerError
from compose_rollout.lb.admin_http import AdminApi, Answer
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.settings import ADDRESS_RE, CaddySettings

CONFIG_PATH = "/config/"
COUNTS_PATH = "/reverse_proxy/upstreams"
# A change refused because the config changed since it was read is computed again on a
# new read, this many times in all; more means someone keeps changing it.
EDIT_ATTEMPTS = 5
# Caddy answers a change once the new config runs; a request the old config had already
# accepted may still be on its way to the proxy, where it picks its upstream from the old
# list and is then counted. A drain returns this much later, so that the first read of
# the drained upstream's requests in flight includes such a request.
DRAIN_SETTLE_SECONDS = 0.2
_FNV32_OFFSET, _FNV32_PRIME = 0x811C9DC5, 0x01000193

Upstream = dict[str, Any]


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash (Go's hash/fnv New32a, which Caddy's admin API uses)."""
    value = _FNV32_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return value


def config_etag(path: str, body: bytes) -> str:
    """The ETag of Caddy's answer `body` to `GET path` (a /config/ path): `"PATH HASH"`,
    HASH the FNV-1a 32-bit hash of the body as sent (its trailing newline included) in 8
    hex digits. Caddy sends it as an HTTP trailer, which most clients drop; with it as
    `If-Match`, a change applies only to the config that was read."""
    return f'"{path} {fnv1a_32(body):08x}"'


def check_dial(address: str, where: str) -> str:
    """`address` if it is HOST:PORT as compose-rollout writes a dial address; Caddy would
    take a malformed one and then answer every request 502."""
    host, _, port = address.rpartition(":")
    if not ADDRESS_RE.fullmatch(address) or not host or not 0 < int(port) < 65536:
        raise LoadBalancerError(f"{where}: {address!r} is not a dial address HOST:PORT")
    return address


def _walk(config: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Every object of the config, with the route whose `handle` list holds it (or None)."""
    stack: list[tuple[Any, dict[str, Any] | None]] = [(config, None)]
    while stack:
        node, route = stack.pop()
        if isinstance(node, dict):
            yield node, route
            stack.extend((value, node if key == "handle" else route) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((item, route) for item in node)


def _never_matches(route: dict[str, Any] | None) -> bool:
    """Every matcher set of the route has the expression `false` (2.6's string form, or
    an `{"expr": "false"}` object), so the route handles no request."""
    matchers = route.get("match") if route is not None else None
    if not isinstance(matchers, list) or not matchers:
        return False

    def false(expression: Any) -> bool:
        if isinstance(expression, dict):
            expression = expression.get("expr")
        return isinstance(expression, str) and expression.strip() == "false"

    return all(isinstance(one, dict) and false(one.get("expression")) for one in matchers)


def _handler(config: Any, object_id: str, role: str, where: str) -> tuple[list[Upstream], dict[str, Any] | None]:
    """(upstreams, enclosing route) of the reverse_proxy handler with `"@id": object_id`."""
    found = [(node, route) for node, route in _walk(config) if node.get("@id") == object_id]
    named = f'"@id": "{object_id}" ({role})'
    if len(found) != 1:
        what = "no object" if not found else f"{len(found)} objects"
        raise LoadBalancerError(f"{where}: the running config has {what} with {named}; see the caddy example")
    handler, route = found[0]
    if handler.get("handler") != "reverse_proxy":
        kind = handler.get("handler")
        raise LoadBalancerError(f'{where}: {named} is not a reverse_proxy handler ("handler": {kind!r})')
    if "dynamic_upstreams" in handler:
        raise LoadBalancerError(f"{where}: {named} has dynamic_upstreams; compose-rollout edits a static list")
    upstreams = handler.get("upstreams")
    if not isinstance(upstreams, list) or not all(
        isinstance(u, dict) and isinstance(u.get("dial"), str) for u in upstreams
    ):
        raise LoadBalancerError(f'{where}: {named} needs "upstreams": a list of objects, each with a "dial" address')
    dials = [upstream["dial"] for upstream in upstreams]
    twice = sorted({dial for dial in dials if dials.count(dial) > 1})
    if twice:
        raise LoadBalancerError(f"{where}: {named} lists {', '.join(twice)} more than once; list each address once")
    return upstreams, route


@dataclass(frozen=True)
class Pools:
    """The upstreams of the instances' handler (in order) and of the parking handler."""

    upstreams: list[Upstream]
    parking: list[Upstream]

    def live(self, address: str) -> bool:
        return any(upstream["dial"] == address for upstream in self.upstreams)

    def parked(self, address: str) -> Upstream | None:
        return next((upstream for upstream in self.parking if upstream["dial"] == address), None)


def read_pools(config: Any, upstreams_id: str, parking_id: str, where: str) -> Pools:
    """The two handlers' lists, or LoadBalancerError naming what the config lacks."""
    upstreams, _ = _handler(config, upstreams_id, "the instances' reverse_proxy: load_balancer.upstreams_id", where)
    parking, route = _handler(config, parking_id, "the parking handler: load_balancer.parking_id", where)
    if not _never_matches(route):
        raise LoadBalancerError(
            f'{where}: the parking handler "@id": "{parking_id}" must be in a route that never matches, '
            '"match": [{"expression": "false"}]; otherwise it sends requests to drained upstreams'
        )
    by_dial = {upstream["dial"]: upstream for upstream in parking}
    unparked = [upstream["dial"] for upstream in upstreams if upstream["dial"] not in by_dial]
    if unparked:
        raise LoadBalancerError(
            f'{where}: the parking handler "@id": "{parking_id}" lacks {", ".join(unparked)} (upstreams of '
            f'"@id": "{upstreams_id}"): add it there, or a drained upstream\'s requests in flight could not be counted'
        )
    differing = [upstream["dial"] for upstream in upstreams if by_dial[upstream["dial"]] != upstream]
    if differing:
        raise LoadBalancerError(
            f'{where}: the parking handler "@id": "{parking_id}" lists {", ".join(differing)} with other fields '
            f'than "@id": "{upstreams_id}" does; make the entries the same (ready puts the parked entry back)'
        )
    return Pools(list(upstreams), list(parking))


def without(pools: Pools, address: str, upstreams_id: str, where: str) -> list[Upstream] | None:
    """The handler's list without `address` (the others' fields and order untouched);
    None if it is not in it. Refuses to take out the last one."""
    kept = [upstream for upstream in pools.upstreams if upstream["dial"] != address]
    if len(kept) == len(pools.upstreams):
        return None
    if not kept:
        raise LoadBalancerError(
            f'{where}: refusing to drain {address}: it is the last upstream of "@id": "{upstreams_id}", '
            "and Caddy would answer every request 503 without one"
        )
    return kept


def with_back(pools: Pools, address: str, parking_id: str, where: str) -> list[Upstream] | None:
    """The handler's list with the parked entry of `address` back, before the first
    upstream that comes after it in the parking list (the others untouched); None if it
    is already in."""
    if pools.live(address):
        return None
    entry = pools.parked(address)
    if entry is None:
        raise LoadBalancerError(f'{where}: the parking handler "@id": "{parking_id}" has no upstream {address}')
    check_dial(entry["dial"], where)
    order = {upstream["dial"]: index for index, upstream in enumerate(pools.parking)}
    position = next(
        (i for i, upstream in enumerate(pools.upstreams) if order.get(upstream["dial"], -1) > order[address]),
        len(pools.upstreams),
    )
    return [*pools.upstreams[:position], entry, *pools.upstreams[position:]]


def with_added(pools: Pools, address: str, beside: str, parking_id: str, where: str) -> list[Upstream] | None:
    """The parking list with a copy of `beside`'s entry dialling `address`, right after
    `beside` (so ready puts it next to `beside`); None if `address` is parked already."""
    if pools.parked(address) is not None:
        return None
    entry = pools.parked(beside)
    if entry is None:
        raise LoadBalancerError(f'{where}: the parking handler "@id": "{parking_id}" has no upstream {beside}')
    position = pools.parking.index(entry) + 1
    return [*pools.parking[:position], {**entry, "dial": address}, *pools.parking[position:]]


def with_moved(
    pools: Pools, server: str, target: str, upstreams_id: str, parking_id: str, where: str
) -> list[Upstream] | None:
    """The parking list with drained `server` dialling `target` instead (its fields and
    place kept), or without it where `target` is parked already; None if only `target`
    is there (moved before)."""
    entry, there = pools.parked(server), pools.parked(target)
    if entry is None:
        if there is not None:
            return None
        raise LoadBalancerError(f'{where}: the parking handler "@id": "{parking_id}" has neither {server} nor {target}')
    if pools.live(server):
        raise LoadBalancerError(
            f'{where}: refusing to move {server} to {target}: it is in "@id": "{upstreams_id}" and takes new '
            "requests; drain it first"
        )
    if there is not None:
        return [upstream for upstream in pools.parking if upstream["dial"] != server]
    return [{**upstream, "dial": target} if upstream["dial"] == server else upstream for upstream in pools.parking]


def parse_counts(body: bytes, where: str) -> dict[str, int]:
    """`num_requests` by address from `GET /reverse_proxy/upstreams`."""
    try:
        listed = json.loads(body)
        return {str(entry["address"]): int(entry["num_requests"]) for entry in listed}
    except (ValueError, TypeError, KeyError) as error:
        raise LoadBalancerError(f"{where}: unexpected answer to GET {COUNTS_PATH} ({error}): {body[:200]!r}") from None


@dataclass(frozen=True)
class CaddyUpstream:
    """One upstream: in the handler's list or parked, and Caddy's count of its requests."""

    name: str
    in_rotation: bool
    sessions: int

    @property
    def up(self) -> None:
        """Caddy's admin API does not tell health: its active check's state is in logs and a
        Prometheus gauge (refreshed every 10 s) only, and an upstream put back, like every
        upstream after any config load, counts as healthy before its first check."""
        return None

    @property
    def drained(self) -> bool:
        """Out of the handler's list (parked): Caddy sends it no new request."""
        return not self.in_rotation

    def describe(self) -> str:
        where = "in rotation" if self.in_rotation else "drained (out of the upstreams, parked)"
        return f"{where}, {self.sessions} requests in flight, health not observable in Caddy's admin API"


class CaddyLoadBalancer:
    """The upstreams of the reverse_proxy handler `settings.upstreams_id`; an instance's
    server is its dial address HOST:PORT."""

    def __init__(self, settings: CaddySettings, admin: AdminApi, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.admin = admin
        self.where = admin.where
        self._sleep = sleep
        self._edit = threading.Lock()  # batch_size > 1 drains in parallel; edits go one at a time

    capabilities: frozenset[Capability] = frozenset({"add_server", "remove_server", "move_server"})

    @property
    def backend(self) -> str:
        return (
            f'reverse_proxy "@id": "{self.settings.upstreams_id}" (parked in "@id": "{self.settings.parking_id}") '
            f"in {self.where}"
        )

    def servers(self) -> dict[str, CaddyUpstream]:
        """Every upstream of the parking handler: those in the handler's list in rotation,
        the others drained."""
        _, pools = self._pools()
        counts = self._counts()
        return {upstream["dial"]: self._view(upstream["dial"], pools, counts) for upstream in pools.parking}

    def server(self, name: str) -> CaddyUpstream:
        _, pools = self._pools()
        if pools.parked(name) is None:
            raise LoadBalancerError(f"{self.backend} has no upstream {name}")
        return self._view(name, pools, self._counts())

    def set_state(self, server: str, state: ServerAction) -> None:
        """`drain`: the upstream leaves the handler's list; `ready`: its parked entry goes back."""
        check_dial(server, self.where)

        def change(pools: Pools) -> list[Upstream] | None:
            if pools.parked(server) is None:
                raise LoadBalancerError(f"{self.backend} has no upstream {server}")
            if state == "drain":
                return without(pools, server, self.settings.upstreams_id, self.where)
            return with_back(pools, server, self.settings.parking_id, self.where)

        if self._patch_upstreams(self.settings.upstreams_id, f"{state} {server}", change) and state == "drain":
            self._sleep(DRAIN_SETTLE_SECONDS)

    def server_address(self, server: str) -> tuple[str, int]:
        """The upstream's name is where Caddy sends it: HOST:PORT."""
        host, _, port = check_dial(server, self.where).rpartition(":")
        return host, int(port)

    def add_server(self, name: str, beside: str, port: int) -> str:
        """Park a copy of `beside`'s entry at `port` of its address, drained: `set_state(...,
        "ready")` puts it in the handler's list. Its name is that address (`name` is not used)."""
        host, _ = self.server_address(beside)
        address = check_dial(f"{host}:{port}", self.where)
        if address == beside:
            raise LoadBalancerError(f"{self.where}: cannot add a server beside {beside} at its own port {port}")

        def change(pools: Pools) -> list[Upstream] | None:
            return with_added(pools, address, beside, self.settings.parking_id, self.where)

        self._patch_upstreams(self.settings.parking_id, f"add {address} beside {beside}", change)
        return address

    def move_server(self, server: str, port: int) -> str:
        """Dial drained `server`'s parked entry at `port`; where the surge's server is parked
        at that address already, drop `server`'s entry and that one takes over. The name
        afterwards is the new address."""
        host, _ = self.server_address(server)
        target = check_dial(f"{host}:{port}", self.where)
        if target == server:
            return server

        def change(pools: Pools) -> list[Upstream] | None:
            return with_moved(pools, server, target, self.settings.upstreams_id, self.settings.parking_id, self.where)

        self._patch_upstreams(self.settings.parking_id, f"move {server} to {target}", change)
        return target

    def remove_server(self, name: str) -> None:
        """Drop a drained upstream with no request in flight from the parking list, after
        which Caddy no longer counts it."""
        check_dial(name, self.where)

        def change(pools: Pools) -> list[Upstream] | None:
            if pools.parked(name) is None:
                return None
            view = self._view(name, pools, self._counts())
            if view.in_rotation or view.sessions:
                raise LoadBalancerError(f"{self.where}: refusing to remove {name}: {view.describe()}")
            return [upstream for upstream in pools.parking if upstream["dial"] != name]

        self._patch_upstreams(self.settings.parking_id, f"remove {name}", change)

    def shutdown_sessions(self, server: str) -> None:
        """Caddy cannot cut one upstream's requests; stopping the container does."""

    def recheck(self, server: str) -> bool:
        return False  # no health state to read or reset through the admin API

    def _patch_upstreams(self, object_id: str, what: str, change: Callable[[Pools], list[Upstream] | None]) -> bool:
        """PATCH the `upstreams` of handler `object_id` with `change` of the config just read
        (None: nothing left to do), with If-Match on that config: True once Caddy applied
        it, False if there was nothing to do. A 412 or a lost answer means read and compute
        again, EDIT_ATTEMPTS times in all."""
        path = f"/id/{object_id}/upstreams"
        with self._edit:
            for _ in range(EDIT_ATTEMPTS):
                body, pools = self._pools()
                changed = change(pools)
                if changed is None:
                    return False
                headers = {"Content-Type": "application/json", "If-Match": config_etag(CONFIG_PATH, body)}
                try:
                    answer = self.admin.request("PATCH", path, json.dumps(changed).encode(), headers)
                except AnswerLost:
                    continue  # applied or not: the next read tells (and a change made is not made twice)
                if answer.status != 412:  # 412: the config changed since it was read
                    self._expect(answer, f"PATCH {path} ({what})")
                    return True
        raise LoadBalancerError(
            f"{self.where}: could not {what}: {EDIT_ATTEMPTS} times in a row the config changed between "
            "reading it and changing it (HTTP 412 to If-Match) or the answer to the change was lost"
        )

    def _view(self, name: str, pools: Pools, counts: Mapping[str, int]) -> CaddyUpstream:
        if name not in counts:  # the parking handler names it, so Caddy counts it: never guess 0
            raise LoadBalancerError(f"{self.where}: GET {COUNTS_PATH} does not list {name}, which the config names")
        return CaddyUpstream(name, pools.live(name), counts[name])

    def _pools(self) -> tuple[bytes, Pools]:
        """The running config as sent (for its ETag) and the two handlers' lists."""
        answer = self._expect(self.admin.request("GET", CONFIG_PATH), f"GET {CONFIG_PATH}")
        try:
            config = json.loads(answer.body)
        except ValueError as error:
            raise LoadBalancerError(f"{self.where}: GET {CONFIG_PATH} is not JSON ({error})") from None
        return answer.body, read_pools(config, self.settings.upstreams_id, self.settings.parking_id, self.where)

    def _counts(self) -> dict[str, int]:
        return parse_counts(self._expect(self.admin.request("GET", COUNTS_PATH), f"GET {COUNTS_PATH}").body, self.where)

    def _expect(self, answer: Answer, call: str) -> Answer:
        """`answer` if it is a 200, else LoadBalancerError with Caddy's own error."""
        if answer.status == 200:
            return answer
        try:
            said = json.loads(answer.body)["error"]
        except (ValueError, TypeError, KeyError):
            said = answer.body[:300].decode(errors="replace").strip() or "(no body)"
        raise LoadBalancerError(f"{self.where}: {call}: HTTP {answer.status}: {said}")
