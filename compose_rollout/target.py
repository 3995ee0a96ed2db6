"""What a run deploys: the requested tag or image, checked against the fleet
(`target_image`), and what it changes of the repository the fleet runs
(`repository_change`). Both refuse a bad request before any instance is drained.
"""

from __future__ import annotations

from collections.abc import Mapping

from compose_rollout.config import Fleet
from compose_rollout.errors import ConfigError, PreflightError, RolloutError
from compose_rollout.images import ImageRef, parse_reference, validate_tag


def target_image(fleet: Fleet, tag: str | None, image: str | None) -> ImageRef:
    """Validate the requested tag or image (exactly one of them)."""
    if (tag is None) == (image is None):
        raise RolloutError("give exactly one of a tag or an image")
    if image is not None:
        ref = parse_reference(image)
        fleet.check_repository(ref)  # only the fleet's repositories: never another registry's
        if ref.tag is None and ref.digest is None:
            raise RolloutError(f"image {image!r} has neither tag nor digest; name the version to deploy")
        return ref
    return parse_reference(f"{fleet.image_repository}:{validate_tag(str(tag))}")


def repository_change(fleet: Fleet, images: Mapping[str, str], target: ImageRef, tag_only: bool) -> str:
    """What a run changes of the repository the fleet runs, for the plan and the summary
    ("" when nothing). A tag-only run (a schedule, a webhook) on a fleet that runs another
    repository than its `image_repository` (an edition switched with `--image`) is
    refused: it would silently switch the fleet back."""
    running: dict[str, list[str]] = {}
    for name, image in images.items():
        try:
            running.setdefault(parse_reference(image).repository, []).append(name)
        except ConfigError:
            continue
    others = {repository: names for repository, names in running.items() if repository != target.repository}
    if not others:
        return ""
    where = "; ".join(f"{repository} on {', '.join(names)}" for repository, names in sorted(others.items()))
    if tag_only:
        raise PreflightError(
            f"fleet {fleet.name} runs {where}, not its image_repository {fleet.image_repository}: a run given only "
            f"a tag would switch it to {target.repository}. Set image_repository in the fleet file to the "
            "repository it runs, or give a full image to switch on purpose"
        )
    return f"it switches repository: {where} -> {target.repository}"
