"""The test bed's "host that cannot pull": the `docker` its sessions find refuses pulls,
does not have an image it did not hold, and hands every other command, arguments intact,
to the real one (real shell; a stand-in for the real docker, no engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from compose_rollout.testbed import sshd

# The stand-in: `image inspect --format {{.Id}} REF` says REF's ID; anything else prints its arguments.
REAL_DOCKER = """#!/bin/sh
if [ "$1 $2 $3 $4" = "image inspect --format {{.Id}}" ]; then echo "sha256:id-of-$5"; exit 0; fi
for arg; do printf "[%s]" "$arg"; done
"""


@pytest.fixture
def docker(tmp_path: Path) -> Path:
    """The refusing `docker` of a host that holds only app:v1, in front of the stand-in."""
    real = tmp_path / "real docker"
    real.write_text(REAL_DOCKER)
    real.chmod(0o755)
    held = tmp_path / "images"
    held.write_text("sha256:id-of-app:v1\n")
    wrapper = tmp_path / "docker"
    wrapper.write_text(sshd.render_docker_refusing_pulls(str(real), held))
    wrapper.chmod(0o755)
    return wrapper


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("pull", [["pull", "--quiet"], ["image", "pull"]])
def test_a_pull_fails_as_a_refusing_registry_makes_it_fail(docker: Path, pull: list[str]) -> None:
    ran = run(docker, *pull, "registry:5000/demo/app@sha256:ab12")
    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr.startswith("Error response from daemon: pull access denied for registry:5000/demo/app,")


def test_an_image_the_host_did_not_hold_is_not_there_even_if_the_engine_has_it(docker: Path) -> None:
    ran = run(docker, "image", "inspect", "--format", "{{.Id}}", "app:v2")
    assert (ran.returncode, ran.stdout, ran.stderr) == (1, "", "Error: No such image: app:v2\n")
    held = run(docker, "image", "inspect", "--format", "{{json .RepoDigests}}", "app:v1")
    assert (held.returncode, held.stdout) == (0, "[image][inspect][--format][{{json .RepoDigests}}][app:v1]")


def test_every_other_command_reaches_the_real_docker_with_its_arguments(docker: Path) -> None:
    ran = run(docker, "container", "inspect", "--format", "{{.Id}} x", "a b")
    assert (ran.returncode, ran.stdout) == (0, "[container][inspect][--format][{{.Id}} x][a b]")


def config(session_path: str | None = None) -> str:
    return sshd.render_config(
        address="127.0.1.2",
        port=2222,
        host_key=Path("key"),
        pid_file=Path("pid"),
        authorized_keys=Path("keys"),
        session_path=session_path,
    )


def test_only_a_broken_host_gets_a_session_path() -> None:
    assert "SetEnv" not in config()
    assert config("/faults/app-2:/usr/bin") == config() + (
        '# A fault injected by the test bed: see Testbed.break_pulls.\nSetEnv PATH="/faults/app-2:/usr/bin"\n'
    )
