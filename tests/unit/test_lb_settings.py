"""`load_balancer` is one strict section per kind, chosen by `kind`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose_rollout.config import load_fleet
from compose_rollout.lb.settings import AwsSettings, HaproxySettings, NginxSettings
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
    assert (
        "load_balancer: unknown load balancer kind; the kinds are haproxy, nginx, caddy, traefik, aws, command"
        in message
    )


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


ARN = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/app/0123456789abcdef"
AWS = {"kind": "aws", "region": "eu-west-1", "target_group_arn": ARN}


def aws_fleet() -> dict[str, Any]:
    data = minimal()
    data["load_balancer"] = dict(AWS)
    data["instances"][0]["lb_server"] = "i-0123456789abcdef0:8080"
    data["instances"][1]["lb_server"] = "10.0.1.2:8080"
    return data


def test_an_aws_section_loads_with_bounded_waits_and_no_credentials(write: Any) -> None:
    fleet = load_fleet(write(aws_fleet()))
    lb = fleet.load_balancer
    assert isinstance(lb, AwsSettings)
    assert (lb.region, lb.target_group_arn, lb.endpoint_url) == ("eu-west-1", ARN, None)
    assert (lb.healthy_timeout_seconds, lb.poll_interval_seconds, lb.max_attempts) == (300, 5, 5)
    assert [i.lb_server for i in fleet.instances] == ["i-0123456789abcdef0:8080", "10.0.1.2:8080"]


@pytest.mark.parametrize(
    "key", ["aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key", "profile"]
)
def test_aws_credentials_in_the_fleet_file_are_refused_as_unknown_keys(write: Any, key: str) -> None:
    data = aws_fleet()
    data["load_balancer"][key] = "AKIAIOSFODNN7EXAMPLE"
    assert f"load_balancer.{key}: unknown key" in config_error(write(data))


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("region", "eu-west", "invalid AWS region 'eu-west'"),
        ("region", "EU-WEST-1", "invalid AWS region"),
        ("target_group_arn", "app-tg", "target_group_arn must be a target group's ARN"),
        ("target_group_arn", ARN.replace("targetgroup", "loadbalancer/app"), "must be a target group's ARN"),
        ("target_group_arn", ARN.replace("eu-west-1", "us-east-1"), "is in region us-east-1, but region is eu-west-1"),
        ("endpoint_url", "elasticloadbalancing.eu-west-1.amazonaws.com", "endpoint_url must be an http(s) URL"),
        ("endpoint_url", "https://AKIA:secret@vpce.example.com", "endpoint_url must be an http(s) URL without"),
        ("endpoint_url", "http://127.0.0.1:70000", "endpoint_url has an invalid port"),
        ("healthy_timeout_seconds", 0, "healthy_timeout_seconds: Input should be greater than 0"),
        ("healthy_timeout_seconds", 7200, "healthy_timeout_seconds: Input should be less than or equal to 3600"),
        ("poll_interval_seconds", 0, "poll_interval_seconds: Input should be greater than 0"),
        ("max_attempts", 0, "max_attempts: Input should be greater than or equal to 1"),
        ("max_attempts", 50, "max_attempts: Input should be less than or equal to 10"),
    ],
)
def test_wrong_aws_values_are_refused_at_their_path(write: Any, key: str, value: object, said: str) -> None:
    data = aws_fleet()
    data["load_balancer"][key] = value
    message = config_error(write(data))
    assert said in message and "load_balancer" in message


def test_an_aws_endpoint_url_for_moto_or_a_vpc_endpoint_is_accepted(write: Any) -> None:
    for url in ("http://127.0.0.1:5000", "https://vpce-0a1b.elasticloadbalancing.eu-west-1.vpce.amazonaws.com"):
        data = aws_fleet()
        data["load_balancer"]["endpoint_url"] = url
        lb = load_fleet(write(data)).load_balancer
        assert isinstance(lb, AwsSettings) and lb.endpoint_url == url


def test_a_setting_of_kind_aws_in_another_kind_is_refused_naming_aws(write: Any) -> None:
    data = minimal()
    data["load_balancer"]["target_group_arn"] = ARN
    assert "load_balancer: target_group_arn is a setting of kind aws, not of kind haproxy" in config_error(write(data))


@pytest.mark.parametrize(
    "server", ["i-0123456789abcdef0:8080", "i-0123abcd:80", "10.0.1.5:8080", "[fd00::5]:8080", "[2001:db8::1]:443"]
)
def test_an_aws_target_is_an_instance_id_or_an_ip_with_its_port(write: Any, server: str) -> None:
    data = aws_fleet()
    data["instances"][0]["lb_server"] = server
    assert load_fleet(write(data)).instances[0].lb_server == server


@pytest.mark.parametrize(
    ("server", "said"),
    [
        ("app-1", "it needs a port from 1 to 65535"),
        ("i-0123456789abcdef0", "it needs a port from 1 to 65535"),
        ("10.0.1.5:0", "it needs a port from 1 to 65535"),
        ("10.0.1.5:65536", "it needs a port from 1 to 65535"),
        ("app-1:8080", "TARGET is an EC2 instance id (i-...) or IP"),
        ("i-0123:8080", "TARGET is an EC2 instance id (i-...) or IP"),
        ("fd00::5:8080", "write the address as AWS does, [fd00::5]:8080"),
        ("[10.0.1.5]:8080", "write the address as AWS does, 10.0.1.5:8080"),
        ("[fd00:0::5]:8080", "write the address as AWS does, [fd00::5]:8080"),
    ],
)
def test_a_wrong_aws_target_is_refused_naming_the_form(write: Any, server: str, said: str) -> None:
    data = aws_fleet()
    data["instances"][1]["lb_server"] = server
    message = config_error(write(data))
    assert f"instances[1].lb_server: invalid target TARGET:PORT {server!r}" in message
    assert said in message and "(load_balancer.kind aws)" in message
