"""Surge preflight: a service that cannot run twice on its host is refused, naming the
exact problem, before anything is touched (fake host and LB; the real rollout is in
tests/fleet/test_surge.py). And the ports a container got, read from `docker inspect`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from compose_rollout import procedure, surge
from compose_rollout.errors import PreflightError
from compose_rollout.lb.base import Capability
from compose_rollout.ports import Ports, host_ports, published_range, reached_at
from compose_rollout.procedure import Context
from tests.unit.fakes import FakeClock, FakeHost, FakeLB, fleet

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

    def add_server(self, name: str, beside: str, port: int) -> None:
        raise AssertionError("preflight must not add a server")

    def move_server(self, server: str, port: int) -> None:
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
    host.on(["docker", "compose", "version"], lambda argv: "v2")
    host.on(["docker", "ps"], lambda argv: "c1\n")
    host.on(["docker", "container", "inspect"], lambda argv: json.dumps([inspection(host_port)]))
    host.on(["docker", "container", "stats"], lambda argv: used + "\n")
    host.on(["cat", "/proc/meminfo"], lambda argv: f"MemTotal: 8000000 kB\nMemAvailable: {available_kb} kB\n")
    ctx = Context(
        fleet=the_fleet,
        hosts={"app-1": host},  # type: ignore[dict-item]
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
