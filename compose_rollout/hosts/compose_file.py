"""Edit the image of one service in a compose file, and nothing else.

The YAML stays the user's: ruamel.yaml only locates the value; the new value is
spliced into the original text (same quoting, same line endings), and the result is
parsed again to prove that the image is the only thing that changed. Anchors, aliases
and `${VARIABLE}` images are refused rather than guessed at.
"""

from __future__ import annotations

import difflib
import io
import re
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from compose_rollout.errors import ConfigError

# An image reference never contains these; a plain scalar ends at the first of them.
_PLAIN_SCALAR = re.compile(r"[^\s,\[\]{}#'\"]+")


@dataclass(frozen=True)
class ImageValue:
    """Where a service's image value stands in the file text."""

    value: str
    start: int
    end: int
    quote: str  # "", "'" or '"'


def _load(text: str, where: str) -> Any:
    try:
        return YAML(typ="rt").load(io.StringIO(text))
    except YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None


def services_of(text: str, where: str = "compose file") -> dict[str, Any]:
    """The `services:` mapping of a compose file."""
    data = _load(text, where)
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        raise ConfigError(f"{where}: has no `services:` mapping")
    return services


def _image_of(text: str, service: str, where: str) -> tuple[Any, Any]:
    """(the service's definition, its `image:` value as parsed); ConfigError if absent."""
    services = services_of(text, where)
    if service not in services:
        known = ", ".join(str(name) for name in services) or "none"
        raise ConfigError(f"{where}: has no service {service!r} (services: {known})")
    definition = services[service]
    if not isinstance(definition, dict) or "image" not in definition:
        raise ConfigError(f"{where}: service {service!r} has no `image:` key")
    value = definition["image"]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: service {service!r} has a non-string image {value!r}")
    return definition, value


def image_value(text: str, service: str, where: str = "compose file") -> str:
    """The `image:` value of `service` as written (variables not interpolated)."""
    return str(_image_of(text, service, where)[1])


def locate_image(text: str, service: str, where: str = "compose file") -> ImageValue:
    """Find the literal `image:` value of `service`; ConfigError if absent or not literal."""
    definition, value = _image_of(text, service, where)
    anchor = getattr(value, "anchor", None)
    if anchor is not None and anchor.value is not None:
        raise ConfigError(f"{where}: the image of {service!r} is a YAML anchor; edit it by hand")
    if "$" in value:
        raise ConfigError(
            f"{where}: the image of {service!r} uses a variable ({value}); only a tag set in .env "
            "(REPOSITORY:${VAR}) can be changed"
        )
    if "image" not in definition.lc.data:
        raise ConfigError(f"{where}: the image of {service!r} comes from a merge key (<<); edit it by hand")
    line, column = definition.lc.value("image")
    lines = text.splitlines(keepends=True)
    offset = sum(len(previous) for previous in lines[:line]) + column
    quote = text[offset] if text[offset] in "'\"" else ""
    if quote:
        end = text.find(quote, offset + 1)
        found = text[offset + 1 : end]
        start, end = offset + 1, end
    else:
        match = _PLAIN_SCALAR.match(text, offset)
        found = match.group(0) if match else ""
        start, end = offset, offset + len(found)
    if found != value:  # an alias, an escape or a multi-line scalar: not a literal we can splice
        raise ConfigError(f"{where}: the image of {service!r} is not a single literal value; edit it by hand")
    return ImageValue(value, start, end, quote)


def _without_image(data: Any, service: str) -> Any:
    plain = _plain(data)
    plain["services"][service].pop("image", None)
    return plain


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(item) for item in node]
    return node


def set_image(original: bytes, service: str, image: str, where: str = "compose file") -> bytes:
    """Return `original` with `service`'s image replaced by `image`, every other byte kept."""
    try:
        text = original.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8") from None
    located = locate_image(text, service, where)
    if located.quote and located.quote in image:
        raise ConfigError(f"image {image!r} cannot be written inside {located.quote} quotes")
    updated = text[: located.start] + image + text[located.end :]
    # Proof that the edit changed exactly one value: parse both, compare.
    after = locate_image(updated, service, where)
    if after.value != image or _without_image(_load(updated, where), service) != _without_image(
        _load(text, where), service
    ):
        raise ConfigError(f"{where}: editing the image would change more than the image; refusing")
    return updated.encode("utf-8")


def current_image(original: bytes, service: str, where: str = "compose file") -> str:
    """The image value `service` has in the file."""
    try:
        return locate_image(original.decode("utf-8"), service, where).value
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8") from None


def unified_diff(before: bytes, after: bytes, path: str) -> str:
    """A unified diff of two versions of a compose file, for `plan`."""
    return "".join(
        difflib.unified_diff(
            before.decode("utf-8").splitlines(keepends=True),
            after.decode("utf-8").splitlines(keepends=True),
            fromfile=f"{path} (now)",
            tofile=f"{path} (after)",
        )
    )
