"""Parsing the three sources' payloads into pushes, and their signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

Source = Literal["distribution", "github", "dockerhub"]
MAX_EVENTS_PER_REQUEST = 1000


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


def same_secret(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
