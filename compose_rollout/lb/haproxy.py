"""HAProxy through its admin (stats) socket: drain, ready, and what it sees.

Command builders and parsers are pure; `HaproxyClient` sends one command per
connection, as HAProxy's non-interactive mode expects, with a timeout on each.
"""

from __future__ import annotations

import csv
import io
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from compose_rollout.errors import LoadBalancerError, RolloutError
from compose_rollout.lb.base import Capability

AdminState = Literal["ready", "drain", "maint"]

# srv_op_state in `show servers state` (HAProxy's enum srv_state).
OP_STOPPED, OP_STARTING, OP_RUNNING, OP_STOPPING = 0, 1, 2, 3
# srv_admin_state bits (HAProxy's enum srv_admin).
ADMF_MAINT_MASK = 0x01 | 0x02 | 0x20  # forced, inherited, DNS-resolution maintenance
ADMF_DRAIN_MASK = 0x08 | 0x10  # forced, inherited drain
_OP_NAMES = {OP_STOPPED: "DOWN", OP_STARTING: "STARTING", OP_RUNNING: "UP", OP_STOPPING: "STOPPING"}
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerState:
    """One server as HAProxy sees it: check result, admin state, active sessions."""

    name: str
    op_state: int
    admin_state: int
    sessions: int
    check_status: str

    @property
    def up(self) -> bool:
        """The health checks pass (whatever the admin state)."""
        return self.op_state == OP_RUNNING

    @property
    def drained(self) -> bool:
        return bool(self.admin_state & ADMF_DRAIN_MASK)

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & ADMF_MAINT_MASK)

    @property
    def in_rotation(self) -> bool:
        """Up and taking new connections."""
        return self.up and not self.drained and not self.in_maintenance

    def describe(self) -> str:
        admin = "MAINT" if self.in_maintenance else "DRAIN" if self.drained else "READY"
        check = f", check {self.check_status}" if self.check_status else ""
        return f"{_OP_NAMES.get(self.op_state, self.op_state)}/{admin}, {self.sessions} sessions{check}"


def set_server_state(backend: str, server: str, state: AdminState) -> str:
    """The admin command that puts a server in `state`."""
    return f"set server {backend}/{server} state {state}"


def shutdown_sessions(backend: str, server: str) -> str:
    """The admin command that cuts every session still open on a server."""
    return f"shutdown sessions server {backend}/{server}"


def force_health_down(backend: str, server: str) -> str:
    """The admin command that marks a server DOWN until its health check passes `rise` times."""
    return f"set server {backend}/{server} health down"


def show_servers_state(backend: str) -> str:
    return f"show servers state {backend}"


SHOW_STAT = "show stat"


def parse_show_stat(text: str, backend: str) -> dict[str, dict[str, str]]:
    """`show stat` CSV rows of `backend`'s servers, by server name."""
    body = text.lstrip("# ")
    rows = csv.DictReader(io.StringIO(body))
    return {
        row["svname"]: row
        for row in rows
        if row.get("pxname") == backend and row.get("svname") not in ("BACKEND", "FRONTEND")
    }


def parse_servers_rows(text: str, backend: str) -> dict[str, dict[str, str]]:
    """`show servers state` rows of `backend`'s servers (srv_op_state, srv_addr, srv_port, ...), by name."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("#")), None)
    if header is None:
        raise LoadBalancerError(f"unexpected `show servers state` output: {text[:200]!r}")
    columns = header.lstrip("# ").split()
    rows = {}
    for line in lines:
        if line.startswith("#") or line.strip().isdigit():
            continue
        fields = dict(zip(columns, line.split(), strict=False))
        if fields.get("be_name") == backend:
            rows[fields["srv_name"]] = fields
    return rows


def parse_servers_state(text: str, backend: str) -> dict[str, tuple[int, int]]:
    """(op_state, admin_state) per server from `show servers state`."""
    return {
        name: (int(row["srv_op_state"]), int(row["srv_admin_state"]))
        for name, row in parse_servers_rows(text, backend).items()
    }


def add_server(backend: str, server: str, address: str, port: int, check: tuple[int, int, int], weight: int) -> str:
    """The command that adds a health-checked server (HAProxy 2.5+; in maintenance until enabled)."""
    inter, rise, fall = check
    return f"add server {backend}/{server} {address}:{port} check inter {inter} rise {rise} fall {fall} weight {weight}"


def set_server_port(backend: str, server: str, address: str, port: int) -> str:
    """The command that sends a server's requests (and checks) to another port."""
    return f"set server {backend}/{server} addr {address} port {port}"


