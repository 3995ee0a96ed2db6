"""The `command` adapter: values reach the owner's commands only as environment, the
output contract is checked, failures and timeouts are bounded and say what happened.

The commands really run (`sh` through prefect-shell on this machine; for the SSH route,
the argv goes through the same `shlex.join` and `sh -c` an sshd applies)."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose_rollout.config import load_fleet
from compose_rollout.errors import CommandTimeout, ConfigError, LoadBalancerError
from compose_rollout.hosts.shell import LocalShell, RemoteShell, Shell, remote_argv
from compose_rollout.hosts.ssh import Executor, Result
from compose_rollout.lb import adapters
from compose_rollout.lb.command import CommandLoadBalancer, Target, parse_in_flight, parse_state, url_port
from compose_rollout.lb.settings import CommandSettings
from tests.unit.fakes import FakeHost, fleet
from tests.unit.test_config import minimal

FAILS = "echo 'this command should not have run' >&2; exit 99"
VARIABLES = (
    "ROLLOUT_ACTION",
    "ROLLOUT_SERVER",
    "ROLLOUT_INSTANCE",
    "ROLLOUT_HOST",
    "ROLLOUT_PORT",
    "ROLLOUT_HEALTH_URL",
)


def settings(**overrides: Any) -> CommandSettings:
    commands: dict[str, Any] = {"drain": FAILS, "ready": FAILS, "in_flight": FAILS, "state": FAILS}
    return CommandSettings(kind="command", **{**commands, **overrides})


def target(server: str = "app-1") -> Target:
    return Target(server=server, instance="app-1", host="10.0.0.1", port=8080, health_url="http://10.0.0.1:8080/health")


def balancer(shell: Shell | None = None, server: str = "app-1", **overrides: Any) -> CommandLoadBalancer:
    return CommandLoadBalancer(settings(**overrides), [target(server)], shell or LocalShell())


def recorder(path: Path) -> str:
    """A command writing every ROLLOUT_ variable to `path`, NUL-separated (the path is the
    test's own, so it may be in the command's text; the values never are)."""
    return "printf '%s\\0' " + " ".join(f'"${name}"' for name in VARIABLES) + f" > {shlex.quote(str(path))}"


def recorded(path: Path) -> dict[str, str]:
    return dict(zip(VARIABLES, path.read_bytes().decode().split("\0")[:-1], strict=True))


class ShellHost:
    """A host whose `run` does what sshd does with a command: the login shell runs the
    one string `shlex.join(argv)`. Here that shell is this machine's `sh`."""

    name = "lb1"

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result:
        self.commands.append(argv)
        done = subprocess.run(["sh", "-c", shlex.join(argv)], capture_output=True, text=True, timeout=timeout)
        return Result(self.name, shlex.join(argv), done.returncode, done.stdout, done.stderr)


HOSTILE = [
    "app 1",
    "it's",
    'say "hi"',
    "a;touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "a && touch {canary} || touch {canary}",
    "a|touch {canary}",
    "x\ntouch {canary}",
    "-n",
    "x=y",
    "*",
    "$HOME ${PATH} \\ '\"",
]


