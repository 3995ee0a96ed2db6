"""Traefik v3 with its file provider: the instances are the servers of one service in a
YAML dynamic configuration file on the LB host.

Traefik has no API to change a server, so a drain is an edit of the file, made over
SSH: the server's list item is taken out (`traefik_file.py`: only that item's bytes; the
file is replaced atomically, since Traefik applies a truncated file as an empty
configuration), and ready puts the same bytes back at the same place. Traefik reloads
the file by itself; every edit is confirmed through Traefik's API (the service's server
list must be the one intended, within `apply_timeout_seconds`), else the old file is put
back and the step fails. While servers are out, the file as it was with all of them in
is kept beside it (`.NAME.compose-rollout.json`), so that a later run or `rollout
recover` puts them back exactly; the record goes when the last one is back.

The surge strategy's servers (`AddsServers`) are servers out of the list, so adding,
moving and removing one changes the record only, never the file or what Traefik runs
(nothing to confirm, no reload): `add_server` puts a copy of the item of the server it
is added beside, at the new port, after that item in the record's file, out of the list
(drained: Traefik would start it UP at once), and ready puts it in like any drained
server; `move_server` rewrites the port in a drained server's kept item, or, when the
service already has a server at the new port (the surge's), forgets the drained one;
`remove_server` forgets a drained server with nothing in flight. Traefik names a server
by its URL, so the adapter's name is HOST:PORT and each of these returns the new one.

The API is reached through an SSH tunnel to the LB host (`traefik_api.py`), on the same
pinned connection as the file edits: it can listen on the LB host's loopback only, and
Traefik's API has no authentication of its own.

What Traefik can and cannot tell:
- In flight: nothing per server (its metrics have no server label). `sessions` counts
  the LB host's TCP connections to the server, opening or established (`ss`); that is
  the requests in flight only when the service's serversTransport keeps no idle
  connections (`maxIdleConnsPerHost: -1`, or a short `idleConnTimeout`), which is
  checked with `servers()`, so in preflight. A server out of the list gets no new
  request once the API no longer lists it, and those in flight finish.
- Health: `serverStatus` in the API, when the service has a healthCheck (without one
  every server is always UP, so `up` is None). Traefik checks only the servers in the
  list, and starts every server of the service UP again at each reload, until its next
  check. Hence: `up` is None while a server is out; `recheck` returns True when it is out
  and Traefik will check it (it keeps nothing of the old container); ready waits for
  Traefik's first check of the server put back (healthCheck interval + timeout) and, if
  Traefik sees it DOWN, takes it out again and fails the step. An edit is refused while
  another server of the service is DOWN, as the reload would send it requests again.
- Cutting requests (`shutdown_sessions`): Traefik cannot cut one server's requests.

capabilities: add_server, remove_server, move_server (the surge strategy).
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable, Set
from dataclasses import dataclass

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.hosts.ssh import TunnelHost
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.connections import OPENING_OR_ESTABLISHED, count_connections, split_address
from compose_rollout.lb.settings import TraefikSettings
from compose_rollout.lb.traefik_api import HealthCheck, RunningService, TraefikApi
from compose_rollout.lb.traefik_file import DynamicFile, Parked, check_idle_connections

__all__ = ["TraefikLoadBalancer", "TraefikServer", "TunnelHost"]

POLL_SECONDS = 0.05
# After Traefik's first check of a server put back is due, a little longer for its answer.
CHECK_MARGIN_SECONDS = 0.5


@dataclass(frozen=True)
class TraefikServer:
    """One server: in the file's list or out of it, Traefik's health check, connections."""

    name: str
    listed: bool  # False: compose-rollout took it out of the list, or added it out of it (drained)
    status: str | None  # Traefik's serverStatus (UP, DOWN); None when Traefik checks nothing
    unobservable: str  # why status is None
    sessions: int

    @property
    def up(self) -> bool | None:
        """Traefik's health check passes; None when it checks nothing of this server (it is
        out of the list, or the service has no healthCheck or no router)."""
        return None if self.status is None else self.status == "UP"

    @property
    def drained(self) -> bool:
        return not self.listed

    @property
    def in_rotation(self) -> bool:
        return self.listed and self.up is not False

    def describe(self) -> str:
        connections = f"{self.sessions} connection{'' if self.sessions == 1 else 's'}"
        if not self.listed:
            return f"out of the server list (drained), {connections}; Traefik checks only listed servers"
        if self.status is None:
            return f"in rotation, {connections}, health not observable ({self.unobservable})"
        if self.status == "UP":
            return f"in rotation, Traefik check UP, {connections}"
        return f"listed but Traefik check {self.status} (it sends it nothing), {connections}"


@dataclass(frozen=True)
class _State:
    """The file now, the file with every server in (the original), and which are out."""

    current: DynamicFile
    original: DynamicFile
    parked: frozenset[str]
    record: Parked | None  # what is beside the file (possibly stale)


class TraefikLoadBalancer:
    """The servers of service `settings.service` in `settings.dynamic_file` on the LB host."""

    def __init__(
        self,
        settings: TraefikSettings,
        host: TunnelHost,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.host = host
        self.where = f"traefik {settings.ssh_host}:{settings.dynamic_file}"
        directory, base = posixpath.split(settings.dynamic_file)
        # Hidden and not .yml/.yaml/.toml: Traefik's directory mode does not load it.
        self.record_path = posixpath.join(directory, f".{base}.compose-rollout.json")
        self._monotonic = monotonic
        self._sleep = sleep
        self._edit = threading.Lock()  # batch_size > 1 drains in parallel; edits go one at a time
        self.api = TraefikApi(host, settings.api_address, settings.timeout_seconds, self.where)

    capabilities: frozenset[Capability] = frozenset({"add_server", "remove_server", "move_server"})

    @property
    def backend(self) -> str:
        return f"service {self.settings.service} in {self.where}"

    # --- reading ------------------------------------------------------------------------

    def _read(self, path: str) -> bytes:
        try:
            return self.host.read_file(path)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot read {path}: {error}") from None

    def _state(self) -> _State:
        try:
            text = self._read(self.settings.dynamic_file).decode()
        except UnicodeDecodeError:
            raise LoadBalancerError(f"{self.where}: not UTF-8 text") from None
        current = DynamicFile(text, self.settings.service, self.where)
        directory, name = posixpath.split(self.record_path)
        try:
            beside = self.host.list_directory(directory)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot list {directory}: {error}") from None
        if name not in beside:
            return _State(current, current, frozenset(), None)
        record = Parked.decode(self._read(self.record_path), self.record_path)
        if record.service != self.settings.service:
            raise LoadBalancerError(
                f"{self.record_path} holds servers of service {record.service!r} out of the list, not of "
                f"{self.settings.service!r}: another fleet is editing this file"
            )
        if record.parked <= set(current.names):  # all back: a run ended between the two writes
            return _State(current, current, frozenset(), record)
        original = DynamicFile(record.original, self.settings.service, self.record_path)
        parked = frozenset(set(original.names) - set(current.names))
        if not parked <= record.parked or original.without(parked) != text:
            out = ", ".join(sorted(record.parked - set(current.names)))
            raise LoadBalancerError(
                f"{self.where} was changed by someone else while compose-rollout had {out} out of its server "
                f"list; {self.record_path} holds the file as it was before. Put the servers back by hand, then "
                "remove that record"
            )
        return _State(current, original, parked, record)

    def _running(self) -> RunningService:
        """The service as Traefik runs it now."""
        return self.api.service(f"{self.settings.service}@file")

    def _view(self, state: _State, name: str, running: RunningService | None) -> TraefikServer:
        """One server: out of the list, or as Traefik runs it (`running`)."""
        sessions = count_connections(
            self.host, name, self.settings.timeout_seconds, self.where, states=OPENING_OR_ESTABLISHED
        )
        if name in state.parked or running is None:
            return TraefikServer(name, False, None, "out of the list", sessions)
        url = next(item.url for item in state.current.items if item.name == name)
        if running.health_check is None:
            return TraefikServer(name, True, None, "the service has no healthCheck", sessions)
        if running.statuses is None:
            return TraefikServer(name, True, None, "no router uses the service, so Traefik checks nothing", sessions)
        if url not in running.statuses:
            return TraefikServer(name, True, None, "Traefik reports no status for it yet", sessions)
        return TraefikServer(name, True, running.statuses[url], "", sessions)

    def servers(self) -> dict[str, TraefikServer]:
        """Every server of the service, those compose-rollout took out of the list too.

        Also the preflight's checks of the setup: the file is one compose-rollout can edit,
        Traefik runs the list the file holds, the serversTransport keeps no idle
        connections, and the health check's first verdict fits in `ready_timeout_seconds`."""
        state = self._state()
        check_idle_connections(state.current, self.settings.max_idle_seconds)
        running = self._running()
        if sorted(running.urls) != sorted(state.current.urls()):
            raise LoadBalancerError(
                f"{self.where}: Traefik runs service {self.settings.service}@file with servers {running.urls}, but "
                f"the file lists {state.current.urls()}: is this the file Traefik's file provider reads?"
            )
        check = running.health_check
        if check is not None and check.interval_seconds + check.timeout_seconds > self.settings.ready_timeout_seconds:
            raise LoadBalancerError(
                f"{self.where}: Traefik's first check of a server put back takes up to its healthCheck interval + "
                f"timeout, {check.interval_seconds + check.timeout_seconds:g} s, more than "
                f"load_balancer.ready_timeout_seconds ({self.settings.ready_timeout_seconds:g} s)"
            )
        names = [*state.current.names, *sorted(state.parked)]
        return {name: self._view(state, name, running) for name in names}

    def server(self, name: str) -> TraefikServer:
        state = self._state()
        if name not in state.parked and name not in state.current.names:
            raise LoadBalancerError(
                f"{self.where}: service {self.settings.service} has no server {name} "
                f"(servers: {', '.join(state.current.names)})"
            )
        return self._view(state, name, None if name in state.parked else self._running())

    # --- changing -----------------------------------------------------------------------

    def set_state(self, server: str, state: ServerAction) -> None:
        """`drain`: take the server out of the list; `ready`: put it back as it was and wait
        for Traefik's first health check of it. Each confirmed through Traefik's API."""
        with self._edit:
            if state == "drain":
                self._drain(server)
            else:
                self._ready(server)

    def shutdown_sessions(self, server: str) -> None:
        """Traefik cannot cut one server's requests; stopping the container does."""

    def recheck(self, server: str) -> bool:
        """True when the server is out of the list and the service has a health check: Traefik
        keeps nothing of a server out of its list, and `set_state("ready")` waits for its
        first check of the new container. False when it is still listed (a reload would
        start it UP again, not forget it) or Traefik checks nothing."""
        found = self._state()
        return server in found.parked and self._running().checked

    def _drain(self, server: str) -> None:
        found = self._state()
        if server in found.parked:
            self._await_applied(found.current.urls(), f"{server} out of the list")
            return
        if server not in found.current.names:
            raise LoadBalancerError(
                f"{self.where}: service {self.settings.service} has no server {server} "
                f"(servers: {', '.join(found.current.names)})"
            )
        self._refuse_if_another_is_down(found, server)
        self._change(found, found.parked | {server}, f"{server} out of the list")

    def _ready(self, server: str) -> None:
        found = self._state()
        if server in found.current.names and server not in found.parked:
            self._await_applied(found.current.urls(), f"{server} in the list")
            return
        if server not in found.parked:
            raise LoadBalancerError(
                f"{self.where}: service {self.settings.service} has no server {server}, and compose-rollout did not "
                "take one out (nothing to put back)"
            )
        self._refuse_if_another_is_down(found, server)
        running = self._change(found, found.parked - {server}, f"{server} back in the list")
        if running.health_check is None or not running.checked:
            return
        try:
            self._await_first_check(server, running.health_check)
        except LoadBalancerError as error:
            try:
                self._change(self._state(), found.parked, f"{server} out of the list again")
            except LoadBalancerError as again:
                raise LoadBalancerError(f"{error}; and taking it out again failed: {again}") from None
            raise LoadBalancerError(f"{error}; taken out of the list again") from None

    def _refuse_if_another_is_down(self, found: _State, server: str) -> None:
        """Each reload starts every server of the service UP until its next check: one that
        Traefik sees DOWN would be sent requests it cannot answer."""
        running = self._running()
        if running.statuses is None or not running.checked:
            return
        names = {item.url: item.name for item in found.current.items}
        down = sorted(f"{names.get(url, url)} {status}" for url, status in running.statuses.items() if status != "UP")
        down = [seen for seen in down if seen.split()[0] != server]
        if down:
            raise LoadBalancerError(
                f"{self.where}: Traefik sees {', '.join(down)}; editing the file reloads the service, and Traefik "
                "starts every server UP again until its next check, so it would get requests it cannot answer. "
                "Nothing changed: fix that server or take it out of the list first"
            )

    def _change(self, found: _State, parked: Set[str], what: str) -> RunningService:
        """Write the file with exactly `parked` out of the list, confirm Traefik runs it, and
        keep the record beside it; on any failure put the file back as it was and raise."""
        text = found.original.without(parked)
        mode = self._mode()
        # Write-ahead: before the file changes, the record names every server out before or
        # after it, so a crash between the writes leaves a record that explains the file.
        ahead = found.parked | set(parked)
        recorded = found.record is not None and (found.record.original, found.record.parked) == (
            found.original.text,
            ahead,
        )
        if not recorded:
            self._keep_record(found.original.text, ahead, mode)
        self._write(text, mode)
        try:
            running = self._await_applied(found.original.urls(set(parked)), what)
        except LoadBalancerError as error:
            try:
                self._write(found.current.text, mode)
                self._await_applied(found.current.urls(), "the file put back")
                if ahead != found.parked:
                    self._keep_record(found.original.text, found.parked, mode)
            except RolloutError as again:
                raise LoadBalancerError(f"{error}; putting the file back failed too: {again}") from None
            raise LoadBalancerError(f"{error}; the file is back as it was") from None
        if ahead != set(parked):
            self._keep_record(found.original.text, set(parked), mode)
        return running

    def _mode(self) -> int:
        try:
            return self.host.file_mode(self.settings.dynamic_file)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot stat it: {error}") from None

    def _write(self, text: str, mode: int) -> None:
        try:
            self.host.write_file_atomic(self.settings.dynamic_file, text.encode(), mode)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot write it: {error}") from None

    def _keep_record(self, original: str, parked: Set[str], mode: int) -> None:
        """The record beside the file: written while servers are out, removed when none is."""
        try:
            if parked:
                record = Parked(self.settings.service, original, frozenset(parked))
                self.host.write_file_atomic(self.record_path, record.encode(), mode & 0o666)
            else:
                self.host.remove_file(self.record_path)
        except RolloutError as error:
            raise LoadBalancerError(f"{self.where}: cannot write {self.record_path}: {error}") from None

    def _await_applied(self, urls: list[str], what: str) -> RunningService:
        """Wait until Traefik's API lists exactly `urls` for the service (it applies a file
        change after its providers' throttle); the service as Traefik then runs it."""
        limit = self.settings.apply_timeout_seconds
        deadline = self._monotonic() + limit
        while True:
            running = self._running()
            if sorted(running.urls) == sorted(urls):
                return running
            if self._monotonic() >= deadline:
                raise LoadBalancerError(
                    f"{self.where}: Traefik did not apply the change ({what}) within {limit:g} s: its API lists "
                    f"{running.urls}, the file {urls} (Traefik keeps its old configuration when it cannot read the "
                    "file; see its log)"
                )
            self._sleep(POLL_SECONDS)

    def _await_first_check(self, server: str, check: HealthCheck) -> None:
        """Traefik starts a server put back UP and checks it one interval later: wait until
        that check has had its time, and fail if Traefik then (or before) sees it DOWN."""
        wait = check.interval_seconds + check.timeout_seconds + CHECK_MARGIN_SECONDS
        deadline = self._monotonic() + wait
        while True:
            found = self.server(server)
            if found.up is False:
                raise LoadBalancerError(
                    f"{self.where}: Traefik's health check (GET {check.path} every {check.interval_seconds:g} s) "
                    f"sees {server} {found.status} after it was put back"
                )
            if self._monotonic() >= deadline:
                if found.up is None:
                    raise LoadBalancerError(f"{self.where}: Traefik reports no health of {server}: {found.describe()}")
                return
            self._sleep(min(0.1, max(0.0, deadline - self._monotonic())))

    # --- adding, moving, removing servers (the surge strategy) --------------------------

    def server_address(self, server: str) -> tuple[str, int]:
        """(address, port) read from the name HOST:PORT, whether or not the service has it."""
        try:
            return split_address(server)
        except LoadBalancerError as error:
            raise LoadBalancerError(f"{self.where}: {error}") from None

    def add_server(self, name: str, beside: str, port: int) -> str:
        """A copy of `beside`'s item sending to `port`, out of the list (drained) until
        `set_state(..., "ready")` puts it in; its name HOST:PORT (`name` is not used:
        Traefik knows a server by its URL). Nothing changes if the service has it."""
        target = self._at_port(beside, port)
        with self._edit:
            found = self._state()
            if target in found.original.names:
                return target
            text, added = found.original.with_copy(beside, port)
            self._keep_parked(found, text, found.parked | {added}, f"add {added} beside {beside}")
            return added

    def move_server(self, server: str, port: int) -> str:
        """Send drained `server`'s requests to `port`: its kept item gets the new URL, and
        its name is the new HOST:PORT. When the service has a server there already (the
        surge's), `server` is forgotten and that one, in its state, is the name returned."""
        target = self._at_port(server, port)
        if target == server:
            return server
        with self._edit:
            found = self._state()
            known = found.original.names
            if server not in known:
                if target in known:
                    return target  # moved before
                raise LoadBalancerError(
                    f"{self.where}: service {self.settings.service} has neither {server} nor {target} "
                    f"(servers: {', '.join(known)})"
                )
            if server not in found.parked:
                raise LoadBalancerError(
                    f"{self.where}: {server} is in the server list (Traefik sends it new requests); only a drained "
                    f"server is moved. Nothing changed"
                )
            if target in known:
                self._keep_parked(found, found.original.without({server}), found.parked - {server}, f"forget {server}")
                return target
            text, moved = found.original.with_port(server, port)
            self._keep_parked(found, text, (found.parked - {server}) | {moved}, f"move {server} to {moved}")
            return moved

    def remove_server(self, name: str) -> None:
        """Forget a drained server with no connections; nothing if the service has none
        by that name."""
        with self._edit:
            found = self._state()
            if name not in found.original.names:
                return
            if name not in found.parked:
                raise LoadBalancerError(
                    f"{self.where}: {name} is in the server list (Traefik sends it new requests): drain it before "
                    "it is removed. Nothing changed"
                )
            sessions = count_connections(
                self.host, name, self.settings.timeout_seconds, self.where, states=OPENING_OR_ESTABLISHED
            )
            if sessions:
                raise LoadBalancerError(
                    f"{self.where}: {name} still has {sessions} connection{'' if sessions == 1 else 's'} from the LB "
                    "host (requests in flight); not removed"
                )
            self._keep_parked(found, found.original.without({name}), found.parked - {name}, f"remove {name}")

    def _at_port(self, server: str, port: int) -> str:
        """The name of the server at `server`'s host and `port`."""
        self.server_address(server)
        target = f"{server.rpartition(':')[0]}:{port}"
        self.server_address(target)  # a port in 1-65535
        return target

    def _keep_parked(self, found: _State, original: str, parked: Set[str], what: str) -> None:
        """Change the record only: the file stays as it is, which is checked first, so
        Traefik has nothing to apply."""
        kept = DynamicFile(original, self.settings.service, self.record_path)
        if kept.without(parked) != found.current.text:
            raise LoadBalancerError(
                f"{self.where}: cannot {what} and keep the file's bytes as they are (its layout is not understood); "
                "nothing written"
            )
        self._keep_record(original, parked, self._mode())
