"""`load_balancer` is one strict section per kind, chosen by `kind`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose_rollout.config import load_fleet
from compose_rollout.lb.settings import HaproxySettings, NginxSettings
from tests.unit.test_config import config_error, minimal


@pytest.fixture
def write(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def _write(data: dict[str, Any]) -> Path:
        path = tmp_path / "fleet.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


NGINX = {
    "kind": "nginx",
    "ssh_host": "10.0.0.2",
    "upstream_file": "/etc/nginx/conf.d/terrateam.conf",
    "upstream": "terrateam",
}


def nginx_fleet() -> dict[str, Any]:
    data = minimal()
    data["load_balancer"] = dict(NGINX)
    for number, instance in enumerate(data["instances"], start=1):
        instance["lb_server"] = f"10.0.1.{number}:8080"
    return data


def test_a_file_without_kind_is_haproxy_as_before(write: Any) -> None:
    assert isinstance(load_fleet(write(minimal())).load_balancer, HaproxySettings)


def test_an_nginx_section_loads_with_its_defaults(write: Any) -> None:
    lb = load_fleet(write(nginx_fleet())).load_balancer
    assert isinstance(lb, NginxSettings)
    assert (lb.nginx_binary, lb.main_config, lb.ssh_port) == ("nginx", None, None)


def test_an_unknown_kind_is_refused_naming_the_kinds_that_exist(write: Any) -> None:
    data = minimal()
    data["load_balancer"]["kind"] = "envoy"
    message = config_error(write(data))
    assert "load_balancer: unknown load balancer kind; the kinds are haproxy, nginx" in message


def test_a_setting_of_another_kind_is_refused_naming_its_kind(write: Any) -> None:
    data = minimal()
    data["load_balancer"]["upstream_file"] = "/etc/nginx/conf.d/app.conf"
    message = config_error(write(data))
    assert "load_balancer: upstream_file is a setting of kind nginx, not of kind haproxy" in message


def test_a_key_of_no_kind_is_refused_at_its_path(write: Any) -> None:
    data = nginx_fleet()
    data["load_balancer"]["upstreams"] = "x"
    assert "load_balancer.upstreams: unknown key" in config_error(write(data))


def test_an_nginx_server_must_be_host_and_port(write: Any) -> None:
    data = nginx_fleet()
    data["instances"][1]["lb_server"] = "app-2"
    message = config_error(write(data))
    assert "instances[1].lb_server: invalid upstream server address HOST:PORT 'app-2' (load_balancer.kind nginx)" in (
        message
    )


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("upstream_file", "conf.d/app.conf", "upstream_file must be an absolute path"),
        ("upstream", "app; include /etc/passwd", "invalid upstream name"),
        ("nginx_binary", "nginx -g 'daemon off;'", "invalid nginx_binary"),
        ("ssh_host", "lb1;reboot", "invalid ssh_host"),
    ],
)
def test_hostile_nginx_values_are_refused(write: Any, key: str, value: str, said: str) -> None:
    data = nginx_fleet()
    data["load_balancer"][key] = value
    assert said in config_error(write(data))


def test_an_ipv6_upstream_server_is_accepted(write: Any) -> None:
    data = nginx_fleet()
    data["instances"][0]["lb_server"] = "[fd00::5]:8080"
    assert load_fleet(write(data)).instances[0].lb_server == "[fd00::5]:8080"
