"""Choosing a tag when none is given: the highest version inside the fleet's range."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from compose_rollout.errors import RegistryError
from compose_rollout.images import ImageRef
from compose_rollout.triggers.tag_policy import TagPolicy, parse_version, rejection_reason, resolve_tag, select_tag

# What a real repository's tag list looks like: moving tags, CI tags, variants, pre-releases.
REGISTRY_TAGS = [
    "latest",
    "main",
    "sha-3f2a9c1",
    "1.3.9",
    "1.4",
    "1.4.0",
    "1.4.2",
    "1.4.2-alpine",
    "v1.4.10",
    "1.5.0-rc.1",
    "1.5.0-beta.2",
    "2.0.0-rc.1",
    "2.0.0",
    "2.0.1",
]


def policy(version_range: str = ">=1.4,<2", **kwargs: object) -> TagPolicy:
    return TagPolicy.model_validate({"version_range": version_range, **kwargs})


def test_the_highest_version_in_range_wins_by_version_order_not_text_order() -> None:
    # 1.4.10 > 1.4.2 although "1.4.10" < "1.4.2" as text; 2.x is outside the range.
    assert select_tag(REGISTRY_TAGS, policy()) == "v1.4.10"


def test_pre_releases_only_when_allowed_and_an_exclusive_bound_keeps_its_pre_releases_out() -> None:
    assert select_tag(REGISTRY_TAGS, policy(allow_prereleases=True)) == "1.5.0-rc.1"
    # `<2` does not admit 2.0.0-rc.1 even with pre-releases allowed (PEP 440).
    assert select_tag(["1.9.0", "2.0.0-rc.1"], policy(allow_prereleases=True)) == "1.9.0"
    assert select_tag(["1.5.0-rc.1", "1.5.0.dev3"], policy()) is None


def test_latest_is_never_selected_even_with_no_ignore_globs() -> None:
    assert select_tag(["latest"], policy(">=0", ignore=[])) is None
    assert rejection_reason("latest", policy(">=0", ignore=[])) == "`latest` is never deployed automatically"


def test_ignore_globs_remove_matching_tags() -> None:
    assert select_tag(REGISTRY_TAGS, policy(ignore=["latest", "sha-*", "v1.4.1*"])) == "1.4.2"
    assert rejection_reason("sha-3f2a9c1", policy()) == "matches the ignore pattern 'sha-*'"


def test_tags_that_are_not_versions_are_never_selected() -> None:
    assert select_tag(["main", "sha-3f2a9c1", "1.4.2-alpine", "1.0.0-SNAPSHOT", "nightly"], policy(">=0")) is None
    assert rejection_reason("1.4.2-alpine", policy()) == "is not a version"


def test_semver_spellings_are_read_as_versions() -> None:
    assert str(parse_version("v1.4.2")) == "1.4.2"
    assert str(parse_version("1.5.0-rc.1")) == "1.5.0rc1"
    assert str(parse_version("1.5.0-beta.2")) == "1.5.0b2"
    # A numeric suffix is a post-release (a rebuild), newer than the release itself.
    assert select_tag(["1.4.2", "1.4.2-1"], policy()) == "1.4.2-1"


def test_equal_versions_prefer_the_most_specific_spelling_then_no_leading_v() -> None:
    assert select_tag(["1.4", "1.4.0"], policy()) == "1.4.0"
    assert select_tag(["1.4.0", "v1.4.0"], policy()) == "1.4.0"
    assert select_tag(["v1.4.0", "1.4"], policy()) == "v1.4.0"


def test_malformed_tags_from_a_registry_are_skipped() -> None:
    assert select_tag(["1.4.3;rm -rf /", "-1.4.4", "1.4.1"], policy()) == "1.4.1"


def test_other_range_forms() -> None:
    assert select_tag(REGISTRY_TAGS, policy("==1.4.*")) == "v1.4.10"
    assert select_tag(REGISTRY_TAGS, policy("~=2.0")) == "2.0.1"
    assert select_tag(REGISTRY_TAGS, policy(">=0")) == "2.0.1"
    assert select_tag(REGISTRY_TAGS, policy(">=3")) is None


@pytest.mark.parametrize("bad", ["1.4", ">=1.4;<2", "*", "latest", ">= one"])
def test_an_invalid_range_is_refused_when_the_file_is_loaded(bad: str) -> None:
    with pytest.raises(ValidationError, match="invalid version_range"):
        policy(bad)


def test_the_model_is_strict_and_frozen() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        policy(prerelease=True)
    with pytest.raises(ValidationError, match="frozen"):
        policy().allow_prereleases = True
    assert policy().ignore == ["latest", "sha-*"]


def test_an_error_in_a_fleet_file_section_names_its_path() -> None:
    class Section(BaseModel):
        tag_policy: TagPolicy | None = None

    with pytest.raises(ValidationError) as error:
        Section.model_validate({"tag_policy": {"version_range": "1.4"}})
    assert error.value.errors()[0]["loc"] == ("tag_policy", "version_range")


class FakeRegistry:
    """Lists a fixed set of tags and records which repositories were asked for."""

    def __init__(self, tags: list[str]) -> None:
        self.tags = tags
        self.asked: list[ImageRef] = []

    def list_tags(self, ref: ImageRef) -> list[str]:
        self.asked.append(ref)
        return self.tags


def test_resolve_tag_lists_the_repository_and_returns_the_chosen_tag() -> None:
    registry = FakeRegistry(REGISTRY_TAGS)
    assert resolve_tag(registry, "ghcr.io/terrateamio/terrat-oss:old", policy()) == "v1.4.10"
    # The tag of the reference is irrelevant: the repository is listed.
    assert registry.asked == [ImageRef("ghcr.io/terrateamio/terrat-oss")]


def test_resolve_tag_explains_what_the_registry_had_when_nothing_matches() -> None:
    registry = FakeRegistry(["latest", "sha-3f2a9c1", "2.0.1", "2.0.0", "1.3.9"])
    with pytest.raises(RegistryError) as error:
        resolve_tag(registry, ImageRef("ghcr.io/terrateamio/terrat-oss"), policy())
    message = str(error.value)
    assert "no tag of ghcr.io/terrateamio/terrat-oss matches version_range '>=1.4,<2'" in message
    assert "pre-releases excluded" in message
    assert "5 tags, highest versions: 2.0.1, 2.0.0, 1.3.9" in message


@given(st.lists(st.sampled_from([*REGISTRY_TAGS, "1.4.7", "1.9.99", "v1.6", "1.6.0-rc.2"]), max_size=12))
def test_the_selected_tag_is_allowed_and_no_allowed_tag_is_higher(tags: list[str]) -> None:
    chosen = select_tag(tags, policy())
    allowed = [tag for tag in tags if rejection_reason(tag, policy()) is None]
    if chosen is None:
        assert allowed == []
    else:
        assert chosen in allowed
        version = parse_version(chosen)
        assert version is not None
        assert all((parse_version(tag) or version) <= version for tag in allowed)
