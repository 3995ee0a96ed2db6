"""Which images a fleet may run, and where its registry credentials may be sent.

A run's `image` comes from a Prefect form, the API or the CLI: anyone who can start a
run chooses it. So the repository must be the fleet's own `image_repository` or one the
fleet file lists in `allowed_repositories`, and the registry password goes only to the
one host it is for (`registry.credentials_host`), over HTTPS, and to that host's token
service. Any other registry, even one holding an allowed repository, is asked
anonymously.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from compose_rollout.errors import ConfigError
from compose_rollout.images import ImageRef, repository_key, validate_registry_host, validate_repository

# The token services of well-known registries that live on another host than their API;
# they may get the credentials of that registry without being listed in token_realm_hosts.
KNOWN_TOKEN_REALM_HOSTS = {"docker.io": ("auth.docker.io",)}


def _host(value: str) -> str:
    try:
        return validate_registry_host(value)
    except ConfigError as error:
        raise ValueError(str(error)) from None


RegistryHost = Annotated[str, AfterValidator(_host)]


def is_loopback(host: str) -> bool:
    """Whether `host` (with an optional port) is localhost or a loopback address."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def origin(url: str) -> str:
    """`scheme://host[:port]` of `url`, lowercase, without the scheme's default port: two
    URLs of one origin may share credentials, any other pair may not."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:  # a port out of range: an origin nothing matches
        return f"{scheme}://{host}:invalid"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def api_host(registry: str) -> str:
    """The host that serves `registry`'s HTTP API (Docker Hub's is registry-1.docker.io)."""
    return "registry-1.docker.io" if registry.lower() == "docker.io" else registry


class RegistrySettings(BaseModel):
    """Credentials for resolving tags to digests (hosts pull with their own `docker login`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: Annotated[str | None, Field(description="Registry user, if the repository is private.")] = None
    password: Annotated[SecretStr | None, Field(description="Registry password or token.")] = None
    credentials_host: Annotated[
        RegistryHost | None,
        Field(
            description="The registry (host[:port]) username and password are for; no other host is sent them. "
            "Default: the registry of image_repository."
        ),
    ] = None
    token_realm_hosts: Annotated[
        list[RegistryHost],
        Field(
            description="Token services on another host than credentials_host that may be sent the credentials "
            "to get a token (Docker Hub's auth.docker.io needs no listing)."
        ),
    ] = []
    timeout_seconds: Annotated[float, Field(gt=0, le=120, description="Limit for one registry request.")] = 10.0
    plain_http_hosts: Annotated[
        list[RegistryHost], Field(description="Registries spoken to over plain HTTP (loopback ones always are).")
    ] = []

    def scheme(self, host: str) -> str:
        """`http` for loopback hosts and those in plain_http_hosts, else `https`."""
        plain = is_loopback(host) or host.lower() in self.plain_http_hosts
        return "http" if plain else "https"

    def credential_origins(self) -> tuple[str, frozenset[str]]:
        """(the registry API origin, the token service origins) that may be sent the
        credentials, each `scheme://host[:port]`; empty when no credentials are set."""
        if not (self.username and self.password and self.credentials_host):
            return "", frozenset()
        registry = api_host(self.credentials_host)
        realms = [registry, *self.token_realm_hosts, *KNOWN_TOKEN_REALM_HOSTS.get(self.credentials_host, ())]
        return origin(f"{self.scheme(registry)}://{registry}"), frozenset(
            origin(f"{self.scheme(h)}://{h}") for h in realms
        )


def check_repository(ref: ImageRef, allowed: list[str], fleet: str) -> None:
    """ConfigError unless `ref`'s repository is one of `allowed` (spellings of one Docker
    Hub repository are equal)."""
    if repository_key(ref.repository) not in {repository_key(repository) for repository in allowed}:
        raise ConfigError(
            f"image repository {ref.repository} is not allowed for fleet {fleet}: it may run only "
            f"{', '.join(allowed)} (image_repository and allowed_repositories in the fleet file)"
        )


def with_credentials_host(fleet: Any) -> Any:
    """The fleet file's data with registry.credentials_host defaulted to the registry of
    image_repository (a `mode="before"` step of the fleet's validation)."""
    if not isinstance(fleet, dict) or not isinstance(fleet.get("image_repository"), str):
        return fleet
    registry = fleet.get("registry")
    registry = registry.model_dump() if isinstance(registry, RegistrySettings) else registry
    if registry is not None and not (isinstance(registry, dict) and registry.get("credentials_host") is None):
        return fleet
    try:
        host = ImageRef(validate_repository(fleet["image_repository"])).registry
    except ConfigError:
        return fleet  # the image_repository validator names the problem
    return {**fleet, "registry": {**(registry or {}), "credentials_host": host}}


def check_credentials_host(settings: RegistrySettings, repositories: list[str]) -> None:
    """ValueError unless credentials_host is the registry of one of `repositories`: the
    credentials are never needed anywhere else."""
    registries = {repository_key(repository)[0] for repository in repositories}
    if settings.credentials_host is not None and settings.credentials_host not in registries:
        raise ValueError(
            f"registry.credentials_host: {settings.credentials_host} is the registry of neither "
            "image_repository nor allowed_repositories"
        )
