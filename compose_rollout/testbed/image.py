"""The test-bed application image: build context, build and push."""

from __future__ import annotations

import shutil
from pathlib import Path

from ._util import TestbedError, clean_env, run

DATA_DIR = Path(__file__).parent / "data"

# Tags pushed by Testbed.start(): v1 and v2 are healthy, "broken" has no /health.
TAGS = ("v1", "v2", "broken")

# busybox-static's binary: statically linked, so it runs in a FROM-scratch image.
BUSYBOX = Path("/bin/busybox")


def prepare_context(context: Path) -> Path:
    """Write the build context (Dockerfile, rootfs, busybox) into ``context``.

    busybox is copied at build time rather than committed. The legacy builder
    hashes file contents (not mtimes) for COPY, so regenerating the context in
    a new directory still hits the build cache."""
    if not BUSYBOX.is_file():
        raise TestbedError(f"{BUSYBOX} is missing (install busybox-static)")
    if context.exists():
        shutil.rmtree(context)
    shutil.copytree(DATA_DIR, context)
    shutil.copy2(BUSYBOX, context / "busybox")
    # Executable bits must not depend on how the repository was checked out:
    # they are part of the image (and of the build cache key).
    for script in [context / "rootfs" / "entrypoint.sh", *(context / "rootfs" / "www" / "cgi-bin").iterdir()]:
        script.chmod(0o755)
    (context / "busybox").chmod(0o755)
    return context


def build(docker: str, context: Path, repository: str, tag: str) -> None:
    """`docker build` one tag of the app image (cached after the first time)."""
    run(
        [docker, "build", "--quiet", "--tag", f"{repository}:{tag}", "--build-arg", f"VERSION={tag}", str(context)],
        timeout=300,
        # The 28.x CLI has no buildx plugin here; say so explicitly rather
        # than depend on its fallback to the legacy builder.
        env=clean_env(DOCKER_BUILDKIT="0"),
    )


def push(docker: str, repository: str, tag: str) -> None:
    """`docker push` one tag to the test-bed registry."""
    run([docker, "push", f"{repository}:{tag}"], timeout=120)
