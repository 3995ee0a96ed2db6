"""HAProxy's admin socket: command texts, parsers fed with real HAProxy 2.6 output, and the client against a
stateful fake stats socket (one command per connection, as HAProxy's non-interactive mode works)."""

from __future__ import annotations

import re
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compose_rollout.errors import LoadBalancerError
from compose_rollout.hosts.ssh import Result
from compose_rollout.lb.haproxy import (
    SHOW_STAT,
    HaproxyClient,
    ServerState,
    parse_servers_state,
    parse_show_stat,
    set_server_state,
    show_servers_state,
    shutdown_sessions,
    socat_argv,
)

# Captured from HAProxy 2.6.12 (`stats socket ... level admin`): backend `app` with app-1 UP holding two
# long requests, app-2 DOWN (connection refused), app-3 UP but drained (`set server app/app-3 state drain`);
# backend `other` has a server that is also called app-1; frontend `web`.
SHOW_STAT_26 = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,"
    "weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,"
    "rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,"
    "hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,"
    "lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,"
    "agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,"
    "conn_rate,conn_rate_max,conn_tot,intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,"
    "srv_icur,src_ilim,qtime_max,ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,"
    "used_conn_cur,need_conn_est,uweight,agg_server_status,agg_server_check_status,agg_check_status,-,"
    "ssl_sess,ssl_reused_sess,ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,"
    "h2_rst_stream_rcvd,h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,"
    "h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,h2_total_connections,"
    "h2_backend_total_streams,h1_open_connections,h1_open_streams,h1_total_connections,h1_total_streams,"
    "h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,h1_spliced_bytes_out,\n"
    "web,FRONTEND,,,2,2,9983,4,0,0,0,0,2,,,,,OPEN,,,,,,,,,1,2,0,,,,0,0,0,2,,,,0,0,0,2,0,0,,0,2,4,,,0,0,0,0,,,"
    ",,,,,,,,,,,,,,,,,,http,,0,2,4,0,0,0,0,,,0,0,,,,,,,0,,,,,,,,,-,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2,2,4,2,"
    "62,414,0,0,\n"
    "app,app-1,0,0,2,2,,2,0,0,,0,,0,0,0,0,UP,1,1,0,1,1,14,1,,1,3,1,,2,,2,0,,2,L7OK,200,0,0,0,0,0,0,0,,,,0,0,"
    "0,,,,,2,,,0,0,0,0,,,,Layer7 check passed,,2,2,3,,,,127.0.0.1:18081,,http,,,,,,,,0,2,0,,,0,,0,0,0,0,0,0,"
    "0,2,3,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n"
    "app,app-2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,14,14,,1,3,2,,0,,2,0,,0,L4CON,,0,0,0,0,0,0,0,,,,0,0,"
    "0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,2,0,,,,127.0.0.1:18082,,http,,,,,,,"
    ",0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n"
    "app,app-3,0,0,0,0,,0,0,0,,0,,0,0,0,0,DRAIN,1,1,0,0,0,10,0,,1,3,3,,0,,2,0,,0,L7OK,301,0,0,0,0,0,0,0,,,,0,"
    "0,0,,,,,-1,,,0,0,0,0,,,,Layer7 check passed,,2,2,3,,,,127.0.0.1:18083,,http,,,,,,,,0,0,0,,,0,,0,0,0,0,0,"
    "0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n"
    "app,BACKEND,0,0,2,2,999,2,0,0,0,0,,0,0,0,0,UP,1,1,0,,0,15,0,,1,3,0,,2,,1,0,,2,,,,0,0,0,0,0,0,,,,0,0,0,0,"
    "0,0,0,2,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,2,0,0,0,,,0,0,0,0,0,,,,,1,0,0,0,-,0,0,0,0,0,0,0,"
    "0,0,0,0,0,0,0,0,0,2,2,211,211,19889,3374,0,0,\n"
    "other,app-1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1,1,0,1,1,13,13,,1,4,1,,0,,2,0,,0,L4CON,,0,0,0,0,0,0,0,,,,0,"
    "0,0,,,,,-1,Connection refused,,0,0,0,0,,,,Layer4 connection problem,,2,3,0,,,,127.0.0.1:18084,,http,,,,,"
    ",,,0,0,0,,,0,,0,0,0,0,0,0,0,0,1,1,,,,-,0,0,0,,,,,,,,,,,,,,,,,,,,,,\n"
    "other,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,DOWN,0,0,0,,1,13,13,,1,4,0,,0,,1,0,,0,,,,0,0,0,0,0,0,,,,0,0,"
    "0,0,0,0,0,-1,,,0,0,0,0,,,,,,,,,,,,,,http,roundrobin,,,,,,,0,0,0,0,0,,,0,0,0,0,0,,,,,0,0,0,0,-,0,0,0,0,0,"
    "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,\n"
    "\n"
)

