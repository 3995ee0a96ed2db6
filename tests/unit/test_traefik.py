"""The traefik adapter's pure parts: its settings, the edit of the dynamic file (one list
item out, every other byte kept, the original bytes back), the checks that refuse a
file it cannot work with, and its decisions against a fake Traefik API (nothing
applied: the file goes back; a record a crash left: read as it stands)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from compose_rollout.config import load_fleet
from compose_rollout.errors import LoadBalancerError
from compose_rollout.hosts.ssh import Stream
from compose_rollout.lb import adapters
from compose_rollout.lb.base import SURGE_NEEDS, AddsServers
from compose_rollout.lb.connections import ss_argv
from compose_rollout.lb.settings import TraefikSettings
from compose_rollout.lb.traefik import TraefikLoadBalancer
from compose_rollout.lb.traefik_file import (
    DynamicFile,
    Parked,
    check_idle_connections,
    go_duration,
    server_name,
)
from tests.unit.fakes import FakeClock, FakeHost
from tests.unit.test_config import config_error, minimal

PATH = "/etc/traefik/dynamic/app.yml"
RECORD = "/etc/traefik/dynamic/.app.yml.compose-rollout.json"

FILE = """\
# Managed by hand. compose-rollout takes one server item out at a time.
http:
  routers:
    app:
      rule: "Host(`app.example`)"   # not ours
      service: app
  services:
    other:
      loadBalancer:
        servers:
          - url: http://10.0.1.1:8080   # same address, another service
    app:
      loadBalancer:
        serversTransport: pool@file
        healthCheck: {path: /health, interval: 5s, timeout: 2s}
        servers:
          # app-1, the big one
          - url: "http://10.0.1.1:8080"   # app-1
            weight: 3
          - url: 'http://10.0.1.2:8080'


          # app-3
          # (two lines about it)
          - url: http://[fd00::3]:8080
            extra:
              - nested: [1, 2]
          - {url: "https://app-4.internal", weight: 1}
          # trailing comment of the list, not of app-4
        passHostHeader: true
  serversTransports:
    pool:
      forwardingTimeouts:
        idleConnTimeout: 1s
