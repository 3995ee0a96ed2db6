"""Registry push webhooks → Prefect flow runs of a fleet's rollout deployment.

Its own process: `python -m compose_rollout.webhooks --config webhooks.yaml` serves

    POST /hooks/distribution      CNCF distribution (docker registry) notifications
    POST /hooks/github            GitHub `package` events for ghcr.io images
    POST /hooks/dockerhub/TOKEN   Docker Hub webhooks
    GET  /healthz

and turns each accepted push into `POST {PREFECT_API_URL}/deployments/{id}/create_flow_run`
with the parameters `fleet_file`, `tag` and `triggered_by`. Open-source Prefect has no
webhooks of its own (they are a Prefect Cloud feature), hence this relay.

Authentication (a request that fails it gets 401 and starts nothing):

- distribution: the exact `Authorization` header value configured, which the registry
  sends through its endpoint configuration::

      notifications:
        endpoints:
          - name: compose-rollout
            url: https://deploy.example.com/hooks/distribution
            headers:
              Authorization: [Bearer <the secret>]

- GitHub: `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>` with the
  webhook's secret (content type `application/json`).
- Docker Hub signs nothing, so the URL carries a long random token:
  `https://deploy.example.com/hooks/dockerhub/<token>`. Anyone who sees that URL can
  trigger a deploy of a tag that exists; keep it out of proxy access logs (this
  process logs no request paths).

Every secret is a SecretStr, compared with `hmac.compare_digest`, and never logged.

What is started:

- Only tag pushes of routed repositories; every tag passes `validate_tag` and the
  route's `TagPolicy` (never `latest`, `sha-*`, a non-version or a pre-release unless
  allowed). A request carrying a malformed tag, repository or digest is refused (422)
  and starts nothing; a request over `max_body_bytes` gets 413 before it is read.
- The same push delivered twice starts one run: the idempotency key is
  `compose-rollout/<fleet>/<tag>/<digest>` (Docker Hub sends no digest: its
  `pushed_at` stands in). This process remembers recent keys, and Prefect itself
  returns the existing run for a known key, so a restart does not duplicate either.
- Pushes for one fleet within `debounce_seconds` of each other (at most
  `debounce_max_seconds` after the first) coalesce: only the newest starts. Newest is
  the highest version by `tag_policy.version_key` when both tags are versions, else
  the one received last. A push older than a version this process already started
  for the fleet is ignored (registries do not guarantee delivery order).
- A route may carry its fleet's maintenance windows: a run for a push outside them is
  created Scheduled for the next window start (`windows.scheduled_start`).
- Once a run exists, this fleet's older webhook runs that are still Scheduled (not
  picked up by a worker) are cancelled, so runs waiting for a window do not pile up.
- The answer is 202 as soon as the push is accepted; creating the run happens after
  the debounce, retried `prefect.attempts` times (the idempotency key makes retries
  safe). A run that still cannot be created is logged as an error.

Bounds: the body size and read time, the events per request, one pending push per
fleet, one run creation in flight per fleet, the remembered keys, the concurrent
connections (uvicorn's `limit_concurrency`), and every Prefect call's timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import logging
import re
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compose_rollout.config import NAME_RE, YamlSettings, load_yaml_settings
from compose_rollout.errors import ConfigError, RolloutError
from compose_rollout.images import ImageRef, validate_digest, validate_repository, validate_tag
from compose_rollout.tag_policy import TagPolicy, VersionKey, rejection_reason, version_key
from compose_rollout.windows import MaintenanceWindows, scheduled_start

logger = logging.getLogger("compose_rollout.webhooks")

Source = Literal["distribution", "github", "dockerhub"]
DISTRIBUTION_MEDIA_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",  # distribution v3
    "application/json",
)
MAX_EVENTS_PER_REQUEST = 1000
RUN_TAG = "compose-rollout-webhook"
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
        if _deployment_uuid(value) is None and not _DEPLOYMENT_NAME_RE.fullmatch(value):
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
    max_concurrent_requests: Annotated[
        int, Field(ge=1, le=10000, description="Connections beyond this get 503 (uvicorn's limit_concurrency).")
    ] = 64
    debounce_seconds: Annotated[
        float, Field(ge=0, le=600, description="Quiet time after a fleet's last push before its newest push starts.")
    ] = 5.0
    debounce_max_seconds: Annotated[
        float, Field(ge=0, le=3600, description="A burst starts at most this long after its first push.")
    ] = 60.0
    remembered_pushes: Annotated[
        int, Field(ge=16, le=1_000_000, description="Recent idempotency keys kept to drop duplicate deliveries.")
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
        pairs = [(_repository_key(r.repository), r.fleet) for r in self.routes]
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


def _deployment_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _repository_key(repository: str) -> tuple[str, str]:
    # Registry hosts are case-insensitive; docker.io names gain `library/` as docker does.
    ref = ImageRef(repository)
    return ref.registry.lower(), ref.path


# ---------------------------------------------------------------------------------------
# Parsing the three sources (pure)


class PayloadError(ValueError):
    """The body is not a well-formed event of its source (→ 400)."""


@dataclass(frozen=True)
class Push:
    """One tag pushed to one repository, as a source reported it."""

    source: Source
    repository: str
    tag: str
    digest: str | None = None
    pushed_at: str | None = None  # Docker Hub's stand-in for the digest it does not send

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}" + (f"@{self.digest}" if self.digest else "")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _DistributionTarget(_Lenient):
    digest: str = ""
    repository: str
    tag: str = ""


class _DistributionRequest(_Lenient):
    host: str = ""


class _DistributionEvent(_Lenient):
    action: str
    target: _DistributionTarget
    request: _DistributionRequest = _DistributionRequest()


class _DistributionEnvelope(_Lenient):
    events: Annotated[list[_DistributionEvent], Field(max_length=MAX_EVENTS_PER_REQUEST)]


class _GitHubTag(_Lenient):
    name: str = ""
    digest: str = ""


class _GitHubContainerMetadata(_Lenient):
    tag: _GitHubTag = _GitHubTag()


class _GitHubVersion(_Lenient):
    name: str = ""
    package_url: str = ""
    container_metadata: _GitHubContainerMetadata | None = None


class _GitHubOwner(_Lenient):
    login: str


class _GitHubPackage(_Lenient):
    name: str
    package_type: str = ""
    ecosystem: str = ""
    owner: _GitHubOwner
    package_version: _GitHubVersion


class _GitHubEvent(_Lenient):
    action: str
    package: _GitHubPackage | None = None
    registry_package: _GitHubPackage | None = None  # the older `registry_package` event


class _DockerHubPushData(_Lenient):
    tag: str
    pushed_at: int | float


class _DockerHubRepository(_Lenient):
    repo_name: str


class _DockerHubEvent(_Lenient):
    push_data: _DockerHubPushData
    repository: _DockerHubRepository


def _load(model: type[_Lenient], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise PayloadError(f"malformed {model.__name__.strip('_')}: {where}: {first['msg']}") from None


def parse_distribution(body: bytes, registry_host: str | None = None) -> list[Push]:
    """The tag pushes in a distribution notification envelope (pulls, deletes and
    blob or by-digest pushes are skipped). The repository is `host/path`, the host
    being `registry_host` if given, else the event's `request.host`."""
    envelope: _DistributionEnvelope = _load(_DistributionEnvelope, body)
    pushes = []
    for event in envelope.events:
        if event.action != "push" or not event.target.tag:
            continue
        host = registry_host or event.request.host
        if not host:
            raise PayloadError("a push event has no request.host; set distribution.registry_host")
        pushes.append(
            Push("distribution", f"{host}/{event.target.repository}", event.target.tag, event.target.digest or None)
        )
    return pushes