@pytest.mark.parametrize("route", ["orchestrator", "ssh"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_server_names_reach_the_command_only_as_its_environment(tmp_path: Path, route: str, value: str) -> None:
    canary = tmp_path / "injected"
    server = value.replace("{canary}", str(canary))
    out = tmp_path / "seen"
    shell: Shell = LocalShell() if route == "orchestrator" else RemoteShell(ShellHost())
    lb = balancer(shell, server, drain=recorder(out))

    lb.set_state(server, "drain")

    assert recorded(out) == {
        "ROLLOUT_ACTION": "drain",
        "ROLLOUT_SERVER": server,  # byte for byte
        "ROLLOUT_INSTANCE": "app-1",
        "ROLLOUT_HOST": "10.0.0.1",
        "ROLLOUT_PORT": "8080",
        "ROLLOUT_HEALTH_URL": "http://10.0.0.1:8080/health",
    }
    assert not canary.exists()  # nothing in the value ran


def test_on_the_orchestrator_the_environment_is_inherited_but_the_rollout_values_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROLLOUT_SERVER", "inherited")
    monkeypatch.setenv("LB_API_TOKEN", "from the orchestrator")
    out = tmp_path / "seen"
    balancer(drain=f'printf %s "$ROLLOUT_SERVER/$LB_API_TOKEN" > {shlex.quote(str(out))}').set_state("app-1", "drain")
    assert out.read_text() == "app-1/from the orchestrator"


def test_over_ssh_every_value_is_its_own_argv_element_and_the_command_too() -> None:
    env = {"ROLLOUT_ACTION": "state", "ROLLOUT_SERVER": "a; b $(c)"}
    argv = remote_argv("state", 'echo "$ROLLOUT_SERVER"', env, 5)
    assert argv == [
        "timeout",
        "--kill-after=10",
        "5",
        "env",
        "ROLLOUT_ACTION=state",
        "ROLLOUT_SERVER=a; b $(c)",
        "sh",
        "-c",
        'echo "$ROLLOUT_SERVER"',
        "rollout-state",
    ]


def test_a_nul_byte_no_environment_can_carry_is_refused_before_anything_runs() -> None:
    host = ShellHost()
    lb = balancer(RemoteShell(host), "app\0-1", drain="true")
    with pytest.raises(LoadBalancerError, match="ROLLOUT_SERVER for server 'app\\\\x00-1' holds a NUL byte"):
        lb.set_state("app\0-1", "drain")
    assert host.commands == []


def test_a_server_of_no_instance_is_refused() -> None:
    with pytest.raises(LoadBalancerError, match="no instance of the fleet has lb_server 'app-9'"):
        balancer(drain="true").set_state("app-9", "drain")


@pytest.fixture
def write(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def _write(data: dict[str, Any]) -> Path:
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


def command_fleet(**lb: Any) -> dict[str, Any]:
    data = minimal()
    data["load_balancer"] = {"kind": "command", "drain": "d", "ready": "r", "in_flight": "i", "state": "s", **lb}
    return data


def test_the_fleet_file_refuses_hostile_server_names_before_any_adapter_sees_them(write: Any) -> None:
    data = command_fleet()
    data["instances"][1]["lb_server"] = "app-2; reboot"
    with pytest.raises(ConfigError, match=r"instances\[1\]\.lb_server: invalid LB server name 'app-2; reboot'"):
        load_fleet(write(data))


def test_a_command_section_loads_and_runs_on_the_orchestrator_by_default(write: Any) -> None:
    lb = load_fleet(write(command_fleet(recheck="rc"))).load_balancer
    assert isinstance(lb, CommandSettings)
    assert (lb.drain, lb.recheck, lb.shutdown_sessions, lb.ssh_host, lb.timeout_seconds) == ("d", "rc", None, None, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"state": "  "}, "load_balancer.state: Value error, the state command is blank"),
        ({"drain": ""}, "load_balancer.drain: String should have at least 1 character"),
        ({"ssh_port": 2222}, "ssh_port is set but ssh_host is not: the commands run on the orchestrator"),
        ({"ssh_host": "lb 1"}, "load_balancer.ssh_host: Value error, invalid ssh_host 'lb 1'"),
        ({"admin_address": "tcp://x:1"}, "admin_address is a setting of kind haproxy, not of kind command"),
        ({"ready": None}, "load_balancer.ready"),
    ],
)
def test_a_bad_command_section_is_refused_at_its_path(write: Any, change: dict[str, Any], message: str) -> None:
    data = command_fleet(**change)
    with pytest.raises(ConfigError) as caught:
        load_fleet(write(data))
    assert message.replace("Value error, ", "") in str(caught.value)


def test_a_command_of_kind_command_in_an_haproxy_section_names_its_kind(write: Any) -> None:
    data = minimal()
    data["load_balancer"]["in_flight"] = "echo 0"
    with pytest.raises(ConfigError, match="in_flight is a setting of kind command, not of kind haproxy"):
        load_fleet(write(data))


# --- the output contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("printed", "count"), [("0", 0), ("17\n", 17), ("\n  3  \n\n", 3), ("000", 0)])
def test_in_flight_is_one_non_negative_integer(printed: str, count: int) -> None:
    assert parse_in_flight(printed, "c") == count


