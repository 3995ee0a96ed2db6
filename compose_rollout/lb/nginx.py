"""Open-source nginx: the instances are `server` lines of an `upstream` block.

nginx has no API for this, so a drain is a configuration change on the LB host, made
over SSH: that server's line gets ` down` (only that line changes, byte for byte; the
file is replaced atomically), `nginx -t` checks the whole configuration (a failure puts
the file back and fails the step), and `nginx -s reload` swaps workers gracefully: the
old ones finish the requests they have and take no new ones. The adapter waits until
every worker of the old configuration is shutting down before it says the drain is done.

What nginx cannot tell: whether a server is healthy (open-source nginx has no active
health check, so `up` is None and only compose-rollout's own health gate vouches for a
new container), and requests in flight (counted as the LB host's TCP connections to
the server, see `connections.py`; with `keepalive` in the upstream, idle kept-alive
connections count too, until nginx closes them).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.hosts.ssh import Executor, Result
from compose_rollout.lb.base import Capability, ServerAction
from compose_rollout.lb.connections import count_connections
from compose_rollout.lb.settings import NginxSettings

_SERVER_RE = re.compile(r"^([ \t]*server[ \t]+)([^\s;#]+)([^;#\n]*)(;)", re.MULTILINE)


def _code(text: str) -> str:
    """`text` with comments and quoted strings blanked (same length), so that braces and
    directives are found only where nginx would see them."""
    out = list(text)
    i, quote = 0, ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                out[i] = " "
                if i + 1 < len(text):
                    out[i + 1] = " " if text[i + 1] != "\n" else "\n"
                i += 2
                continue
            if c == quote:
                quote = ""
            elif c != "\n":
                out[i] = " "
        elif c in "'\"":
            quote = c
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                out[i] = " "
                i += 1
            continue
        i += 1
    return "".join(out)


def upstream_span(text: str, upstream: str, where: str) -> tuple[int, int]:
    """(start, end) of the inside of `upstream NAME { ... }` in `text`."""
    code = _code(text)
    found = [m for m in re.finditer(rf"(?<![\w.-])upstream\s+{re.escape(upstream)}\s*\{{", code)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise LoadBalancerError(f"{where} has {what} `upstream {upstream}` block{'s' if found else ''}")
    depth, start = 1, found[0].end()
    for i in range(start, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return start, i
    raise LoadBalancerError(f"{where}: `upstream {upstream}` has no closing brace")


@dataclass(frozen=True)
class ServerLine:
    address: str
    start: int  # of the parameters, just after the address
    end: int  # of the parameters, at the `;`
    down: bool
    begin: int  # of the directive (its indentation included)
    address_start: int


def server_lines(text: str, upstream: str, where: str) -> dict[str, ServerLine]:
    """The `server` lines of the upstream block, by address."""
    start, end = upstream_span(text, upstream, where)
    code = _code(text)
    lines: dict[str, ServerLine] = {}
    for match in _SERVER_RE.finditer(code, start, end):
        address = text[match.start(2) : match.end(2)]
        params = text[match.start(3) : match.end(3)].split()
        if address in lines:
            raise LoadBalancerError(f"{where}: `upstream {upstream}` lists server {address} twice")
        lines[address] = ServerLine(
            address, match.end(2), match.start(4), "down" in params, match.start(1), match.start(2)
        )
    return lines


def with_down(text: str, upstream: str, address: str, down: bool, where: str) -> str:
    """`text` with only the server line of `address` changed: ` down` added or removed."""
    line = server_lines(text, upstream, where).get(address)
    if line is None:
        raise LoadBalancerError(f"{where}: `upstream {upstream}` has no `server {address}` line")
    if line.down == down:
        return text
    params = text[line.start : line.end]
    if down:
        params = params.rstrip() + " down" + params[len(params.rstrip()) :]
    else:
        params = re.sub(r"[ \t]+down(?=[ \t]|$)", "", params, count=1)
    return text[: line.start] + params + text[line.end :]


def _line(text: str, upstream: str, address: str, where: str) -> ServerLine:
    line = server_lines(text, upstream, where).get(address)
    if line is None:
        raise LoadBalancerError(f"{where}: `upstream {upstream}` has no `server {address}` line")
    return line


def with_server_added(text: str, upstream: str, beside: str, address: str, where: str) -> str:
    """`text` with a `server ADDRESS ... down;` line after `beside`'s line, with its
    parameters (as is, if there is one already)."""
    if address in server_lines(text, upstream, where):
        return text
    line = _line(text, upstream, beside, where)
    directive = text[line.begin : line.address_start] + address + text[line.start : line.end + 1]
    newline = text.find("\n", line.end)
    at = len(text) if newline < 0 else newline
    added = text[:at] + "\n" + directive + text[at:]
    return with_down(added, upstream, address, True, where)


def with_server_renamed(text: str, upstream: str, address: str, new: str, where: str) -> str:
    """`text` with the server line of `address` sending to `new` instead, nothing else changed."""
    line = _line(text, upstream, address, where)
    return text[: line.address_start] + new + text[line.start :]


def without_server(text: str, upstream: str, address: str, where: str) -> str:
    """`text` without the server line of `address` (the whole line, when it holds only that)."""
    line = _line(text, upstream, address, where)  # a server line starts its line
    end = text.find("\n", line.end)
    end = len(text) if end < 0 else end
    if _code(text[line.end + 1 : end]).strip():
        return text[: line.begin] + text[line.end + 1 :]  # another directive on the same line stays
    return text[: line.begin] + text[end + 1 :]


@dataclass(frozen=True)
class NginxServer:
    """One upstream server as the file says and the LB host's connections show."""

    name: str
    drained: bool
    sessions: int

    @property
    def up(self) -> None:
        """Open-source nginx has no active health check to read."""
        return None

    @property
    def in_rotation(self) -> bool:
        return not self.drained

    def describe(self) -> str:
        state = "down (drained)" if self.drained else "in rotation"
        return f"{state}, {self.sessions} connections, health not observable in nginx"