def parse_github(body: bytes, event: str) -> list[Push]:
    """The tag push in a GitHub `package` (or `registry_package`) event; empty for
    other actions, non-container packages and untagged versions."""
    if event not in ("package", "registry_package"):
        return []
    payload: _GitHubEvent = _load(_GitHubEvent, body)
    package = payload.package or payload.registry_package
    if package is None:
        raise PayloadError(f"a {event} event without a package")
    kind = {package.package_type.lower(), package.ecosystem.lower()}
    if payload.action != "published" or not kind & {"container", "docker"}:
        return []
    version = package.package_version
    metadata = version.container_metadata or _GitHubContainerMetadata()
    if not metadata.tag.name:
        return []  # an untagged manifest (e.g. one platform of a multi-arch image)
    # package_url is `ghcr.io/Owner/name:tag`; ghcr.io paths are lowercase.
    name = version.package_url.partition("@")[0]
    if name.rfind(":") > name.rfind("/"):
        name = name[: name.rfind(":")]
    repository = (name or f"ghcr.io/{package.owner.login}/{package.name}").lower()
    digest = metadata.tag.digest or (version.name if version.name.startswith("sha256:") else "")
    return [Push("github", repository, metadata.tag.name, digest or None)]


def parse_dockerhub(body: bytes) -> list[Push]:
    """The tag push in a Docker Hub webhook (repository `docker.io/<repo_name>`)."""
    payload: _DockerHubEvent = _load(_DockerHubEvent, body)
    repository = f"docker.io/{payload.repository.repo_name}"
    return [Push("dockerhub", repository, payload.push_data.tag, None, str(int(payload.push_data.pushed_at)))]


