"""Pure builders of the docker and Compose commands run on a host.

Each function takes validated configuration and returns an argv list; none does I/O.
The SSH layer quotes an argv once (`shlex.join`) and runs it.
"""

from __future__ import annotations

from typing import Literal

from compose_rollout.config import Instance

ComposeVersion = Literal["v1", "v2"]

# A remote `timeout` is the backstop for a command whose client-side deadline fired
# while the remote process kept going (a hung `docker pull`, say).
KILL_GRACE_SECONDS = 10


def with_timeout(argv: list[str], seconds: float) -> list[str]:
    """Wrap `argv` in coreutils `timeout` so the host itself stops it after `seconds`."""
    return ["timeout", f"--kill-after={KILL_GRACE_SECONDS}", f"{max(1, round(seconds))}", *argv]


# Prints the Compose flavour on the host, in one round trip: v2 if `docker compose` works,
# else v1 if the `docker-compose` program is there (only looked up: running
# `docker-compose version` starts a Python interpreter, 0.5-1.4 s of CPU per host, all
# hosts at once in preflight); fails if neither. A constant: no value reaches the shell.
COMPOSE_PROBE = [
    "sh",
    "-c",
    "if docker compose version >/dev/null 2>&1; then echo v2; "
    "elif command -v docker-compose >/dev/null; then echo v1; else exit 1; fi",
]


def compose_base(instance: Instance, version: ComposeVersion) -> list[str]:
    """`docker compose` / `docker-compose` bound to the instance's project and file."""
    program = ["docker", "compose"] if version == "v2" else ["docker-compose"]
    return [
        *program,
        "--project-directory",
        instance.project_directory,
        "--file",
        instance.compose_path,
        "--project-name",
        instance.compose_project,
    ]


def compose_up(instance: Instance, version: ComposeVersion, service: str) -> list[str]:
    """Recreate only `service` from the compose file, leaving its dependencies alone."""
    return [*compose_base(instance, version), "up", "--detach", "--no-deps", service]


def compose_scale_up(instance: Instance, version: ComposeVersion, service: str) -> list[str]:
    """Start a second container of `service` from the compose file, leaving the running
    one as it is (the surge strategy)."""
    base = compose_base(instance, version)
    return [*base, "up", "--detach", "--no-deps", "--no-recreate", "--scale", f"{service}=2", service]


def stop_container(container_id: str, grace_seconds: int = 10) -> list[str]:
    """Stop one container (SIGTERM, then SIGKILL after `grace_seconds`)."""
    return ["docker", "container", "stop", "--time", str(grace_seconds), container_id]


def remove_container(container_id: str) -> list[str]:
    """Remove one stopped container."""
    return ["docker", "container", "rm", container_id]


def image_pull(image: str) -> list[str]:
    """Pull one image by reference (done before any instance leaves rotation)."""
    return ["docker", "pull", "--quiet", image]


def image_id(image: str) -> list[str]:
    """Print the local image ID of `image` (fails if the host does not have it)."""
    return ["docker", "image", "inspect", "--format", "{{.Id}}", image]


def service_containers(instance: Instance, service: str) -> list[str]:
    """List the IDs of the service's containers, by the labels Compose sets on them."""
    return [
        "docker",
        "ps",
        "--all",
        "--no-trunc",
        "--quiet",
        "--filter",
        f"label=com.docker.compose.project={instance.compose_project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
        "--filter",
        "label=com.docker.compose.oneoff=False",
    ]


def inspect_container(container_id: str) -> list[str]:
    """Full `docker inspect` JSON of one container."""
    return ["docker", "container", "inspect", container_id]


def sync_file(path: str) -> list[str]:
    """Flush one file to disk (coreutils `sync FILE`), before it replaces the original."""
    return ["sync", path]


def image_repo_digests(image: str) -> list[str]:
    """Print the `repo@sha256:...` names the host knows for an image, as JSON."""
    return ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", image]
