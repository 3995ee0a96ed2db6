"""The fleet file: strict, typed, overridable from the environment, errors that name their path."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from compose_rollout.config import Fleet, Instance, RolloutPolicy, load_fleet
from compose_rollout.errors import ConfigError
from compose_rollout.images import parse_reference

REGISTRY_PASSWORD = "ghp_registry-Secret-4f2a9c"
SSH_PASSPHRASE = "ssh-Passphrase-77e1b0"


def _instance(number: int) -> dict[str, Any]:
    return {
        "name": f"app-{number}",
        "host": f"10.0.0.{number + 4}",
        "project_directory": "/srv/terrateam",
        "lb_server": f"app-{number}",
        "health_url": f"http://10.0.0.{number + 4}:8080/health",
    }


def minimal(instances: int = 2) -> dict[str, Any]:
    """The smallest valid fleet: everything else has a default."""
    return {
        "name": "terrateam",
        "image_repository": "ghcr.io/terrateamio/terrat-oss",
        "load_balancer": {"admin_address": "tcp://10.0.0.2:9999", "backend": "app"},
        "instances": [_instance(number) for number in range(1, instances + 1)],
    }


@pytest.fixture(autouse=True)
def _no_rollout_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own ROLLOUT_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("ROLLOUT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write(tmp_path: Path):
    def _write(data: dict[str, Any] | str, name: str = "fleet.yaml") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


def config_error(path: Path, **overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_fleet(path, **overrides)
    return str(caught.value)


# --- a valid file -------------------------------------------------------------------------------------------------


def test_minimal_fleet_loads_with_defaults(write):
    fleet = load_fleet(write(minimal()))
    assert isinstance(fleet, Fleet)
    assert fleet.name == "terrateam"
    assert fleet.service == "server"
    assert fleet.rollout.batch_size == 1
    assert fleet.rollout.batch_count(len(fleet.instances)) == 1
    assert fleet.rollout.drain_timeout_seconds == 130
    assert fleet.rollout.on_drain_timeout == "fail"
    assert fleet.rollout.canary is False
    assert fleet.compose.command == "auto"
    assert fleet.load_balancer.kind == "haproxy"
    assert fleet.registry.username is None and fleet.registry.password is None
    assert fleet.ssh.key_passphrase is None
    assert [instance.name for instance in fleet.instances] == ["app-1", "app-2"]


def test_instance_paths_and_project_name_are_derived(write):
    fleet = load_fleet(write(minimal()))
    instance = fleet.instances[0]
    assert instance.compose_file == "docker-compose.yml"
    assert instance.compose_path == "/srv/terrateam/docker-compose.yml"
    assert instance.compose_project == "terrateam"


def test_instance_overrides_ssh_port_and_user(write):
    data = minimal()
    data["ssh"] = {"user": "deploy", "port": 2222}
    data["instances"][1].update(ssh_port=22022, ssh_user="ops")
    fleet = load_fleet(write(data))
    first, second = fleet.instances
    assert (fleet.ssh_port(first), fleet.ssh_user(first)) == (2222, "deploy")
    assert (fleet.ssh_port(second), fleet.ssh_user(second)) == (22022, "ops")


def test_instance_lookup_by_name(write):
    fleet = load_fleet(write(minimal()))
    assert fleet.instance("app-2").host == "10.0.0.6"
    with pytest.raises(ConfigError, match="no instance 'app-9'"):
        fleet.instance("app-9")


def test_loaded_fleet_is_immutable(write):
    fleet = load_fleet(write(minimal()))
    with pytest.raises((TypeError, ValueError)):
        fleet.instances[0].host = "10.9.9.9"  # type: ignore[misc]


def test_explicit_project_name_and_compose_file(write):
    data = minimal()
    data["instances"][0].update(
        project_directory="/opt/Terrateam App", compose_file="deploy/compose.prod.yml", project_name="terra"
    )
    data["instances"][1].update(project_directory="/opt/Terrateam App")
    fleet = load_fleet(write(data))
    first, second = fleet.instances
    assert first.compose_path == "/opt/Terrateam App/deploy/compose.prod.yml"
    assert first.compose_project == "terra"
    # Without a name, Compose derives it from the directory: lowercased, other characters dropped.
    assert second.compose_project == "terrateamapp"


@pytest.mark.parametrize("directory", ["/srv/_terrateam", "/srv/-app", "/srv/__"])
def test_derived_project_name_is_never_one_compose_refuses(directory: str):
    try:
        instance = Instance(
            name="app-1",
            host="10.0.0.5",
            project_directory=directory,
            lb_server="app-1",
            health_url="http://10.0.0.5:8080/health",
        )
    except ValueError:
        return  # refusing the instance (asking for an explicit project_name) is a fine answer
    # Otherwise the name must pass the same rule the fleet file enforces for an explicit project_name.
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", instance.compose_project)


# --- unknown keys -------------------------------------------------------------------------------------------------


def test_unknown_top_level_key_is_refused(write):
    data = minimal()
    data["bogus"] = 1
    assert "bogus: unknown key" in config_error(write(data))


def test_unknown_nested_keys_are_refused_naming_their_path(write):
    data = minimal()
    data["instances"][1]["bogus"] = True
    data["health"] = {"timeout_secs": 10}
    message = config_error(write(data))
    # Every bad path is reported at once, with the file it came from.
    assert "instances[1].bogus: unknown key" in message
    assert "health.timeout_secs: unknown key" in message
    assert "fleet.yaml" in message


def test_missing_required_fields_are_named(write):
    data = minimal()
    del data["load_balancer"]["backend"]
    del data["instances"][0]["health_url"]
    message = config_error(write(data))
    assert "load_balancer.backend: Field required" in message
    assert "instances[0].health_url: Field required" in message


def test_empty_file_names_every_required_field(write):
    message = config_error(write(""))
    for field in ("name", "image_repository", "load_balancer", "instances"):
        assert f"{field}: Field required" in message


def test_top_level_list_is_refused(write):
    with pytest.raises(ConfigError, match=r"fleet\.yaml"):
        load_fleet(write("- a\n- b\n"))


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_fleet(missing)
    assert str(missing) in str(caught.value)


def test_directory_instead_of_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_fleet(tmp_path)


@pytest.mark.parametrize("text", ["name: terrateam\n  image_repository: [x\n", "name: [unclosed\n", "a: b: c\n"])
def test_yaml_syntax_error_is_a_config_error(write, text: str):
    with pytest.raises(ConfigError, match=r"fleet\.yaml"):
        load_fleet(write(text))


@pytest.mark.parametrize(("key", "second"), [("name", "name: other"), ("backend", "  backend: web")])
def test_a_key_given_twice_is_refused_naming_it_and_its_line(write, key: str, second: str):
    """PyYAML alone keeps the last of two `backend:` lines; a person meant one of them."""
    lines = yaml.safe_dump(minimal(), sort_keys=False).splitlines()
    first = next(number for number, line in enumerate(lines) if line.lstrip().startswith(f"{key}:"))
    lines.insert(first + 1, second)
    message = config_error(write("\n".join(lines) + "\n"))
    assert f"found the key '{key}' twice" in message and "fleet.yaml" in message
    assert f"line {first + 2}" in message  # the second one, counted from 1


# --- environment and explicit overrides ---------------------------------------------------------------------------


def test_environment_overrides_nested_yaml_value(write, monkeypatch: pytest.MonkeyPatch):
    data = minimal()
    data["health"] = {"timeout_seconds": 50, "consecutive_successes": 5}
    path = write(data)
    assert load_fleet(path).health.timeout_seconds == 50
    monkeypatch.setenv("ROLLOUT_HEALTH__TIMEOUT_SECONDS", "7")
    fleet = load_fleet(path)
    assert fleet.health.timeout_seconds == 7
    # The rest of the section still comes from the file.
    assert fleet.health.consecutive_successes == 5


def test_environment_overrides_top_level_and_secret(write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROLLOUT_SERVICE", "web")
    monkeypatch.setenv("ROLLOUT_REGISTRY__PASSWORD", REGISTRY_PASSWORD)
    fleet = load_fleet(write(minimal()))
    assert fleet.service == "web"
    assert fleet.registry.password is not None
    assert fleet.registry.password.get_secret_value() == REGISTRY_PASSWORD


def test_invalid_environment_value_names_the_path(write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROLLOUT_HEALTH__TIMEOUT_SECONDS", "-1")
    assert "health.timeout_seconds:" in config_error(write(minimal()))


def test_explicit_arguments_win_over_environment_and_file(write, monkeypatch: pytest.MonkeyPatch):
    data = minimal()
    data["service"] = "from-file"
    monkeypatch.setenv("ROLLOUT_SERVICE", "from-env")
    assert load_fleet(write(data), service="explicit").service == "explicit"


# --- invalid values -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "-oProxyCommand=touch /tmp/x"),
        ("host", "app host"),
        ("host", "host;reboot"),
        ("host", ""),
        ("host", "host-"),
        ("host", "10.0.0.5\n"),
        ("project_directory", "srv/terrateam"),
        ("project_directory", "./terrateam"),
        ("project_directory", "/srv/../etc"),
        ("project_directory", "/srv/terrateam/.."),
        ("project_directory", "/srv/terra\nteam"),
        ("compose_file", "/etc/docker-compose.yml"),
        ("compose_file", "../docker-compose.yml"),
        ("compose_file", "deploy/../../docker-compose.yml"),
        ("compose_file", "docker compose.yml"),
        ("compose_file", "compose.yml;id"),
        ("compose_file", "$HOME/compose.yml"),
        ("health_url", "ftp://10.0.0.5/health"),
        ("health_url", "10.0.0.5:8080/health"),
        ("health_url", "http://"),
        ("health_url", "http://10.0.0.5:8080/he alth"),
        ("health_url", "http:///health"),
        ("name", "App-1"),
        ("name", "-app"),
        ("name", "app-"),
        ("name", "app_1"),
        ("name", "a" * 64),
        ("name", ""),
        ("lb_server", "app 1"),
        ("lb_server", "app/1"),
        ("ssh_user", "root;id"),
        ("ssh_port", 0),
        ("ssh_port", 65536),
        ("project_name", "Terrateam"),
        ("project_name", "_terrateam"),
    ],
)
def test_invalid_instance_field_is_refused_naming_it(write, field: str, value: object):
    data = minimal()
    data["instances"][1][field] = value
    message = config_error(write(data))
    assert f"instances[1].{field}:" in message
    assert "instances[0]" not in message


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        ("host", "app-2.internal.example.com", "app-2.internal.example.com"),
        ("host", "2001:db8::5", "2001:db8::5"),
        ("host", "2001:DB8:0::5", "2001:db8::5"),
        ("project_directory", "/srv/./terrateam/", "/srv/terrateam"),
        ("compose_file", "deploy/compose.prod.yml", "deploy/compose.prod.yml"),
        ("health_url", "https://app-2.example.com/api/health?full=1", "https://app-2.example.com/api/health?full=1"),
        ("name", "a" * 63, "a" * 63),
    ],
)
def test_valid_instance_values(write, field: str, value: str, stored: str):
    data = minimal()
    data["instances"][1][field] = value
    assert getattr(load_fleet(write(data)).instances[1], field) == stored


@pytest.mark.parametrize(
    "address",
    [
        "tcp://10.0.0.2",
        "tcp://10.0.0.2:0",
        "tcp://10.0.0.2:70000",
        "http://10.0.0.2:9999",
        "unix://run/haproxy.sock",
        "unix:///run/../etc/haproxy.sock",
        "tcp://-x:9999",
        "10.0.0.2:9999",
    ],
)
def test_invalid_admin_address(write, address: str):
    data = minimal()
    data["load_balancer"]["admin_address"] = address
    assert "load_balancer.admin_address:" in config_error(write(data))


@pytest.mark.parametrize(
    "path", ["/run/haproxy,fork.sock", "/run/haproxy.sock,exec=id", "/run/ha proxy.sock", "/run/h!!aproxy", "/run/a:b"]
)
def test_an_ssh_admin_socket_path_socat_would_read_as_options_is_refused_when_the_fleet_loads(write, path: str):
    data = minimal()
    data["load_balancer"]["admin_address"] = f"ssh://lb.internal{path}"
    message = config_error(write(data))
    assert "load_balancer.admin_address:" in message and "is refused" in message and repr(path) in message


@pytest.mark.parametrize(
    "address", ["tcp://10.0.0.2:9999", "tcp://haproxy.internal:9999", "unix:///run/haproxy/admin.sock"]
)
def test_valid_admin_address(write, address: str):
    data = minimal()
    data["load_balancer"]["admin_address"] = address
    assert load_fleet(write(data)).load_balancer.admin_address == address


@pytest.mark.parametrize("repository", ["ghcr.io/terrateamio/terrat-oss:1.2.3", "ghcr.io/TerrateamIO/terrat-oss", ""])
def test_invalid_image_repository(write, repository: str):
    data = minimal()
    data["image_repository"] = repository
    assert "image_repository:" in config_error(write(data))


@pytest.mark.parametrize("name", ["Terrateam", "terra team", "-terrateam"])
def test_invalid_fleet_name(write, name: str):
    data = minimal()
    data["name"] = name
    assert f"name: invalid fleet name {name!r}" in config_error(write(data))


# --- the fleet as a whole -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attribute", ["name", "lb_server"])
def test_duplicates_are_refused(write, attribute: str):
    data = minimal(3)
    data["instances"][2][attribute] = data["instances"][0][attribute]
    message = config_error(write(data))
    assert f"duplicate {attribute} app-1" in message


def test_single_instance_fleet_is_refused(write):
    message = config_error(write(minimal(1)))
    assert "allow_single_instance" in message


def test_single_instance_fleet_allowed_when_accepted_explicitly(write):
    data = minimal(1)
    data["rollout"] = {"allow_single_instance": True}
    fleet = load_fleet(write(data))
    assert len(fleet.instances) == 1


def test_empty_instance_list_is_refused_even_when_single_is_allowed(write):
    data = minimal(0)
    data["rollout"] = {"allow_single_instance": True}
    assert "instances:" in config_error(write(data))


@pytest.mark.parametrize(("size", "expected"), [(3, 1), (4, 1), (12, 3), (24, 6), (7, 1), (8, 2)])
def test_percentage_batch_count(size: int, expected: int):
    # 25 % of the fleet, rounded down, but at least one instance per batch.
    assert RolloutPolicy(batch_size="25%").batch_count(size) == expected


@pytest.mark.parametrize("size", [3, 12, 24])
def test_percentage_batch_in_a_loaded_fleet(write, size: int):
    data = minimal(size)
    data["rollout"] = {"batch_size": "25%"}
    fleet = load_fleet(write(data))
    assert fleet.rollout.batch_count(len(fleet.instances)) == max(1, size // 4)


def test_numeric_string_batch_size_is_a_count():
    assert RolloutPolicy(batch_size="2").batch_size == 2


@pytest.mark.parametrize(("size", "batch_size"), [(2, 2), (3, 3), (3, 5), (3, "100%"), (4, "100%")])
def test_batch_taking_every_instance_out_is_refused(write, size: int, batch_size: int | str):
    data = minimal(size)
    data["rollout"] = {"batch_size": batch_size}
    message = config_error(write(data))
    assert "rollout.batch_size" in message
    assert f"all {size} instances" in message


@pytest.mark.parametrize(("size", "batch_size", "count"), [(2, "50%", 1), (4, "75%", 3), (3, 2, 2), (3, "99%", 2)])
def test_batch_leaving_one_instance_serving_is_accepted(write, size: int, batch_size: int | str, count: int):
    data = minimal(size)
    data["rollout"] = {"batch_size": batch_size}
    assert load_fleet(write(data)).rollout.batch_count(size) == count


@pytest.mark.parametrize("batch_size", [0, -1, "0", "0%", "101%", "25 %", "%", "quarter", "2.5"])
def test_invalid_batch_size(write, batch_size: object):
    data = minimal(4)
    data["rollout"] = {"batch_size": batch_size}
    assert "rollout.batch_size" in config_error(write(data))


def test_wrong_type_batch_size_names_the_real_path(write):
    data = minimal(4)
    data["rollout"] = {"batch_size": [1]}
    message = config_error(write(data))
    assert "rollout.batch_size:" in message
    assert "batch_size.int" not in message and "batch_size.str" not in message


# --- secrets ------------------------------------------------------------------------------------------------------


def _with_secrets(data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    data["ssh"] = {"key_passphrase": SSH_PASSPHRASE}
    data["registry"] = {"username": "terrateam-bot", "password": REGISTRY_PASSWORD}
    return data


def test_secrets_are_secretstr_and_hidden_from_repr(write):
    fleet = load_fleet(write(_with_secrets(minimal())))
    assert isinstance(fleet.ssh.key_passphrase, SecretStr)
    assert isinstance(fleet.registry.password, SecretStr)
    assert fleet.ssh.key_passphrase.get_secret_value() == SSH_PASSPHRASE
    assert fleet.registry.password.get_secret_value() == REGISTRY_PASSWORD
    for text in (
        repr(fleet),
        str(fleet),
        repr(fleet.registry),
        str(fleet.ssh),
        fleet.model_dump_json(),
        str(fleet.model_dump()),
    ):
        assert REGISTRY_PASSWORD not in text
        assert SSH_PASSPHRASE not in text


def test_secrets_never_appear_in_config_errors(write):
    data = _with_secrets(minimal())
    data["instances"][0]["host"] = "bad host"
    data["registry"]["timeout_seconds"] = -1
    data["ssh"]["port"] = 0
    message = config_error(write(data))
    assert "instances[0].host" in message and "registry.timeout_seconds" in message
    assert REGISTRY_PASSWORD not in message
    assert SSH_PASSPHRASE not in message


@pytest.mark.parametrize(
    "registry",
    [
        {"password": [REGISTRY_PASSWORD]},
        {"password": {"value": REGISTRY_PASSWORD}},
        {"passwd": REGISTRY_PASSWORD},
        {"password": REGISTRY_PASSWORD, "timeout_seconds": REGISTRY_PASSWORD},
    ],
)
def test_misplaced_or_mistyped_secret_is_not_echoed(write, registry: dict[str, Any]):
    data = minimal()
    data["registry"] = registry
    message = config_error(write(data))
    assert "registry." in message
    assert REGISTRY_PASSWORD not in message


def test_secret_from_environment_is_not_echoed_when_invalid(write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROLLOUT_REGISTRY__TIMEOUT_SECONDS", REGISTRY_PASSWORD)
    message = config_error(write(minimal()))
    assert "registry.timeout_seconds" in message
    assert REGISTRY_PASSWORD not in message


# --- which images a run may deploy, and where the registry credentials go ----------------------------------------


def _allowing(*repositories: str) -> Fleet:
    return Fleet(**(minimal() | {"allowed_repositories": list(repositories)}))


def test_an_image_outside_the_allowed_repositories_is_refused_naming_it_and_the_allowed_ones():
    fleet = _allowing("ghcr.io/terrateamio/terrat-ee")
    message = "ghcr.io/evil/terrat-oss is not allowed for fleet terrateam: it may run only "
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        fleet.check_repository(parse_reference("ghcr.io/evil/terrat-oss:1.2.3"))
    assert "ghcr.io/terrateamio/terrat-oss, ghcr.io/terrateamio/terrat-ee" in str(caught.value)
    assert "allowed_repositories" in str(caught.value)


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/terrateamio/terrat-oss:1.2.3",
        "GHCR.io/terrateamio/terrat-oss:1.2.3",  # registry hosts are case-insensitive
        "ghcr.io/terrateamio/terrat-ee@sha256:" + "a" * 64,
        "nginx:1.27",
        "docker.io/library/nginx:1.27",
        "index.docker.io/library/nginx:1.27",
    ],
)
def test_the_fleets_repository_and_the_allowed_ones_pass(image: str):
    _allowing("ghcr.io/terrateamio/terrat-ee", "nginx").check_repository(parse_reference(image))


@pytest.mark.parametrize(
    "image",
    ["ghcr.io/terrateamio/terrat-oss-fork:1", "ghcr.io/terrateamio:1", "terrateamio/terrat-oss:1", "nginx2:1"],
)
def test_a_repository_that_only_resembles_an_allowed_one_is_refused(image: str):
    with pytest.raises(ConfigError, match="is not allowed for fleet terrateam"):
        _allowing("nginx").check_repository(parse_reference(image))


def test_an_invalid_allowed_repository_is_refused_naming_its_path(write):
    data = minimal() | {"allowed_repositories": ["ghcr.io/terrateamio/terrat-ee", "ghcr.io/Bad Name"]}
    with pytest.raises(ConfigError, match=re.escape("allowed_repositories[1]: invalid image repository")):
        load_fleet(write(data))


def test_the_credentials_are_for_the_registry_of_image_repository_by_default(write):
    fleet = load_fleet(write(_with_secrets(minimal())))
    assert fleet.registry.credentials_host == "ghcr.io"
    hub = load_fleet(write(minimal() | {"image_repository": "terrateamio/terrat-oss"}))
    assert hub.registry.credentials_host == "docker.io"


def test_credentials_host_may_name_the_registry_of_an_allowed_repository(write):
    data = _with_secrets(minimal()) | {"allowed_repositories": ["registry.terrateam.io/ee/terrat-ee"]}
    data["registry"]["credentials_host"] = "Registry.Terrateam.io"
    assert load_fleet(write(data)).registry.credentials_host == "registry.terrateam.io"


def test_credentials_host_elsewhere_is_refused(write):
    data = _with_secrets(minimal())
    data["registry"]["credentials_host"] = "collector.example.com"
    message = "registry.credentials_host: collector.example.com is the registry of neither"
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_fleet(write(data))
    assert REGISTRY_PASSWORD not in str(caught.value)


@pytest.mark.parametrize("key", ["token_realm_hosts", "plain_http_hosts"])
def test_registry_host_lists_are_validated(write, key: str):
    data = minimal() | {"registry": {key: ["auth.example.com", "https://auth.example.com/token"]}}
    with pytest.raises(ConfigError, match=re.escape(f"registry.{key}[1]: invalid registry host")):
        load_fleet(write(data))


def test_credentials_host_can_be_set_from_the_environment(write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ROLLOUT_REGISTRY__PASSWORD", REGISTRY_PASSWORD)
    monkeypatch.setenv("ROLLOUT_ALLOWED_REPOSITORIES", '["registry.terrateam.io/ee/terrat-ee"]')
    monkeypatch.setenv("ROLLOUT_REGISTRY__CREDENTIALS_HOST", "registry.terrateam.io")
    fleet = load_fleet(write(minimal()))
    assert fleet.registry.credentials_host == "registry.terrateam.io"
    assert fleet.allowed_repositories == ["registry.terrateam.io/ee/terrat-ee"]


def test_a_batch_of_the_whole_fleet_is_refused_in_place_and_allowed_with_surge(write):
    data = minimal(3)
    data["rollout"] = {"batch_size": "100%"}
    message = config_error(write(data))
    assert "would take all 3 instances out of rotation at once" in message and "strategy: surge" in message
    data["rollout"]["strategy"] = "surge"
    fleet = load_fleet(write(data))
    assert fleet.rollout.batch_count(3) == 3


def test_a_fleet_of_one_needs_no_downtime_with_surge(write):
    data = minimal(1)
    data["rollout"] = {"strategy": "surge"}
    assert len(load_fleet(write(data)).instances) == 1


def test_an_unknown_strategy_is_refused_naming_both(write):
    data = minimal()
    data["rollout"] = {"strategy": "blue-green"}
    assert "rollout.strategy: Input should be 'in-place' or 'surge'" in config_error(write(data))


def test_a_hook_of_the_whole_run_cannot_run_on_a_host(write):
    data = minimal()
    data["hooks"] = {"before_deploy": {"command": "backup", "run_on": "host"}}
    assert "hooks: before_deploy runs once for the fleet: run_on must be orchestrator, not host" in config_error(
        write(data)
    )


@pytest.mark.parametrize(
    ("rollout", "problem"),
    [
        ({"canary_weight": "0%"}, "canary_weight must be a share from 1% to 99%"),
        ({"canary_weight": "10"}, "canary_weight must be a share from 1% to 99%"),
        ({"canary_weight": "10%", "strategy": "surge"}, "canary_weight works with strategy in-place only"),
    ],
)
def test_a_weighted_canary_is_refused_where_it_cannot_work(write, rollout, problem):
    data = minimal()
    data["rollout"] = rollout
    assert problem in config_error(write(data))