def github_signature(secret: SecretStr, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


# ---------------------------------------------------------------------------------------
# Routing and filtering (pure)


@dataclass(frozen=True)
class PlannedRun:
    """An accepted push for one fleet: what would be started for it."""

    route: WebhookRoute
    push: Push
    received_at: float = 0.0  # the receiver's clock, for the webhook-to-run latency

    @property
    def fleet(self) -> str:
        """The fleet this run deploys."""
        return self.route.fleet

    @property
    def idempotency_key(self) -> str:
        """Same fleet, tag and digest (or Docker Hub push time) → same key → one run."""
        identity = self.push.digest or f"pushed-at-{self.push.pushed_at}"
        return f"compose-rollout/{self.route.fleet}/{self.push.tag}/{identity}"

    @property
    def parameters(self) -> dict[str, str]:
        """The flow run's parameters (`rolling_deploy(fleet_file, tag, triggered_by=...)`)."""
        return {
            "fleet_file": self.route.fleet_file,
            "tag": self.push.tag,
            "triggered_by": f"webhook:{self.push.source} push of {self.push}",
        }


@dataclass(frozen=True)
class Ignored:
    """A push that starts nothing, and why."""

    repository: str
    tag: str
    reason: str


def validate_push(push: Push) -> None:
    """Raise ConfigError if the push's repository, tag or digest is malformed."""
    validate_repository(push.repository)
    validate_tag(push.tag)
    if push.digest is not None:
        validate_digest(push.digest)


def plan_runs(
    pushes: Sequence[Push], routes: Sequence[WebhookRoute], received_at: float = 0.0
) -> tuple[list[PlannedRun], list[Ignored]]:
    """Which pushes start runs for which fleets; the rest with the reason they start nothing.

    Call `validate_push` on every push first: this assumes well-formed values.
    """
    planned: list[PlannedRun] = []
    ignored: list[Ignored] = []
    for push in pushes:
        key = _repository_key(push.repository)
        matching = [route for route in routes if _repository_key(route.repository) == key]
        if not matching:
            ignored.append(Ignored(push.repository, push.tag, "no route for this repository"))
        for route in matching:
            reason = rejection_reason(push.tag, route.tags)
            if reason is None:
                planned.append(PlannedRun(route, push, received_at))
            else:
                ignored.append(Ignored(push.repository, push.tag, f"fleet {route.fleet}: tag {push.tag} {reason}"))
    return planned, ignored


# ---------------------------------------------------------------------------------------
# Coalescing (pure, clock passed in)


def _newer(candidate: PlannedRun, current: PlannedRun) -> bool:
    new, old = version_key(candidate.push.tag), version_key(current.push.tag)
    if new is not None and old is not None and new != old:
        return new > old
    return True  # not both versions, or the same version pushed again: the latest received wins


@dataclass
class _Pending:
    run: PlannedRun
    first_at: float
    last_at: float
    debounce: float


@dataclass
class Coalescer:
    """Per fleet, the newest push of the current burst, released after the debounce.

    Pure: the caller passes the time (monotonic seconds). Holds at most one pending push
    per fleet and `remembered` idempotency keys.
    """

    debounce_seconds: float
    debounce_max_seconds: float
    remembered: int = 4096
    _pending: dict[str, _Pending] = field(default_factory=dict, init=False, repr=False)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False, repr=False)
    _highest_started: dict[str, VersionKey] = field(default_factory=dict, init=False, repr=False)

    def offer(self, run: PlannedRun, now: float) -> str:
        """Take an accepted push; return what became of it, in words."""
        key = run.idempotency_key
        if key in self._seen:
            self._seen.move_to_end(key)
            return "duplicate of a push already received"
        self._seen[key] = None
        while len(self._seen) > self.remembered:
            self._seen.popitem(last=False)
        started = self._highest_started.get(run.fleet)
        version = version_key(run.push.tag)
        if started is not None and version is not None and version < started:
            return f"older than {started[3]}, already started for fleet {run.fleet}"
        pending = self._pending.get(run.fleet)
        if pending is None:
            debounce = self.debounce_seconds if run.route.debounce_seconds is None else run.route.debounce_seconds
            self._pending[run.fleet] = _Pending(run, now, now, debounce)
            return "scheduled"
        pending.last_at = now
        if _newer(run, pending.run):
            replaced, pending.run = pending.run, run
            return f"scheduled, replacing {replaced.push.tag}"
        return f"superseded by {pending.run.push.tag}"

    def _deadline(self, pending: _Pending) -> float:
        cap = max(self.debounce_max_seconds, pending.debounce)
        return min(pending.last_at + pending.debounce, pending.first_at + cap)

    def next_deadline(self, busy: frozenset[str] = frozenset()) -> float | None:
        """When the next pending push is due (fleets in `busy` wait); None if none is."""
        deadlines = [self._deadline(p) for fleet, p in self._pending.items() if fleet not in busy]
        return min(deadlines, default=None)

    def pop_due(self, now: float, busy: frozenset[str] = frozenset()) -> list[PlannedRun]:
        """The pushes whose burst is over, removed from pending (fleets in `busy` wait)."""
        due = [f for f, p in self._pending.items() if f not in busy and self._deadline(p) <= now]
        return [self._pending.pop(fleet).run for fleet in due]

    def pop_all(self) -> list[PlannedRun]:
        """Every pending push, due or not (for shutdown)."""
        runs = [p.run for p in self._pending.values()]
        self._pending.clear()
        return runs

    def forget(self, run: PlannedRun) -> None:
        """Drop `run`'s idempotency key: the same push delivered again is no longer a duplicate."""
        self._seen.pop(run.idempotency_key, None)

    def mark_started(self, run: PlannedRun) -> None:
        """Record that `run` exists in Prefect: older versions for its fleet are ignored from now on."""
        version = version_key(run.push.tag)
        started = self._highest_started.get(run.fleet)
        if version is not None and (started is None or version > started):
            self._highest_started[run.fleet] = version

    @property
    def pending_count(self) -> int:
        """How many fleets have a push waiting for its burst to end."""
        return len(self._pending)

    @property
    def pending(self) -> Mapping[str, PlannedRun]:
        """Fleet → the push that would start now."""
        return {fleet: p.run for fleet, p in self._pending.items()}


