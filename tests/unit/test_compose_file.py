"""Editing one service's image in a compose file: that value changes, every other byte stays."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from compose_rollout.errors import ConfigError
from compose_rollout.hosts.compose_file import current_image, locate_image, services_of, set_image, unified_diff
from compose_rollout.images import parse_reference

OLD = "ghcr.io/terrateamio/terrat-oss:1.2.3"
NEW = "ghcr.io/terrateamio/terrat-oss:1.3.0@sha256:" + "5" * 64

# A realistic self-hosted Terrateam compose file: comments (some non-ASCII), anchors and merge keys used by
# other keys, `${VARIABLES}` outside the image, and the three quoting styles.
TERRATEAM = """\
# Terrateam self-hosted — déployé par compose-rollout (only services.server.image is edited).
name: terrateam

x-logging: &default-logging
  driver: json-file
  options:
    max-size: "10m"
    max-file: "3"

x-restart: &restart
  restart: unless-stopped

services:
  db:
    <<: *restart
    image: "postgres:16.4"   # pinned major version
    logging: *default-logging
    environment:
      POSTGRES_USER: terrateam
      POSTGRES_PASSWORD: ${DB_PASS:?set DB_PASS}
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U terrateam"]
      interval: 5s

  server:
    image: ghcr.io/terrateamio/terrat-oss:1.2.3 # deployed by compose-rollout
    <<: *restart
    logging: *default-logging
    depends_on:
      db:
        condition: service_healthy
    ports:
      - "8080:8080"
    environment:
      DB_HOST: db
      DB_PASS: ${DB_PASS}
      GITHUB_APP_ID: ${GITHUB_APP_ID}
      TERRAT_UI_BASE: https://terrateam.example.com/
    stop_grace_period: 130s

  nginx:
    image: 'nginx:1.27-alpine'
    logging: *default-logging
    ports: ["443:443"]
    volumes:
      - ./nginx.conf:/etc/nginx/nginx.conf:ro

volumes:
  pgdata: {}
""".encode()

FLOW = b"""\
services:
  db: {image: "postgres:16.4", restart: always}
  server: {image: ghcr.io/terrateamio/terrat-oss:1.2.3, ports: ["8080:8080"], restart: always}
  nginx: {image: 'nginx:1.27-alpine'}
