"""Image references: the grammar of distribution/reference, and nothing a shell could misread."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from compose_rollout.errors import ConfigError
from compose_rollout.images import (
    ImageRef,
    parse_reference,
    repository_key,
    validate_digest,
    validate_registry_host,
    validate_repository,
    validate_tag,
)

DIGEST = "sha256:" + "0123456789abcdef" * 4
OTHER_DIGEST = "sha256:" + "f" * 64
# Characters a POSIX shell (or a YAML/compose file) gives meaning to, plus whitespace.
SHELL_METACHARACTERS = set(";&|$`'\"<>()\\*?[]{}!#~=%^, \t\n\r\x0b\x0c")


# --- strategies: references built from the grammar itself ---------------------------------------------------------

_alnum = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
_separator = st.sampled_from([".", "_", "__", "-", "---"])


@st.composite
def path_components(draw: st.DrawFn) -> str:
    parts = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_separator), draw(_alnum)]
    return "".join(parts)


_domain_component = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)


@st.composite
def registries(draw: st.DrawFn) -> str:
    """A registry host that `ImageRef.registry` must recognise (it has a dot or a port, or is localhost)."""
    kind = draw(st.sampled_from(["dotted", "port", "localhost"]))
    if kind == "localhost":
        host = "localhost"
    else:
        host = ".".join(draw(st.lists(_domain_component, min_size=2 if kind == "dotted" else 1, max_size=3)))
    if kind == "port" or draw(st.booleans()):
        host += f":{draw(st.integers(1, 65535))}"
    return host


tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
digests = st.from_regex(r"[a-f0-9]{64}", fullmatch=True).map(lambda hexdigits: f"sha256:{hexdigits}")


@st.composite
def image_refs(draw: st.DrawFn) -> tuple[str, str | None, str, str | None, str | None]:
    """(text, registry or None, path, tag, digest) of a valid reference."""
    registry = draw(st.none() | registries())
    path = "/".join(draw(st.lists(path_components(), min_size=1, max_size=3)))
    tag = draw(st.none() | tags)
    digest = draw(st.none() | digests)
    repository = f"{registry}/{path}" if registry else path
    text = repository + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return text, registry, path, tag, digest


# --- valid references ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repository", "tag", "digest"),
    [
        ("ghcr.io/terrateamio/terrat-oss:1.2.3", "ghcr.io/terrateamio/terrat-oss", "1.2.3", None),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b", "v1", None),
        ("nginx", "nginx", None, None),
        ("nginx:latest", "nginx", "latest", None),
        (f"a/b@{DIGEST}", "a/b", None, DIGEST),
        (f"repo:tag@{DIGEST}", "repo", "tag", DIGEST),
        (f"ghcr.io/terrateamio/terrat-oss:1.2.3@{DIGEST}", "ghcr.io/terrateamio/terrat-oss", "1.2.3", DIGEST),
        (
            "registry.example.com:443/team/app_name__x-y.z:Build_7.1-rc",
            "registry.example.com:443/team/app_name__x-y.z",
            "Build_7.1-rc",
            None,
        ),
        # The port of a registry is not a tag; the tag is after the last slash.
        ("localhost:5000/app", "localhost:5000/app", None, None),
        ("nginx:" + "t" * 128, "nginx", "t" * 128, None),
    ],
)
def test_valid_references_parse_into_their_parts(text: str, repository: str, tag: str | None, digest: str | None):
    ref = parse_reference(text)
    assert ref == ImageRef(repository, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "registry", "path"),
    [
        ("nginx", "docker.io", "library/nginx"),
        ("nginx:1.27", "docker.io", "library/nginx"),
        ("terrateamio/terrat-oss:1.2.3", "docker.io", "terrateamio/terrat-oss"),
        ("ghcr.io/terrateamio/terrat-oss:1.2.3", "ghcr.io", "terrateamio/terrat-oss"),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b"),
        ("localhost/a", "localhost", "a"),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000", "team/app"),
        ("registry:5000/app", "registry:5000", "app"),
        (f"quay.io/org/app@{DIGEST}", "quay.io", "org/app"),
    ],
)
def test_registry_and_path_inside_the_registry(text: str, registry: str, path: str):
    ref = parse_reference(text)
    assert (ref.registry, ref.path) == (registry, path)


@pytest.mark.parametrize(
    ("text", "path"), [("docker.io/nginx:1.27", "library/nginx"), ("docker.io/postgres", "library/postgres")]
)
def test_explicit_docker_hub_single_name_gets_library_prefix(text: str, path: str):
    ref = parse_reference(text)
    assert (ref.registry, ref.path) == ("docker.io", path)


def test_explicit_docker_hub_namespace_is_kept():
    ref = parse_reference("docker.io/terrateamio/terrat-oss:1.2.3")
    assert (ref.registry, ref.path) == ("docker.io", "terrateamio/terrat-oss")


def test_with_digest_pins_the_same_tag():
    ref = parse_reference("ghcr.io/terrateamio/terrat-oss:1.2.3")
    pinned = ref.with_digest(DIGEST)
    assert str(pinned) == f"ghcr.io/terrateamio/terrat-oss:1.2.3@{DIGEST}"
    assert parse_reference(str(pinned)) == pinned
    # Re-pinning replaces the digest rather than appending a second one.
    assert str(pinned.with_digest(OTHER_DIGEST)) == f"ghcr.io/terrateamio/terrat-oss:1.2.3@{OTHER_DIGEST}"


def test_with_digest_refuses_a_malformed_digest():
    with pytest.raises(ConfigError, match="digest"):
        parse_reference("nginx:1").with_digest("sha256:" + "A" * 64)


# --- refused references -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ghcr.io/terrateamio/terrat-oss:v1;rm -rf /",
        "nginx:v1;rm",
        "nginx:1.0 latest",
        "nginx:1.0 ",
        " nginx",
        "nginx\n",
        "nginx:1\nrm -rf /",
        "nginx:$(reboot)",
        "a/b:`id`",
        "a/b:1&&id",
        "a/b|sh",
        "a/b:v1>out",
        "a/b@sha256:" + "A" * 64,
        "a/b@sha256:" + "ABCDEF0123456789" * 4,
        "a/b@sha256:abc",
        "a/b@sha512:" + "a" * 128,
        "a/b@",
        "a/b@sha256:" + "a" * 64 + "@sha256:" + "b" * 64,
        "nginx:" + "t" * 129,
        "nginx:",
        "nginx:-rc1",
        "nginx:.hidden",
        ":latest",
        "ghcr.io/TerrateamIO/terrat-oss:1.2.3",
        "Nginx",
        "a//b",
        "a/b/",
        "/a/b",
        "-a/b",
        "a/-b",
        "a/b_",
        "a/b..c",
        "ghcr.io/-org/app",
        "n" * 256,
        "ghcr.io/" + "a" * 248,
        "ghcr.io/a/b:caf\u00e9",
        "ghcr.io/a/b:\u0661",
    ],
)
def test_malformed_references_are_refused(text: str):
    with pytest.raises(ConfigError, match=r"^invalid image (repository|tag|digest|reference)"):
        parse_reference(text)


def test_error_names_the_bad_tag():
    with pytest.raises(ConfigError) as caught:
        parse_reference("ghcr.io/terrateamio/terrat-oss:v1;rm")
    assert "'v1;rm'" in str(caught.value)
    assert "tag" in str(caught.value)


def test_error_quotes_the_refused_text():
    # After the last `/` there is no tag any more: the whole name is reported as the bad repository.
    with pytest.raises(ConfigError) as caught:
        parse_reference("ghcr.io/terrateamio/terrat-oss:v1;rm -rf /")
    assert "v1;rm -rf /" in str(caught.value)


def test_repository_length_limit_is_255():
    validate_repository("a" * 255)
    with pytest.raises(ConfigError, match=r"^invalid image repository 'a{256}'"):
        validate_repository("a" * 256)


def test_validators_return_their_input():
    assert validate_tag("1.2.3") == "1.2.3"
    assert validate_digest(DIGEST) == DIGEST
    assert validate_repository("ghcr.io/terrateamio/terrat-oss") == "ghcr.io/terrateamio/terrat-oss"


@pytest.mark.parametrize("repository", ["ghcr.io/a/b:1", f"a/b@{DIGEST}", "a b", "a/B"])
def test_validate_repository_refuses_tags_digests_and_junk(repository: str):
    with pytest.raises(ConfigError, match=r"^invalid image repository"):
        validate_repository(repository)


def test_registry_host_may_have_uppercase_letters():
    # Host names are case-insensitive; only the repository path must be lowercase.
    assert parse_reference("Registry.Example.com/team/app:1").registry == "Registry.Example.com"


@pytest.mark.parametrize("text", ["Terrateamio/terrat-oss:1.2.3", "A/b"])
def test_uppercase_first_component_is_not_a_docker_hub_path(text: str):
    try:
        ref = parse_reference(text)
    except ConfigError:
        return  # refusing it up front is fine
    # Otherwise it must mean what docker makes of it: a registry host, not a Docker Hub namespace.
    assert ref.registry == text.split("/")[0]


# --- properties ---------------------------------------------------------------------------------------------------

_reference_alphabet = string.ascii_letters + string.digits + "._-/:@" + "".join(sorted(SHELL_METACHARACTERS))


@given(
    st.one_of(
        st.text(max_size=40),
        st.text(alphabet=_reference_alphabet, max_size=40),
        image_refs().map(lambda parts: parts[0]),
    )
)
@example("nginx")
@example(f"repo:tag@{DIGEST}")
def test_accepted_text_is_shell_safe_and_round_trips(text: str):
    try:
        ref = parse_reference(text)
    except ConfigError:
        return
    assert not SHELL_METACHARACTERS & set(text)
    assert text.isascii() and text.isprintable()
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref


@given(image_refs(), st.sampled_from(sorted(SHELL_METACHARACTERS)), st.data())
def test_any_shell_metacharacter_anywhere_is_refused(parts, metachar: str, data: st.DataObject):
    text = parts[0]
    position = data.draw(st.integers(0, len(text)))
    with pytest.raises(ConfigError, match=r"^invalid image"):
        parse_reference(text[:position] + metachar + text[position:])


@given(image_refs())
def test_generated_valid_references_always_parse(parts):
    text, registry, path, tag, digest = parts
    ref = parse_reference(text)
    assert ref.tag == tag
    assert ref.digest == digest
    assert str(ref) == text
    if registry is not None:
        assert ref.registry == registry
        assert ref.path == path
    elif "/" in path:
        # No registry part: the first component is a Docker Hub namespace, unless it looks like a host.
        first = path.split("/")[0]
        if "." not in first and first != "localhost":
            assert ref.registry == "docker.io"
            assert ref.path == path
    else:
        assert (ref.registry, ref.path) == ("docker.io", f"library/{path}")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("ghcr.io", "ghcr.io"),
        ("Registry.Example.com:5000", "registry.example.com:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("localhost", "localhost"),
        ("index.docker.io", "docker.io"),
    ],
)
def test_registry_hosts_are_compared_in_lowercase(host: str, expected: str):
    assert validate_registry_host(host) == expected


@pytest.mark.parametrize("host", ["", "https://ghcr.io", "ghcr.io/token", "ghcr.io:port", "-ghcr.io", "a b"])
def test_a_registry_host_is_a_host_and_an_optional_port(host: str):
    with pytest.raises(ConfigError, match="invalid registry host"):
        validate_registry_host(host)


def test_docker_hub_spellings_name_one_repository():
    assert repository_key("nginx") == repository_key("docker.io/library/nginx") == ("docker.io", "library/nginx")
    assert repository_key("index.docker.io/library/nginx") == ("docker.io", "library/nginx")
    assert repository_key("GHCR.io/a/b") == ("ghcr.io", "a/b") != repository_key("ghcr.io/a/bc")
