"""The test bed's "host that cannot pull": the `docker` its sessions find refuses pulls
and hands every other command, arguments intact, to the real one (real shell, no engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from compose_rollout.testbed import sshd

ECHO_ARGS = '#!/bin/sh\nfor arg; do printf "[%s]" "$arg"; done\n'


@pytest.fixture
def docker(tmp_path: Path) -> Path:
    """The refusing `docker`, in front of a `docker` that prints its arguments."""
    real = tmp_path / "real docker"
    real.write_text(ECHO_ARGS)
    real.chmod(0o755)
    wrapper = tmp_path / "docker"
    wrapper.write_text(sshd.render_docker_refusing_pulls(str(real)))
    wrapper.chmod(0o755)
    return wrapper


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("pull", [["pull", "--quiet"], ["image", "pull"]])
def test_a_pull_fails_as_a_refusing_registry_makes_it_fail(docker: Path, pull: list[str]) -> None:
    ran = run(docker, *pull, "registry:5000/demo/app@sha256:ab12")
    assert (ran.returncode, ran.stdout) == (1, "")
    assert ran.stderr.startswith("Error response from daemon: pull access denied for registry:5000/demo/app,")


def test_every_other_command_reaches_the_real_docker_with_its_arguments(docker: Path) -> None:
    ran = run(docker, "image", "inspect", "--format", "{{.Id}} x", "a b")
    assert (ran.returncode, ran.stdout) == (0, "[image][inspect][--format][{{.Id}} x][a b]")


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
