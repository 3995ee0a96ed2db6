"""The receiver's settings: sources, the Prefect API, routes (one YAML file, strict)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from compose_rollout.config import YamlSettings, load_yaml_settings
from compose_rollout.errors import ConfigError
from compose_rollout.fields import NAME_RE
from compose_rollout.images import ImageRef, validate_repository
from compose_rollout.triggers.tag_policy import TagPolicy
from compose_rollout.triggers.windows import MaintenanceWindows

_DEPLOYMENT_NAME_RE = re.compile(r"[^/\s]{1,200}/[^/\s]{1,200}")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32,256}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _long_secret(value: SecretStr, what: str, minimum: int = 16) -> SecretStr:
    if not minimum <= len(value.get_secret_value()) <= 1024:
        raise ValueError(f"{what} must be {minimum}-1024 characters (a long random value)")
    return value


# ---------------------------------------------------------------------------------------
# Settings


class DistributionSource(_Strict):
    """Notifications from a CNCF distribution (docker) registry."""

    authorization: Annotated[
        SecretStr,
        Field(description="The exact Authorization header value the registry sends, e.g. 'Bearer <secret>' (16-1024)."),
    ]
    registry_host: Annotated[
        str | None,
        Field(
            max_length=255,
            description="The registry host[:port] as fleets name it; default: the `request.host` of each event.",
        ),
    ] = None

    @field_validator("authorization")
    @classmethod
    def _authorization(cls, value: SecretStr) -> SecretStr:
        return _long_secret(value, "authorization")

    @field_validator("registry_host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is not None:
            validate_repository(f"{value}/x")
        return value


class GitHubSource(_Strict):
    """GitHub `package` events (ghcr.io images)."""

    secret: Annotated[SecretStr, Field(description="The webhook's secret (signs every body), 16-1024 characters.")]

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        return _long_secret(value, "secret")


class DockerHubSource(_Strict):
    """Docker Hub webhooks, authenticated by a token in the URL path (Docker Hub signs nothing)."""

    token: Annotated[
        SecretStr,
        Field(description="32-256 random URL-safe characters ([A-Za-z0-9_-]); the URL is /hooks/dockerhub/<token>."),
    ]

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        if not _TOKEN_RE.fullmatch(value.get_secret_value()):
            raise ValueError("token must be 32-256 characters of [A-Za-z0-9_-], e.g. `openssl rand -hex 24`")
        return value


class PrefectApi(_Strict):
    """Where and how flow runs are created."""

    api_url: Annotated[
        str | None,
        Field(
            max_length=2048, description="Prefect API URL, e.g. http://127.0.0.1:4200/api; default: PREFECT_API_URL."
        ),
    ] = None
    auth_string: Annotated[
        SecretStr | None,
        Field(
            description="The server's PREFECT_SERVER_API_AUTH_STRING (user:password); default: PREFECT_API_AUTH_STRING."
        ),
    ] = None
    api_key: Annotated[SecretStr | None, Field(description="A Prefect API key (sent as a bearer token).")] = None
    timeout_seconds: Annotated[float, Field(gt=0, le=120, description="Limit for one Prefect API request.")] = 10.0
    attempts: Annotated[int, Field(ge=1, le=10, description="Tries to create one run (transient errors only).")] = 3
    retry_delay_seconds: Annotated[
        float, Field(ge=0, le=60, description="Delay before the second try; doubled each time, at most 30 s.")
    ] = 1.0

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"api_url must be an http(s) URL, got {value!r}")
        return value


class WebhookRoute(_Strict):
    """Pushes to one repository start runs of one fleet's deployment."""

    repository: Annotated[
        str, Field(description="Image repository as pushed, e.g. ghcr.io/acme/app or registry.example.com:5000/app.")
    ]
    fleet: Annotated[str, Field(description="Fleet name (pushes are coalesced per fleet).")]
    deployment: Annotated[
        str,
        Field(description="The Prefect deployment to run: its id, or 'flow-name/deployment-name'."),
    ]
    fleet_file: Annotated[
        str, Field(min_length=1, max_length=4096, description="The `fleet_file` parameter, as the worker sees it.")
    ]
    tags: Annotated[TagPolicy, Field(description="Which pushed tags start a run.")] = TagPolicy(version_range=">=0")
    debounce_seconds: Annotated[
        float | None, Field(ge=0, le=600, description="Overrides the global debounce_seconds for this fleet.")
    ] = None
    maintenance_windows: Annotated[
        MaintenanceWindows,
        Field(description="The fleet's windows: a run for a push outside them is scheduled for the next window start."),
    ] = []
    allow_downgrade: Annotated[
        bool,
        Field(
            description=(
                "Start a run for a version older than the one this fleet's last webhook run was for. "
                "Off: such a push (a late or replayed delivery) starts nothing."
            )
        ),
    ] = False

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        try:
            return validate_repository(value)
        except ConfigError as error:
            raise ValueError(str(error)) from None

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError(f"invalid fleet name {value!r}")
        return value

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: str) -> str:
        if deployment_uuid(value) is None and not _DEPLOYMENT_NAME_RE.fullmatch(value):
            raise ValueError(f"deployment must be an id or 'flow-name/deployment-name', got {value!r}")
        return value

    @field_validator("fleet_file")
    @classmethod
    def _fleet_file(cls, value: str) -> str:
        if any(c in value for c in "\n\r\0"):
            raise ValueError("fleet_file must be a single-line path")
        return value


