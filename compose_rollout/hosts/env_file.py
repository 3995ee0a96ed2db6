"""An image tag kept in the project's `.env`: `image: ghcr.io/terrateamio/terrat-oss:${TERRAT_VERSION}`.

Compose reads `.env` in the project directory and interpolates `${VAR}`, `${VAR:-default}`,
`${VAR-default}` and `$VAR` (a variable set in Compose's own environment wins over the
file). compose-rollout supports the variable only as the image's whole tag, defined on
exactly one line of `.env` and used nowhere else in the compose file; the edit splices
the new value into that one line, every other byte kept, and the compose file is not
touched. Anything else is refused, naming why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compose_rollout.errors import ConfigError

# The image value when its tag is a variable: REPOSITORY:${VAR}, ${VAR:-default}, ${VAR-default} or $VAR.
TAG_VARIABLE_RE = re.compile(
    r"(?P<repository>[^$:@\s]+(?::[0-9]+)?(?:/[^$:@\s]+)*):"
    r"(?:\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
_ASSIGNMENT_RE = re.compile(r"[ \t]*(?:export[ \t]+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)[ \t]*=")
_PLAIN_VALUE_RE = re.compile(r"[^\s#'\"]*")


@dataclass(frozen=True)
class TagVariable:
    """The variable an image's tag comes from."""

    repository: str
    name: str


def tag_variable(image: str, where: str) -> TagVariable | None:
    """The variable `image`'s tag comes from; None for a literal image; ConfigError when a
    variable is used in any other way (repository, digest, part of the tag)."""
    if "$" not in image:
        return None
    match = TAG_VARIABLE_RE.fullmatch(image)
    if match is None or "$" in match.group("repository"):
        raise ConfigError(
            f"{where}: the image {image!r} interpolates a variable in more than its tag; compose-rollout edits "
            "either a literal image or a tag that is one variable (REPOSITORY:${VAR}) set in .env"
        )
    return TagVariable(match.group("repository"), match.group("braced") or match.group("bare"))


@dataclass(frozen=True)
class EnvValue:
    """Where a variable's value stands in the `.env` text."""

    value: str
    start: int
    end: int


def locate(text: str, name: str, where: str) -> EnvValue:
    """The one line of `.env` that defines `name`; ConfigError if none, several, or not a plain value."""
    found: list[EnvValue] = []
    offset = 0
    for line in text.splitlines(keepends=True):
        match = _ASSIGNMENT_RE.match(line)
        if match and match.group("name") == name:
            start = offset + match.end()
            rest = line[match.end() :]
            quote = rest[:1] if rest[:1] in ("'", '"') else ""
            if quote:
                close = rest.find(quote, 1)
                if close < 0:
                    raise ConfigError(f"{where}: {name} has an unterminated {quote}quoted{quote} value")
                value, start = rest[1:close], start + 1
            else:
                value = _PLAIN_VALUE_RE.match(rest).group(0)  # type: ignore[union-attr]  # matches ""
            if "$" in value or "\\" in value:
                raise ConfigError(f"{where}: {name}={value} interpolates or escapes; set it to a plain tag")
            found.append(EnvValue(value, start, start + len(value)))
        offset += len(line)
    if not found:
        raise ConfigError(
            f"{where}: defines no {name}; compose-rollout changes the tag where it is defined, in .env "
            "(a variable set only in the shell environment cannot be changed)"
        )
    if len(found) > 1:
        raise ConfigError(f"{where}: defines {name} {len(found)} times; keep one line")
    return found[0]


def set_value(original: bytes, name: str, value: str, where: str) -> bytes:
    """`original` with `name`'s value replaced by `value`, every other byte kept."""
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8") from None
    if not re.fullmatch(r"[A-Za-z0-9_.:@/-]+", value):
        raise ConfigError(f"{where}: {value!r} cannot be written as {name}'s value")
    located = locate(text, name, where)
    updated = text[: located.start] + value + text[located.end :]
    if locate(updated, name, where).value != value:
        raise ConfigError(f"{where}: editing {name} would change more than its value; refusing")
    return updated.encode("utf-8")


def value_of(original: bytes, name: str, where: str) -> str:
    try:
        return locate(original.decode("utf-8"), name, where).value
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8") from None


def uses(compose: str, name: str) -> list[int]:
    """Line numbers (1-based) of the compose file that interpolate `name`."""
    pattern = re.compile(r"(?<!\$)\$(?:\{" + re.escape(name) + r"(?=[:?}-])|" + re.escape(name) + r"(?![A-Za-z0-9_]))")
    return [number for number, line in enumerate(compose.splitlines(), start=1) if pattern.search(line)]