# ---------------------------------------------------------------------------------------
# Prefect


class PrefectApiError(RolloutError):
    """The Prefect API refused or did not answer; `permanent` when retrying cannot help."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class FlowRunRef:
    """A flow run Prefect created (or already had, for a repeated idempotency key)."""

    id: str
    name: str
    created: bool


class RunCreator(Protocol):
    """Creates a flow run for a planned run (PrefectRuns; fakes in tests)."""

    async def create_run(self, run: PlannedRun, scheduled_time: datetime | None = None) -> FlowRunRef:
        """Create the run (to start at `scheduled_time`, default now), or return the one
        that already has its idempotency key."""
        ...

    async def cancel_superseded(self, run: PlannedRun, keep: FlowRunRef) -> list[str]:
        """Cancel the not-yet-started webhook runs of the same fleet for older versions; their ids."""
        ...


def prefect_headers(api: PrefectApi) -> dict[str, str]:
    """Authorization headers as Prefect's own client sends them (auth string wins)."""
    if api.auth_string is not None:
        token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if api.api_key is not None:
        return {"Authorization": f"Bearer {api.api_key.get_secret_value()}"}
    return {}


class PrefectRuns:
    """Creates flow runs through Prefect's REST API (one HTTP client, every call bounded)."""

    def __init__(
        self,
        api: PrefectApi,
        api_url: str,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            base_url=api_url.rstrip("/") + "/",
            headers=prefect_headers(api),
            timeout=httpx.Timeout(api.timeout_seconds),
            transport=transport,
        )
        self._deployment_ids: dict[str, str] = {}

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def deployment_id(self, deployment: str) -> str:
        """The id of `deployment` (an id, or 'flow-name/deployment-name' looked up once)."""
        known = _deployment_uuid(deployment) or self._deployment_ids.get(deployment)
        if known:
            return known
        flow_name, _, name = deployment.partition("/")
        response = await self._client.get(f"deployments/name/{quote(flow_name, safe='')}/{quote(name, safe='')}")
        if response.status_code == 404:
            raise PrefectApiError(f"Prefect has no deployment {deployment!r}", permanent=True)
        _raise_for_status(response, f"looking up deployment {deployment!r}")
        self._deployment_ids[deployment] = str(response.json()["id"])
        return self._deployment_ids[deployment]

    async def create_run(self, run: PlannedRun, scheduled_time: datetime | None = None) -> FlowRunRef:
        """Create the flow run for `run` (Scheduled for `scheduled_time`, default now),
        retrying transient failures with the same idempotency key."""
        body: dict[str, Any] = {"parameters": run.parameters, "idempotency_key": run.idempotency_key, "tags": [RUN_TAG]}
        if scheduled_time is not None:
            body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": scheduled_time.isoformat()}}
        last: PrefectApiError | None = None
        for attempt in range(1, self.api.attempts + 1):
            try:
                deployment_id = await self.deployment_id(run.route.deployment)
                response = await self._client.post(f"deployments/{deployment_id}/create_flow_run", json=body)
                if response.status_code == 404:
                    # A deployment deleted and re-created under the same name has a new id.
                    self._deployment_ids.pop(run.route.deployment, None)
                    raise PrefectApiError(f"Prefect has no deployment {run.route.deployment!r}", permanent=False)
                _raise_for_status(response, f"creating a run of {run.route.deployment!r}")
                data = response.json()
                return FlowRunRef(str(data["id"]), str(data.get("name", "")), created=response.status_code == 201)
            except httpx.HTTPError as error:
                last = PrefectApiError(f"Prefect API unreachable: {type(error).__name__}: {error}", permanent=False)
            except PrefectApiError as error:
                if error.permanent:
                    raise
                last = error
            if attempt < self.api.attempts:
                await self._sleep(min(self.api.retry_delay_seconds * 2 ** (attempt - 1), 30.0))
        assert last is not None
        raise PrefectApiError(f"{last} (after {self.api.attempts} attempts)", permanent=False)

    async def cancel_superseded(self, run: PlannedRun, keep: FlowRunRef) -> list[str]:
        """Cancel this deployment's webhook-created runs for the same fleet that are still
        Scheduled (not yet picked up) for a version no newer than `run`'s, except `keep`.

        Without this, pushes outside a maintenance window would pile up runs that all
        start when it opens, in no guaranteed order. Runs created by anything else
        (without the `compose-rollout-webhook` tag) are never touched. One bounded pass,
        not retried; returns the ids cancelled.
        """
        new = version_key(run.push.tag)
        if new is None:
            return []
        deployment_id = await self.deployment_id(run.route.deployment)
        query = {
            "flow_runs": {
                "deployment_id": {"any_": [deployment_id]},
                "tags": {"all_": [RUN_TAG]},
                "state": {"type": {"any_": ["SCHEDULED"]}},
            },
            "limit": 50,
        }
        response = await self._client.post("flow_runs/filter", json=query)
        _raise_for_status(response, "listing scheduled runs")
        cancelled = []
        for other in response.json():
            parameters = other.get("parameters") or {}
            old = version_key(str(parameters.get("tag", "")))
            if (
                other["id"] == keep.id
                or parameters.get("fleet_file") != run.route.fleet_file
                or old is None
                or old > new
            ):
                continue
            state = {"type": "CANCELLED", "message": f"superseded by the webhook push of {run.push}"}
            answer = await self._client.post(f"flow_runs/{other['id']}/set_state", json={"state": state})
            _raise_for_status(answer, f"cancelling superseded run {other['id']}")
            if answer.json().get("status") == "ACCEPT":
                cancelled.append(str(other["id"]))
        return cancelled


