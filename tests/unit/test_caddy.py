"""The caddy adapter's pure parts and its logic against a fake admin API written here.

What the fake assumes of Caddy (the ETag, If-Match, the error bodies, the global
upstream pool) is checked against a real Caddy in tests/integration/test_caddy.py.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from compose_rollout.config import load_fleet
from compose_rollout.errors import AnswerLost, LoadBalancerError
from compose_rollout.lb.admin_http import Answer, HttpAdmin, Stream, request_head
from compose_rollout.lb.base import SURGE_NEEDS, AddsServers, require
from compose_rollout.lb.caddy import (
    DRAIN_SETTLE_SECONDS,
    EDIT_ATTEMPTS,
    CaddyLoadBalancer,
    Pools,
    config_etag,
    fnv1a_32,
    read_pools,
    with_back,
    without,
)
from compose_rollout.lb.settings import CaddySettings
from tests.unit.test_config import config_error, minimal

# --- settings --------------------------------------------------------------------------------------------------------


def settings(**values: Any) -> CaddySettings:
    return CaddySettings.model_validate({"kind": "caddy", "upstreams_id": "app_upstreams", **values})


def test_the_defaults_are_caddys_own_admin_address_and_the_documented_parking_id() -> None:
    lb = settings()
    assert (lb.admin_url, lb.parking_id, lb.ssh_host, lb.timeout_seconds) == (
        "http://localhost:2019",
        "rollout_parking",
        None,
        5.0,
    )
    assert settings(admin_url="http://[::1]:2019/", ssh_host="lb1").admin_url == "http://[::1]:2019"


@pytest.mark.parametrize(
    "admin_url",
    [
        "https://localhost:2019",  # the admin API's TLS (remote admin) is not supported
        "http://localhost",  # no port
        "http://localhost:0",
        "http://localhost:65536",
        "http://user:secret@localhost:2019",
        "http://localhost:2019/config/",
        "http://localhost:2019?x=1",
        "http://localhost:2019#x",
        "http://local host:2019",
        "http://localhost:2019\r\nX: y",
        "http://[zz::1]:2019",
        "file:///etc/passwd",
        "unix//run/caddy/admin.sock",
        "localhost:2019",
    ],
)
def test_an_admin_url_that_is_not_http_host_port_is_refused(admin_url: str) -> None:
    with pytest.raises(ValidationError, match="admin_url"):
        settings(admin_url=admin_url)


@pytest.mark.parametrize(
    "object_id", ["", "../config", "a/b", "a b", "id\n", "%2e%2e", "a?b", "-x", ".hidden", "x" * 129, "é"]
)
@pytest.mark.parametrize("field", ["upstreams_id", "parking_id"])
def test_an_id_that_is_not_one_path_segment_is_refused(field: str, object_id: str) -> None:
    with pytest.raises(ValidationError, match=field):
        settings(**{field: object_id})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"parking_id": "app_upstreams"}, "must name two handlers"),
        ({"ssh_port": 2222}, "ssh_port and ssh_user need ssh_host"),
        ({"ssh_host": "-oProxyCommand=sh"}, "invalid ssh_host"),
        ({"ssh_host": "lb1", "ssh_user": "root;id"}, "invalid SSH user"),
        ({"timeout_seconds": 0}, "greater than 0"),
        ({"timeout_seconds": 61}, "less than or equal to 60"),
        ({"upstreams": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_contradicting_or_hostile_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        settings(**values)


def caddy_fleet() -> dict[str, Any]:
    data = minimal()
    data["load_balancer"] = {"kind": "caddy", "ssh_host": "10.0.0.2", "upstreams_id": "terrateam_upstreams"}
    for number, instance in enumerate(data["instances"], start=1):
        instance["lb_server"] = f"10.0.1.{number}:8080"
    return data


def test_a_caddy_fleet_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(caddy_fleet()))
    lb = load_fleet(path).load_balancer
    assert isinstance(lb, CaddySettings) and lb.upstreams_id == "terrateam_upstreams"


@pytest.mark.parametrize(
    "server",
    [
        "app-2",
        "10.0.1.2",
        "10.0.1.2:0",
        "10.0.1.2:70000",
        "10.0.1.2:8080;rm -rf /",
        "unix//run/app.sock",
        "{http.request.host}:80",
        "10.0.1.2:8080-8085",
    ],
)
def test_a_caddy_server_must_be_a_dial_address_host_port(tmp_path: Path, server: str) -> None:
    data = caddy_fleet()
    data["instances"][1]["lb_server"] = server
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    message = config_error(path)
    # Names no LB could have are refused by every kind; the others by kind caddy's check.
    assert f"instances[1].lb_server: invalid LB server name {server!r}" in message or (
        f"instances[1].lb_server: invalid upstream dial address HOST:PORT {server!r}" in message
        and "(load_balancer.kind caddy)" in message
    )


def test_a_setting_of_kind_caddy_is_named_as_such_in_another_kind(tmp_path: Path) -> None:
    data = minimal()
    data["load_balancer"]["parking_id"] = "p"
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "parking_id is a setting of kind caddy, not of kind haproxy" in config_error(path)


# --- the ETag --------------------------------------------------------------------------------------------------------

# GET /config/ of Caddy 2.6.2 on this machine, byte for byte, and the ETag trailer it sent.
MEASURED_BODY = (
    b'{"admin":{"listen":"127.0.0.1:12119"},"apps":{"http":{"servers":{"app":{"listen":["127.0.0.1:18182"],'
    b'"routes":[{"handle":[{"@id":"app_upstreams","handler":"reverse_proxy","health_checks":{"active":'
    b'{"interval":"500ms","uri":"/health"}},"upstreams":[{"dial":"127.0.3.2:8080"},{"dial":"127.0.3.3:8080",'
    b'"max_requests":100}]}]},{"handle":[{"@id":"rollout_parking","handler":"reverse_proxy","upstreams":'
    b'[{"dial":"127.0.3.2:8080"},{"dial":"127.0.3.3:8080"}]}],"match":[{"expression":"false"}]}]}}}}}\n'
)
MEASURED_ETAG = '"/config/ 143b4f1c"'


def test_the_etag_is_the_one_caddy_sent_for_that_body() -> None:
    assert len(MEASURED_BODY) == 0x1ED  # the chunk size Caddy announced
    assert config_etag("/config/", MEASURED_BODY) == MEASURED_ETAG


def test_fnv1a_32_matches_the_published_test_vectors() -> None:
    assert [fnv1a_32(data) for data in (b"", b"a", b"foobar")] == [0x811C9DC5, 0xE40C292C, 0xBF9CF968]
    assert config_etag("/config/", b"") == '"/config/ 811c9dc5"'


def test_a_hash_with_leading_zeros_keeps_eight_digits() -> None:
    # Go prints the 4 bytes of the sum with %x: always 8 hex digits.
    body = next(bytes([i, j]) for i in range(256) for j in range(256) if fnv1a_32(bytes([i, j])) < 0x10000000)
    assert len(config_etag("/config/", body).split()[1]) == len('143b4f1c"')


# --- reading and editing the two handlers ----------------------------------------------------------------------------

A, B, C = "10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:8080"


def config(
    live: list[dict[str, Any]] | None = None,
    parked: list[dict[str, Any]] | None = None,
    parking_match: Any = None,
) -> dict[str, Any]:
    """A Caddy config with the instances' handler inside a subroute and the parking route."""
    live = [{"dial": A}, {"dial": B, "max_requests": 10}, {"dial": C}] if live is None else live
    parked = copy.deepcopy(live) if parked is None else parked
    return {
        "apps": {
            "http": {
                "servers": {
                    "web": {
                        "listen": [":443"],
                        "routes": [
                            {
                                "match": [{"host": ["app.example.com"]}],
                                "handle": [
                                    {
                                        "handler": "subroute",
                                        "routes": [
                                            {"handle": [{"handler": "encode", "encodings": {"gzip": {}}}]},
                                            {
                                                "handle": [
                                                    {
                                                        "@id": "app_upstreams",
                                                        "handler": "reverse_proxy",
                                                        "upstreams": live,
                                                        "health_checks": {"active": {"uri": "/health"}},
                                                    }
                                                ]
                                            },
                                        ],
                                    }
                                ],
                                "terminal": True,
                            },
                            {
                                "match": [{"expression": "false"}] if parking_match is None else parking_match,
                                "handle": [{"@id": "rollout_parking", "handler": "reverse_proxy", "upstreams": parked}],
                            },
                        ],
                    }
                }
            }
        }
    }


