"""Resolve a tag to its digest through the registry's HTTP API (distribution v2).

The digest is resolved once per run and deployed everywhere, so a tag moved during
the run cannot split the fleet. Works anonymously, with basic credentials, and with
the bearer-token challenge that ghcr.io and Docker Hub use.
"""

from __future__ import annotations

import re

import requests

from compose_rollout.errors import RegistryError
from compose_rollout.images import DIGEST_RE, ImageRef
from compose_rollout.registry_settings import RegistrySettings, api_host, origin

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
MAX_REDIRECTS = 5


def base_url(ref: ImageRef, settings: RegistrySettings) -> str:
    """`http(s)://host/v2/path`: plain HTTP only for loopback or listed registries."""
    host = api_host(ref.registry)
    return f"{settings.scheme(host)}://{host}/v2/{ref.path}"


class RegistryClient:
    """A small distribution-v2 client for one run (it caches bearer tokens per scope).

    The credentials (basic, or the basic auth of a token request) go only to
    `settings.credentials_host` over HTTPS (plain HTTP only where `base_url` uses it) and to
    its token service (same origin, Docker Hub's, or listed in token_realm_hosts). Any
    other registry, token service or redirect target is spoken to anonymously, and a tag
    list whose next page is on another origin is refused.
    """

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.max_redirects = MAX_REDIRECTS
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._registry_origin, self._realm_origins = settings.credential_origins()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self.session.close()

    def _credentials(self) -> tuple[str, str] | None:
        if self.settings.username and self.settings.password:
            return (self.settings.username, self.settings.password.get_secret_value())
        return None

    def _token(self, registry: str, challenge: str) -> str:
        """A bearer token for the challenge `registry` (an origin) sent; with the
        credentials only if both the registry and the realm may have them."""
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.pop("realm", None)
        if not realm or (not realm.startswith("https://") and not realm.startswith("http://")):
            raise RegistryError(f"registry asked for a token without a usable realm: {challenge!r}")
        trusted = registry == self._registry_origin and origin(realm) in self._realm_origins
        key = (registry, realm, params.get("scope", ""))
        if key not in self._tokens:
            response = self.session.get(
                realm,
                params=params,
                auth=self._credentials() if trusted else None,
                timeout=self.settings.timeout_seconds,
            )
            if response.status_code != 200:
                raise RegistryError(f"registry token request to {realm} answered {response.status_code}")
            body = response.json()
            self._tokens[key] = body.get("token") or body.get("access_token") or ""
        return self._tokens[key]

    def _send(self, method: str, url: str, headers: dict[str, str]) -> requests.Response:
        """One request; basic credentials only if `url` is the credentials' origin and no
        token is sent. requests drops Authorization on a redirect to another host, port
        or scheme (at most MAX_REDIRECTS of them)."""
        basic = "Authorization" not in headers and origin(url) == self._registry_origin
        return self.session.request(
            method,
            url,
            headers=headers,
            auth=self._credentials() if basic else None,
            timeout=self.settings.timeout_seconds,
        )

    def _request(self, method: str, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            response = self._send(method, url, headers)
            challenge = response.headers.get("WWW-Authenticate", "")
            if response.status_code == 401 and challenge.lower().startswith("bearer"):
                # Ask again where the challenge came from (the end of any redirect), with its token.
                token = self._token(origin(response.url), challenge)
                response = self._send(method, response.url, {**headers, "Authorization": f"Bearer {token}"})
        except requests.RequestException as error:
            raise RegistryError(f"registry unreachable at {url}: {error}") from None
        return response

    def list_tags(self, ref: ImageRef, limit: int = 10000) -> list[str]:
        """Every tag of `ref`'s repository (following pagination on the same origin, at most `limit`)."""
        first = f"{base_url(ref, self.settings)}/tags/list?n=1000"
        url: str | None = first
        tags: list[str] = []
        while url and len(tags) < limit:
            response = self._request("GET", url, {"Accept": "application/json"})
            if response.status_code == 404:
                raise RegistryError(f"repository {ref.repository} does not exist")
            if response.status_code != 200:
                raise RegistryError(f"registry answered {response.status_code} listing tags of {ref.repository}")
            page = response.json().get("tags") or []
            link = response.links.get("next", {}).get("url")
            if link and not page:  # every page followed brings a tag, so `limit` ends the loop
                raise RegistryError(f"registry linked an empty page of tags of {ref.repository} to more pages")
            tags.extend(page)
            url = requests.compat.urljoin(url, link) if link else None
            if url and origin(url) != origin(first):
                raise RegistryError(f"registry sent the tag list of {ref.repository} on to another origin: {url}")
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
