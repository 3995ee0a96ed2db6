"""Parsing the three sources' payloads into pushes, and their signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from compose_rollout.errors import ConfigError
from compose_rollout.images import validate_digest, validate_repository, validate_tag

Source = Literal["distribution", "github", "dockerhub"]
MAX_EVENTS_PER_REQUEST = 1000
# Docker Hub's `pushed_at` is Unix seconds; anything past 9999-12-31 is not a time.
_LAST_UNIX_SECOND = 253402300799


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
    pushed_time: datetime | None = None  # when the source says the push happened (aware), if it says

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
    timestamp: str = ""


class _DistributionEnvelope(_Lenient):
    # Each event is checked on its own: one bad event must not refuse the good ones.
    events: Annotated[list[Any], Field(max_length=MAX_EVENTS_PER_REQUEST)]


@dataclass(frozen=True)
class EventRefusal:
    """One event of a multi-event request that was refused (the others still count)."""

    index: int
    event_id: str
    error: str


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
    pushed_at: Annotated[
        float, Field(allow_inf_nan=False, ge=0, le=_LAST_UNIX_SECOND, description="Unix seconds of the push.")
    ]


class _DockerHubRepository(_Lenient):
    repo_name: str


class _DockerHubEvent(_Lenient):
    push_data: _DockerHubPushData
    repository: _DockerHubRepository


def _load(model: type[_Lenient], body: bytes | Any) -> Any:
    try:
        if isinstance(body, bytes):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise PayloadError(f"malformed {model.__name__.strip('_')}: {where}: {first['msg']}") from None


def _aware_time(text: str) -> datetime | None:
    """An ISO-8601 time with its offset (distribution writes RFC 3339), else None."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def _event_id(event: Any) -> str:
    found = event.get("id") if isinstance(event, dict) else None
    return found[:64] if isinstance(found, str) else ""


def parse_distribution(body: bytes, registry_host: str | None = None) -> tuple[list[Push], list[EventRefusal]]:
    """The tag pushes in a distribution notification envelope (pulls, deletes and
    blob or by-digest pushes are skipped), and the push events that were malformed.

    The repository is `host/path`, the host being `registry_host` if given, else the
    event's `request.host`. A push event that is malformed or names a malformed
    repository, tag or digest is refused on its own; only a body that is not an
    envelope raises PayloadError.
    """
    envelope: _DistributionEnvelope = _load(_DistributionEnvelope, body)
    pushes: list[Push] = []
    refused: list[EventRefusal] = []
    for index, raw in enumerate(envelope.events):
        if not isinstance(raw, dict) or raw.get("action") != "push":
            continue  # not a push: nothing to start, whatever its shape
        try:
            event: _DistributionEvent = _load(_DistributionEvent, raw)
            if not event.target.tag:
                continue
            host = registry_host or event.request.host
            if not host:
                raise PayloadError("a push event has no request.host; set distribution.registry_host")
            repository = validate_repository(f"{host}/{event.target.repository}")
            tag = validate_tag(event.target.tag)
            digest = validate_digest(event.target.digest) if event.target.digest else None
        except (PayloadError, ConfigError) as error:
            refused.append(EventRefusal(index, _event_id(raw), str(error)))
            continue
        pushes.append(Push("distribution", repository, tag, digest, None, _aware_time(event.timestamp)))
    return pushes, refused


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
    seconds = int(payload.push_data.pushed_at)
    pushed = datetime.fromtimestamp(seconds, UTC)
    return [Push("dockerhub", repository, payload.push_data.tag, None, str(seconds), pushed)]


def github_signature(secret: SecretStr, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