def pools(cfg: dict[str, Any]) -> Pools:
    return read_pools(cfg, "app_upstreams", "rollout_parking", "caddy x")


def test_the_two_lists_are_read_in_order_with_their_fields() -> None:
    found = pools(config())
    assert found.upstreams == [{"dial": A}, {"dial": B, "max_requests": 10}, {"dial": C}]
    assert found.parking == found.upstreams and found.live(B) and found.parked(B) == {"dial": B, "max_requests": 10}


def test_draining_removes_only_that_entry_and_keeps_the_others_fields_and_order() -> None:
    assert without(pools(config()), A, "app_upstreams", "w") == [{"dial": B, "max_requests": 10}, {"dial": C}]
    assert without(pools(config()), B, "app_upstreams", "w") == [{"dial": A}, {"dial": C}]


def test_draining_one_already_out_is_no_change() -> None:
    assert (
        without(pools(config(live=[{"dial": A}], parked=[{"dial": A}, {"dial": B}])), B, "app_upstreams", "w") is None
    )


def test_the_last_upstream_is_never_taken_out() -> None:
    last = pools(config(live=[{"dial": B}], parked=[{"dial": A}, {"dial": B}]))
    with pytest.raises(LoadBalancerError, match=r'refusing to drain 10.0.1.2:8080: it is the last upstream of "@id": '):
        without(last, B, "app_upstreams", "caddy x")


