"""Image references, validated by the grammar of distribution/reference.

Every image value that reaches a remote command or a compose file passes through
`parse_reference`; anything else is refused before a host is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compose_rollout.errors import ConfigError

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_REPOSITORY_RE = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
# Only sha256, and only in its canonical lowercase form: an upper-case digest names
# the same bytes but is not what registries and docker print, so it is refused.
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")

MAX_REPOSITORY_LENGTH = 255
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    """`repository[:tag][@digest]`, each part already validated."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> ImageRef:
        """The same tag pinned to `digest` (written as `repo:tag@sha256:...`)."""
        return ImageRef(self.repository, self.tag, validate_digest(digest))

    @property
    def registry(self) -> str:
        """The registry host (with port), `docker.io` when the name has none."""
        return _split_registry(self.repository)[0]

    @property
    def path(self) -> str:
        """The repository path inside its registry (`library/` added on Docker Hub, as docker does)."""
        registry, path = _split_registry(self.repository)
        return f"library/{path}" if registry == DOCKER_HUB and "/" not in path else path


def _names_registry(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost"


def _split_registry(repository: str) -> tuple[str, str]:
    """(registry, path), by docker's rule: a first component with `.` or `:`, or
    `localhost`, is a registry host; `index.docker.io` is Docker Hub."""
    first, _, rest = repository.partition("/")
    if rest and _names_registry(first):
        return (DOCKER_HUB if first in (DOCKER_HUB, "index.docker.io") else first), rest
    return DOCKER_HUB, repository


def validate_repository(repository: str) -> str:
    """Return `repository` if it is a valid image name without tag or digest."""
    first = repository.partition("/")[0]
    if (
        len(repository) > MAX_REPOSITORY_LENGTH
        or not _REPOSITORY_RE.fullmatch(repository)
        # docker would read an upper-case first component as a registry host; refuse the ambiguity
        or (not _names_registry(first) and first != first.lower())
    ):
        raise ConfigError(f"invalid image repository {repository!r}: expected e.g. ghcr.io/org/app")
    return repository


def validate_registry_host(host: str) -> str:
    """Return `host` (a registry host name or address, with an optional port) in lowercase,
    as it is compared: host names are case-insensitive."""
    if not re.fullmatch(_DOMAIN, host):
        raise ConfigError(f"invalid registry host {host!r}: expected e.g. ghcr.io or registry.internal:5000")
    return DOCKER_HUB if host.lower() == "index.docker.io" else host.lower()


def repository_key(repository: str) -> tuple[str, str]:
    """(registry, path) by which two spellings of one repository compare equal:
    `nginx`, `docker.io/library/nginx` and `index.docker.io/library/nginx` are one."""
    ref = ImageRef(repository)
    return ref.registry.lower(), ref.path


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid tag (letters, digits, `_.-`, at most 128 characters)."""
    if not TAG_RE.fullmatch(tag):
        raise ConfigError(f"invalid image tag {tag!r}: a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -")
    return tag


def validate_digest(digest: str) -> str:
    """Return `digest` if it is a canonical `sha256:<64 lowercase hex>` digest."""
    if not DIGEST_RE.fullmatch(digest):
        raise ConfigError(f"invalid image digest {digest!r}: expected sha256:<64 lowercase hex digits>")
    return digest


def parse_reference(text: str) -> ImageRef:
    """Parse and validate `repository[:tag][@digest]`; raise ConfigError if malformed."""
    name, at, digest = text.partition("@")
    if at:
        validate_digest(digest)
    repository, tag = name, None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        repository, tag = name[:colon], validate_tag(name[colon + 1 :])
    validate_repository(repository)
    return ImageRef(repository, tag, digest if at else None)