class NginxLoadBalancer:
    """The upstream block `settings.upstream` in `settings.upstream_file` on the LB host."""

    def __init__(self, settings: NginxSettings, host: Executor) -> None:
        self.settings = settings
        self.host = host
        self.where = f"nginx {settings.ssh_host}:{settings.upstream_file}"
        self._edit = threading.Lock()  # batch_size > 1 drains in parallel; edits go one at a time

    # The surge strategy: a server is added as a `down` line after the one it is beside,
    # moved by rewriting its address, removed by deleting its line (each one reload).
    capabilities: frozenset[Capability] = frozenset({"add_server", "move_server", "remove_server"})

    @property
    def backend(self) -> str:
        return f"upstream {self.settings.upstream} in {self.where}"

    def _text(self) -> str:
        try:
            return self.host.read_file(self.settings.upstream_file).decode()
        except (RolloutError, UnicodeDecodeError) as error:
            raise LoadBalancerError(f"{self.where}: cannot read it: {error}") from None

    def servers(self) -> dict[str, NginxServer]:
        lines = server_lines(self._text(), self.settings.upstream, self.where)
        return {address: NginxServer(address, line.down, self._connections(address)) for address, line in lines.items()}

    def server(self, name: str) -> NginxServer:
        line = server_lines(self._text(), self.settings.upstream, self.where).get(name)
        if line is None:
            raise LoadBalancerError(f"{self.where}: `upstream {self.settings.upstream}` has no `server {name}` line")
        return NginxServer(name, line.down, self._connections(name))

    def _connections(self, address: str) -> int:
        return count_connections(self.host, address, self.settings.timeout_seconds, self.where)

    def set_state(self, server: str, state: ServerAction) -> None:
        with self._edit:
            self._change(lambda text: with_down(text, self.settings.upstream, server, state == "drain", self.where))

    def shutdown_sessions(self, server: str) -> None:
        """nginx cannot cut one server's requests; stopping the container does."""

    def recheck(self, server: str) -> bool:
        return False  # no active health check in open-source nginx

    def server_address(self, server: str) -> tuple[str, int]:
        """(host, port) of a server named HOST:PORT (a unix socket or a name without a
        port cannot be followed to another port)."""
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LoadBalancerError(f"{self.where}: server {server!r} is not HOST:PORT; its port cannot be changed")
        return host, int(port)

    def add_server(self, name: str, beside: str, port: int) -> str:
        """A `down` line for `beside`'s host at `port`, after `beside`'s line, with its parameters."""
        host, _ = self.server_address(beside)
        added = f"{host}:{port}"
        with self._edit:
            self._change(lambda text: with_server_added(text, self.settings.upstream, beside, added, self.where))
        return added

    def move_server(self, server: str, port: int) -> str:
        """The drained server's line sends to `port` (or, when there is a line for that
        address already, goes: that one is the server from now on)."""
        host, _ = self.server_address(server)
        target = f"{host}:{port}"
        if target == server:
            return target
        upstream = self.settings.upstream
        with self._edit:
            lines = server_lines(self._text(), upstream, self.where)
            if server not in lines:
                if target in lines:
                    return target  # moved already
                raise LoadBalancerError(f"{self.where}: `upstream {upstream}` has neither {server} nor {target}")
            if not lines[server].down:
                raise LoadBalancerError(f"{self.where}: refusing to move {server}, which is in rotation (not `down`)")
            if target in lines:
                self._change(lambda text: without_server(text, upstream, server, self.where))
            else:
                self._change(lambda text: with_server_renamed(text, upstream, server, target, self.where))
        return target

    def remove_server(self, name: str) -> None:
        """Delete the `down` line of a server with no connection left."""
        upstream = self.settings.upstream
        with self._edit:
            line = server_lines(self._text(), upstream, self.where).get(name)
            if line is None:
                return
            if not line.down:
                raise LoadBalancerError(f"{self.where}: refusing to remove {name}, which is in rotation (not `down`)")
            connections = self._connections(name)
            if connections:
                raise LoadBalancerError(f"{self.where}: refusing to remove {name}: {connections} connections to it")
            self._change(lambda text: without_server(text, upstream, name, self.where))

    def _nginx(self, *args: str) -> list[str]:
        config = ["-c", self.settings.main_config] if self.settings.main_config else []
        return [self.settings.nginx_binary, *config, *args]

    def _change(self, edit: Callable[[str], str]) -> None:
        original = self.host.read_file(self.settings.upstream_file)
        changed = edit(original.decode())
        if changed.encode() == original:
            return
        mode = self.host.file_mode(self.settings.upstream_file)
        timeout = self.settings.reload_timeout_seconds
        self.host.write_file_atomic(self.settings.upstream_file, changed.encode(), mode)
        tested = self.host.run(self._nginx("-t"), timeout=timeout, check=False)
        if not tested.ok:
            self.host.write_file_atomic(self.settings.upstream_file, original, mode)
            raise LoadBalancerError(f"{self.where}: `nginx -t` refused the change, file put back: {_tail(tested)}")
        before = self._workers()
        reloaded = self.host.run(self._nginx("-s", "reload"), timeout=timeout, check=False)
        if not reloaded.ok:
            self.host.write_file_atomic(self.settings.upstream_file, original, mode)
            raise LoadBalancerError(f"{self.where}: `nginx -s reload` failed, file put back: {_tail(reloaded)}")
        self._await_new_workers(before)

    def _workers(self) -> set[str]:
        """PIDs of this nginx's workers that take new connections (not those shutting
        down): the children of its master (the one started with `main_config`, if set)."""
        listed = self.host.run(["ps", "-eo", "pid=,ppid=,args="], timeout=self.settings.timeout_seconds)
        processes = []
        for line in str(listed.stdout).splitlines():
            fields = line.split(None, 2)
            if len(fields) == 3:
                processes.append((fields[0], fields[1], fields[2].strip()))
        masters = [
            pid
            for pid, _, args in processes
            if args.startswith("nginx: master process")
            and (self.settings.main_config is None or self.settings.main_config in args.split())
        ]
        if len(masters) != 1:
            found = "no nginx master process" if not masters else f"{len(masters)} nginx master processes"
            hint = "" if masters == [] or self.settings.main_config else "; set load_balancer.main_config"
            raise LoadBalancerError(f"{self.where}: {found} on the LB host{hint}")
        return {pid for pid, ppid, args in processes if ppid == masters[0] and args == "nginx: worker process"}

    def _await_new_workers(self, before: set[str]) -> None:
        """A reload is a signal: wait until no worker of the old configuration still
        takes new connections (they are gone or `shutting down`)."""
        limit = self.settings.reload_timeout_seconds
        deadline = time.monotonic() + limit
        while before & self._workers():
            if time.monotonic() >= deadline:
                raise LoadBalancerError(
                    f"{self.where}: nginx's old workers still take connections {limit:g} s after reload"
                )
            time.sleep(0.05)


def _tail(result: Result) -> str:
    return (result.stderr.strip() or result.stdout.strip())[-800:] or f"exit code {result.exit_code}"
