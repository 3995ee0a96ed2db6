"""Choosing a tag when none is given: the highest version tag inside a range.

A fleet may name a `TagPolicy` (e.g. `version_range: ">=1.4,<2"`); a deploy without
`--tag` then lists the repository's tags and takes the highest one the policy allows.
The registry push webhook applies the same rules to a pushed tag.

How tags are read:

- A tag is a version if `packaging.version.Version` parses it (PEP 440, which also
  accepts the common semver spellings): `1.4.2`, `v1.4.2`, `1.4`, `2024.05.01`,
  `1.5.0-rc.1` (pre-release 1.5.0rc1), `1.5.0-beta.2`, `1.0.dev3` (pre-release).
  `1.4.2-1` and `1.4.2-r1` read as *post*-releases of 1.4.2 (packaging's rule), so
  they sort above 1.4.2.
- Every other tag is **not a version** and is never selected: `latest`, `main`,
  `sha-3f2a9c1`, `1.4.2-alpine`, `1.0.0-SNAPSHOT`, `1.0.0-alpha.beta`.
- `latest` is never selected, whatever the policy says; nor is a tag matching one of
  the `ignore` globs (`fnmatch` syntax, case-sensitive, matched against the whole tag).
- Pre-releases (alpha, beta, rc, dev) are selected only with `allow_prereleases`.
  Even then an exclusive bound keeps PEP 440's meaning: `<2` excludes `2.0.0-rc.1`.
- Ties between spellings of one version go to the most specific (`1.4.0` over `1.4`,
  since `1.4` is usually a moving tag), then to the one without a leading `v`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Annotated, Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compose_rollout.errors import ConfigError, RegistryError
from compose_rollout.images import ImageRef, parse_reference, validate_tag

NEVER = "latest"
# (version, number of release components as written, no leading "v", tag): a total
# order in which equal versions are broken deterministically (see the module docstring).
VersionKey = tuple[Version, int, bool, str]


class TagPolicy(BaseModel):
    """Which tags may be deployed when no tag is named (and which pushes the webhook acts on)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version_range: Annotated[
        str,
        Field(
            min_length=1,
            max_length=256,
            description=(
                "Comma-separated version comparisons the tag must satisfy, PEP 440 style: "
                "'>=1.4,<2', '==1.4.*', '~=1.4', or '>=0' for any release."
            ),
        ),
    ]
    allow_prereleases: Annotated[
        bool, Field(description="Also select pre-releases (1.5.0-rc.1, 1.5.0-beta.2, 1.5.0.dev1).")
    ] = False
    ignore: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]],
        Field(
            max_length=64,
            description="Globs of tags never selected (fnmatch, case-sensitive). `latest` is never selected anyway.",
        ),
    ] = ["latest", "sha-*"]

    @field_validator("version_range")
    @classmethod
    def _range(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier:
            raise ValueError(
                f"invalid version_range {value!r}: expected comparisons like '>=1.4,<2' or '==1.4.*'"
            ) from None
        return value

    @property
    def specifiers(self) -> SpecifierSet:
        """The parsed `version_range`."""
        return SpecifierSet(self.version_range)


def parse_version(tag: str) -> Version | None:
    """The version a tag names, or None if it is not a version (see the module docstring)."""
    try:
        return Version(tag)
    except InvalidVersion:
        return None


def version_key(tag: str) -> VersionKey | None:
    """A sort key ordering version tags from oldest to newest; None for a tag that is not a version."""
    version = parse_version(tag)
    if version is None:
        return None
    return (version, len(version.release), tag[:1] not in ("v", "V"), tag)


def rejection_reason(tag: str, policy: TagPolicy) -> str | None:
    """Why `policy` refuses `tag`, in words for a log line; None if the tag is allowed."""
    try:
        validate_tag(tag)
    except ConfigError as error:
        return str(error)
    if tag == NEVER:
        return "`latest` is never deployed automatically"
    for pattern in policy.ignore:
        if fnmatch.fnmatchcase(tag, pattern):
            return f"matches the ignore pattern {pattern!r}"
    version = parse_version(tag)
    if version is None:
        return "is not a version"
    if version.is_prerelease and not policy.allow_prereleases:
        return "is a pre-release (allow_prereleases is off)"
    if not policy.specifiers.contains(version, prereleases=policy.allow_prereleases):
        return f"is outside version_range {policy.version_range!r}"
    return None


def select_tag(tags: Sequence[str], policy: TagPolicy) -> str | None:
    """The highest tag `policy` allows, or None when none does.

    Never `latest`, never a tag matching an ignore glob, never a tag that is not a
    version, never a pre-release unless `allow_prereleases`; see the module docstring
    for how ties between spellings of one version are broken.
    """
    best: VersionKey | None = None
    for tag in tags:
        if rejection_reason(tag, policy) is not None:
            continue
        key = version_key(tag)
        if key is not None and (best is None or key > best):
            best = key
    return None if best is None else best[3]


class TagLister(Protocol):
    """What `resolve_tag` needs from a registry client (`compose_rollout.registry.RegistryClient` fits)."""

    def list_tags(self, ref: ImageRef) -> list[str]:
        """Every tag of `ref`'s repository."""
        ...


def resolve_tag(registry_client: TagLister, repository_ref: ImageRef | str, policy: TagPolicy) -> str:
    """The tag to deploy: the highest one in the repository that `policy` allows.

    Raises RegistryError naming the repository, the range and what the registry
    offered (the highest versions outside the range) when no tag matches; errors of
    the registry client itself propagate unchanged.
    """
    ref = parse_reference(repository_ref) if isinstance(repository_ref, str) else repository_ref
    tags = registry_client.list_tags(ImageRef(ref.repository))
    chosen = select_tag(tags, policy)
    if chosen is not None:
        return chosen
    versions = sorted((key for key in map(version_key, tags) if key is not None), reverse=True)
    seen = ", ".join(key[3] for key in versions[:5]) or "none"
    prereleases = "included" if policy.allow_prereleases else "excluded"
    raise RegistryError(
        f"no tag of {ref.repository} matches version_range {policy.version_range!r} "
        f"(pre-releases {prereleases}, ignored: {', '.join(policy.ignore) or 'none'}); "
        f"the registry lists {len(tags)} tags, highest versions: {seen}"
    )
