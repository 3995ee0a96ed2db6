"""The fleet file: typed, strict, and validated before anything is touched.

A fleet file is YAML (see `examples/terrateam-fleet.yaml`). Every field can be
overridden by an environment variable: `ROLLOUT_` + the field path joined with `__`,
e.g. `ROLLOUT_HEALTH__TIMEOUT_SECONDS=300` or `ROLLOUT_IMAGE_REPOSITORY=...`.
Unknown keys are refused, and every error names its path (`instances[1].host: ...`).
"""

from __future__ import annotations

import math
import re
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from compose_rollout.errors import ConfigError
from compose_rollout.fields import IDENT_RE, NAME_RE, SERVER_RE, USER_RE, Strict, absolute_posix, check
from compose_rollout.fields import host as valid_host
from compose_rollout.images import ImageRef, validate_repository
from compose_rollout.lb.settings import KINDS as LB_KINDS
from compose_rollout.lb.settings import LoadBalancerSettings
from compose_rollout.registry_settings import (
    RegistrySettings,
    check_credentials_host,
    check_repository,
    with_credentials_host,
)
from compose_rollout.triggers.tag_policy import TagPolicy
from compose_rollout.triggers.windows import MaintenanceWindows

BATCH_RE = re.compile(r"([1-9][0-9]?|100)%")


def _valid_repository(value: str) -> str:
    try:
        return validate_repository(value)
    except ConfigError as error:
        raise ValueError(str(error)) from None


class SshSettings(Strict):
    """How to reach every instance over SSH (instances may override port and user)."""

    user: Annotated[str, Field(description="Remote user.")] = "root"
    port: Annotated[int, Field(ge=1, le=65535, description="Default SSH port.")] = 22
    key_file: Annotated[Path, Field(description="Private key file used to log in.")] = Path("~/.ssh/id_ed25519")
    key_passphrase: Annotated[SecretStr | None, Field(description="Passphrase of the key, if it has one.")] = None
    known_hosts_file: Annotated[
        Path,
        Field(description="known_hosts file pinning every host key (hashed entries work). Unknown keys are refused."),
    ] = Path("~/.ssh/known_hosts")
    connect_timeout_seconds: Annotated[
        float, Field(gt=0, le=120, description="TCP connect, banner and auth timeout.")
    ] = 10.0
    command_timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, description="Default limit for one remote command.")
    ] = 60.0

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        return check(USER_RE, "SSH user", value)


class ComposeSettings(Strict):
    """How Compose is invoked on the hosts."""

    command: Annotated[
        Literal["auto", "v1", "v2"],
        Field(description="`v2` = `docker compose`, `v1` = `docker-compose`, `auto` = detect per host."),
    ] = "auto"
    up_timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, description="Limit for `up -d` (a remote `timeout` wraps it).")
    ] = 180.0
    pull_timeout_seconds: Annotated[float, Field(gt=0, le=7200, description="Limit for one image pull.")] = 600.0


class HealthSettings(Strict):
    """The health gate an instance must pass before it takes traffic again."""

    consecutive_successes: Annotated[
        int, Field(ge=1, le=100, description="Consecutive 2xx answers from the health URL needed.")
    ] = 3
    interval_seconds: Annotated[float, Field(gt=0, le=60, description="Time between two health probes.")] = 0.5
    request_timeout_seconds: Annotated[float, Field(gt=0, le=60, description="Limit for one health probe.")] = 2.0
    timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, description="Deadline for the instance to become healthy after `up`.")
    ] = 120.0
    stabilization_seconds: Annotated[
        float,
        Field(ge=0, le=3600, description="After passing, it must stay healthy (same container, no restart) this long."),
    ] = 2.0
    lb_timeout_seconds: Annotated[
        float, Field(gt=0, le=3600, description="Deadline for the LB's own check to report the server UP.")
    ] = 60.0
    watch_seconds: Annotated[
        float,
        Field(
            ge=0,
            le=3600,
            description="The 5xx gate: after an instance is back in rotation, watch its responses in the LB this "
            "long and roll back if too many are 5xx (0: off; needs an LB that counts responses: HAProxy).",
        ),
    ] = 0.0
    max_5xx_ratio: Annotated[
        float, Field(ge=0, le=1, description="The 5xx gate fails above this share of 5xx responses (0.05 = 5 %).")
    ] = 0.05
    min_requests: Annotated[
        int, Field(ge=1, le=1_000_000, description="The 5xx gate judges only from this many responses on.")
    ] = 20