SERVERS_STATE_APP = (
    "1\n"
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
    "srv_check_addr srv_agent_addr srv_agent_port\n"
    "3 app 1 app-1 127.0.0.1 2 0 1 1 14 15 3 3 6 0 0 0 - 18081 - 0 0 - - 0\n"
    "3 app 2 app-2 127.0.0.1 0 0 1 1 14 8 2 0 6 0 0 0 - 18082 - 0 0 - - 0\n"
    "3 app 3 app-3 127.0.0.1 2 8 1 1 10 15 3 3 6 0 0 0 - 18083 - 0 0 - - 0\n"
    "\n"
)

SERVERS_STATE_MAINT = (
    "1\n"
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
    "srv_check_addr srv_agent_addr srv_agent_port\n"
    "3 app 1 app-1 127.0.0.1 2 0 1 1 17 15 3 3 6 0 0 0 - 18081 - 0 0 - - 0\n"
    "3 app 2 app-2 127.0.0.1 0 1 1 1 17 8 2 0 14 0 0 0 - 18082 - 0 0 - - 0\n"
    "3 app 3 app-3 127.0.0.1 2 8 1 1 13 15 3 3 6 0 0 0 - 18083 - 0 0 - - 0\n"
    "\n"
)

# (same HAProxy) `show servers state` with no backend argument lists every backend.
SERVERS_STATE_ALL = (
    SERVERS_STATE_APP.rstrip("\n") + "\n4 other 1 app-1 127.0.0.1 0 0 1 1 4 8 2 0 6 0 0 0 - 18084 - 0 0 - - 0\n\n"
)

SERVERS_STATE_HEADER = SERVERS_STATE_APP.splitlines()[1]
SHOW_STAT_HEADER = SHOW_STAT_26.splitlines()[0]
DRAIN, MAINT = 0x08, 0x01


def state_of(name: str, servers_state: str = SERVERS_STATE_APP, backend: str = "app") -> ServerState:
    """A ServerState assembled from the captured outputs, the way HaproxyClient.servers() combines them."""
    op_state, admin_state = parse_servers_state(servers_state, backend)[name]
    row = parse_show_stat(SHOW_STAT_26, backend)[name]
    return ServerState(name, op_state, admin_state, int(row["scur"] or 0), row["check_status"])


# --- command texts ------------------------------------------------------------------------------------------------


def test_command_texts_follow_haproxy_syntax():
    assert set_server_state("app", "app-1", "drain") == "set server app/app-1 state drain"
    assert set_server_state("app", "app-1", "ready") == "set server app/app-1 state ready"
    assert set_server_state("app", "app-1", "maint") == "set server app/app-1 state maint"
    assert shutdown_sessions("app", "app-2") == "shutdown sessions server app/app-2"
    assert show_servers_state("app") == "show servers state app"
    assert SHOW_STAT == "show stat"


# --- parse_show_stat ----------------------------------------------------------------------------------------------


def test_show_stat_rows_of_one_backend_without_frontend_and_backend_totals():
    rows = parse_show_stat(SHOW_STAT_26, "app")
    assert set(rows) == {"app-1", "app-2", "app-3"}
    assert {name: (row["scur"], row["status"], row["check_status"]) for name, row in rows.items()} == {
        "app-1": ("2", "UP", "L7OK"),
        "app-2": ("0", "DOWN", "L4CON"),
        "app-3": ("0", "DRAIN", "L7OK"),
    }
    assert rows["app-2"]["check_desc"] == "Layer4 connection problem"


def test_show_stat_keeps_same_named_servers_of_other_backends_apart():
    rows = parse_show_stat(SHOW_STAT_26, "other")
    assert set(rows) == {"app-1"}
    assert rows["app-1"]["status"] == "DOWN"
    assert rows["app-1"]["addr"] == "127.0.0.1:18084"