def _raise_for_status(response: httpx.Response, doing: str) -> None:
    if response.status_code < 400:
        return
    detail = response.text[:300].replace("\n", " ")
    # 429 and 5xx may pass; anything else (401, 403, 409 parameter schema, 422) will not.
    transient = response.status_code == 429 or response.status_code >= 500
    raise PrefectApiError(f"Prefect answered {response.status_code} {doing}: {detail}", permanent=not transient)


# ---------------------------------------------------------------------------------------
# The receiver: coalescer + run creation, on the app's event loop


@dataclass(frozen=True)
class StartedRun:
    """A run this receiver created (or found, for a known key)."""

    fleet: str
    tag: str
    flow_run: FlowRunRef
    seconds_after_push: float
    scheduled_time: datetime | None = None  # set when the push came outside the fleet's windows


@dataclass(frozen=True)
class FailedRun:
    """A push whose run could not be created."""

    fleet: str
    tag: str
    error: str


class Receiver:
    """Runs the coalescer's clock: starts each fleet's newest push once its burst is over."""

    def __init__(
        self,
        settings: WebhookSettings,
        runs: RunCreator,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.runs = runs
        self.clock = clock
        self.wall_clock = wall_clock
        self.coalescer = Coalescer(
            settings.debounce_seconds, settings.debounce_max_seconds, remembered=settings.remembered_pushes
        )
        self.started: deque[StartedRun] = deque(maxlen=256)
        self.failed: deque[FailedRun] = deque(maxlen=256)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def offer(self, run: PlannedRun) -> str:
        """Hand over an accepted push (on the event loop); returns what became of it."""
        outcome = self.coalescer.offer(run, self.clock())
        self._wake.set()
        return outcome

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing being created."""
        return self.coalescer.pending_count == 0 and not self._in_flight

    @property
    def creating(self) -> int:
        """Runs being created in Prefect right now."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Start due pushes until cancelled."""
        while True:
            busy = frozenset(self._in_flight)
            deadline = self.coalescer.next_deadline(busy)
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            for planned in self.coalescer.pop_due(self.clock(), frozenset(self._in_flight)):
                self._in_flight[planned.fleet] = asyncio.create_task(self._start(planned))

    async def drain(self, timeout: float) -> None:
        """On shutdown: start every pending push now (after its fleet's call in flight, if
        any) and wait for the calls, at most `timeout` seconds in all; then cancel the rest."""
        deadline = self.clock() + timeout
        pending = self.coalescer.pop_all()
        busy = [self._in_flight[run.fleet] for run in pending if run.fleet in self._in_flight]
        if busy:
            await asyncio.wait(busy, timeout=max(0.0, deadline - self.clock()))
        for planned in pending:
            if planned.fleet in self._in_flight:
                logger.error(
                    "shutting down: %s for fleet %s not started (a run is still being created)",
                    planned.push,
                    planned.fleet,
                )
                continue
            self._in_flight[planned.fleet] = asyncio.create_task(self._start(planned))
        tasks = list(self._in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - self.clock()))
            for task in late:
                task.cancel()

    async def _start(self, planned: PlannedRun) -> None:
        try:
            # Decided when the run is created, not when the push came: the debounce may cross a window edge.
            when = scheduled_start(planned.route.maintenance_windows, self.wall_clock())
            ref = await self.runs.create_run(planned, when)
        except PrefectApiError as error:
            # Forget the push, so that a redelivery (GitHub's "Redeliver", a registry retry) can try again.
            self.coalescer.forget(planned)
            self.failed.append(FailedRun(planned.fleet, planned.push.tag, str(error)))
            logger.error("no run started for fleet %s, tag %s: %s", planned.fleet, planned.push.tag, error)
        else:
            self.coalescer.mark_started(planned)
            seconds = self.clock() - planned.received_at
            self.started.append(StartedRun(planned.fleet, planned.push.tag, ref, seconds, when))
            logger.info(
                "%s flow run %s (%s) for fleet %s, tag %s, %.3f s after the push%s",
                "created" if ref.created else "found existing",
                ref.name,
                ref.id,
                planned.fleet,
                planned.push.tag,
                seconds,
                f", scheduled for the next maintenance window at {when.isoformat()}" if when else "",
            )
            await self._cancel_superseded(planned, ref)
        finally:
            self._in_flight.pop(planned.fleet, None)
            self._wake.set()

    async def _cancel_superseded(self, planned: PlannedRun, ref: FlowRunRef) -> None:
        try:
            cancelled = await self.runs.cancel_superseded(planned, ref)
        except (PrefectApiError, httpx.HTTPError) as error:
            logger.warning(
                "could not cancel runs superseded by %s for fleet %s: %s", planned.push, planned.fleet, error
            )
        else:
            for run_id in cancelled:
                logger.info("cancelled flow run %s of fleet %s: superseded by %s", run_id, planned.fleet, planned.push)