@pytest.mark.parametrize("printed", ["", "\n", "-1", "3.5", "three", "1\n2", "12 sessions", "1234567890", "0x10"])
def test_in_flight_printing_anything_else_is_refused_showing_what_it_printed(printed: str) -> None:
    with pytest.raises(LoadBalancerError, match="c broke its output contract: it must print one line with a non-neg"):
        parse_in_flight(printed, "c")


@pytest.mark.parametrize(
    ("printed", "state"),
    [
        ("ready up", (False, True)),
        ("ready unknown", (False, None)),
        ("drained up\n", (True, True)),
        ("  drained \t down  ", (True, False)),
        ("drained unknown", (True, None)),
        ("absent", None),
    ],
)
def test_state_is_admin_then_health_or_absent(printed: str, state: tuple[bool, bool | None] | None) -> None:
    assert parse_state(printed, "c") == state


@pytest.mark.parametrize(
    "printed", ["", "in_rotation up", "READY UP", "ready", "up ready", "ready up now", "ready up\nready up", "drain up"]
)
def test_state_printing_anything_else_is_refused(printed: str) -> None:
    with pytest.raises(LoadBalancerError, match="c broke its output contract: it must print one line, `ready` or"):
        parse_state(printed, "c")


def test_a_contract_violation_names_the_command_the_server_and_the_output() -> None:
    lb = balancer(state="echo 'ready up'", in_flight="echo '12 sessions'")
    with pytest.raises(LoadBalancerError) as caught:
        lb.server("app-1")
    assert str(caught.value).startswith(
        "load balancer command `in_flight` for server 'app-1' (on the orchestrator) broke its output contract"
    )
    assert str(caught.value).endswith("it printed '12 sessions'")


def test_what_the_commands_report_is_what_the_procedure_reads() -> None:
    lb = balancer(state="echo drained up", in_flight="echo 4")
    server = lb.server("app-1")
    assert (server.name, server.drained, server.up, server.in_rotation, server.sessions) == (
        "app-1",
        True,
        True,
        False,
        4,
    )
    assert server.describe() == "drained, up, 4 in flight"
    ready_unknown = balancer(state="echo ready unknown", in_flight="echo 0").server("app-1")
    assert ready_unknown.in_rotation and ready_unknown.up is None  # an LB without a health check
    assert not balancer(state="echo ready down", in_flight="echo 0").server("app-1").in_rotation


def test_a_server_the_lb_calls_absent_is_missing_from_servers_and_refused_by_server(tmp_path: Path) -> None:
    lb = CommandLoadBalancer(
        settings(state='[ "$ROLLOUT_SERVER" = app-2 ] && echo absent || echo ready up', in_flight="echo 0"),
        [target("app-1"), target("app-2")],
        LocalShell(),
    )
    assert list(lb.servers()) == ["app-1"]
    with pytest.raises(LoadBalancerError, match=r"`state` for server 'app-2' .* says the LB has no such server"):
        lb.server("app-2")


def test_optional_commands_run_only_when_given(tmp_path: Path) -> None:
    assert balancer().recheck("app-1") is False
    balancer().shutdown_sessions("app-1")  # nothing to run: the default commands would fail
    out = tmp_path / "seen"
    assert balancer(recheck=recorder(out)).recheck("app-1") is True
    assert recorded(out)["ROLLOUT_ACTION"] == "recheck"
    balancer(shutdown_sessions=recorder(out)).shutdown_sessions("app-1")
    assert recorded(out)["ROLLOUT_ACTION"] == "shutdown_sessions"


# --- failures and timeouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["orchestrator", "ssh"])
def test_a_non_zero_exit_names_command_server_code_and_output_tail_never_the_command_text(route: str) -> None:
    drain = "TOKEN=s3cr3t; for i in 1 2 3 4 5 6 7; do echo line $i; done; echo 'connection refused' >&2; exit 3"
    shell: Shell = LocalShell() if route == "orchestrator" else RemoteShell(ShellHost())
    with pytest.raises(LoadBalancerError) as caught:
        balancer(shell, drain=drain).set_state("app-1", "drain")
    where = "on the orchestrator" if route == "orchestrator" else "on lb1 over SSH"
    assert str(caught.value) == (
        f"load balancer command `drain` for server 'app-1' ({where}) exited 3; last output:\n    connection refused"
    )
    quiet = "for i in 1 2 3 4 5 6 7; do echo line $i; done; exit 2"
    with pytest.raises(LoadBalancerError) as caught:
        balancer(shell, ready=quiet).set_state("app-1", "ready")
    assert str(caught.value).endswith("exited 2; last output:\n" + "\n".join(f"    line {i}" for i in range(3, 8)))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # exited, not yet reaped