class RemoteRunner(Protocol):
    """What the SSH route needs from a host (hosts.ssh.SshHost is one)."""

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Any: ...


# socat parses the socket path as part of its own address syntax: `,` starts options
# (`,fork`, `,exec=...`), `!!` splits read and write addresses, `:` ends an address type,
# quotes and `\` escape. Shell quoting does not help there; only a conservative character
# set keeps the path a file name.
SOCKET_PATH_RE = re.compile(r"(/[A-Za-z0-9._-]+)+")


def check_socket_path(path: str) -> str:
    """`path` if it is safe to give socat as a unix socket, else a LoadBalancerError naming it."""
    if not SOCKET_PATH_RE.fullmatch(path):
        raise LoadBalancerError(
            f"HAProxy admin socket path {path!r} is refused: it must be an absolute path of letters, "
            "digits and . _ - / only (socat would read , ! : quotes, backslashes or spaces as its own syntax)"
        )
    return path


def ssh_socket_path(address: str) -> str:
    """The unix socket path of an `ssh://HOST[:PORT]/path` address, checked."""
    _, slash, path = address.removeprefix("ssh://").partition("/")
    if not slash:
        raise LoadBalancerError(
            f"{address} is refused: an ssh:// address needs the socket's path (ssh://HOST[:PORT]/path)"
        )
    return check_socket_path("/" + path)


def socat_argv(socket_path: str, timeout: float) -> list[str]:
    """Talk to a unix socket on the LB host: stdin to the socket, the answer to stdout."""
    return ["socat", f"-t{max(1, round(timeout))}", "-", f"UNIX-CONNECT:{check_socket_path(socket_path)}"]