# ---------------------------------------------------------------------------------------
# HTTP


class Refused(Exception):
    """A request answered with a 4xx (and nothing started)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, "invalid Content-Length")
        if int(length) > limit:
            raise Refused(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, f"body not received within {timeout:g} s") from None
    return b"".join(chunks)


def _require_json(request: Request, accepted: Sequence[str]) -> None:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in accepted:
        raise Refused(415, f"content type must be one of {', '.join(accepted)}")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _prefect_defaults(api: PrefectApi) -> tuple[str, PrefectApi]:
    if api.api_url is not None:
        return api.api_url, api
    # Only when the file leaves them out: Prefect's own settings (profile, environment).
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("set prefect.api_url in the webhook config, or PREFECT_API_URL")
    auth = PREFECT_API_AUTH_STRING.value()
    if api.auth_string is None and api.api_key is None and auth:
        api = api.model_copy(update={"auth_string": SecretStr(str(auth))})
    return str(url), api


def create_app(
    settings: WebhookSettings,
    *,
    runs: RunCreator | None = None,
    prefect_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Starlette:
    """The receiver as an ASGI app. `runs` or `prefect_transport` replace the Prefect side
    and the clocks are injectable, for tests; the app's state holds the `receiver`
    (pending pushes, started runs)."""
    prefect_runs: PrefectRuns | None = None
    if runs is None:
        api_url, api = _prefect_defaults(settings.prefect)
        prefect_runs = PrefectRuns(api, api_url, transport=prefect_transport)
        runs = prefect_runs
    receiver = Receiver(settings, runs, clock, wall_clock)

    async def accept(request: Request, source: Source, pushes: list[Push]) -> Response:
        for push in pushes:
            try:
                validate_push(push)
            except ConfigError as error:
                logger.warning("refused a %s request from %s: %s", source, _client(request), error)
                raise Refused(422, str(error)) from None
        planned, ignored = plan_runs(pushes, settings.routes, receiver.clock())
        accepted = []
        for run in planned:
            outcome = receiver.offer(run)
            logger.info("%s push of %s for fleet %s: %s", source, run.push, run.fleet, outcome)
            accepted.append({"fleet": run.fleet, "tag": run.push.tag, "outcome": outcome})
        for item in ignored:
            logger.info("%s push of %s:%s ignored: %s", source, item.repository, item.tag, item.reason)
        body = {"accepted": accepted, "ignored": [asdict(item) for item in ignored]}
        return JSONResponse(body, status_code=202 if accepted else 200)

    def unauthorized(request: Request, source: Source) -> Refused:
        logger.warning("refused an unauthenticated %s request from %s", source, _client(request))
        return Refused(401, "not authenticated")

    async def distribution(request: Request) -> Response:
        source = settings.distribution
        assert source is not None
        if not _same(request.headers.get("authorization"), source.authorization.get_secret_value()):
            raise unauthorized(request, "distribution")
        _require_json(request, DISTRIBUTION_MEDIA_TYPES)
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        return await accept(request, "distribution", parse_distribution(body, source.registry_host))

    async def github(request: Request) -> Response:
        source = settings.github
        assert source is not None
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        if not _same(request.headers.get("x-hub-signature-256"), github_signature(source.secret, body)):
            raise unauthorized(request, "github")
        _require_json(request, ("application/json",))
        event = request.headers.get("x-github-event", "")
        if event == "ping":
            return JSONResponse({"pong": True})
        return await accept(request, "github", parse_github(body, event))

    async def dockerhub(request: Request) -> Response:
        source = settings.dockerhub
        assert source is not None
        if not _same(request.path_params.get("token"), source.token.get_secret_value()):
            raise unauthorized(request, "dockerhub")
        _require_json(request, ("application/json",))
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        return await accept(request, "dockerhub", parse_dockerhub(body))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "pending": receiver.coalescer.pending_count, "creating": receiver.creating})

    async def refused(request: Request, error: Exception) -> Response:
        assert isinstance(error, Refused)
        return JSONResponse({"error": error.message}, status_code=error.status)

    async def malformed(request: Request, error: Exception) -> Response:
        logger.warning("refused a malformed request from %s: %s", _client(request), error)
        return JSONResponse({"error": str(error)}, status_code=400)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop_task = asyncio.create_task(receiver.run())
        try:
            yield
        finally:
            loop_task.cancel()
            with suppress(asyncio.CancelledError):
                await loop_task
            await receiver.drain(settings.shutdown_grace_seconds)
            if prefect_runs is not None:
                await prefect_runs.aclose()

    routes = [Route("/healthz", healthz, methods=["GET"])]
    if settings.distribution is not None:
        routes.append(Route("/hooks/distribution", distribution, methods=["POST"]))
    if settings.github is not None:
        routes.append(Route("/hooks/github", github, methods=["POST"]))
    if settings.dockerhub is not None:
        routes.append(Route("/hooks/dockerhub/{token}", dockerhub, methods=["POST"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Refused: refused, PayloadError: malformed},
    )
    app.state.receiver = receiver
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m compose_rollout.webhooks --config FILE`: serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m compose_rollout.webhooks", description="Registry push webhooks → Prefect rollout runs."
    )
    parser.add_argument("--config", required=True, type=Path, help="the receiver's YAML file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_webhook_settings(args.config)
        app = create_app(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    import uvicorn

    logger.info(
        "listening on %s:%d for %s; %d routes",
        settings.listen_host,
        settings.listen_port,
        ", ".join(s for s in ("distribution", "github", "dockerhub") if getattr(settings, s) is not None),
        len(settings.routes),
    )
    uvicorn.run(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        access_log=False,  # the Docker Hub URL carries its token
        server_header=False,
        limit_concurrency=settings.max_concurrent_requests,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 1,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