def test_show_stat_of_a_frontend_or_unknown_backend_is_empty():
    assert parse_show_stat(SHOW_STAT_26, "web") == {}
    assert parse_show_stat(SHOW_STAT_26, "nope") == {}


def test_show_stat_of_a_listen_section_skips_its_frontend_and_backend_rows():
    # A `listen app` section reports FRONTEND, its servers and BACKEND under the same proxy name.
    text = (
        "# pxname,svname,scur,status,check_status,\n"
        "app,FRONTEND,5,OPEN,,\n"
        "app,app-1,3,UP,L7OK,\n"
        "app,app-2,2,UP,L7OK,\n"
        "app,BACKEND,5,UP,,\n"
    )
    assert {name: row["scur"] for name, row in parse_show_stat(text, "app").items()} == {"app-1": "3", "app-2": "2"}


# --- parse_servers_state ------------------------------------------------------------------------------------------


def test_servers_state_of_one_backend():
    assert parse_servers_state(SERVERS_STATE_APP, "app") == {"app-1": (2, 0), "app-2": (0, 0), "app-3": (2, 8)}


def test_servers_state_filters_the_backend_when_all_are_listed():
    assert parse_servers_state(SERVERS_STATE_ALL, "app") == {"app-1": (2, 0), "app-2": (0, 0), "app-3": (2, 8)}
    assert parse_servers_state(SERVERS_STATE_ALL, "other") == {"app-1": (0, 0)}


def test_servers_state_of_a_server_in_maintenance():
    assert parse_servers_state(SERVERS_STATE_MAINT, "app")["app-2"] == (0, MAINT)


def test_servers_state_without_servers_is_empty():
    assert parse_servers_state(f"1\n{SERVERS_STATE_HEADER}\n\n", "app") == {}


@pytest.mark.parametrize("answer", ["Can't find backend.\n\n", "", "Permission denied\n\n", "1\n"])
def test_servers_state_error_answer_raises(answer: str):
    with pytest.raises(LoadBalancerError, match="show servers state"):
        parse_servers_state(answer, "app")


# --- ServerState --------------------------------------------------------------------------------------------------


def test_server_in_rotation():
    server = state_of("app-1")
    assert server.up and server.in_rotation
    assert not server.drained and not server.in_maintenance
    assert server.sessions == 2
    assert server.describe() == "UP/READY, 2 sessions, check L7OK"


def test_drained_server_is_up_but_out_of_rotation():
    server = state_of("app-3")
    assert server.admin_state == 8
    assert server.up and server.drained
    assert not server.in_rotation
    assert server.describe() == "UP/DRAIN, 0 sessions, check L7OK"


def test_down_server_is_out_of_rotation():
    server = state_of("app-2")
    assert not server.up and not server.in_rotation and not server.drained
    assert server.describe() == "DOWN/READY, 0 sessions, check L4CON"


def test_server_in_maintenance():
    server = state_of("app-2", SERVERS_STATE_MAINT)
    assert server.in_maintenance and not server.in_rotation
    assert server.describe() == "DOWN/MAINT, 0 sessions, check L4CON"


@pytest.mark.parametrize(
    ("op_state", "admin_state", "in_rotation"),
    [
        (2, 0x00, True),
        (2, 0x04, True),  # `disabled` in the config, then `set server ... state ready` (HAProxy 2.6 shows 4)
        (2, 0x0C, False),  # the same server then drained (HAProxy 2.6 shows 12)
        (2, 0x10, False),  # drain inherited from a tracked server
        (2, 0x01, False),  # forced maintenance
        (2, 0x02, False),  # maintenance inherited from a tracked server
        (2, 0x20, False),  # maintenance because its address could not be resolved
        (0, 0x00, False),  # checks fail
        (1, 0x00, False),  # starting
        (3, 0x00, False),  # stopping
    ],
)
def test_in_rotation_by_operational_and_admin_state(op_state: int, admin_state: int, in_rotation: bool):
    assert ServerState("app-1", op_state, admin_state, 0, "").in_rotation is in_rotation


def test_describe_without_check_status():
    assert ServerState("app-1", 1, 0, 4, "").describe() == "STARTING/READY, 4 sessions"