"""

FLOW = """\
http:
  services:
    app:
      loadBalancer:
        servers: [{url: "http://10.0.1.1:8080"}, {url: "http://10.0.1.2:8080", weight: 2},
          # the third
          {url: http://10.0.1.3:8080}]
"""


def test_the_servers_of_the_named_service_by_host_and_port() -> None:
    found = DynamicFile(FILE, "app", "f")
    assert found.names == ["10.0.1.1:8080", "10.0.1.2:8080", "[fd00::3]:8080", "app-4.internal:443"]
    assert found.urls()[3] == "https://app-4.internal"
    assert DynamicFile(FILE, "other", "f").names == ["10.0.1.1:8080"]


@pytest.mark.parametrize(
    ("name", "gone"),
    [
        (
            "10.0.1.1:8080",
            "          # app-1, the big one\n"
            '          - url: "http://10.0.1.1:8080"   # app-1\n            weight: 3\n',
        ),
        ("10.0.1.2:8080", "          - url: 'http://10.0.1.2:8080'\n"),
        (
            "[fd00::3]:8080",
            "          # app-3\n          # (two lines about it)\n          - url: http://[fd00::3]:8080\n"
            "            extra:\n              - nested: [1, 2]\n",
        ),
        ("app-4.internal:443", '          - {url: "https://app-4.internal", weight: 1}\n'),
    ],
)
def test_a_drain_takes_out_that_item_only_and_the_original_is_the_way_back(name: str, gone: str) -> None:
    found = DynamicFile(FILE, "app", "f")
    drained = found.without({name})
    assert FILE.count(gone) == 1 and drained == FILE.replace(gone, "")
    assert DynamicFile(drained, "app", "f").names == [n for n in found.names if n != name]
    assert found.without(set()) == FILE  # everything back in: the original bytes


def test_several_out_at_once_and_crlf_line_ends_kept() -> None:
    crlf = FILE.replace("\n", "\r\n")
    found = DynamicFile(crlf, "app", "f")
    drained = found.without({"10.0.1.2:8080", "app-4.internal:443"})
    assert drained == crlf.replace("          - url: 'http://10.0.1.2:8080'\r\n", "").replace(
        '          - {url: "https://app-4.internal", weight: 1}\r\n', ""
    )
    assert "# trailing comment of the list, not of app-4" in drained


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "10.0.1.1:8080",
            'servers: [{url: "http://10.0.1.2:8080", weight: 2},\n          # the third\n'
            "          {url: http://10.0.1.3:8080}]",
        ),
        ("10.0.1.2:8080", 'servers: [{url: "http://10.0.1.1:8080"}, {url: http://10.0.1.3:8080}]'),
        (
            "10.0.1.3:8080",
            'servers: [{url: "http://10.0.1.1:8080"}, {url: "http://10.0.1.2:8080", weight: 2}]',
        ),
    ],
)
def test_a_flow_list_loses_the_item_and_one_separator(name: str, expected: str) -> None:
    drained = DynamicFile(FLOW, "app", "f").without({name})
    assert drained.split("servers: ", 1)[0] == FLOW.split("servers: ", 1)[0]
    assert drained.endswith(expected + "\n")


def test_the_last_server_is_never_taken_out() -> None:
    with pytest.raises(LoadBalancerError, match=r"would leave service 'app' with no server .*503"):
        DynamicFile(FLOW, "app", "f").without({"10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:8080"})
    with pytest.raises(LoadBalancerError, match="would leave service 'other' with no server"):
        DynamicFile(FILE, "other", "f").without({"10.0.1.1:8080"})


def test_a_server_or_service_not_in_the_file_is_named() -> None:
    with pytest.raises(LoadBalancerError, match=r"f: service 'app' has no server 10.0.1.9:8080 \(servers: 10.0.1.1"):
        DynamicFile(FILE, "app", "f").without({"10.0.1.9:8080"})
    with pytest.raises(LoadBalancerError, match=r"f has no service 'web' under http.services \(services: other, app\)"):
        DynamicFile(FILE, "web", "f")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no `http.services` mapping"),
        ("http:\n  routers: {}\n", "has no `http.services` mapping"),
        ("[http]\n[http.services]\n", "not valid YAML|no `http.services`"),
        ("http: {services: {app: {loadBalancer: {servers: [{url: '{{ env \"A\" }}'}]}}}}\n", "is a Go template"),
        ("http:\n  services:\n    app:\n      weighted: {services: []}\n", "is not a loadBalancer service"),
        ("http: {services: {app: {loadBalancer: {servers: {url: x}}}}}\n", "has no `loadBalancer.servers` list"),
        ("http: {services: {app: {loadBalancer: {servers: [{weight: 1}]}}}}\n", "server #1 .* has no `url:` string"),
        ("http: {services: {app: {loadBalancer: {servers: [{url: 8080}]}}}}\n", "has no `url:` string"),
        (
            "http: {services: {app: {loadBalancer: {servers: [{url: '10.0.1.1:8080'}]}}}}\n",
            "is not SCHEME://HOST.* no scheme: Traefik applies it and answers 404",
        ),
        ("http: {services: {app: {loadBalancer: {servers: [{url: 'ftp://a:21'}]}}}}\n", "has scheme ftp"),
        ("http: {services: {app: {loadBalancer: {servers: [{url: 'http://a:99999'}]}}}}\n", "not HOST:PORT"),
        (
            "http: {services: {app: {loadBalancer: {servers: [{url: 'http://a:80'}, {url: 'http://a'}]}}}}\n",
            "lists a:80 more than once",
        ),
        (
            "x: &one {url: 'http://a:80'}\nhttp: {services: {app: {loadBalancer: {servers: [*one, {url: 'http://b'}]}}}}\n",
            "is a YAML anchor or alias",
        ),
        (
            "http: {services: {app: {loadBalancer: {servers: [&one {url: 'http://a:80'}, {url: 'http://b'}]}}}}\n",
            "is a YAML anchor or alias",
        ),
        ("http: {services: {app: {}, app: {}}}\n", "not valid YAML"),
    ],
)
def test_a_file_it_cannot_edit_safely_is_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(LoadBalancerError, match=message):
        DynamicFile(text, "app", "f")


def test_an_edit_that_would_change_anything_else_is_refused() -> None:
    # A merge key: the item's data depends on text outside it.
    text = (
        "base: &base {weight: 2}\n"
        "http:\n  services:\n    app:\n      loadBalancer:\n        servers:\n"
        "          - url: http://a:80\n          - <<: *base\n            url: http://b:80\n"
    )
    found = DynamicFile(text, "app", "f")
    assert found.without({"a:80"}) == text.replace("          - url: http://a:80\n", "")
    assert found.without({"b:80"}) == text.replace("          - <<: *base\n            url: http://b:80\n", "")
    # Every result is read again and compared with the data intended; anything else is refused.
    changed = found.without({"a:80"}).replace("weight: 2", "weight: 3")
    with pytest.raises(LoadBalancerError, match="cannot take a:80 out of service 'app' without changing something"):
        found._prove(changed, {"a:80"})


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://10.0.1.2:8080", "10.0.1.2:8080"),
        ("http://10.0.1.2", "10.0.1.2:80"),
        ("https://app.internal/", "app.internal:443"),
        ("h2c://10.0.1.2:9000/prefix", "10.0.1.2:9000"),
        ("HTTP://[fd00::2]:8080", "[fd00::2]:8080"),
    ],
)
def test_a_server_is_named_by_host_and_port(url: str, name: str) -> None:
    assert server_name(url, "f") == name


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), ("1m30s", 90.0), ("1.5h", 5400.0), (10, 10.0), ("3", 3.0), ("250us", 0.00025)],
)
def test_traefik_durations(value: object, seconds: float) -> None:
    assert go_duration(value, "d") == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "1x", "s", "1s2", "-1s", True, "1 s"])
def test_what_is_no_duration(value: object) -> None:
    with pytest.raises(LoadBalancerError, match=r"d: .* is not a duration"):
        go_duration(value, "d")


def _with_transport(transport: str, uses: str = "pool@file") -> DynamicFile:
    text = (
        f"http:\n  services:\n    app:\n      loadBalancer:\n        serversTransport: {uses}\n"
        f"        servers: [{{url: 'http://a:80'}}]\n  serversTransports:\n    pool: {transport}\n"
    )
    return DynamicFile(text, "app", "f")


@pytest.mark.parametrize(
    ("transport", "uses", "verdict"),
    [
        ("{maxIdleConnsPerHost: -1}", "pool", "maxIdleConnsPerHost -1 (no idle connections)"),
        ("{forwardingTimeouts: {idleConnTimeout: 1s}}", "pool@file", "idleConnTimeout 1s"),
        ("{forwardingTimeouts: {idleConnTimeout: 5s}}", "pool", "idleConnTimeout 5s"),
        ("{forwardingTimeouts: {idleConnTimeout: 6s}}", "pool", "has idleConnTimeout 6s"),
        ("{forwardingTimeouts: {idleConnTimeout: 0s}}", "pool", "has idleConnTimeout 0s"),
        ("{maxIdleConnsPerHost: 2}", "pool", "keeps idle connections 90 s"),
        ("{}", "pool", "keeps idle connections 90 s"),
        ("{maxIdleConnsPerHost: -1}", "other", "uses serversTransport other, which is not defined in this file"),
        ("{maxIdleConnsPerHost: -1}", "pool@docker", "uses serversTransport pool@docker, which is not defined"),
    ],
)
def test_the_servers_transport_must_keep_no_idle_connection(transport: str, uses: str, verdict: str) -> None:
    found = _with_transport(transport, uses)
    if verdict.startswith(("has", "keeps", "uses")):
        with pytest.raises(LoadBalancerError, match=verdict):
            check_idle_connections(found, 5)
    else:
        assert verdict in check_idle_connections(found, 5)


def test_the_default_transport_is_refused_with_what_to_set() -> None:
    with pytest.raises(LoadBalancerError, match=r"default servers transport.*`maxIdleConnsPerHost: -1`"):
        check_idle_connections(DynamicFile(FLOW, "app", "f"), 5)


def test_the_record_beside_the_file_round_trips_and_a_foreign_one_is_refused() -> None:
    record = Parked("app", FILE, frozenset({"10.0.1.2:8080"}))
    assert Parked.decode(record.encode(), "r") == record
    for hostile in (
        b"",
        b"[]",
        b'{"format": "x", "version": 1}',
        json.dumps({**json.loads(record.encode()), "parked": "a"}).encode(),
    ):
        with pytest.raises(LoadBalancerError, match="r: unreadable"):
            Parked.decode(hostile, "r")


# --- settings ------------------------------------------------------------------------

BASE = {"kind": "traefik", "ssh_host": "10.0.0.2", "dynamic_file": PATH, "service": "app"}


def test_settings_with_their_defaults() -> None:
    settings = TraefikSettings(**BASE)  # type: ignore[arg-type]
    assert (settings.api_address, settings.apply_timeout_seconds, settings.max_idle_seconds) == (
        "127.0.0.1:8080",
        10.0,
        5.0,
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dynamic_file", "dynamic/app.yml", "must be an absolute path"),
        ("dynamic_file", "/etc/traefik/../shadow.yml", "must be an absolute path without '..'"),
        ("dynamic_file", "/etc/traefik/app.toml", "is TOML: compose-rollout edits YAML dynamic configuration only"),
        ("dynamic_file", "/etc/traefik/app.json", "must end in .yml or .yaml"),
        ("dynamic_file", "/etc/traefik/yml", "must end in .yml or .yaml"),
        ("dynamic_file", "/etc/traefik/app.yml\n", "must be an absolute path"),
        ("service", "app@file", "without @file"),
        ("service", "app; rm -rf /", "invalid Traefik service name"),
        ("service", "", "invalid Traefik service name"),
        ("service", "../app", "invalid Traefik service name"),
        ("service", "a" * 200, "invalid Traefik service name"),
        ("api_address", "127.0.0.1", "invalid api_address"),
        ("api_address", "127.0.0.1:0", "the port must be 1-65535"),
        ("api_address", "127.0.0.1:65536", "the port must be 1-65535"),
        ("api_address", "http://127.0.0.1:8080", "invalid api_address"),
        ("api_address", "127.0.0.1:8080/api", "invalid api_address"),
        ("api_address", "lb host:8080", "invalid api_address"),
        ("ssh_host", "-oProxyCommand=sh", "invalid ssh_host"),
        ("apply_timeout_seconds", 0, "greater than 0"),
        ("apply_timeout_seconds", 301, "less than or equal to 300"),
        ("max_idle_seconds", -1, "greater than 0"),
        ("ready_timeout_seconds", 3601, "less than or equal to 3600"),
        ("upstream", "app", "upstream is a setting of kind nginx, not of kind traefik"),
        ("api_url", "http://x", "Extra inputs are not permitted"),
    ],
)
def test_hostile_settings_are_refused_naming_the_setting(key: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TraefikSettings(**{**BASE, key: value})  # type: ignore[arg-type]


def test_the_ipv6_api_address_is_fine() -> None:
    assert TraefikSettings(**{**BASE, "api_address": "[::1]:8080"}).api_address == "[::1]:8080"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("server", "ok"),
    [
        ("10.0.1.2:8080", True),
        ("[fd00::2]:8080", True),
        ("app-1.internal:80", True),
        ("app-1", False),
        ("10.0.1.2", False),
        ("10.0.1.2:99999", False),
        ("http://10.0.1.2:8080", False),
        ("10.0.1.2:8080;reboot", False),
        ("-oProxyCommand=x:22", False),
    ],
)
def test_an_instances_lb_server_is_host_and_port(tmp_path: Path, server: str, ok: bool) -> None:
    data = minimal()
    data["load_balancer"] = dict(BASE)
    for number, instance in enumerate(data["instances"], start=1):
        instance["lb_server"] = f"10.0.1.{number}:8080"
    data["instances"][1]["lb_server"] = server
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    if ok:
        assert load_fleet(path).instances[1].lb_server == server
    else:
        assert "instances[1].lb_server: invalid" in config_error(path)


def test_ss_counts_connections_still_opening_too() -> None:
    assert ss_argv("10.0.1.2:8080", ("syn-sent", "established")) == (
        ["ss", "-H", "-t", "-n", "state", "syn-sent", "state", "established", "dst", "10.0.1.2:8080"]
    )


# --- the adapter against a fake Traefik API ---------------------------------------------


class FakeTraefik:
    """Traefik's API as the adapter reads it: the service with the servers of the file it
    last applied. It applies the host's file at each GET unless `applies` is False."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.applies = True
        self.applied = host.files[PATH].decode()
        self.status: dict[str, str] = {}  # url -> status, UP unless said
        self.health_check = True

    def answer(self, request: bytes) -> bytes:
        path = request.split(b" ", 2)[1].decode()
        assert path == "/api/http/services/app@file", path
        if self.applies:
            self.applied = self.host.files[PATH].decode()
        urls = DynamicFile(self.applied, "app", "applied").urls()
        balancer: dict[str, Any] = {"servers": [{"url": url} for url in urls]}
        if self.health_check:
            balancer["healthCheck"] = {"path": "/health", "interval": "1s", "timeout": "1s"}
        service = {"loadBalancer": balancer, "serverStatus": {url: self.status.get(url, "UP") for url in urls}}
        body = json.dumps(service).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class FakeStream:
    def __init__(self, traefik: FakeTraefik) -> None:
        self.traefik = traefik
        self.request = b""

    def sendall(self, data: bytes, /) -> None:
        self.request += data

    def makefile(self, mode: str, /) -> Any:
        return io.BytesIO(self.traefik.answer(self.request))

    def settimeout(self, timeout: float | None, /) -> None:
        pass

    def close(self) -> None:
        pass


class TunnelHost(FakeHost):
    def __init__(self) -> None:
        super().__init__("lb")
        self.files[PATH] = FILE.encode()
        self.on(["ss"], lambda argv: "")
        self.on(["sync"], lambda argv: "")
        self.traefik = FakeTraefik(self)
        self.tunnels: list[tuple[str, int]] = []

    def open_tunnel(self, address: str, port: int, timeout: float) -> Stream:
        self.tunnels.append((address, port))
        return FakeStream(self.traefik)


@pytest.fixture
def lb() -> TraefikLoadBalancer:
    clock = FakeClock()
    settings = TraefikSettings(**{**BASE, "api_address": "127.0.0.1:8081"})  # type: ignore[arg-type]
    return TraefikLoadBalancer(settings, TunnelHost(), monotonic=clock.monotonic, sleep=clock.sleep)


def host_of(lb: TraefikLoadBalancer) -> TunnelHost:
    assert isinstance(lb.host, TunnelHost)
    return lb.host


def test_drain_writes_the_record_first_and_ready_removes_it(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    lb.set_state("10.0.1.2:8080", "drain")
    assert host.files[PATH].decode() == FILE.replace("          - url: 'http://10.0.1.2:8080'\n", "")
    assert Parked.decode(host.files[RECORD], "r") == Parked("app", FILE, frozenset({"10.0.1.2:8080"}))
    assert host.modes[RECORD] == host.modes[PATH] == 0o644
    assert set(host.tunnels) == {("127.0.0.1", 8081)}
    lb.set_state("10.0.1.2:8080", "ready")
    assert host.files[PATH] == FILE.encode() and RECORD not in host.files


def test_a_change_traefik_does_not_apply_is_put_back_and_fails_the_step(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    host.traefik.applies = False  # as when Traefik cannot read the file: it keeps the old configuration
    with pytest.raises(
        LoadBalancerError, match=r"did not apply the change \(10.0.1.2:8080 out of the list\) within 10 s"
    ):
        lb.set_state("10.0.1.2:8080", "drain")
    assert host.files[PATH] == FILE.encode() and RECORD not in host.files


def test_a_record_left_by_a_crash_between_the_two_writes_is_read_as_it_stands(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    # Drain: the record was written, the file not yet.
    host.files[RECORD] = Parked("app", FILE, frozenset({"10.0.1.2:8080"})).encode()
    assert not lb.server("10.0.1.2:8080").drained
    lb.set_state("10.0.1.2:8080", "drain")
    lb.set_state("10.0.1.1:8080", "drain")
    # Ready of one: the file was written, the record still names both.
    host.files[PATH] = DynamicFile(FILE, "app", "f").without({"10.0.1.1:8080"}).encode()
    host.traefik.applied = host.files[PATH].decode()
    assert not lb.server("10.0.1.2:8080").drained and lb.server("10.0.1.1:8080").drained
    lb.set_state("10.0.1.1:8080", "ready")
    assert host.files[PATH] == FILE.encode() and RECORD not in host.files


def test_a_file_someone_else_changed_while_servers_are_out_is_left_alone(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    lb.set_state("10.0.1.2:8080", "drain")
    edited = host.files[PATH] + b"# an edit by hand\n"
    host.files[PATH] = edited
    with pytest.raises(LoadBalancerError, match=r"changed by someone else while compose-rollout had 10.0.1.2:8080 out"):
        lb.set_state("10.0.1.2:8080", "ready")
    assert host.files[PATH] == edited


def test_a_server_down_after_it_is_back_is_taken_out_again(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    lb.set_state("10.0.1.2:8080", "drain")
    drained = host.files[PATH]
    host.traefik.status["http://10.0.1.2:8080"] = "DOWN"
    with pytest.raises(
        LoadBalancerError, match=r"sees 10.0.1.2:8080 DOWN after it was put back; taken out of the list"
    ):
        lb.set_state("10.0.1.2:8080", "ready")
    assert host.files[PATH] == drained and RECORD in host.files


def test_up_recheck_and_what_is_said_of_each_server(lb: TraefikLoadBalancer) -> None:
    lb.set_state("10.0.1.2:8080", "drain")
    out = lb.server("10.0.1.2:8080")
    assert (out.up, out.drained, out.in_rotation) == (None, True, False)
    assert out.describe() == "out of the server list (drained), 0 connections; Traefik checks only listed servers"
    assert lb.recheck("10.0.1.2:8080") is True
    assert lb.recheck("10.0.1.1:8080") is False  # listed: a reload would not make Traefik forget it
    assert lb.server("10.0.1.1:8080").describe() == "in rotation, Traefik check UP, 0 connections"
    lb.shutdown_sessions("10.0.1.2:8080")  # nothing Traefik can do: no call, no error
    assert lb.backend == f"service app in traefik 10.0.0.2:{PATH}"


def test_without_a_health_check_traefik_tells_nothing_and_ready_does_not_wait(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    host.traefik.health_check = False
    host.traefik.status["http://10.0.1.1:8080"] = "DOWN"  # never, without a check; and ignored
    lb.set_state("10.0.1.2:8080", "drain")
    assert lb.recheck("10.0.1.2:8080") is False
    before = len(host.tunnels)
    lb.set_state("10.0.1.2:8080", "ready")
    assert len(host.tunnels) - before <= 3  # state, the edit's confirmation: no wait for a check
    listed = lb.server("10.0.1.2:8080")
    assert (listed.up, listed.in_rotation) == (None, True)
    assert listed.describe() == "in rotation, 0 connections, health not observable (the service has no healthCheck)"


def test_connect_gives_the_adapter_the_lb_hosts_connection() -> None:
    settings = TraefikSettings(**BASE)  # type: ignore[arg-type]
    opened: list[tuple[str, int | None, str | None]] = []

    def ssh_to(host: str, port: int | None, user: str | None) -> Any:
        opened.append((host, port, user))
        return TunnelHost()

    lb, host = adapters.connect(settings, ssh_to, [])
    assert isinstance(lb, TraefikLoadBalancer) and host is lb.host and opened == [("10.0.0.2", None, None)]


ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_dynamic_files_are_ones_compose_rollout_accepts() -> None:
    """The dynamic file the example fleet file documents in its comments."""
    lines = (ROOT / "examples" / "fleet-traefik.yaml").read_text().splitlines()
    start = lines.index("#   http:")
    in_example = "\n".join(line[4:] for line in lines[start:] if line.startswith("#   ") or not line) + "\n"
    in_example = in_example.split("\n\n", 1)[0] + "\n"
    for text in (in_example,):
        found = DynamicFile(text, "terrateam", "doc")
        assert found.names == ["10.0.1.11:8080", "10.0.1.12:8080"]
        assert "maxIdleConnsPerHost -1" in check_idle_connections(found, 5)
        assert DynamicFile(found.without({"10.0.1.11:8080"}), "terrateam", "doc").names == ["10.0.1.12:8080"]


# --- adding, moving, removing servers (the surge strategy) ------------------------------

APP_2 = "          - url: 'http://10.0.1.2:8080'\n"
APP_2_AT_9000 = "          - url: 'http://10.0.1.2:9000'\n"


def test_a_copy_beside_a_server_at_another_port_and_the_way_back() -> None:
    found = DynamicFile(FILE, "app", "f")
    text, name = found.with_copy("10.0.1.1:8080", 9000)
    one = '          # app-1, the big one\n          - url: "http://10.0.1.1:8080"   # app-1\n            weight: 3\n'
    assert name == "10.0.1.1:9000" and text == FILE.replace(one, one + one.replace(":8080", ":9000"))
    copied = DynamicFile(text, "app", "f")
    assert copied.without({name}) == FILE  # the copy out: the original bytes
    assert copied.without({"10.0.1.1:8080"}) == found.with_port("10.0.1.1:8080", 9000)[0]  # the original out: moved
    assert found.with_copy("app-4.internal:443", 8443) == (
        FILE.replace(
            '          - {url: "https://app-4.internal", weight: 1}\n',
            '          - {url: "https://app-4.internal", weight: 1}\n'
            '          - {url: "https://app-4.internal:8443", weight: 1}\n',
        ),
        "app-4.internal:8443",
    )
    flow, name = DynamicFile(FLOW, "app", "f").with_copy("10.0.1.1:8080", 9000)
    assert name == "10.0.1.1:9000" and flow == FLOW.replace(
        '{url: "http://10.0.1.1:8080"}, ', '{url: "http://10.0.1.1:8080"}, {url: "http://10.0.1.1:9000"}, '
    )
    assert DynamicFile(flow, "app", "f").without({name}) == FLOW


def test_add_keeps_the_new_server_out_of_the_list_and_ready_puts_it_in(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    assert isinstance(lb, AddsServers) and set(SURGE_NEEDS) <= lb.capabilities
    added = lb.add_server("app-2-surge", "10.0.1.2:8080", 9000)
    assert added == "10.0.1.2:9000"
    with_copy = FILE.replace(APP_2, APP_2 + APP_2_AT_9000)
    assert host.files[PATH] == FILE.encode()  # Traefik is not given it yet: it would start it UP
    assert Parked.decode(host.files[RECORD], "r") == Parked("app", with_copy, frozenset({added}))
    servers = lb.servers()
    assert list(servers) == [*DynamicFile(FILE, "app", "f").names, added] and servers[added].drained
    assert lb.add_server("again", "10.0.1.2:8080", 9000) == added  # a repeat changes nothing
    assert Parked.decode(host.files[RECORD], "r") == Parked("app", with_copy, frozenset({added}))
    calls_before = len(host.tunnels)
    lb.set_state(added, "ready")
    assert host.files[PATH] == with_copy.encode() and RECORD not in host.files
    assert "http://10.0.1.2:9000" in DynamicFile(host.traefik.applied, "app", "applied").urls()
    assert len(host.tunnels) - calls_before > 3  # it waited for Traefik's first check of it
    assert lb.server(added).in_rotation
    assert lb.add_server("again", "10.0.1.2:8080", 9000) == added and host.files[PATH] == with_copy.encode()


def test_an_added_server_traefik_sees_down_goes_back_out(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    added = lb.add_server("surge", "10.0.1.2:8080", 9000)
    host.traefik.status["http://10.0.1.2:9000"] = "DOWN"
    with pytest.raises(LoadBalancerError, match=r"sees 10.0.1.2:9000 DOWN after it was put back; taken out"):
        lb.set_state(added, "ready")
    assert host.files[PATH] == FILE.encode() and lb.server(added).drained


def test_move_of_a_drained_server_changes_its_url(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    lb.set_state("10.0.1.2:8080", "drain")
    drained = host.files[PATH]
    assert lb.move_server("10.0.1.2:8080", 9000) == "10.0.1.2:9000"
    moved = FILE.replace(APP_2, APP_2_AT_9000)
    assert host.files[PATH] == drained  # out of the list: nothing for Traefik to apply
    assert Parked.decode(host.files[RECORD], "r") == Parked("app", moved, frozenset({"10.0.1.2:9000"}))
    assert lb.move_server("10.0.1.2:8080", 9000) == "10.0.1.2:9000"  # a repeat: it is there already
    assert lb.move_server("10.0.1.2:9000", 9000) == "10.0.1.2:9000"
    assert Parked.decode(host.files[RECORD], "r") == Parked("app", moved, frozenset({"10.0.1.2:9000"}))
    lb.set_state("10.0.1.2:9000", "ready")
    assert host.files[PATH] == moved.encode() and RECORD not in host.files


def test_move_onto_the_surge_server_forgets_the_drained_one(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    added = lb.add_server("surge", "10.0.1.2:8080", 9000)
    lb.set_state(added, "ready")
    lb.set_state("10.0.1.2:8080", "drain")
    assert lb.move_server("10.0.1.2:8080", 9000) == added
    # The copy stands where the original was: the file reads as if the server had moved.
    assert host.files[PATH] == FILE.replace(APP_2, APP_2_AT_9000).encode() and RECORD not in host.files
    assert lb.server(added).in_rotation and "10.0.1.2:8080" not in lb.servers()
    assert lb.move_server("10.0.1.2:8080", 9000) == added  # a repeat
    with pytest.raises(LoadBalancerError, match=r"has neither 10.0.1.2:8080 nor 10.0.1.2:7000"):
        lb.move_server("10.0.1.2:8080", 7000)


def test_a_drained_surge_server_is_forgotten_and_the_file_is_the_original(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    added = lb.add_server("surge", "10.0.1.2:8080", 9000)
    lb.set_state(added, "ready")
    lb.set_state(added, "drain")
    lb.remove_server(added)
    assert host.files[PATH] == FILE.encode() and RECORD not in host.files and added not in lb.servers()
    lb.remove_server(added)  # gone: nothing to do
    lb.remove_server("10.0.1.9:8080")
    assert host.files[PATH] == FILE.encode() and RECORD not in host.files


def test_moving_or_removing_a_server_in_rotation_is_refused(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    added = lb.add_server("surge", "10.0.1.2:8080", 9000)
    lb.set_state(added, "ready")
    for move in (9001, 9000):  # to a new port, and onto the listed surge server
        with pytest.raises(LoadBalancerError, match=r"10.0.1.2:8080 is in the server list .*only a drained server"):
            lb.move_server("10.0.1.2:8080", move)
    with pytest.raises(LoadBalancerError, match=r"10.0.1.2:9000 is in the server list .*drain it before"):
        lb.remove_server(added)
    listed = FILE.replace(APP_2, APP_2 + APP_2_AT_9000).encode()
    assert host.files[PATH] == listed and RECORD not in host.files


def test_a_drained_server_with_connections_is_not_removed(lb: TraefikLoadBalancer) -> None:
    host = host_of(lb)
    lb.set_state("10.0.1.2:8080", "drain")
    record = host.files[RECORD]
    host.on(["ss"], lambda argv: "0 0 10.0.0.2:40000 10.0.1.2:8080\n" if "10.0.1.2:8080" in argv else "")
    with pytest.raises(LoadBalancerError, match=r"10.0.1.2:8080 still has 1 connection from the LB host"):
        lb.remove_server("10.0.1.2:8080")
    assert host.files[RECORD] == record


def test_server_address_is_read_from_the_name(lb: TraefikLoadBalancer) -> None:
    assert lb.server_address("10.0.1.7:8081") == ("10.0.1.7", 8081)  # not in the file
    assert lb.server_address("[fd00::3]:8080") == ("fd00::3", 8080)
    with pytest.raises(LoadBalancerError, match="'app-1' is not HOST:PORT"):
        lb.server_address("app-1")
    with pytest.raises(LoadBalancerError, match="is not HOST:PORT"):
        lb.add_server("x", "10.0.1.2:8080", 70000)
    assert host_of(lb).files[PATH] == FILE.encode() and RECORD not in host_of(lb).files
