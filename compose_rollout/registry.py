"""Resolve a tag to its digest through the registry's HTTP API (distribution v2).

The digest is resolved once per run and deployed everywhere, so a tag moved during
the run cannot split the fleet. Works anonymously, with basic credentials, and with
the bearer-token challenge that ghcr.io and Docker Hub use.
"""

from __future__ import annotations

import ipaddress
import re

import requests

from compose_rollout.config import RegistrySettings
from compose_rollout.errors import RegistryError
from compose_rollout.images import DIGEST_RE, ImageRef

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def base_url(ref: ImageRef, settings: RegistrySettings) -> str:
    """`http(s)://host/v2/path`: plain HTTP only for loopback or listed registries."""
    host = "registry-1.docker.io" if ref.registry == "docker.io" else ref.registry
    scheme = "http" if _is_loopback(ref.registry) or ref.registry in settings.plain_http_hosts else "https"
    return f"{scheme}://{host}/v2/{ref.path}"


class RegistryClient:
    """A small distribution-v2 client for one run (it caches bearer tokens per scope)."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self._tokens: dict[str, str] = {}

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self.session.close()

    def _auth(self) -> tuple[str, str] | None:
        if self.settings.username and self.settings.password:
            return (self.settings.username, self.settings.password.get_secret_value())
        return None

    def _token(self, challenge: str) -> str:
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", None)
        if not realm or (not realm.startswith("https://") and not realm.startswith("http://")):
            raise RegistryError(f"registry asked for a token without a usable realm: {challenge!r}")
        key = realm + params.get("scope", "")
        if key not in self._tokens:
            response = self.session.get(realm, params=params, auth=self._auth(), timeout=self.settings.timeout_seconds)
            if response.status_code != 200:
                raise RegistryError(f"registry token request to {realm} answered {response.status_code}")
            body = response.json()
            self._tokens[key] = body.get("token") or body.get("access_token") or ""
        return self._tokens[key]

    def _request(self, method: str, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            response = self.session.request(
                method, url, headers=headers, auth=self._auth(), timeout=self.settings.timeout_seconds
            )
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code == 401 and challenge.lower().startswith("bearer"):
                headers = {**headers, "Authorization": f"Bearer {self._token(challenge)}"}
                response = self.session.request(method, url, headers=headers, timeout=self.settings.timeout_seconds)
        except requests.RequestException as error:
            raise RegistryError(f"registry unreachable at {url}: {error}") from None
        return response

    def list_tags(self, ref: ImageRef, limit: int = 10000) -> list[str]:
        """Every tag of `ref`'s repository (following pagination, at most `limit`)."""
        url: str | None = f"{base_url(ref, self.settings)}/tags/list?n=1000"
        tags: list[str] = []
        while url and len(tags) < limit:
            response = self._request("GET", url, {"Accept": "application/json"})
            if response.status_code == 404:
                raise RegistryError(f"repository {ref.repository} does not exist")
            if response.status_code != 200:
                raise RegistryError(f"registry answered {response.status_code} listing tags of {ref.repository}")
            tags.extend(response.json().get("tags") or [])
            link = response.links.get("next", {}).get("url")
            url = requests.compat.urljoin(url, link) if link else None
        return tags[:limit]

    def resolve_digest(self, ref: ImageRef) -> str:
        """The digest `ref`'s tag points to now; RegistryError if the tag does not exist."""
        if ref.digest:
            return ref.digest
        tag = ref.tag or "latest"
        url = f"{base_url(ref, self.settings)}/manifests/{tag}"
        response = self._request("HEAD", url, {"Accept": MANIFEST_TYPES})
        if response.status_code == 404:
            raise RegistryError(f"tag {tag} does not exist in {ref.repository}")
        if response.status_code != 200:
            raise RegistryError(f"registry answered {response.status_code} for {ref} ({url})")
        digest = response.headers.get("Docker-Content-Digest", "")
        if not DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"registry gave no usable digest for {ref} (got {digest!r})")
        return digest