@pytest.mark.parametrize("address", [A, B, C])
def test_ready_puts_the_parked_entry_back_where_the_parking_order_says(address: str) -> None:
    every = pools(config()).parking
    drained = pools(config(live=[u for u in every if u["dial"] != address], parked=every))
    assert with_back(drained, address, "rollout_parking", "w") == every


def test_ready_with_two_out_restores_the_order_whichever_comes_back_first() -> None:
    parked: list[dict[str, Any]] = [{"dial": A}, {"dial": B, "max_requests": 10}, {"dial": C}]
    only_c = pools(config(live=[{"dial": C}], parked=parked))
    back_a = with_back(only_c, A, "rollout_parking", "w")
    assert back_a == [{"dial": A}, {"dial": C}]
    assert with_back(pools(config(live=back_a, parked=parked)), B, "rollout_parking", "w") == parked


def test_ready_keeps_an_upstream_that_is_not_parked_where_it_is() -> None:
    # Not a configuration read_pools accepts; with_back alone must still not lose it.
    odd = Pools(upstreams=[{"dial": "10.0.9.9:80"}, {"dial": C}], parking=[{"dial": A}, {"dial": C}])
    assert with_back(odd, A, "rollout_parking", "w") == [{"dial": "10.0.9.9:80"}, {"dial": A}, {"dial": C}]


def test_ready_of_one_in_rotation_is_no_change() -> None:
    assert with_back(pools(config()), A, "rollout_parking", "w") is None


def set_handler(cfg: dict[str, Any], object_id: str, **changes: Any) -> dict[str, Any]:
    for route in cfg["apps"]["http"]["servers"]["web"]["routes"]:
        for handler in route["handle"]:
            for candidate in [handler, *(h for r in handler.get("routes", []) for h in r["handle"])]:
                if candidate.get("@id") == object_id:
                    candidate.update(changes)
                    for key in [k for k, v in changes.items() if v is None]:
                        del candidate[key]
    return cfg


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (
            lambda c: set_handler(c, "app_upstreams", **{"@id": None}),
            r'caddy x: the running config has no object with "@id": "app_upstreams" \(the instances\' reverse_proxy: '
            r"load_balancer.upstreams_id\)",
        ),
        (
            lambda c: set_handler(c, "rollout_parking", **{"@id": None}),
            r'no object with "@id": "rollout_parking" \(the parking handler: load_balancer.parking_id\)',
        ),
        (lambda c: None, "the running config has no object"),  # Caddy running without a config: `null`
        (
            lambda c: set_handler(c, "app_upstreams", handler="static_response"),
            r'"@id": "app_upstreams" .* is not a reverse_proxy handler \("handler": \'static_response\'\)',
        ),
        (
            lambda c: set_handler(c, "app_upstreams", upstreams=None, dynamic_upstreams={"source": "a"}),
            "has dynamic_upstreams",
        ),
        (lambda c: set_handler(c, "app_upstreams", upstreams=[{"dial": A}, {"dial": A}]), "lists 10.0.1.1:8080 more"),
        (lambda c: set_handler(c, "app_upstreams", upstreams=[A]), 'needs "upstreams": a list of objects'),
        (lambda c: config(parking_match=[]), "must be in a route that never matches"),
        (lambda c: config(parking_match=[{"path": ["/nothing"]}]), "must be in a route that never matches"),
        (
            lambda c: config(parking_match=[{"expression": "false"}, {"path": ["/x"]}]),
            "must be in a route that never matches",
        ),
        (
            lambda c: config(parked=[{"dial": A}, {"dial": B, "max_requests": 10}]),
            r'the parking handler "@id": "rollout_parking" lacks 10.0.1.3:8080 \(upstreams of "@id": "app_upstreams"\)',
        ),
        (
            lambda c: config(parked=[{"dial": A}, {"dial": B}, {"dial": C}]),
            "lists 10.0.1.2:8080 with other fields than",
        ),
    ],
)
def test_a_config_the_adapter_cannot_drain_safely_is_refused_naming_what_is_wrong(broken: Any, message: str) -> None:
    with pytest.raises(LoadBalancerError, match=message):
        pools(broken(config()))