class HaproxyClient:
    """HAProxy's admin socket at `tcp://HOST:PORT`, `unix:///path`, or a unix socket on
    the LB host reached over SSH (`ssh://HOST[:PORT]/path`, given its `host` executor)."""

    def __init__(
        self,
        address: str,
        backend: str,
        timeout: float,
        host: RemoteRunner | None = None,
        surge_check: tuple[int, int, int] = (2000, 2, 3),
    ) -> None:
        self.address = address
        self.name = backend
        self.timeout = timeout
        self.host = host
        self.surge_check = surge_check
        self._socket_path = ""
        if address.startswith("ssh://"):
            if host is None:
                raise LoadBalancerError(f"{address}: an SSH address needs the LB host's connection")
            self._socket_path = ssh_socket_path(address)  # refused here, before any command runs

    capabilities: frozenset[Capability] = frozenset(
        {"response_counters", "add_server", "move_server", "remove_server", "weights"}
    )

    def weight(self, server: str) -> int:
        """The server's current weight (`get weight` answers `CURRENT (initial INITIAL)`)."""
        answer = self.command(f"get weight {self.name}/{server}").strip()
        first = answer.split(" ", 1)[0]
        if not first.isdigit():
            raise LoadBalancerError(f"HAProxy answered `get weight {self.name}/{server}` with {answer!r}")
        return int(first)

    def set_weight(self, server: str, weight: int) -> None:
        """`set weight` (0-256)."""
        if not 0 <= weight <= 256:
            raise LoadBalancerError(f"HAProxy weights go from 0 to 256, not {weight}")
        self._act(f"set weight {self.name}/{server} {weight}")

    @property
    def backend(self) -> str:
        return f"HAProxy backend {self.name}"

    def response_counts(self, server: str) -> dict[str, int]:
        """The server's `hrsp_1xx` ... `hrsp_5xx` and `hrsp_other` counters (`show stat`)."""
        row = parse_show_stat(self.command(SHOW_STAT), self.name).get(server)
        if row is None:
            raise LoadBalancerError(f"{self.backend} has no server {server!r}")
        kinds = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")
        return {kind: int(row.get(f"hrsp_{kind}") or 0) for kind in kinds}

    def _open(self) -> socket.socket:
        if self.address.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = self.address[len("unix://") :]
        else:
            host, _, port = self.address[len("tcp://") :].rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        sock.settimeout(self.timeout)
        try:
            sock.connect(target)
        except OSError as error:
            sock.close()
            raise LoadBalancerError(f"HAProxy admin socket {self.address} unreachable: {error}") from None
        return sock

    def command(self, text: str) -> str:
        """Send one command; return HAProxy's answer."""
        if self.host is not None:
            try:
                result = self.host.run(
                    socat_argv(self._socket_path, self.timeout), timeout=self.timeout + 5, stdin=text.encode() + b"\n"
                )
            except RolloutError as error:
                raise LoadBalancerError(f"HAProxy admin socket {self.address} unreachable: {error}") from None
            return str(result.stdout)
        with self._open() as sock:
            try:
                sock.sendall(text.encode() + b"\n")
                chunks = []
                received = 0
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                    received += len(chunk)
                    if received > MAX_RESPONSE_BYTES:
                        raise LoadBalancerError(f"HAProxy answer to `{text}` is too large")
            except OSError as error:
                raise LoadBalancerError(f"HAProxy admin socket {self.address}: `{text}` failed: {error}") from None
        return b"".join(chunks).decode(errors="replace")

    def _act(self, text: str) -> None:
        answer = self.command(text).strip()
        if answer:  # admin commands answer nothing on success
            raise LoadBalancerError(f"HAProxy refused `{text}`: {answer}")

    def set_state(self, server: str, state: AdminState) -> None:
        """Put `server` in `state` (drain: no new connections; ready: back in rotation)."""
        self._act(set_server_state(self.name, server, state))

    def shutdown_sessions(self, server: str) -> None:
        """Cut the sessions still open on `server`."""
        self._act(shutdown_sessions(self.name, server))

    def recheck(self, server: str) -> bool:
        """Mark `server` DOWN so HAProxy needs `rise` passing checks of what runs now."""
        if not self.server(server).check_status:  # no `check` on this server: it never goes DOWN
            return False
        self._act(force_health_down(self.name, server))
        return True

    def _row(self, server: str) -> dict[str, str]:
        row = parse_servers_rows(self.command(show_servers_state(self.name)), self.name).get(server)
        if row is None:
            raise LoadBalancerError(f"{self.backend} has no server {server!r}")
        return row

    def server_address(self, server: str) -> tuple[str, int]:
        """(address, port) HAProxy sends `server`'s requests to."""
        row = self._row(server)
        return row["srv_addr"], int(row["srv_port"])

    def add_server(self, name: str, beside: str, port: int) -> str:
        """Add `name` at `beside`'s address and `port`: drained, its check enabled and
        forced DOWN, so it is UP only after `rise` checks of what listens there."""
        row = self._row(beside)
        if row.get("srv_use_ssl") == "1":
            raise LoadBalancerError(
                f"{self.backend}: server {beside} uses TLS; the surge strategy adds plain servers only"
            )
        command = add_server(self.name, name, row["srv_addr"], port, self.surge_check, int(row["srv_uweight"]))
        answer = self.command(command).strip()
        if answer != "New server registered.":
            raise LoadBalancerError(f"HAProxy refused `{command}`: {answer}")
        self._act(set_server_state(self.name, name, "drain"))  # out of maintenance: checked, no new requests
        self._act(f"enable health {self.name}/{name}")
        self._act(force_health_down(self.name, name))
        return name

    def move_server(self, server: str, port: int) -> str:
        """Send `server`'s requests and checks to `port` at the same address; it keeps its name."""
        address, _ = self.server_address(server)
        command = set_server_port(self.name, server, address, port)
        answer = self.command(command).strip()
        # On success HAProxy says what changed ("no need to change the addr, port changed from ...").
        if "changed" not in answer:
            raise LoadBalancerError(f"HAProxy refused `{command}`: {answer}")
        return server

    def remove_server(self, name: str) -> None:
        """Put `name` in maintenance and delete it; HAProxy refuses while it still has
        connections (also idle ones it keeps for reuse), so it is asked again for up to
        `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        while True:
            if name not in parse_servers_rows(self.command(show_servers_state(self.name)), self.name):
                return
            self._act(set_server_state(self.name, name, "maint"))
            answer = self.command(f"del server {self.name}/{name}").strip()
            if answer in ("Server deleted.", "No such server."):
                return
            if time.monotonic() >= deadline:
                raise LoadBalancerError(f"HAProxy did not delete server {self.name}/{name}: {answer}")
            time.sleep(0.2)

    def servers(self) -> dict[str, ServerState]:
        """Every server of the backend as HAProxy sees it now."""
        states = parse_servers_state(self.command(show_servers_state(self.name)), self.name)
        if not states:
            raise LoadBalancerError(f"HAProxy has no backend {self.name!r} (or it has no servers)")
        stats = parse_show_stat(self.command(SHOW_STAT), self.name)
        return {
            name: ServerState(
                name=name,
                op_state=op_state,
                admin_state=admin_state,
                sessions=int(stats.get(name, {}).get("scur") or 0),
                check_status=stats.get(name, {}).get("check_status", ""),
            )
            for name, (op_state, admin_state) in states.items()
        }

    def server(self, name: str) -> ServerState:
        """One server of the backend."""
        servers = self.servers()
        if name not in servers:
            raise LoadBalancerError(f"{self.backend} has no server {name!r}")
        return servers[name]
