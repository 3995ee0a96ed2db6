"""Tag -> digest through the distribution v2 API, against a tiny registry on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from compose_rollout.config import Fleet, RegistrySettings
from compose_rollout.errors import RegistryError
from compose_rollout.images import ImageRef, parse_reference
from compose_rollout.registry import MANIFEST_TYPES, RegistryClient, base_url

DIGEST_V1 = "sha256:" + "1" * 64
DIGEST_LATEST = "sha256:" + "a1b2c3d4" * 8
TOKEN = "tok-8f1e"
PASSWORD = "registry-Password-93b1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class FakeRegistry:
    """A distribution-v2 registry that knows a few tags, optionally behind a bearer-token challenge."""

    manifests: dict[tuple[str, str], str] = field(default_factory=dict)
    bearer: bool = False
    token_needs_basic: tuple[str, str] | None = None
    token_status: int = 200
    manifest_status: int | None = None  # force a status for every manifest request
    digest_header: str | None = None  # force the Docker-Content-Digest value
    tags: dict[str, list[str]] = field(default_factory=dict)
    next_page: str | None = None  # the Link: next URL sent with every tag list
    realm: str | None = None  # the token service named in the challenge; default: this registry's /token
    redirect_to: str | None = None  # answer every /v2/ request with a 307 to this origin
    address: str = "127.0.0.1"
    port: int = 0
    requests: list[Request] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def challenge(self, path: str) -> str:
        realm = self.realm or f"http://{self.host}/token"
        return f'Bearer realm="{realm}",service="x",scope="repository:{path}:pull"'

    def authorizations(self) -> list[str]:
        """Every Authorization header this registry (or its token service) was sent."""
        return [request.headers["Authorization"] for request in self.requests if "Authorization" in request.headers]


def _handler(registry: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _record(self) -> tuple[str, dict[str, list[str]]]:
            parts = urlsplit(self.path)
            registry.requests.append(Request(self.command, parts.path, parse_qs(parts.query), dict(self.headers)))
            return parts.path, parse_qs(parts.query)

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _challenged(self, path: str) -> bool:
            """Answer 307 or the bearer challenge when the fake is set up to; True if it did."""
            if registry.redirect_to is not None:
                self._send(307, {"Location": registry.redirect_to + self.path})
                return True
            if registry.bearer and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"WWW-Authenticate": registry.challenge(path)})
                return True
            return False

        def do_GET(self) -> None:
            path, _query = self._record()
            if path.startswith("/v2/") and path.endswith("/tags/list"):
                repository = path.removeprefix("/v2/").removesuffix("/tags/list")
                if self._challenged(repository):
                    return
                headers = {"Content-Type": "application/json"}
                if registry.next_page is not None:
                    headers["Link"] = f'<{registry.next_page}>; rel="next"'
                body = {"name": repository, "tags": registry.tags.get(repository, [])}
                self._send(200, headers, json.dumps(body).encode())
                return
            if path != "/token":
                self._send(404, {})
                return
            if registry.token_needs_basic is not None:
                expected = "Basic " + base64.b64encode(":".join(registry.token_needs_basic).encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self._send(401, {})
                    return
            body = json.dumps({"token": TOKEN}).encode() if registry.token_status == 200 else b"{}"
            self._send(registry.token_status, {"Content-Type": "application/json"}, body)

        def do_HEAD(self) -> None:
            path, _query = self._record()
            prefix, _, tag = path.partition("/manifests/")
            repository = prefix.removeprefix("/v2/")
            if not prefix.startswith("/v2/") or not tag:
                self._send(404, {})
                return
            if self._challenged(repository):
                return
            if registry.manifest_status is not None:
                self._send(registry.manifest_status, {})
                return
            digest = registry.manifests.get((repository, tag))
            if digest is None:
                self._send(404, {"Content-Type": "application/json"})
                return
            headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
            header = registry.digest_header if registry.digest_header is not None else digest
            if header:
                headers["Docker-Content-Digest"] = header
            self._send(200, headers)

    return Handler


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy or ~/.netrc may reroute or re-authenticate requests to the loopback registry."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@contextmanager
def serving(fake: FakeRegistry) -> Iterator[FakeRegistry]:
    """`fake` answering on a free port of its address, in a thread."""
    server = ThreadingHTTPServer((fake.address, 0), _handler(fake))
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _known_images(address: str) -> FakeRegistry:
    return FakeRegistry(
        manifests={("a/b", "v1"): DIGEST_V1, ("a/b", "latest"): DIGEST_LATEST},
        tags={"a/b": ["v1", "latest"]},
        address=address,
    )


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    with serving(_known_images("127.0.0.1")) as fake:
        yield fake


@pytest.fixture
def elsewhere() -> Iterator[FakeRegistry]:
    """Another registry, on another loopback address: the host an `image` or a challenge may name."""
    with serving(_known_images("127.0.0.2")) as fake:
        yield fake


def credentials_for(host: str, **settings: object) -> RegistrySettings:
    return RegistrySettings.model_validate(
        {"username": "terrateam-bot", "password": PASSWORD, "credentials_host": host, "timeout_seconds": 5, **settings}
    )


BASIC = "Basic " + base64.b64encode(f"terrateam-bot:{PASSWORD}".encode()).decode()


def resolve(registry: FakeRegistry, text: str, settings: RegistrySettings | None = None) -> str:
    client = RegistryClient(settings or RegistrySettings(timeout_seconds=5))
    try:
        return client.resolve_digest(parse_reference(text.format(host=registry.host)))
    finally:
        client.session.close()


# --- anonymous ----------------------------------------------------------------------------------------------------


def test_tag_resolves_to_the_digest_the_registry_reports(registry: FakeRegistry):
    assert resolve(registry, "{host}/a/b:v1") == DIGEST_V1
    [request] = registry.requests
    assert (request.method, request.path) == ("HEAD", "/v2/a/b/manifests/v1")
    # A multi-arch tag must resolve to its index, so the index types must be acceptable.
    accept = request.headers["Accept"]
    assert "application/vnd.oci.image.index.v1+json" in accept
    assert "application/vnd.docker.distribution.manifest.list.v2+json" in accept
    assert "application/vnd.docker.distribution.manifest.v2+json" in accept
    assert accept == MANIFEST_TYPES
    assert "Authorization" not in request.headers


def test_reference_without_tag_resolves_latest(registry: FakeRegistry):
    assert resolve(registry, "{host}/a/b") == DIGEST_LATEST
    assert registry.requests[0].path == "/v2/a/b/manifests/latest"


def test_reference_with_digest_needs_no_request(registry: FakeRegistry):
    pinned = f"sha256:{'c' * 64}"
    assert resolve(registry, "{host}/a/b:v1@" + pinned) == pinned
    assert registry.requests == []


def test_unknown_tag_names_the_tag(registry: FakeRegistry):
    with pytest.raises(RegistryError) as caught:
        resolve(registry, "{host}/a/b:v9")
    assert "v9" in str(caught.value)
    assert "a/b" in str(caught.value)


def test_unknown_implicit_latest_names_latest(registry: FakeRegistry):
    registry.manifests.clear()
    with pytest.raises(RegistryError) as caught:
        resolve(registry, "{host}/a/b")
    assert "latest" in str(caught.value)
    assert "None" not in str(caught.value)


@pytest.mark.parametrize("status", [500, 403, 429])
def test_other_statuses_are_errors_naming_status_and_reference(registry: FakeRegistry, status: int):
    registry.manifest_status = status
    with pytest.raises(RegistryError) as caught:
        resolve(registry, "{host}/a/b:v1")
    assert str(status) in str(caught.value)
    assert f"{registry.host}/a/b:v1" in str(caught.value)


@pytest.mark.parametrize("header", ["", "sha256:short", "sha256:" + "A" * 64, "md5:" + "a" * 32])
def test_missing_or_malformed_digest_is_refused(registry: FakeRegistry, header: str):
    registry.digest_header = header
    with pytest.raises(RegistryError, match="no usable digest"):
        resolve(registry, "{host}/a/b:v1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_registry_names_the_url():
    port = _free_port()
    client = RegistryClient(RegistrySettings(timeout_seconds=2))
    with pytest.raises(RegistryError) as caught:
        client.resolve_digest(parse_reference(f"127.0.0.1:{port}/a/b:v1"))
    client.session.close()
    assert f"http://127.0.0.1:{port}/v2/a/b/manifests/v1" in str(caught.value)


# --- bearer-token challenge ---------------------------------------------------------------------------------------


def test_bearer_challenge_fetches_a_token_and_retries(registry: FakeRegistry):
    registry.bearer = True
    assert resolve(registry, "{host}/a/b:v1") == DIGEST_V1
    first, token, retry = registry.requests
    assert (first.method, first.path) == ("HEAD", "/v2/a/b/manifests/v1")
    assert "Authorization" not in first.headers
    assert (token.method, token.path) == ("GET", "/token")
    assert token.query == {"service": ["x"], "scope": ["repository:a/b:pull"]}
    assert (retry.method, retry.path) == ("HEAD", "/v2/a/b/manifests/v1")
    assert retry.headers["Authorization"] == f"Bearer {TOKEN}"


def test_token_is_reused_for_the_same_scope(registry: FakeRegistry):
    registry.bearer = True
    client = RegistryClient(RegistrySettings(timeout_seconds=5))
    try:
        assert client.resolve_digest(parse_reference(f"{registry.host}/a/b:v1")) == DIGEST_V1
        assert client.resolve_digest(parse_reference(f"{registry.host}/a/b:latest")) == DIGEST_LATEST
    finally:
        client.session.close()
    assert [request.path for request in registry.requests].count("/token") == 1


def test_token_request_carries_the_credentials(registry: FakeRegistry):
    registry.bearer = True
    registry.token_needs_basic = ("terrateam-bot", PASSWORD)
    settings = credentials_for(registry.host)
    assert resolve(registry, "{host}/a/b:v1", settings) == DIGEST_V1


def test_refused_token_request_is_an_error_without_the_password(registry: FakeRegistry):
    registry.bearer = True
    registry.token_needs_basic = ("terrateam-bot", "the-right-one")
    settings = credentials_for(registry.host)
    with pytest.raises(RegistryError) as caught:
        resolve(registry, "{host}/a/b:v1", settings)
    assert "401" in str(caught.value)
    assert f"http://{registry.host}/token" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_token_endpoint_failure_is_an_error(registry: FakeRegistry):
    registry.bearer = True
    registry.token_status = 503
    with pytest.raises(RegistryError, match="503"):
        resolve(registry, "{host}/a/b:v1")


@pytest.mark.parametrize(
    "challenge",
    ['Bearer service="x",scope="repository:a/b:pull"', 'Bearer realm="file:///etc/passwd",service="x"'],
)
def test_challenge_without_a_usable_realm_is_refused(
    registry: FakeRegistry, challenge: str, monkeypatch: pytest.MonkeyPatch
):
    registry.bearer = True
    monkeypatch.setattr(FakeRegistry, "challenge", lambda self, path: challenge)
    with pytest.raises(RegistryError, match="realm"):
        resolve(registry, "{host}/a/b:v1")
    # Nothing was fetched from the bogus realm: only the one manifest request reached the registry.
    assert [request.path for request in registry.requests] == ["/v2/a/b/manifests/v1"]


# --- where the credentials go -------------------------------------------------------------------------------------


def test_the_credentials_go_to_the_registry_they_are_for(registry: FakeRegistry):
    assert resolve(registry, "{host}/a/b:v1", credentials_for(registry.host)) == DIGEST_V1
    assert registry.authorizations() == [BASIC]


def test_an_image_on_another_registry_is_resolved_and_listed_without_credentials(
    registry: FakeRegistry, elsewhere: FakeRegistry
):
    # The fleet's credentials are for `registry`; a run's image names `elsewhere`.
    with RegistryClient(credentials_for(registry.host)) as opened:
        assert opened.resolve_digest(parse_reference(f"{elsewhere.host}/a/b:v1")) == DIGEST_V1
        assert opened.list_tags(parse_reference(f"{elsewhere.host}/a/b")) == ["v1", "latest"]
    assert [request.path for request in elsewhere.requests] == ["/v2/a/b/manifests/v1", "/v2/a/b/tags/list"]
    assert elsewhere.authorizations() == []


def test_a_token_service_on_another_host_gets_no_credentials(registry: FakeRegistry, elsewhere: FakeRegistry):
    registry.bearer = True
    registry.realm = f"http://{elsewhere.host}/token"
    assert resolve(registry, "{host}/a/b:v1", credentials_for(registry.host)) == DIGEST_V1
    [token] = elsewhere.requests
    assert token.path == "/token" and "Authorization" not in token.headers


def test_a_token_service_listed_in_token_realm_hosts_gets_the_credentials(
    registry: FakeRegistry, elsewhere: FakeRegistry
):
    registry.bearer = True
    registry.realm = f"http://{elsewhere.host}/token"
    elsewhere.token_needs_basic = ("terrateam-bot", PASSWORD)
    settings = credentials_for(registry.host, token_realm_hosts=[elsewhere.host])
    assert resolve(registry, "{host}/a/b:v1", settings) == DIGEST_V1
    assert elsewhere.authorizations() == [BASIC]
    # The token it gave is used on the registry that asked for it, nowhere else.
    assert registry.authorizations() == [BASIC, f"Bearer {TOKEN}"]


def test_another_registry_cannot_get_a_token_from_our_token_service(registry: FakeRegistry, elsewhere: FakeRegistry):
    # `elsewhere` names the fleet registry's own token service in its challenge: were the
    # credentials sent, it would receive a token for the fleet's registry, for a scope it chose.
    elsewhere.bearer = True
    elsewhere.realm = f"http://{registry.host}/token"
    assert resolve(elsewhere, "{host}/a/b:v1", credentials_for(registry.host)) == DIGEST_V1
    assert [request.path for request in registry.requests] == ["/token"]
    assert registry.authorizations() == []


def test_a_tag_list_continued_on_another_host_is_refused(registry: FakeRegistry, elsewhere: FakeRegistry):
    registry.next_page = f"http://{elsewhere.host}/v2/a/b/tags/list?last=latest"
    with RegistryClient(credentials_for(registry.host)) as opened, pytest.raises(RegistryError, match="another origin"):
        opened.list_tags(parse_reference(f"{registry.host}/a/b"))
    assert elsewhere.requests == []


def test_a_tag_list_continued_on_the_same_registry_is_followed(registry: FakeRegistry):
    registry.next_page = "/v2/a/b/tags/list?last=latest"
    with RegistryClient(credentials_for(registry.host)) as opened:
        assert opened.list_tags(parse_reference(f"{registry.host}/a/b"), limit=5) == ["v1", "latest"] * 2 + ["v1"]
    assert set(registry.authorizations()) == {BASIC}


def test_a_tag_list_that_never_ends_is_an_error(registry: FakeRegistry):
    registry.tags.clear()  # empty pages, each linking to the next: the tag count never reaches the limit
    registry.next_page = "/v2/a/b/tags/list?last=x"
    with (
        RegistryClient(RegistrySettings(timeout_seconds=5)) as opened,
        pytest.raises(RegistryError, match="empty page"),
    ):
        opened.list_tags(parse_reference(f"{registry.host}/a/b"))


def test_a_redirect_to_another_host_carries_no_credentials(registry: FakeRegistry, elsewhere: FakeRegistry):
    registry.redirect_to = f"http://{elsewhere.host}"
    assert resolve(registry, "{host}/a/b:v1", credentials_for(registry.host)) == DIGEST_V1
    assert registry.authorizations() == [BASIC]
    assert [request.path for request in elsewhere.requests] == ["/v2/a/b/manifests/v1"]
    assert elsewhere.authorizations() == []


def test_settings_without_credentials_host_send_no_credentials(registry: FakeRegistry):
    settings = RegistrySettings(username="terrateam-bot", password=SecretStr(PASSWORD), timeout_seconds=5)
    assert resolve(registry, "{host}/a/b:v1", settings) == DIGEST_V1
    assert registry.authorizations() == []


@pytest.mark.parametrize(
    ("settings", "origins"),
    [
        (
            {"credentials_host": "ghcr.io"},
            ("https://ghcr.io", {"https://ghcr.io"}),
        ),
        (
            {"credentials_host": "Registry.Example.com:443", "token_realm_hosts": ["auth.example.com"]},
            ("https://registry.example.com", {"https://registry.example.com", "https://auth.example.com"}),
        ),
        (
            {"credentials_host": "docker.io"},
            ("https://registry-1.docker.io", {"https://registry-1.docker.io", "https://auth.docker.io"}),
        ),
        (
            {"credentials_host": "registry.internal:5000", "plain_http_hosts": ["registry.internal:5000"]},
            ("http://registry.internal:5000", {"http://registry.internal:5000"}),
        ),
        ({"credentials_host": "127.0.0.1:5000"}, ("http://127.0.0.1:5000", {"http://127.0.0.1:5000"})),
        ({}, ("", set())),
    ],
)
def test_credentials_go_over_https_except_to_loopback_or_listed_hosts(
    settings: dict[str, object], origins: tuple[str, set[str]]
):
    configured = RegistrySettings.model_validate({"username": "u", "password": "p", **settings})
    assert configured.credential_origins() == (origins[0], frozenset(origins[1]))


def test_the_fleets_own_registry_gets_the_credentials_and_an_allowed_one_elsewhere_none(
    registry: FakeRegistry, elsewhere: FakeRegistry
):
    fleet = Fleet(
        **{
            "name": "terrateam",
            "image_repository": f"{registry.host}/a/b",
            "allowed_repositories": [f"{elsewhere.host}/a/b"],
            "registry": {"username": "terrateam-bot", "password": PASSWORD, "timeout_seconds": 5},
            "load_balancer": {"admin_address": "tcp://127.0.0.1:9999", "backend": "app"},
            "instances": [
                {
                    "name": f"app-{n}",
                    "host": f"127.0.1.{n}",
                    "project_directory": "/srv/app",
                    "lb_server": f"app-{n}",
                    "health_url": f"http://127.0.1.{n}:8080/health",
                }
                for n in (1, 2)
            ],
        }
    )
    with RegistryClient(fleet.registry) as opened:
        for host in (registry.host, elsewhere.host):
            ref = parse_reference(f"{host}/a/b:v1")
            fleet.check_repository(ref)
            assert opened.resolve_digest(ref) == DIGEST_V1
    assert registry.authorizations() == [BASIC]
    assert elsewhere.authorizations() == []


# --- URLs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("nginx:1.27", "https://registry-1.docker.io/v2/library/nginx"),
        ("terrateamio/terrat-oss:1.2.3", "https://registry-1.docker.io/v2/terrateamio/terrat-oss"),
        ("ghcr.io/terrateamio/terrat-oss:1.2.3", "https://ghcr.io/v2/terrateamio/terrat-oss"),
        ("localhost:5000/a/b:v1", "http://localhost:5000/v2/a/b"),
        ("localhost/a:v1", "http://localhost/v2/a"),
        ("127.0.0.1:5000/a/b:v1", "http://127.0.0.1:5000/v2/a/b"),
        ("127.0.0.2:5000/a/b:v1", "http://127.0.0.2:5000/v2/a/b"),
        ("10.0.0.9:5000/a/b:v1", "https://10.0.0.9:5000/v2/a/b"),
        ("registry.internal:5000/a/b:v1", "https://registry.internal:5000/v2/a/b"),
    ],
)
def test_base_url_uses_https_except_on_loopback(text: str, url: str):
    assert base_url(parse_reference(text), RegistrySettings()) == url


def test_plain_http_only_for_listed_registries():
    settings = RegistrySettings(plain_http_hosts=["registry.internal:5000"])
    assert base_url(parse_reference("registry.internal:5000/a/b"), settings) == "http://registry.internal:5000/v2/a/b"
    assert base_url(parse_reference("registry.internal/a/b"), settings) == "https://registry.internal/v2/a/b"


def test_base_url_of_an_image_ref_built_directly():
    assert base_url(ImageRef("ghcr.io/a/b", "v1"), RegistrySettings()) == "https://ghcr.io/v2/a/b"