def test_an_expression_matcher_in_caddy_2_7s_object_form_counts_as_never_matching() -> None:
    assert pools(config(parking_match=[{"expression": {"expr": "false", "name": "never"}}])).parked(A)


def test_the_parking_handler_may_list_more_than_the_instances() -> None:
    assert pools(config(live=[{"dial": A}], parked=[{"dial": A}, {"dial": B}])).parked(B) == {"dial": B}


# --- the adapter against a fake admin API ----------------------------------------------------------------------------


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _objects(item)


class FakeCaddy:
    """Caddy's admin API as the adapter uses it: GET /config/ (whose ETag it checks on
    PATCH /id/<id>/upstreams), GET /reverse_proxy/upstreams over every reverse_proxy
    handler, errors as `{"error": ...}`. `changes_by_others` edits the config just
    before that many PATCHes arrive, as another admin would."""

    where = "caddy admin http://fake:2019"

    def __init__(self, cfg: dict[str, Any], in_flight: Mapping[str, int] | None = None) -> None:
        self.config = cfg
        self.in_flight = dict(in_flight or {})
        self.calls: list[tuple[str, str, Any]] = []
        self.changes_by_others = 0
        self.answers_lost = 0  # PATCHes applied whose answer is then lost

    def body(self) -> bytes:
        return (json.dumps(self.config, separators=(",", ":")) + "\n").encode()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        headers = headers or {}
        self.calls.append((method, path, json.loads(body) if body else None))
        if (method, path) == ("GET", "/config/"):
            return Answer(200, self.body())
        if (method, path) == ("GET", "/reverse_proxy/upstreams"):
            dials = {
                u["dial"] for o in _objects(self.config) if o.get("handler") == "reverse_proxy" for u in o["upstreams"]
            }
            listed = [{"address": d, "num_requests": self.in_flight.get(d, 0), "fails": 0} for d in sorted(dials)]
            return Answer(200, json.dumps(listed).encode())
        if method == "PATCH" and path.startswith("/id/") and path.endswith("/upstreams"):
            if headers.get("Content-Type") != "application/json":
                return Answer(400, b'{"error":"unacceptable content-type: ; \'application/json\' required"}\n')
            if self.changes_by_others:
                self.changes_by_others -= 1
                self.config.setdefault("logging", {})["n"] = len(self.calls)  # a new value every time
            if headers.get("If-Match") != config_etag("/config/", self.body()):
                return Answer(412, b'{"error":"If-Match header did not match current config hash"}\n')
            object_id = path.split("/")[2]
            found = [o for o in _objects(self.config) if o.get("@id") == object_id]
            if not found:
                return Answer(404, f'{{"error":"unknown object ID \'{object_id}\'"}}\n'.encode())
            found[0]["upstreams"] = json.loads(body or b"null")
            if self.answers_lost:
                self.answers_lost -= 1
                raise AnswerLost(f"{self.where}: PATCH {path}: no complete answer (ConnectionResetError)")
            return Answer(200, b"")
        return Answer(404, b'{"error":"not found"}\n')

    def live(self) -> list[dict[str, Any]]:
        return next(o for o in _objects(self.config) if o.get("@id") == "app_upstreams")["upstreams"]  # type: ignore[no-any-return]

    def parking(self) -> list[dict[str, Any]]:
        return next(o for o in _objects(self.config) if o.get("@id") == "rollout_parking")["upstreams"]  # type: ignore[no-any-return]

    def patches(self) -> list[tuple[str, Any]]:
        return [(path, body) for method, path, body in self.calls if method == "PATCH"]


@pytest.fixture
def fake() -> FakeCaddy:
    return FakeCaddy(config(), in_flight={B: 2})


@pytest.fixture
def lb(fake: FakeCaddy) -> CaddyLoadBalancer:
    return CaddyLoadBalancer(settings(), fake, sleep=lambda seconds: None)


def test_the_servers_are_the_parked_upstreams_with_caddys_counts(lb: CaddyLoadBalancer) -> None:
    servers = lb.servers()
    assert sorted(servers) == [A, B, C]
    assert [(s.in_rotation, s.drained, s.up, s.sessions) for s in servers.values()] == [
        (True, False, None, 0),
        (True, False, None, 2),
        (True, False, None, 0),
    ]
    assert servers[B].describe() == "in rotation, 2 requests in flight, health not observable in Caddy's admin API"
    assert lb.backend == (
        'reverse_proxy "@id": "app_upstreams" (parked in "@id": "rollout_parking") in caddy admin http://fake:2019'
    )


