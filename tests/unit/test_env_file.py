"""An image tag kept in `.env`: found the way Compose finds it, edited on its one line, refused otherwise."""

from __future__ import annotations

import pytest

from compose_rollout.errors import ConfigError
from compose_rollout.hosts.env_file import TagVariable, set_value, tag_variable, uses, value_of

ENV = b"""# Terrateam settings
DB_HOST=db
TERRAT_VERSION=1.4.2   # bumped by compose-rollout
export OTHER="x y"
"""


@pytest.mark.parametrize(
    "image", ["ghcr.io/terrateamio/terrat-oss:${TERRAT_VERSION}", "ghcr.io/terrateamio/terrat-oss:$TERRAT_VERSION"]
)
def test_a_tag_that_is_one_variable_is_found(image: str) -> None:
    assert tag_variable(image, "c") == TagVariable("ghcr.io/terrateamio/terrat-oss", "TERRAT_VERSION")
    assert tag_variable("registry:5000/a/b:${V:-1.0}", "c") == TagVariable("registry:5000/a/b", "V")
    assert tag_variable("ghcr.io/terrateamio/terrat-oss:1.4.2", "c") is None


@pytest.mark.parametrize(
    "image", ["${REGISTRY}/terrat-oss:1.4.2", "ghcr.io/terrat-oss:v${VERSION}", "ghcr.io/terrat-oss:${V}@sha256:abc"]
)
def test_a_variable_in_more_than_the_tag_is_refused(image: str) -> None:
    with pytest.raises(ConfigError, match="interpolates a variable in more than its tag"):
        tag_variable(image, "c")


def test_the_one_line_is_edited_and_every_other_byte_kept() -> None:
    assert value_of(ENV, "TERRAT_VERSION", "e") == "1.4.2"
    updated = set_value(ENV, "TERRAT_VERSION", "1.4.3@sha256:" + "a" * 64, "e")
    assert updated == ENV.replace(b"1.4.2", b"1.4.3@sha256:" + b"a" * 64)
    quoted = b'TERRAT_VERSION="1.4.2"\n'
    assert set_value(quoted, "TERRAT_VERSION", "1.4.3", "e") == b'TERRAT_VERSION="1.4.3"\n'


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (b"DB_HOST=db\n", "defines no TERRAT_VERSION; compose-rollout changes the tag where it is defined"),
        (b"TERRAT_VERSION=1\nTERRAT_VERSION=2\n", "defines TERRAT_VERSION 2 times"),
        (b"TERRAT_VERSION=${BASE}\n", "interpolates or escapes"),
    ],
)
def test_a_variable_that_is_not_on_one_plain_line_is_refused(env: bytes, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("$", r"\$").replace("{", r"\{")):
        set_value(env, "TERRAT_VERSION", "1.4.3", "e")


def test_every_use_of_the_variable_in_the_compose_file_is_found() -> None:
    compose = """services:
  server:
    image: r/app:${V}
  worker:
    image: r/worker:${V:-1.0}
    environment:
      LITERAL: $$V
      OTHER: ${VX}
      BARE: $V
"""
    assert uses(compose, "V") == [3, 5, 9]