@pytest.mark.timeout(30)
def test_a_command_that_hangs_is_stopped_at_its_timeout_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    hangs = f"echo waiting; sleep 30 & echo $! > {shlex.quote(str(pid_file))}; wait"
    lb = balancer(state=hangs, timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(LoadBalancerError) as caught:
        lb.server("app-1")
    assert time.monotonic() - started < 3
    assert str(caught.value) == (
        "load balancer command `state` for server 'app-1' (on the orchestrator) did not finish within 0.5 s "
        "and was stopped; last output:\n    waiting"
    )
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


@pytest.mark.timeout(30)
def test_a_command_that_ignores_sigterm_is_killed_within_the_grace_period() -> None:
    lb = balancer(state="trap '' TERM; sleep 30", timeout_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(LoadBalancerError, match=r"did not finish within 0\.2 s"):
        lb.server("app-1")
    assert time.monotonic() - started < 8


@pytest.mark.timeout(30)
def test_over_ssh_the_host_stops_a_command_at_its_timeout() -> None:
    host = ShellHost()
    lb = balancer(RemoteShell(host), state="echo waiting; sleep 30", timeout_seconds=1)
    started = time.monotonic()
    with pytest.raises(LoadBalancerError, match="on lb1 over SSH\\) did not finish within 1 s and was stopped"):
        lb.server("app-1")
    assert time.monotonic() - started < 5


def test_an_ssh_failure_is_reported_without_the_command_text() -> None:
    host = FakeHost("lb1")

    def hangs(argv: list[str]) -> str:
        raise CommandTimeout("lb1", shlex.join(argv), 15, "partial")

    host.on(["timeout"], hangs)
    lb = balancer(RemoteShell(host), drain="curl -H 'Authorization: Bearer s3cr3t' https://lb/api")
    with pytest.raises(LoadBalancerError) as caught:
        lb.set_state("app-1", "drain")
    assert "s3cr3t" not in str(caught.value)
    assert str(caught.value).startswith(
        "load balancer command `drain` on lb1 over SSH failed: on lb1: `the drain command` did not finish within 15 s"
    )


# --- wiring -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "port"), [("http://h:8080/health", 8080), ("https://h/health", 443), ("http://h/", 80)]
)
def test_rollout_port_is_the_health_urls(url: str, port: int) -> None:
    assert url_port(url) == port


def test_connect_runs_on_the_orchestrator_unless_an_ssh_host_is_given() -> None:
    commands = {"kind": "command", "drain": "d", "ready": "r", "in_flight": "i", "state": "s"}
    asked: list[tuple[str, int | None, str | None]] = []

    def ssh_to(hostname: str, port: int | None, user: str | None) -> Executor:
        asked.append((hostname, port, user))
        return FakeHost(f"lb {hostname}")

    demo = fleet(load_balancer=commands)
    lb, host = adapters.connect(demo.load_balancer, ssh_to, demo.instances)
    assert isinstance(lb, CommandLoadBalancer) and isinstance(lb.shell, LocalShell) and host is None and asked == []
    assert lb.targets["app-2"] == Target("app-2", "app-2", "10.0.0.2", 8080, "http://10.0.0.2:8080/health")

    remote = fleet(load_balancer={**commands, "ssh_host": "10.0.0.9", "ssh_user": "lbadmin"})
    lb, host = adapters.connect(remote.load_balancer, ssh_to, remote.instances)
    assert isinstance(lb, CommandLoadBalancer) and isinstance(lb.shell, RemoteShell)
    assert host is lb.shell.host and asked == [("10.0.0.9", None, "lbadmin")]
    assert lb.backend == "kind: command (on lb 10.0.0.9 over SSH)"