# --- a stateful fake stats socket ---------------------------------------------------------------------------------


class FakeHaproxy:
    """Answers like HAProxy 2.6's stats socket: one command per connection, then close; an empty line for a
    successful `set server`/`shutdown sessions`, an error text otherwise."""

    def __init__(self, backend: str = "app", level: str = "admin") -> None:
        self.backend = backend
        self.level = level
        self.lock = threading.Lock()
        self.received: list[bytes] = []
        # name -> [op_state, admin_state, sessions, check_status]
        self.servers: dict[str, list] = {
            "app-1": [2, 0, 3, "L7OK"],
            "app-2": [2, 0, 1, "L7OK"],
            "app-3": [0, 0, 0, "L4CON"],
        }
        self.other_backend = {"app-1": [2, 0, 42, "L7OK"]}
        self.override: Callable[[str], bytes] | None = None

    def handle(self, raw: bytes) -> bytes:
        with self.lock:
            self.received.append(raw)
            if self.override is not None:
                return self.override(raw.decode())
            return self._answer(raw.decode().strip()).encode()

    def _answer(self, command: str) -> str:
        words = command.split()
        if words[:2] == ["show", "stat"]:
            return self._show_stat()
        if words[:3] == ["show", "servers", "state"]:
            if len(words) == 4 and words[3] != self.backend:
                return "Can't find backend.\n\n"
            return self._servers_state()
        if words[:2] == ["set", "server"] and len(words) == 5 and words[3] == "state":
            server = self._server(words[2])
            if isinstance(server, str):
                return server
            if words[4] == "ready":
                server[1] &= ~(DRAIN | MAINT)
            elif words[4] == "drain":
                server[1] = (server[1] | DRAIN) & ~MAINT
            elif words[4] == "maint":
                server[1] |= MAINT
            else:
                return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n"
            return "\n"
        if words[:3] == ["shutdown", "sessions", "server"] and len(words) == 4:
            server = self._server(words[3])
            if isinstance(server, str):
                return server
            server[2] = 0
            return "\n"
        return "Unknown command. Please enter one of the following commands only :\n  help : this message\n\n"

    def _server(self, target: str) -> list | str:
        if self.level != "admin":
            return "Permission denied\n\n"
        backend, _, name = target.partition("/")
        if backend != self.backend:
            return "No such backend.\n\n"
        if name not in self.servers:
            return "No such server.\n\n"
        return self.servers[name]

    def _servers_state(self) -> str:
        lines = ["1", SERVERS_STATE_HEADER]
        for number, (name, (op, admin, _sessions, _check)) in enumerate(self.servers.items(), start=1):
            lines.append(
                f"3 {self.backend} {number} {name} 10.0.0.{number} {op} {admin} 1 1 5 15 3 3 6 0 0 0 - 8080 - 0 0 - - 0"
            )
        return "\n".join(lines) + "\n\n"

    def _show_stat(self) -> str:
        columns = SHOW_STAT_HEADER.lstrip("# ").split(",")

        def row(pxname: str, svname: str, scur: int, status: str, check: str) -> str:
            values = dict.fromkeys(columns, "")
            values.update(pxname=pxname, svname=svname, scur=str(scur), status=status, check_status=check)
            return ",".join(values[column] for column in columns)

        def status(op: int, admin: int) -> str:
            return "MAINT" if admin & MAINT else "DRAIN" if admin & DRAIN and op == 2 else "UP" if op == 2 else "DOWN"

        rows = [SHOW_STAT_HEADER, row("web", "FRONTEND", 99, "OPEN", "")]
        for name, (op, admin, sessions, check) in self.servers.items():
            rows.append(row(self.backend, name, sessions, status(op, admin), check))
        rows.append(row(self.backend, "BACKEND", sum(s[2] for s in self.servers.values()), "UP", ""))
        for name, (op, admin, sessions, check) in self.other_backend.items():
            rows.append(row("other", name, sessions, status(op, admin), check))
        return "\n".join(rows) + "\n\n"


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        raw = self.rfile.readline(65536)
        self.wfile.write(self.server.fake.handle(raw))  # type: ignore[attr-defined]


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A directory with a path short enough for a unix socket (sun_path holds 107 bytes;
    pytest's tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="lb-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture(params=["tcp", "unix"])
def lb(request: pytest.FixtureRequest, short_directory: Path) -> Iterator[tuple[FakeHaproxy, str]]:
    """A running fake stats socket and its admin address (`tcp://127.0.0.1:PORT` or `unix:///...`)."""
    fake = FakeHaproxy()
    if request.param == "tcp":
        server: socketserver.BaseServer = _TcpServer(("127.0.0.1", 0), _Handler)
        address = f"tcp://127.0.0.1:{server.server_address[1]}"
    else:
        path = short_directory / "admin.sock"
        server = _UnixServer(str(path), _Handler)
        address = f"unix://{path}"
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield fake, address
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def client_for(lb: tuple[FakeHaproxy, str], backend: str = "app") -> HaproxyClient:
    return HaproxyClient(lb[1], backend, timeout=2.0)


# --- the client ---------------------------------------------------------------------------------------------------


def test_set_state_sends_exactly_one_command_line(lb):
    fake, _ = lb
    client_for(lb).set_state("app-1", "drain")
    assert fake.received == [b"set server app/app-1 state drain\n"]
    assert fake.servers["app-1"][1] & DRAIN


def test_drain_then_ready_as_seen_through_the_client(lb):
    fake, _ = lb
    client = client_for(lb)
    assert client.server("app-1").in_rotation
    client.set_state("app-1", "drain")
    drained = client.server("app-1")
    assert drained.drained and drained.up and not drained.in_rotation
    assert client.server("app-2").in_rotation  # only the named server changed
    client.set_state("app-1", "ready")
    assert client.server("app-1").in_rotation
    assert fake.received.count(b"set server app/app-1 state ready\n") == 1


def test_maint_then_ready(lb):
    client = client_for(lb)
    client.set_state("app-2", "maint")
    assert client.server("app-2").in_maintenance
    client.set_state("app-2", "ready")
    assert client.server("app-2").in_rotation


def test_refused_command_raises_with_haproxys_text(lb):
    fake, _ = lb
    with pytest.raises(LoadBalancerError) as caught:
        client_for(lb).set_state("app-9", "drain")
    assert "No such server." in str(caught.value)
    assert "set server app/app-9 state drain" in str(caught.value)
    assert all(server[1] == 0 for server in fake.servers.values())


def test_unknown_backend_is_refused(lb):
    client = client_for(lb, backend="nope")
    with pytest.raises(LoadBalancerError, match=r"No such backend\."):
        client.set_state("app-1", "drain")
    with pytest.raises(LoadBalancerError, match="Can't find backend"):
        client.servers()


def test_backend_without_servers_is_refused(lb):
    fake, _ = lb
    fake.servers.clear()
    with pytest.raises(LoadBalancerError, match="'app'"):
        client_for(lb).servers()


def test_socket_without_admin_level_is_refused(lb):
    fake, _ = lb
    fake.level = "user"
    with pytest.raises(LoadBalancerError, match="Permission denied"):
        client_for(lb).set_state("app-1", "drain")
    with pytest.raises(LoadBalancerError, match="Permission denied"):
        client_for(lb).shutdown_sessions("app-1")


def test_servers_combines_state_and_stat(lb):
    fake, _ = lb
    fake.servers["app-2"][1] = DRAIN
    servers = client_for(lb).servers()
    assert fake.received == [b"show servers state app\n", b"show stat\n"]
    assert servers == {
        "app-1": ServerState("app-1", 2, 0, 3, "L7OK"),
        "app-2": ServerState("app-2", 2, DRAIN, 1, "L7OK"),
        "app-3": ServerState("app-3", 0, 0, 0, "L4CON"),
    }
    # `other/app-1` has 42 sessions: it must not leak into `app/app-1`.
    assert servers["app-1"].sessions == 3


def test_server_missing_from_show_stat_counts_zero_sessions(lb):
    fake, _ = lb
    fake.override = lambda command: (
        fake._servers_state() if command.startswith("show servers state") else SHOW_STAT_HEADER + "\n\n"
    ).encode()
    servers = client_for(lb).servers()
    assert {name: (server.sessions, server.check_status) for name, server in servers.items()} == {
        "app-1": (0, ""),
        "app-2": (0, ""),
        "app-3": (0, ""),
    }


def test_shutdown_sessions_cuts_what_is_left(lb):
    fake, _ = lb
    client = client_for(lb)
    assert client.server("app-1").sessions == 3
    client.shutdown_sessions("app-1")
    assert fake.received[-1] == b"shutdown sessions server app/app-1\n"
    assert client.server("app-1").sessions == 0
    assert client.server("app-2").sessions == 1


def test_unknown_server_name(lb):
    with pytest.raises(LoadBalancerError, match="'app-9'"):
        client_for(lb).server("app-9")


def test_each_command_uses_its_own_connection(lb):
    fake, _ = lb
    client = client_for(lb)
    for _ in range(3):
        assert client.command("show stat").startswith("# pxname,svname,")
    assert fake.received == [b"show stat\n"] * 3


def test_oversized_answer_is_refused(lb):
    fake, _ = lb
    fake.override = lambda command: b"x" * (4 * 1024 * 1024 + 1)
    with pytest.raises(LoadBalancerError, match="too large"):
        client_for(lb).command("show stat")


# --- unreachable or silent sockets --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tcp_address_is_named():
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(LoadBalancerError) as caught:
        HaproxyClient(address, "app", timeout=1.0).set_state("app-1", "drain")
    assert address in str(caught.value)
    assert "unreachable" in str(caught.value)


def test_missing_unix_socket_is_named(tmp_path: Path):
    address = f"unix://{tmp_path / 'missing.sock'}"
    with pytest.raises(LoadBalancerError) as caught:
        HaproxyClient(address, "app", timeout=1.0).servers()
    assert address in str(caught.value)


def test_silent_socket_times_out():
    # A listener that accepts the connection (backlog) but never answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(LoadBalancerError) as caught:
            HaproxyClient(address, "app", timeout=0.1).set_state("app-1", "drain")
    assert address in str(caught.value)
    assert "set server app/app-1 state drain" in str(caught.value)


# --- ssh:// addresses: the socket path reaches socat's address syntax ----------------------------------------------


class RecordingHost:
    """An LB host that records what it is asked to run and answers like socat would."""

    def __init__(self, answer: str = "") -> None:
        self.answer = answer
        self.runs: list[tuple[list[str], bytes]] = []

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result:
        self.runs.append((argv, stdin))
        return Result("lb", " ".join(argv), 0, self.answer, "")


def test_ssh_address_runs_socat_on_the_socket_path():
    host = RecordingHost(answer="")
    HaproxyClient("ssh://lb:2222/run/haproxy/admin.sock", "app", timeout=2.0, host=host).set_state("app-1", "drain")
    assert host.runs == [
        (["socat", "-t2", "-", "UNIX-CONNECT:/run/haproxy/admin.sock"], b"set server app/app-1 state drain\n")
    ]


HOSTILE_SOCKET_PATHS = [
    "/run/haproxy.sock,fork",  # `,` starts socat options
    "/tmp/x,exec=/bin/sh",
    "/run/a.sock!!EXEC:id",  # `!!` splits socat's read and write addresses
    "/run/a:b",  # `:` separates an address type from its parameters
    "/run/admin sock",
    "/run/'admin'.sock",
    '/run/"admin".sock',
    "/run/a\\,b.sock",
    "/run/a\nb.sock",
    "/run/a;id",
    "/run/haproxy/",
]


@pytest.mark.parametrize("path", HOSTILE_SOCKET_PATHS)
def test_hostile_ssh_socket_path_is_refused_before_anything_runs(path: str):
    host = RecordingHost()
    with pytest.raises(LoadBalancerError, match=re.escape(repr(path))):
        HaproxyClient(f"ssh://lb{path}", "app", timeout=2.0, host=host)
    assert host.runs == []


@pytest.mark.parametrize("path", [*HOSTILE_SOCKET_PATHS, "run/relative.sock", ""])
def test_socat_argv_refuses_a_hostile_socket_path(path: str):
    with pytest.raises(LoadBalancerError, match=re.escape(repr(path))):
        socat_argv(path, 2.0)


def test_ssh_address_without_a_socket_path_is_refused():
    with pytest.raises(LoadBalancerError, match=r"ssh://lb:2222 .*needs the socket's path"):
        HaproxyClient("ssh://lb:2222", "app", timeout=2.0, host=RecordingHost())