class RolloutPolicy(Strict):
    """How many instances leave rotation at once, and what to do when draining is slow."""

    batch_size: Annotated[
        int | str,
        Field(description="Instances updated at once: a count (1) or a percentage of the fleet ('25%')."),
    ] = 1
    canary: Annotated[bool, Field(description="Update one instance alone first, whatever the batch size.")] = False
    canary_weight: Annotated[
        str | None,
        Field(
            description="Share of the traffic the canary gets back in rotation, e.g. '10%' (implies canary; "
            "needs an LB with weights: HAProxy; in-place only)."
        ),
    ] = None
    canary_bake_seconds: Annotated[
        float,
        Field(ge=0, le=86400, description="How long the weighted canary serves its share, watched by the 5xx gate."),
    ] = 0.0
    pause_between_batches_seconds: Annotated[float, Field(ge=0, le=3600, description="Wait between two batches.")] = 0.0
    drain_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=86400,
            description="How long to wait for active sessions to reach zero (Terrateam: 120 s requests).",
        ),
    ] = 130.0
    on_drain_timeout: Annotated[
        Literal["fail", "proceed"],
        Field(description="`fail`: abort and roll back; `proceed`: cut the remaining sessions and go on."),
    ] = "fail"
    on_locked: Annotated[
        Literal["fail", "wait"],
        Field(description="When another run holds the fleet: `fail` at once, or `wait` for it (not in FIFO order)."),
    ] = "fail"
    lock_wait_seconds: Annotated[
        float, Field(gt=0, le=86400, description="With on_locked: wait, how long to wait for the lock.")
    ] = 3600.0
    max_failed_instances: Annotated[
        int,
        Field(
            ge=0,
            le=1000,
            description="0: the first failed instance rolls the whole run back. Above 0: a failed instance is rolled "
            "back alone and the run goes on, until more than this many failed; the run then ends partial.",
        ),
    ] = 0
    strategy: Annotated[
        Literal["in-place", "surge"],
        Field(
            description="`in-place`: each instance leaves rotation while its container is replaced; `surge`: the "
            "new container starts beside the old one and takes traffic before the old one is drained "
            "(no capacity lost; the service must publish a host port range, README)."
        ),
    ] = "in-place"
    allow_single_instance: Annotated[
        bool, Field(description="Allow a fleet of one instance (it cannot stay up during the update).")
    ] = False

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_type(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"batch_size must be a count or a percentage like '25%', got {value!r}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("batch_size must be at least 1")
            return value
        if value.isdigit() and int(value) >= 1:
            return int(value)
        if not BATCH_RE.fullmatch(value):
            raise ValueError(f"batch_size must be a count or a percentage like '25%', got {value!r}")
        return value

    @field_validator("canary_weight")
    @classmethod
    def _canary_weight(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"([1-9]|[1-9][0-9])%", value):
            raise ValueError(f"canary_weight must be a share from 1% to 99%, got {value!r}")
        return value

    @property
    def canary_share(self) -> float | None:
        """The weighted canary's share of the traffic (0.1 for '10%'), None without one."""
        return int(self.canary_weight[:-1]) / 100 if self.canary_weight else None

    def batch_count(self, fleet_size: int) -> int:
        """How many instances one batch holds for a fleet of `fleet_size`."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        return max(1, math.floor(fleet_size * int(self.batch_size[:-1]) / 100))


class Hook(Strict):
    """A command the run calls at one point, its facts only as ROLLOUT_* environment variables."""

    command: Annotated[
        str, Field(min_length=1, max_length=20_000, description="Shell text, run by `sh`; exit 0 = go on.")
    ]
    timeout_seconds: Annotated[
        float, Field(gt=0, le=86400, description="Stopped (with its process group) after this long: a failure.")
    ] = 300.0
    run_on: Annotated[
        Literal["orchestrator", "host"],
        Field(
            description="`orchestrator`: where the run is (prefect-shell); `host`: the instance's host over SSH "
            "(per-instance hooks only)."
        ),
    ] = "orchestrator"

    @field_validator("command")
    @classmethod
    def _command(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("a hook's command cannot hold a NUL byte")
        return value


class Hooks(Strict):
    """Commands the run calls (README, "Hooks"): non-zero stops what they guard."""

    before_deploy: Annotated[
        Hook | None, Field(description="Once, before the first drain (a backup): failing, nothing is touched.")
    ] = None
    before_instance: Annotated[
        Hook | None, Field(description="Per instance, before it is touched: failing, that instance fails.")
    ] = None
    after_instance: Annotated[
        Hook | None,
        Field(description="Per instance, healthy and before it takes traffic (a smoke test): failing, it fails."),
    ] = None
    after_deploy: Annotated[Hook | None, Field(description="Once, after every instance moved.")] = None
    on_failure: Annotated[Hook | None, Field(description="Once, after a failed run's rollback.")] = None

    @model_validator(mode="after")
    def _once_on_the_orchestrator(self) -> Hooks:
        for name in ("before_deploy", "after_deploy", "on_failure"):
            hook = getattr(self, name)
            if hook is not None and hook.run_on == "host":
                raise ValueError(f"{name} runs once for the fleet: run_on must be orchestrator, not host")
        return self


class Instance(Strict):
    """One Compose host behind the load balancer."""

    name: Annotated[str, Field(description="Unique name (lowercase letters, digits, dashes).")]
    host: Annotated[str, Field(description="Address or DNS name for SSH.")]
    ssh_port: Annotated[int | None, Field(ge=1, le=65535, description="Overrides ssh.port.")] = None
    ssh_user: Annotated[str | None, Field(description="Overrides ssh.user.")] = None
    project_directory: Annotated[str, Field(description="Absolute path of the Compose project on the host.")]
    compose_file: Annotated[str, Field(description="Compose file, relative to project_directory.")] = (
        "docker-compose.yml"
    )
    project_name: Annotated[
        str | None, Field(description="Compose project name; default: the project directory's name.")
    ] = None
    lb_server: Annotated[
        str,
        Field(
            description="This instance's server in the LB, by the LB's name for it: the server name (haproxy), "
            "the upstream address `HOST:PORT` (nginx, caddy), the server URL's `HOST:PORT` (traefik), "
            "the target `TARGET:PORT`, an EC2 instance id or an IP (aws)."
        ),
    ]
    health_url: Annotated[str, Field(description="URL the orchestrator polls, e.g. http://10.0.0.5:8080/health.")]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check(NAME_RE, "instance name", value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return valid_host(value)

    @field_validator("ssh_user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return None if value is None else check(USER_RE, "SSH user", value)

    @field_validator("project_directory")
    @classmethod
    def _directory(cls, value: str) -> str:
        return absolute_posix(value, "project_directory")

    @field_validator("compose_file")
    @classmethod
    def _file(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or not re.fullmatch(r"[A-Za-z0-9_./-]+", value):
            raise ValueError(f"compose_file must be a plain relative file name, got {value!r}")
        return value

    @field_validator("project_name")
    @classmethod
    def _project(cls, value: str | None) -> str | None:
        return None if value is None else check(re.compile(r"[a-z0-9][a-z0-9_-]*"), "project name", value)

    @field_validator("lb_server")
    @classmethod
    def _server(cls, value: str) -> str:
        return check(SERVER_RE, "LB server name", value)

    @field_validator("health_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"health_url must be an http(s) URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _derived_project(self) -> Instance:
        if self.project_name is None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", self.compose_project):
            raise ValueError(
                f"project_directory {self.project_directory!r} gives no valid Compose project name; set project_name"
            )
        return self

    @property
    def compose_path(self) -> str:
        """Absolute path of the compose file on the host."""
        return str(PurePosixPath(self.project_directory) / self.compose_file)

    @property
    def compose_project(self) -> str:
        """The Compose project name (as Compose derives it from the directory)."""
        if self.project_name:
            return self.project_name
        return re.sub(r"[^a-z0-9_-]", "", PurePosixPath(self.project_directory).name.lower())


S = TypeVar("S", bound="YamlSettings")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML would keep
    the last silently: two `batch_size:` lines must not mean whichever comes second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


class _UniqueKeyYamlSource(YamlConfigSettingsSource):
    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        with file_path.open(encoding="utf-8") as stream:
            return yaml.load(stream, Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader


class YamlSettings(BaseSettings):
    """Settings read from a YAML file and overridable from the environment (a base class).

    Explicit arguments win, then the environment, then the file. Load with
    `load_yaml_settings`, which names every bad path in its ConfigError.
    """

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _UniqueKeyYamlSource(settings_cls))


class Fleet(YamlSettings):
    """A fleet: the instances of one Compose service behind one load balancer."""

    model_config = SettingsConfigDict(env_prefix="ROLLOUT_", env_nested_delimiter="__", extra="forbid", frozen=True)

    name: Annotated[str, Field(description="Fleet name, used for locks, history and artifacts.")]
    service: Annotated[str, Field(description="The Compose service that is updated.")] = "server"
    image_repository: Annotated[
        str, Field(description="Image repository without tag, e.g. ghcr.io/terrateamio/terrat-oss.")
    ]
    allowed_repositories: Annotated[
        list[Annotated[str, AfterValidator(_valid_repository)]],
        Field(description="Repositories besides image_repository that a run's `image` may name; others are refused."),
    ] = []
    ssh: SshSettings = SshSettings()
    compose: ComposeSettings = ComposeSettings()
    load_balancer: LoadBalancerSettings
    health: HealthSettings = HealthSettings()
    rollout: RolloutPolicy = RolloutPolicy()
    hooks: Hooks = Hooks()
    registry: RegistrySettings = RegistrySettings()
    tag_policy: Annotated[
        TagPolicy | None,
        Field(description="How a run given no tag (a schedule, say) picks one from the registry, e.g. >=1.4,<2."),
    ] = None
    maintenance_windows: Annotated[
        MaintenanceWindows,
        Field(description="When rollouts may run (cron start, duration, time zone); empty: any time."),
    ] = []
    state_directory: Annotated[Path, Field(description="Where run journals are kept on the orchestrator.")] = Path(
        "~/.local/state/compose-rollout"
    )
    instances: Annotated[list[Instance], Field(min_length=1, description="The instances, in update order.")]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check(NAME_RE, "fleet name", value)

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        return check(IDENT_RE, "service name", value)

    @field_validator("image_repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        return _valid_repository(value)

    @model_validator(mode="before")
    @classmethod
    def _credentials_host(cls, data: Any) -> Any:
        return with_credentials_host(data)

    @model_validator(mode="after")
    def _fleet(self) -> Fleet:
        for attribute in ("name", "lb_server"):
            values = [getattr(instance, attribute) for instance in self.instances]
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                raise ValueError(f"instances: duplicate {attribute} {', '.join(duplicates)}")
        for index, instance in enumerate(self.instances):
            try:
                self.load_balancer.check_server(instance.lb_server)
            except ValueError as error:
                kind = self.load_balancer.kind
                raise ValueError(f"instances[{index}].lb_server: {error} (load_balancer.kind {kind})") from None
        check_credentials_host(self.registry, [self.image_repository, *self.allowed_repositories])
        size = len(self.instances)
        if size < 2 and not self.rollout.allow_single_instance and self.rollout.strategy == "in-place":
            raise ValueError(
                "instances: a fleet of one cannot stay up while it is updated; "
                "set rollout.allow_single_instance: true to accept downtime"
            )
        if self.rollout.canary_weight is not None and self.rollout.strategy == "surge":
            raise ValueError("rollout.canary_weight works with strategy in-place only (not built for surge yet)")
        if self.rollout.canary_weight is not None and size < 2:
            raise ValueError("rollout.canary_weight needs at least two instances (the canary's share of what?)")
        if size >= 2 and self.rollout.strategy == "in-place" and self.rollout.batch_count(size) >= size:
            raise ValueError(
                f"rollout.batch_size: {self.rollout.batch_size} would take all {size} instances out of rotation at "
                "once (rollout.strategy: surge keeps them serving, and allows it)"
            )
        return self

    def instance(self, name: str) -> Instance:
        """The instance called `name`."""
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise ConfigError(f"fleet {self.name} has no instance {name!r}")

    def check_repository(self, ref: ImageRef) -> None:
        """ConfigError unless `ref` is in image_repository or allowed_repositories: a run's
        `image` must not make the fleet run (or the registry client visit) any other."""
        check_repository(ref, [self.image_repository, *self.allowed_repositories], self.name)

    def ssh_port(self, instance: Instance) -> int:
        """The SSH port for `instance`."""
        return instance.ssh_port or self.ssh.port

    def ssh_user(self, instance: Instance) -> str:
        """The SSH user for `instance`."""
        return instance.ssh_user or self.ssh.user


def format_validation_error(error: ValidationError, root: str) -> str:
    """Every problem of a ValidationError as `path.to[1].key: message`, joined by `; `."""
    lines = []
    for item in error.errors():
        path = ""
        for index, part in enumerate(item["loc"]):
            if index and item["loc"][index - 1] == "load_balancer" and part in LB_KINDS:
                continue  # the kind pydantic chose by `kind` is no part of the file's path
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or root}: {message}")
    return "; ".join(lines)


def load_yaml_settings(cls: type[S], path: Path | str, what: str, root: str, **overrides: object) -> S:
    """Load and validate `cls` from a YAML file; ConfigError naming the file and every bad path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    from_file = type(f"_{cls.__name__}FromFile", (cls,), {"model_config": SettingsConfigDict(yaml_file=path)})
    try:
        loaded = from_file(**overrides)
    except ValidationError as error:
        raise ConfigError(f"{what} {path}: {format_validation_error(error, root)}") from None
    except (OSError, ValueError, yaml.YAMLError) as error:  # unreadable file or YAML syntax
        raise ConfigError(f"{what} {path}: {error}") from None
    return cls.model_construct(**dict(loaded))


def load_fleet(path: Path | str, **overrides: object) -> Fleet:
    """Load and validate a fleet file; raise ConfigError naming every bad path."""
    return load_yaml_settings(Fleet, path, "fleet file", "fleet", **overrides)