def test_drain_then_ready_is_one_if_match_patch_each_and_restores_the_list(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    before = copy.deepcopy(fake.live())
    lb.set_state(B, "drain")
    assert fake.live() == [{"dial": A}, {"dial": C}]
    drained = lb.server(B)
    assert (drained.in_rotation, drained.drained, drained.sessions) == (False, True, 2)  # still counted: parked
    assert drained.describe().startswith("drained (out of the upstreams, parked), 2 requests in flight")
    lb.set_state(B, "drain")  # already out: nothing sent
    lb.set_state(B, "ready")
    assert fake.live() == before
    patches = [call for call in fake.calls if call[0] == "PATCH"]
    assert patches == [
        ("PATCH", "/id/app_upstreams/upstreams", [{"dial": A}, {"dial": C}]),
        ("PATCH", "/id/app_upstreams/upstreams", before),
    ]


def test_a_change_by_someone_else_is_read_again_and_the_patch_computed_again(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    fake.changes_by_others = EDIT_ATTEMPTS - 1
    lb.set_state(A, "drain")
    assert fake.live() == [{"dial": B, "max_requests": 10}, {"dial": C}]
    assert [call[:2] for call in fake.calls].count(("GET", "/config/")) == EDIT_ATTEMPTS


def test_a_change_whose_answer_was_lost_is_read_again_and_not_made_twice(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    fake.answers_lost = 2
    lb.set_state(A, "drain")
    lb.set_state(A, "ready")
    assert (
        fake.live()
        == config()["apps"]["http"]["servers"]["web"]["routes"][0]["handle"][0]["routes"][1]["handle"][0]["upstreams"]
    )
    assert [call[0] for call in fake.calls].count("PATCH") == 2


def test_a_config_that_keeps_changing_fails_after_the_bounded_attempts(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    fake.changes_by_others = EDIT_ATTEMPTS
    with pytest.raises(LoadBalancerError, match=rf"could not drain 10\.0\.1\.1:8080: {EDIT_ATTEMPTS} times in a row"):
        lb.set_state(A, "drain")
    assert len(fake.live()) == 3


def test_caddys_error_is_named_with_the_admin_api_and_the_call(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    fake.request = lambda method, path, body=None, headers=None: Answer(  # type: ignore[method-assign]
        404 if method == "PATCH" else 200,
        b'{"error":"unknown object ID \'app_upstreams\'"}\n' if method == "PATCH" else fake.body(),
    )
    with pytest.raises(LoadBalancerError) as raised:
        lb.set_state(A, "drain")
    assert str(raised.value) == (
        "caddy admin http://fake:2019: PATCH /id/app_upstreams/upstreams (drain 10.0.1.1:8080): "
        "HTTP 404: unknown object ID 'app_upstreams'"
    )


def test_an_answer_that_is_not_caddys_json_error_is_quoted(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    fake.request = lambda *args, **kwargs: Answer(502, b"<html>Bad Gateway</html>")  # type: ignore[method-assign]
    with pytest.raises(LoadBalancerError, match=r"fake:2019: GET /config/: HTTP 502: <html>Bad Gateway</html>"):
        lb.servers()


def test_an_upstream_that_is_not_parked_is_not_a_server(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    with pytest.raises(LoadBalancerError, match=r"has no upstream 10\.0\.1\.9:8080"):
        lb.server("10.0.1.9:8080")
    with pytest.raises(LoadBalancerError, match=r"has no upstream 10\.0\.1\.9:8080"):
        lb.set_state("10.0.1.9:8080", "ready")
    with pytest.raises(LoadBalancerError, match="is not a dial address"):
        lb.set_state("10.0.1.9:8080, 10.0.1.1", "drain")
    assert not [call for call in fake.calls if call[0] == "PATCH"]


def test_a_parked_address_caddy_does_not_count_is_an_error_not_zero(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    real = fake.request
    fake.request = lambda method, path, body=None, headers=None: (  # type: ignore[method-assign]
        Answer(200, b"[]") if path == "/reverse_proxy/upstreams" else real(method, path, body, headers)
    )
    with pytest.raises(LoadBalancerError, match=r"does not list 10\.0\.1\.1:8080, which the config names"):
        lb.server(A)


def test_a_refused_config_is_refused_before_any_change(fake: FakeCaddy) -> None:
    fake.config = config(parked=[{"dial": A}])
    with pytest.raises(LoadBalancerError, match=r"lacks 10\.0\.1\.2:8080, 10\.0\.1\.3:8080"):
        CaddyLoadBalancer(settings(), fake, sleep=lambda seconds: None).set_state(A, "drain")
    assert [call[0] for call in fake.calls] == ["GET"]


def test_no_cut_and_no_recheck(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    lb.shutdown_sessions(B)
    assert lb.recheck(B) is False
    assert fake.calls == []


# --- adding, moving and removing servers (the surge strategy) ------------------------------------------------------

B2 = "10.0.1.2:8081"  # B's address at the port a second container got
PARKING_PATH = "/id/rollout_parking/upstreams"


def test_caddy_declares_and_implements_what_surge_needs(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    require(lb, SURGE_NEEDS, "rollout.strategy: surge")
    assert isinstance(lb, AddsServers)
    assert lb.server_address(B) == ("10.0.1.2", 8080)
    assert lb.server_address("10.0.9.9:81") == ("10.0.9.9", 81)  # not in Caddy: read from the name
    with pytest.raises(LoadBalancerError, match="is not a dial address"):
        lb.server_address("app-2")
    assert fake.calls == []


def test_an_added_server_is_parked_beside_its_model_and_ready_puts_it_in_rotation_next_to_it(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    live = copy.deepcopy(fake.live())
    assert lb.add_server("10.0.1.2:8080-surge", B, 8081) == B2
    assert fake.live() == live
    assert fake.parking() == [
        {"dial": A},
        {"dial": B, "max_requests": 10},
        {"dial": B2, "max_requests": 10},
        {"dial": C},
    ]
    added = lb.server(B2)
    assert (added.drained, added.in_rotation, added.sessions) == (True, False, 0)
    lb.set_state(B2, "ready")
    assert fake.live() == [{"dial": A}, {"dial": B, "max_requests": 10}, {"dial": B2, "max_requests": 10}, {"dial": C}]
    assert fake.patches()[0] == (PARKING_PATH, fake.parking())


def test_adding_again_after_a_crash_changes_nothing_and_names_the_same_server(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    lb.add_server("x", B, 8081)
    lb.set_state(B2, "ready")
    live, parked = copy.deepcopy(fake.live()), copy.deepcopy(fake.parking())
    assert lb.add_server("x", B, 8081) == B2
    assert (fake.live(), fake.parking()) == (live, parked)
    assert len(fake.patches()) == 2


def test_a_server_is_not_added_beside_one_caddy_lacks_or_at_its_own_port(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    with pytest.raises(LoadBalancerError, match=r'"rollout_parking" has no upstream 10\.0\.1\.9:8080'):
        lb.add_server("x", "10.0.1.9:8080", 8081)
    with pytest.raises(LoadBalancerError, match=r"beside 10\.0\.1\.2:8080 at its own port 8080"):
        lb.add_server("x", B, 8080)
    with pytest.raises(LoadBalancerError, match="is not a dial address"):
        lb.add_server("x", B, 0)
    assert fake.patches() == []


def test_moving_a_drained_server_rewrites_its_dial_in_place(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    lb.set_state(B, "drain")
    assert lb.move_server(B, 8081) == B2
    assert fake.parking() == [{"dial": A}, {"dial": B2, "max_requests": 10}, {"dial": C}]
    assert fake.live() == [{"dial": A}, {"dial": C}]  # still drained
    assert lb.move_server(B, 8081) == B2  # done before: nothing to do
    assert len(fake.patches()) == 2
    lb.set_state(B2, "ready")
    assert fake.live() == [{"dial": A}, {"dial": B2, "max_requests": 10}, {"dial": C}]


def test_moving_onto_the_surge_server_drops_the_drained_one_and_keeps_the_other_as_it_is(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    lb.add_server("x", B, 8081)
    lb.set_state(B2, "ready")
    lb.set_state(B, "drain")
    assert lb.move_server(B, 8081) == B2
    after = [{"dial": A}, {"dial": B2, "max_requests": 10}, {"dial": C}]
    assert (fake.parking(), fake.live()) == (after, after)
    assert lb.move_server(B, 8081) == B2
    assert (fake.parking(), fake.live()) == (after, after)
    assert len(fake.patches()) == 4


def test_a_move_to_the_same_port_is_no_change(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    assert lb.move_server(B, 8080) == B
    assert fake.calls == []


def test_a_server_in_rotation_is_not_moved(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    with pytest.raises(LoadBalancerError, match=r"refusing to move 10\.0\.1\.2:8080 to 10\.0\.1\.2:8081: it is in"):
        lb.move_server(B, 8081)
    lb.add_server("x", B, 8081)
    parked = copy.deepcopy(fake.parking())
    with pytest.raises(LoadBalancerError, match="drain it first"):
        lb.move_server(B, 8081)  # also not onto a server that is there
    assert fake.parking() == parked and len(fake.live()) == 3


def test_a_move_of_a_server_caddy_lacks_names_both_addresses(lb: CaddyLoadBalancer, fake: FakeCaddy) -> None:
    with pytest.raises(LoadBalancerError, match=r"has neither 10\.0\.1\.9:8080 nor 10\.0\.1\.9:8081"):
        lb.move_server("10.0.1.9:8080", 8081)
    assert fake.patches() == []


def test_a_server_is_removed_only_out_of_rotation_and_with_nothing_in_flight(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    lb.add_server("x", B, 8081)
    lb.set_state(B2, "ready")
    with pytest.raises(LoadBalancerError, match=r"refusing to remove 10\.0\.1\.2:8081: in rotation"):
        lb.remove_server(B2)
    lb.set_state(B2, "drain")
    fake.in_flight[B2] = 1
    with pytest.raises(LoadBalancerError, match=r"refusing to remove 10\.0\.1\.2:8081: drained .*, 1 requests in"):
        lb.remove_server(B2)
    assert lb.server(B2).drained
    fake.in_flight[B2] = 0
    lb.remove_server(B2)
    every = config()["apps"]["http"]["servers"]["web"]["routes"][1]["handle"][0]["upstreams"]
    assert (fake.parking(), fake.live()) == (every, every)
    patches = len(fake.patches())
    lb.remove_server(B2)  # gone: nothing to do
    assert len(fake.patches()) == patches
    with pytest.raises(LoadBalancerError, match="has no upstream"):
        lb.server(B2)


@pytest.mark.parametrize("interruption", ["changes_by_others", "answers_lost"])
def test_adding_moving_and_removing_read_again_after_a_change_in_between_or_a_lost_answer(
    lb: CaddyLoadBalancer, fake: FakeCaddy, interruption: str
) -> None:
    setattr(fake, interruption, 1)
    lb.add_server("x", B, 8081)
    assert [u["dial"] for u in fake.parking()] == [A, B, B2, C]
    lb.set_state(A, "drain")
    setattr(fake, interruption, 1)
    assert lb.move_server(A, 8082) == "10.0.1.1:8082"
    assert [u["dial"] for u in fake.parking()] == ["10.0.1.1:8082", B, B2, C]
    setattr(fake, interruption, 1)
    lb.remove_server(B2)
    assert [u["dial"] for u in fake.parking()] == ["10.0.1.1:8082", B, C]
    # Each of the three was read twice; a change whose answer was lost was not sent again.
    assert len(fake.patches()) == (7 if interruption == "changes_by_others" else 4)


def test_a_config_that_keeps_changing_fails_an_add_after_the_bounded_attempts(
    lb: CaddyLoadBalancer, fake: FakeCaddy
) -> None:
    fake.changes_by_others = EDIT_ATTEMPTS
    with pytest.raises(
        LoadBalancerError, match=rf"could not add 10\.0\.1\.2:8081 beside 10\.0\.1\.2:8080: {EDIT_ATTEMPTS} times"
    ):
        lb.add_server("x", B, 8081)
    assert len(fake.parking()) == 3


# --- HTTP over a stream ----------------------------------------------------------------------------------------------


def test_the_request_head_names_the_admin_address_as_host() -> None:
    head = request_head("PATCH", "/id/a/upstreams", "localhost", 2019, {"If-Match": '"/config/ 1"'}, 2)
    assert head == (
        b'PATCH /id/a/upstreams HTTP/1.1\r\nHost: localhost:2019\r\nIf-Match: "/config/ 1"\r\n'
        b"Content-Length: 2\r\nConnection: close\r\n\r\n"
    )
    assert request_head("GET", "/", "::1", 2019, {}, 0).startswith(b"GET / HTTP/1.1\r\nHost: [::1]:2019\r\n")


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [("GET", "/x\r\nX: y", {}), ("GET", "/a b", {}), ("GET", "/", {"X": "a\nb"}), ("GE T", "/", {})],
)
def test_a_request_that_would_not_stay_on_its_lines_is_refused(method: str, path: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="broken line"):
        request_head(method, path, "localhost", 2019, headers, 0)


def serve_once(answer: bytes | None) -> tuple[HttpAdmin, list[bytes]]:
    """An HttpAdmin whose stream is one end of a socket pair; the other end reads the
    request and sends `answer` (or nothing, None)."""
    ours, theirs = socket.socketpair()
    received: list[bytes] = []

    def peer() -> None:
        with theirs:
            data = b""
            while b"\r\n\r\n" not in data:
                data += theirs.recv(4096)
            received.append(data)
            if answer is not None:
                theirs.sendall(answer)
            else:
                theirs.recv(1)  # until the client gives up and closes

    threading.Thread(target=peer, daemon=True).start()

    def open_stream(host: str, port: int, timeout: float) -> Stream:
        return ours

    return HttpAdmin("127.0.0.1", 12019, open_stream, 0.5, "caddy admin http://127.0.0.1:12019"), received


def test_a_chunked_answer_with_caddys_etag_trailer_is_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTrailer: ETag\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'6\r\n{"a":1\r\n2\r\n}\n\r\n0\r\nEtag: "/config/ 01234567"\r\n\r\n'
    )
    admin, received = serve_once(chunked)
    assert admin.request("GET", "/config/") == Answer(200, b'{"a":1}\n')
    assert received[0].startswith(b"GET /config/ HTTP/1.1\r\nHost: 127.0.0.1:12019\r\n")


def test_an_admin_api_that_never_answers_fails_the_call_in_time() -> None:
    admin, _ = serve_once(None)
    with pytest.raises(
        LoadBalancerError, match=r"caddy admin http://127.0.0.1:12019: GET /config/: no complete answer"
    ):
        admin.request("GET", "/config/")


CLOSE = b""  # the peer reads the request and closes without an answer


def serve_each(answers: list[bytes]) -> tuple[HttpAdmin, list[bytes]]:
    """An HttpAdmin whose every new stream is a socket pair answered with the next of
    `answers` (CLOSE: closed without one)."""
    received: list[bytes] = []
    left = list(answers)

    def open_stream(host: str, port: int, timeout: float) -> Stream:
        ours, theirs = socket.socketpair()
        answer = left.pop(0)

        def peer() -> None:
            with theirs:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += theirs.recv(4096)
                received.append(data)
                theirs.sendall(answer)

        threading.Thread(target=peer, daemon=True).start()
        return ours

    admin = HttpAdmin("127.0.0.1", 12019, open_stream, 1, "caddy admin http://127.0.0.1:12019", sleep=lambda s: None)
    return admin, received


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n[]\n"


def test_a_get_whose_connection_was_cut_before_the_answer_is_sent_again() -> None:
    admin, received = serve_each([CLOSE, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[", OK])
    assert admin.request("GET", "/reverse_proxy/upstreams") == Answer(200, b"[]\n")
    assert len(received) == 3


def test_a_get_cut_every_time_is_lost_after_its_resends() -> None:
    admin, received = serve_each([CLOSE] * 3)
    with pytest.raises(AnswerLost, match=r"GET /config/: no complete answer \(RemoteDisconnected"):
        admin.request("GET", "/config/")
    assert len(received) == 3


def test_a_change_whose_answer_was_lost_is_not_sent_again() -> None:
    admin, received = serve_each([CLOSE, OK])
    with pytest.raises(AnswerLost, match="PATCH /id/a/upstreams: no complete answer"):
        admin.request("PATCH", "/id/a/upstreams", b"[]", {"Content-Type": "application/json"})
    assert len(received) == 1


def test_an_admin_api_that_cannot_be_reached_is_named() -> None:
    def refused(host: str, port: int, timeout: float) -> Stream:
        raise ConnectionRefusedError(111, "Connection refused")

    admin = HttpAdmin("127.0.0.1", 1, refused, 1, "caddy admin http://127.0.0.1:1")
    with pytest.raises(LoadBalancerError, match=r"http://127.0.0.1:1: GET /config/: cannot connect \(Connection"):
        admin.request("GET", "/config/")


def test_the_example_fleet_file_loads() -> None:
    fleet = load_fleet(Path(__file__).parents[2] / "examples" / "fleet-caddy.yaml")
    assert isinstance(fleet.load_balancer, CaddySettings)
    assert [instance.lb_server for instance in fleet.instances] == ["10.0.1.11:8080", "10.0.1.12:8080"]


def test_a_drain_returns_after_requests_the_old_config_accepted_can_be_counted(fake: FakeCaddy) -> None:
    slept: list[float] = []
    lb = CaddyLoadBalancer(settings(), fake, sleep=slept.append)
    lb.set_state(A, "drain")
    lb.set_state(A, "drain")  # nothing changed: nothing to wait for
    lb.set_state(A, "ready")
    assert slept == [DRAIN_SETTLE_SECONDS]