class WebhookSettings(YamlSettings):
    """The webhook receiver: sources, routes to fleets, and its bounds."""

    model_config = SettingsConfigDict(
        env_prefix="ROLLOUT_WEBHOOK_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    listen_host: Annotated[str, Field(max_length=255, description="Address to listen on.")] = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=1, le=65535, description="Port to listen on.")] = 8780
    max_body_bytes: Annotated[
        int, Field(ge=1024, le=16 * 1024 * 1024, description="Larger requests are refused (413) unread.")
    ] = 1024 * 1024
    body_timeout_seconds: Annotated[float, Field(gt=0, le=120, description="Limit for reading one body.")] = 10.0
    header_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=120,
            description=(
                "A connection whose request line and headers are not complete this long after it opened "
                "(or after its first byte, on a kept-alive connection) is closed."
            ),
        ),
    ] = 10.0
    keep_alive_seconds: Annotated[
        int, Field(ge=1, le=300, description="An idle kept-alive connection is closed after this long.")
    ] = 5
    max_concurrent_requests: Annotated[
        int,
        Field(
            ge=1,
            le=10000,
            description="Requests in progress beyond this get 503 (idle or half-sent connections do not count).",
        ),
    ] = 64
    tls_certfile: Annotated[
        Path | None,
        Field(description="Serve HTTPS with this PEM certificate (chain); needs tls_keyfile. Default: plain HTTP."),
    ] = None
    tls_keyfile: Annotated[Path | None, Field(description="The PEM private key of tls_certfile.")] = None
    state_directory: Annotated[
        Path,
        Field(
            description=(
                "Where the receiver keeps what must survive a restart: recent push keys and delivery ids "
                "(replays) and each fleet's last started version (downgrades). One receiver per directory."
            )
        ),
    ] = Path("~/.local/state/compose-rollout/webhooks")
    debounce_seconds: Annotated[
        float, Field(ge=0, le=600, description="Quiet time after a fleet's last push before its newest push starts.")
    ] = 5.0
    debounce_max_seconds: Annotated[
        float, Field(ge=0, le=3600, description="A burst starts at most this long after its first push.")
    ] = 60.0
    remembered_pushes: Annotated[
        int,
        Field(
            ge=16,
            le=65536,
            description="Recent idempotency keys (and as many delivery ids) kept, across restarts, to drop repeats.",
        ),
    ] = 4096
    shutdown_grace_seconds: Annotated[
        float, Field(ge=0, le=120, description="On shutdown, time to start pending pushes and finish calls.")
    ] = 10.0
    prefect: PrefectApi = PrefectApi()
    distribution: DistributionSource | None = None
    github: GitHubSource | None = None
    dockerhub: DockerHubSource | None = None
    routes: Annotated[list[WebhookRoute], Field(min_length=1, max_length=256, description="Repository → fleet.")]

    @model_validator(mode="after")
    def _consistent(self) -> WebhookSettings:
        if self.distribution is None and self.github is None and self.dockerhub is None:
            raise ValueError("configure at least one source: distribution, github or dockerhub")
        if self.debounce_max_seconds < self.debounce_seconds:
            raise ValueError("debounce_max_seconds must be at least debounce_seconds")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both tls_certfile and tls_keyfile, or neither")
        pairs = [(repository_key(r.repository), r.fleet) for r in self.routes]
        duplicates = sorted(
            {f"{repo[0]}/{repo[1]} → {fleet}" for repo, fleet in pairs if pairs.count((repo, fleet)) > 1}
        )
        if duplicates:
            raise ValueError(f"routes: duplicate route {', '.join(duplicates)}")
        return self


def load_webhook_settings(path: Path | str) -> WebhookSettings:
    """Load and validate the receiver's YAML file; raise ConfigError naming every bad path.

    Every value can be overridden from the environment: `ROLLOUT_WEBHOOK_` + the path
    joined by `__`, e.g. `ROLLOUT_WEBHOOK_GITHUB__SECRET`.
    """
    return load_yaml_settings(WebhookSettings, path, "webhook config", "config")


def deployment_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def repository_key(repository: str) -> tuple[str, str]:
    # Registry hosts are case-insensitive; docker.io names gain `library/` as docker does.
    ref = ImageRef(repository)
    return ref.registry.lower(), ref.path
