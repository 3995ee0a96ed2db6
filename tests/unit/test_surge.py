"""Surge preflight: a service that cannot run twice on its host is refused, naming the
exact problem, before anything is touched (fake host and LB; the real rollout is in
tests/fleet/test_surge.py). And the ports a container got, read from `docker inspect`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from compose_rollout import procedure, surge
from compose_rollout.context import Context
from compose_rollout.errors import PreflightError
from compose_rollout.hosts import commands
from compose_rollout.lb.base import Capability
from compose_rollout.ports import Ports, host_ports, published_range, reached_at
from compose_rollout.state.journal import InstanceRecord, Ledger
from tests.unit.fakes import FakeClock, FakeHost, FakeLB, FakeServer, fleet

RANGE_COMPOSE = """services:
  server:
    image: registry.example/demo/app:v1
    ports: ["10.0.0.1:8080-8081:8080"]
"""


class SurgeLB(FakeLB):
    """The fake LB, able to add servers; each server sends to 10.0.0.1:8080."""

    capabilities: frozenset[Capability] = frozenset({"add_server", "move_server", "remove_server"})

    def server_address(self, server: str) -> tuple[str, int]:
        return "10.0.0.1", 8080

    def add_server(self, name: str, beside: str, port: int) -> str:
        raise AssertionError("preflight must not add a server")

    def move_server(self, server: str, port: int) -> str:
        raise AssertionError("preflight must not move a server")

    def remove_server(self, name: str) -> None:
        raise AssertionError("preflight must not remove a server")


def inspection(host_port: str = "8080-8081", got: str = "8080") -> dict[str, Any]:
    return {
        "Id": "c1",
        "Image": "sha256:" + "a" * 64,
        "Config": {"Image": "registry.example/demo/app:v1"},
        "State": {"Status": "running"},
        "HostConfig": {"PortBindings": {"8080/tcp": [{"HostIp": "10.0.0.1", "HostPort": host_port}]}},
        "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "10.0.0.1", "HostPort": got}]}},
    }


def surge_preflight(
    compose: str = RANGE_COMPOSE,
    host_port: str = "8080-8081",
    used: str = "120MiB / 7.6GiB",
    available_kb: int = 4_000_000,
    health_url: str = "http://10.0.0.1:8080/health",
    lb: FakeLB | None = None,
) -> tuple[Ports, FakeHost]:
    instances = [
        {
            "name": f"app-{n}",
            "host": f"10.0.0.{n}",
            "project_directory": f"/srv/app-{n}",
            "lb_server": f"app-{n}",
            "health_url": health_url if n == 1 else f"http://10.0.0.{n}:8080/health",
        }
        for n in (1, 2)
    ]
    the_fleet = fleet(instances=instances, rollout={"strategy": "surge"})
    host = FakeHost("app-1")
    host.files["/srv/app-1/docker-compose.yml"] = compose.encode()
    host.on(commands.COMPOSE_PROBE, lambda argv: "v2")
    host.on(["docker", "ps"], lambda argv: "c1\n")
    host.on(["docker", "container", "inspect"], lambda argv: json.dumps([inspection(host_port)]))
    host.on(["docker", "container", "stats"], lambda argv: used + "\n")
    host.on(["cat", "/proc/meminfo"], lambda argv: f"MemTotal: 8000000 kB\nMemAvailable: {available_kb} kB\n")
    ctx = Context(
        fleet=the_fleet,
        hosts={"app-1": host},
        lb=lb or SurgeLB(["app-1", "app-2"]),  # type: ignore[arg-type]
        clock=FakeClock(),
    )
    instance = the_fleet.instance("app-1")
    found = procedure.preflight_instance(ctx, instance)
    return surge.preflight(ctx, instance, found), host


def test_a_service_publishing_a_port_range_passes_and_its_ports_are_known() -> None:
    ports, host = surge_preflight()
    assert ports == Ports("8080/tcp", 8080, 8081)
    assert not [argv for argv in host.commands if argv[:2] != ["docker", "container"] and "up" in argv]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"host_port": "8080"}, r'fixed host port 8080.*publish a range such as "8080-8081:8080"'),
        (
            {"compose": RANGE_COMPOSE + "    container_name: terrateam\n"},
            "sets container_name 'terrateam', so a second container cannot exist beside it",
        ),
        ({"compose": RANGE_COMPOSE + "    network_mode: host\n"}, "uses network_mode: host"),
        ({"compose": RANGE_COMPOSE + "    deploy:\n      replicas: 2\n"}, "asks for 2 replicas"),
        (
            {"used": "3GiB / 7.6GiB", "available_kb": 1_000_000},
            r"the host has 977 MiB available, and 1 more container\(s\) of server need 3072 MiB",
        ),
        (
            {"health_url": "http://10.0.0.1:9090/health"},
            "health_url http://10.0.0.1:9090/health is not on the published range 8080-8081",
        ),
        ({"lb": SurgeLB(["app-1", "app-2", "app-1-surge"])}, "already has a server 'app-1-surge'"),
    ],
)
def test_a_service_that_cannot_run_twice_is_refused_naming_the_problem(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(PreflightError, match=f"^app-1: .*{problem}"):
        surge_preflight(**change)


def test_an_lb_that_cannot_add_servers_is_refused_naming_what_it_lacks() -> None:
    with pytest.raises(PreflightError, match=r"cannot add_server, move_server, remove_server, which rollout\.strategy"):
        surge_preflight(lb=type("Plain", (FakeLB,), {"capabilities": frozenset()})(["app-1", "app-2"]))


def test_ports_read_from_docker_inspect_follow_the_port_a_container_got() -> None:
    info = inspection("8080-8081", got="8081")
    assert host_ports(info) == {"8080/tcp": 8081}
    assert published_range(info, "8080/tcp") == (8080, 8081)
    assert reached_at(info, 8081) == Ports("8080/tcp", 8080, 8081)
    assert reached_at(info, 8080) is None  # the LB sends to a port this container did not get
    assert published_range(inspection("8080"), "8080/tcp") == (8080, 8080)


def test_a_health_url_on_the_range_is_moved_to_the_port_the_container_got() -> None:
    ports = Ports("8080/tcp", 8080, 8081)
    assert ports.url_at("http://10.0.0.1:8080/health?x=1", 8081) == "http://10.0.0.1:8081/health?x=1"
    assert ports.url_at("http://[fd00::1]:8080/health", 8081) == "http://[fd00::1]:8081/health"
    assert ports.url_at("http://10.0.0.1:9090/health", 8081) == "http://10.0.0.1:9090/health"  # another port


NGINX = {"kind": "nginx", "ssh_host": "10.0.0.9", "upstream_file": "/etc/nginx/conf.d/app.conf", "upstream": "app"}


class AddressLB(FakeLB):
    """A fake LB that names servers by HOST:PORT, as nginx, Caddy and Traefik do."""

    capabilities: frozenset[Capability] = frozenset({"add_server", "move_server", "remove_server"})

    def server_address(self, server: str) -> tuple[str, int]:
        host, _, port = server.rpartition(":")
        return host, int(port)

    def add_server(self, name: str, beside: str, port: int) -> str:
        added = f"{self.server_address(beside)[0]}:{port}"
        self.servers_[added] = FakeServer(admin="drain")
        return added

    def move_server(self, server: str, port: int) -> str:
        target = f"{self.server_address(server)[0]}:{port}"
        assert self.servers_[server].admin == "drain", "moved while in rotation"
        if target not in self.servers_:
            self.servers_[target] = self.servers_[server]
        del self.servers_[server]
        return target

    def remove_server(self, name: str) -> None:
        self.servers_.pop(name, None)


def surge_ledger(lb: AddressLB, **record: Any) -> tuple[Context, Ledger]:
    instances = [
        {"name": "app-1", "host": "10.0.0.1", "project_directory": "/srv/app-1", "lb_server": "10.0.0.1:8080",
         "health_url": "http://10.0.0.1:8080/health"}
    ]  # fmt: skip
    the_fleet = fleet(instances=instances, load_balancer=NGINX, rollout={"strategy": "surge"})
    ctx = Context(fleet=the_fleet, hosts={}, lb=lb, clock=FakeClock())
    ledger = Ledger("demo", "run", "app:v2")
    ledger.add(InstanceRecord("app-1", "/srv/app-1/docker-compose.yml", "app:v1", "sha256:1", b"", 0o644, **record))
    return ctx, ledger


def test_by_address_the_own_server_moved_onto_the_surge_one_becomes_it_in_rotation() -> None:
    lb = AddressLB(["10.0.0.1:8080"])
    ctx, ledger = surge_ledger(lb, lb_server="10.0.0.1:8080", surge_port=8081, port=8080)
    instance = ctx.fleet.instance("app-1")
    surge.register(ctx, instance, ledger)
    assert ledger["app-1"].surge_server == "10.0.0.1:8081"
    lb.set_state("10.0.0.1:8081", "ready")
    procedure.drain(ctx, instance, ledger)
    surge.move(ctx, instance, ledger)
    record = ledger["app-1"]
    assert (record.lb_server, record.surge_server, record.port, record.drained) == ("10.0.0.1:8081", "", 8081, False)
    assert set(lb.servers_) == {"10.0.0.1:8081"} and lb.servers_["10.0.0.1:8081"].admin == "ready"
    assert surge.surge_servers(ctx, instance, ledger) == []  # nothing left to retire


def test_a_move_the_run_did_not_record_is_found_before_the_rollback() -> None:
    # Interrupted between the LB's move and the journal: the record still names 8080.
    lb = AddressLB(["10.0.0.1:8081"])
    ctx, ledger = surge_ledger(
        lb, lb_server="10.0.0.1:8080", surge_server="10.0.0.1:8081", surge_port=8081, port=8080, moved=True
    )
    surge.settle_names(ctx, ctx.fleet.instance("app-1"), ledger)
    record = ledger["app-1"]
    assert (record.lb_server, record.surge_server, record.port) == ("10.0.0.1:8081", "", 8081)


def test_a_surge_server_named_by_address_before_the_run_recorded_its_name_is_still_found() -> None:
    lb = AddressLB(["10.0.0.1:8080", "10.0.0.1:8081", "10.0.0.2:8081"])
    ctx, ledger = surge_ledger(lb, lb_server="10.0.0.1:8080", surge_server="app-1-surge", surge_port=8081)
    assert surge.surge_servers(ctx, ctx.fleet.instance("app-1"), ledger) == ["10.0.0.1:8081"]


def test_the_next_run_finds_the_server_at_the_port_its_container_has_now() -> None:
    lb = AddressLB(["10.0.0.1:8081", "10.0.0.2:8080"])
    instances = [
        {"name": f"app-{n}", "host": f"10.0.0.{n}", "project_directory": f"/srv/app-{n}",
         "lb_server": f"10.0.0.{n}:8080", "health_url": f"http://10.0.0.{n}:8080/health"}
        for n in (1, 2)
    ]  # fmt: skip
    host = FakeHost("app-1")
    host.on(["docker", "ps"], lambda argv: "c1\n")
    host.on(["docker", "container", "inspect"], lambda argv: json.dumps([inspection("8080-8081", got="8081")]))
    ctx = Context(
        fleet=fleet(instances=instances, load_balancer=NGINX), hosts={"app-1": host}, lb=lb, clock=FakeClock()
    )
    found = procedure.find_servers(ctx)
    assert [i.lb_server for i in found.instances] == ["10.0.0.1:8081", "10.0.0.2:8080"]