"""

VARIANTS = {
    "block": TERRATEAM,
    "crlf": TERRATEAM.replace(b"\n", b"\r\n"),
    "bom-crlf": b"\xef\xbb\xbf" + TERRATEAM.replace(b"\n", b"\r\n"),
    "flow": FLOW,
    "flow-crlf": FLOW.replace(b"\n", b"\r\n"),
    "no-final-newline": b"services:\n  server:\n    image: ghcr.io/terrateamio/terrat-oss:1.2.3",
    "value-on-next-line": b"services:\n  server:\n    image:\n      ghcr.io/terrateamio/terrat-oss:1.2.3\n",
    "spaces-around-value": b"services:\n  server:\n    image:     ghcr.io/terrateamio/terrat-oss:1.2.3   \n",
}
OLD_IMAGES = {"server": OLD, "db": "postgres:16.4", "nginx": "nginx:1.27-alpine"}


def assert_only_image_changed(before: bytes, after: bytes, old: str, new: str) -> None:
    """`after` is `before` with the single occurrence of `old` replaced by `new`, byte for byte."""
    old_bytes, new_bytes = old.encode(), new.encode()
    assert before.count(old_bytes) == 1, "the fixture must hold the old image exactly once"
    start = before.index(old_bytes)
    assert after[start : start + len(new_bytes)] == new_bytes
    # With the image spans cut out, the two files are identical.
    assert before[:start] + before[start + len(old_bytes) :] == after[:start] + after[start + len(new_bytes) :]


# --- set_image ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_set_image_changes_only_the_image_bytes(variant: str):
    before = VARIANTS[variant]
    after = set_image(before, "server", NEW)
    assert_only_image_changed(before, after, OLD, NEW)
    assert current_image(after, "server") == NEW


@pytest.mark.parametrize(("variant", "service"), [(v, s) for v in ("block", "crlf", "flow") for s in ("db", "nginx")])
def test_quote_style_is_preserved(variant: str, service: str):
    before = VARIANTS[variant]
    old = OLD_IMAGES[service]
    new = old.rsplit(":", 1)[0] + ":9.9.9"
    after = set_image(before, service, new)
    assert_only_image_changed(before, after, old, new)
    quote = '"' if service == "db" else "'"
    assert f"{quote}{new}{quote}".encode() in after
    assert current_image(after, service) == new


def test_crlf_line_endings_stay_crlf():
    before = VARIANTS["crlf"]
    after = set_image(before, "server", NEW)
    assert after.count(b"\r\n") == before.count(b"\r\n")
    assert after.replace(b"\r\n", b"").count(b"\n") == 0


def test_other_services_and_comments_are_untouched():
    after = set_image(TERRATEAM, "server", NEW)
    assert b"# deployed by compose-rollout" in after
    assert "déployé".encode() in after
    assert current_image(after, "db") == "postgres:16.4"
    assert current_image(after, "nginx") == "nginx:1.27-alpine"


def test_setting_the_same_image_is_a_no_op():
    assert set_image(TERRATEAM, "server", OLD) == TERRATEAM


def test_result_is_bytes_and_reparses_to_the_same_document_apart_from_the_image():
    after = set_image(TERRATEAM, "server", NEW)
    assert isinstance(after, bytes)
    before_doc = YAML(typ="safe").load(io.BytesIO(TERRATEAM))
    after_doc = YAML(typ="safe").load(io.BytesIO(after))
    assert after_doc["services"]["server"].pop("image") == NEW
    before_doc["services"]["server"].pop("image")
    assert after_doc == before_doc


# --- current_image / locate_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_current_image_reads_every_variant(variant: str):
    assert current_image(VARIANTS[variant], "server") == OLD


def test_locate_image_reports_quote_and_span():
    text = TERRATEAM.decode()
    for service, quote in (("server", ""), ("db", '"'), ("nginx", "'")):
        located = locate_image(text, service)
        assert located.quote == quote
        assert text[located.start : located.end] == OLD_IMAGES[service]
        assert text[located.start - len(quote) : located.start] == quote


def test_services_of_lists_the_services_in_order():
    assert list(services_of(TERRATEAM.decode())) == ["db", "server", "nginx"]


# --- refusals -----------------------------------------------------------------------------------------------------


def test_missing_service_is_named_with_the_known_services():
    with pytest.raises(ConfigError) as caught:
        set_image(TERRATEAM, "web", NEW, where="/srv/terrateam/docker-compose.yml")
    message = str(caught.value)
    assert "'web'" in message
    assert "db, server, nginx" in message
    assert "/srv/terrateam/docker-compose.yml" in message


@pytest.mark.parametrize(
    "text",
    [b"version: '3'\n", b"services: []\n", b"- server\n", b"", b"services:\n"],
)
def test_file_without_services_mapping_is_refused(text: bytes):
    with pytest.raises(ConfigError, match="services"):
        set_image(text, "server", NEW)


def test_service_without_image_is_refused():
    text = b"services:\n  server:\n    build: .\n"
    with pytest.raises(ConfigError, match="no `image:` key"):
        set_image(text, "server", NEW)


@pytest.mark.parametrize(
    "value",
    [
        "ghcr.io/terrateamio/terrat-oss:${TAG}",
        "${IMAGE}",
        "${IMAGE:-ghcr.io/terrateamio/terrat-oss:1.2.3}",
        '"$IMAGE"',
        "'ghcr.io/terrateamio/terrat-oss:${TAG:?}'",
    ],
)
def test_image_with_a_variable_is_refused(value: str):
    text = f"services:\n  server:\n    image: {value}\n".encode()
    with pytest.raises(ConfigError, match="variable"):
        set_image(text, "server", NEW)
    with pytest.raises(ConfigError, match="variable"):
        current_image(text, "server")


@pytest.mark.parametrize(
    "text",
    [
        # The image itself carries an anchor (another service may alias it).
        b"services:\n  server:\n    image: &img ghcr.io/terrateamio/terrat-oss:1.2.3\n  worker:\n    image: *img\n",
        # The image is an alias of a value defined elsewhere.
        b"x-image: &img ghcr.io/terrateamio/terrat-oss:1.2.3\nservices:\n  server:\n    image: *img\n",
    ],
    ids=["anchor", "alias"],
)
def test_anchored_or_aliased_image_is_refused(text: bytes):
    with pytest.raises(ConfigError, match="anchor"):
        set_image(text, "server", NEW)


def test_service_shared_through_an_alias_is_refused():
    # Editing `server` would silently change `worker` too.
    text = b"services:\n  server: &srv\n    image: ghcr.io/terrateamio/terrat-oss:1.2.3\n  worker: *srv\n"
    with pytest.raises(ConfigError, match="more than the image"):
        set_image(text, "server", NEW)


def test_image_inherited_through_a_merge_key_is_refused():
    text = (
        b"x-defaults: &defaults\n  image: ghcr.io/terrateamio/terrat-oss:1.2.3\n  restart: always\n"
        b"services:\n  server:\n    <<: *defaults\n    ports: ['8080:8080']\n"
    )
    with pytest.raises(ConfigError, match=r"comes from a merge key \(<<\); edit it by hand"):
        set_image(text, "server", NEW)


@pytest.mark.parametrize(
    "value",
    [
        "!!str ghcr.io/terrateamio/terrat-oss:1.2.3",
        ">-\n      ghcr.io/terrateamio/terrat-oss:1.2.3",
        '"ghcr.io/terrateamio/terrat-oss:1.2.\\x33"',
        "ghcr.io/terrateamio/terrat-oss:1.2.3#frag",
        "1234",
        "",
    ],
    ids=["tag", "folded", "escaped", "hash", "int", "empty"],
)
def test_image_that_is_not_a_plain_literal_string_is_refused(value: str):
    text = f"services:\n  server:\n    image: {value}\n    restart: always\n".encode()
    with pytest.raises(ConfigError, match=r"has a non-string image|is not a single literal value; edit it by hand"):
        set_image(text, "server", NEW)


def test_duplicate_image_key_is_refused():
    text = b"services:\n  server:\n    image: a:1\n    image: b:2\n"
    with pytest.raises(ConfigError, match='duplicate key "image"'):
        set_image(text, "server", NEW)


@pytest.mark.parametrize(
    "text",
    [b"# caf\xe9\nservices:\n  server:\n    image: nginx:1\n", b"services:\n  server:\n    image: nginx:1\xff\n"],
)
def test_non_utf8_file_is_refused(text: bytes):
    with pytest.raises(ConfigError, match="UTF-8"):
        set_image(text, "server", NEW)
    with pytest.raises(ConfigError, match="UTF-8"):
        current_image(text, "server")


def test_invalid_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        set_image(b"services:\n  server: [\n", "server", NEW)


@pytest.mark.parametrize(
    ("variant", "image"),
    [
        ("block", "nginx:1\n    privileged: true"),
        ("block", "nginx:1 # comment"),
        ("block", "nginx:1 privileged"),
        ("flow", "nginx:1, privileged: true"),
        ("flow", "nginx:1}"),
        ("block", "'nginx:1'"),
    ],
)
def test_a_value_that_would_change_the_structure_is_never_written(variant: str, image: str):
    refused = r"would change more than the image; refusing|is not a single literal value|not valid YAML"
    with pytest.raises(ConfigError, match=refused):
        set_image(VARIANTS[variant], "server", image)


@pytest.mark.parametrize(("service", "image"), [("db", 'postgres:"17"'), ("nginx", "nginx:it's")])
def test_a_value_containing_the_surrounding_quote_is_refused(service: str, image: str):
    with pytest.raises(ConfigError, match="quotes"):
        set_image(TERRATEAM, service, image)


# --- unified_diff -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["block", "crlf", "flow"])
def test_unified_diff_shows_exactly_one_changed_line(variant: str):
    before = VARIANTS[variant]
    after = set_image(before, "server", NEW)
    diff = unified_diff(before, after, "/srv/terrateam/docker-compose.yml")
    lines = diff.splitlines()
    assert lines[0] == "--- /srv/terrateam/docker-compose.yml (now)"
    assert lines[1] == "+++ /srv/terrateam/docker-compose.yml (after)"
    removed = [line for line in lines[2:] if line.startswith("-")]
    added = [line for line in lines[2:] if line.startswith("+")]
    assert len(removed) == len(added) == 1
    assert OLD in removed[0] and NEW not in removed[0]
    assert NEW in added[0]
    assert removed[0][1:].replace(OLD, NEW) == added[0][1:]


def test_unified_diff_of_identical_files_is_empty():
    assert unified_diff(TERRATEAM, TERRATEAM, "docker-compose.yml") == ""


# --- properties ---------------------------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]{1,8}(?:(?:[._]|__|-+)[a-z0-9]{1,8}){0,2}"
generated_refs = st.from_regex(
    rf"(?:[a-z0-9]{{1,8}}(?:\.[a-z0-9]{{1,8}}){{1,2}}(?::[0-9]{{1,5}})?/)?{_COMPONENT}(?:/{_COMPONENT}){{0,2}}"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,30})?(?:@sha256:[a-f0-9]{64})?",
    fullmatch=True,
).filter(lambda text: len(text) < 200)


def _plain_yaml_is_a_string(value: str) -> bool:
    return isinstance(YAML(typ="rt").load(io.StringIO(f"k: {value}\n"))["k"], str)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generated_refs, st.sampled_from(sorted(VARIANTS)))
def test_set_then_read_back_any_valid_reference(ref: str, variant: str):
    assert str(parse_reference(ref)) == ref  # the strategy only yields valid references
    before = VARIANTS[variant]
    if not _plain_yaml_is_a_string(ref):
        # e.g. `1234` or `1e5`: YAML would read an unquoted number, never a string; refusing is the only safe answer.
        with pytest.raises(ConfigError, match="has a non-string image"):
            set_image(before, "server", ref)
        return
    after = set_image(before, "server", ref)
    assert current_image(after, "server") == ref
    assert_only_image_changed(before, after, OLD, ref)


@settings(max_examples=15, deadline=None)
@given(generated_refs, st.sampled_from(["db", "nginx"]))
def test_quoted_values_take_any_valid_reference(ref: str, service: str):
    after = set_image(TERRATEAM, service, ref)
    assert current_image(after, service) == ref
    assert_only_image_changed(TERRATEAM, after, OLD_IMAGES[service], ref)
