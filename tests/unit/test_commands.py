"""The argv builders: what runs on a host, in both Compose forms, and safe to quote once with shlex.join."""

from __future__ import annotations

import shlex
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compose_rollout.config import Instance
from compose_rollout.hosts import commands

V1 = ["docker-compose"]
V2 = ["docker", "compose"]


def make_instance(**fields: str) -> Instance:
    values = {
        "name": "app-1",
        "host": "10.0.0.5",
        "project_directory": "/srv/terrateam",
        "lb_server": "app-1",
        "health_url": "http://10.0.0.5:8080/health",
    }
    values.update(fields)
    return Instance(**values)


def global_options(argv: list[str]) -> dict[str, str]:
    """`--option value` pairs, as Compose would read them."""
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--") and "=" not in argv[i]}


# --- compose ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "program"), [("v1", V1), ("v2", V2)])
def test_compose_up_recreates_only_the_service(version, program):
    argv = commands.compose_up(make_instance(), version, "server")
    assert argv[: len(program)] == program
    up = argv.index("up")
    # Project options are global options: they come before the `up` subcommand.
    assert global_options(argv[len(program) : up]) == {
        "--project-directory": "/srv/terrateam",
        "--file": "/srv/terrateam/docker-compose.yml",
        "--project-name": "terrateam",
    }
    # Detached, without touching dependencies (the database keeps running), and only this service.
    assert argv[up:] == ["up", "--detach", "--no-deps", "server"]


def test_v1_and_v2_differ_only_in_the_program():
    instance = make_instance()
    v1 = commands.compose_up(instance, "v1", "server")
    v2 = commands.compose_up(instance, "v2", "server")
    assert v1[:1] == V1 and v2[:2] == V2
    assert v1[1:] == v2[2:]


def test_compose_uses_explicit_file_and_project_name():
    instance = make_instance(compose_file="deploy/compose.prod.yml", project_name="terra")
    options = global_options(commands.compose_base(instance, "v2"))
    assert options["--file"] == "/srv/terrateam/deploy/compose.prod.yml"
    assert options["--project-name"] == "terra"
    assert options["--project-directory"] == "/srv/terrateam"


def test_project_directory_with_a_space_is_one_argument():
    instance = make_instance(project_directory="/srv/Terrateam Prod")
    argv = commands.compose_up(instance, "v2", "server")
    assert "/srv/Terrateam Prod" in argv
    assert "/srv/Terrateam Prod/docker-compose.yml" in argv
    assert global_options(argv)["--project-name"] == "terrateamprod"
    assert shlex.split(shlex.join(argv)) == argv


def _probe(tmp_path: Path, programs: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The Compose probe with only `programs` (name: shell body) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in programs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return subprocess.run(
        commands.COMPOSE_PROBE,
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=10,
        executable="/bin/sh",
    )


def test_the_compose_probe_prefers_docker_compose_v2(tmp_path):
    found = _probe(tmp_path, {"docker": '[ "$1 $2" = "compose version" ]', "docker-compose": "exit 0"})
    assert (found.returncode, found.stdout) == (0, "v2\n")


def test_the_compose_probe_finds_v1_without_starting_it(tmp_path):
    ran = tmp_path / "ran"
    found = _probe(tmp_path, {"docker": "exit 1", "docker-compose": f"echo started >> {ran}"})
    assert (found.returncode, found.stdout) == (0, "v1\n")
    assert not ran.exists()  # looked up, never run


def test_the_compose_probe_fails_without_either(tmp_path):
    found = _probe(tmp_path, {"docker": "exit 1"})
    assert found.returncode != 0 and found.stdout == ""


# --- timeout ------------------------------------------------------------------------------------------------------


def test_with_timeout_wraps_in_coreutils_timeout():
    argv = commands.compose_up(make_instance(), "v2", "server")
    wrapped = commands.with_timeout(argv, 180)
    assert wrapped[0] == "timeout"
    assert wrapped[1] == f"--kill-after={commands.KILL_GRACE_SECONDS}"
    assert wrapped[2] == "180"
    assert wrapped[3:] == argv


@pytest.mark.parametrize(("seconds", "expected"), [(0.2, 1), (0.5, 1), (1, 1), (59.6, 60), (600.0, 600)])
def test_timeout_is_a_whole_positive_number_of_seconds(seconds: float, expected: int):
    # `timeout 0 cmd` would mean no limit at all: never emit 0.
    duration = commands.with_timeout(["true"], seconds)[2]
    assert duration.isdigit()
    assert int(duration) == expected


def test_kill_grace_is_positive():
    assert commands.KILL_GRACE_SECONDS > 0


# --- docker -------------------------------------------------------------------------------------------------------


def test_service_containers_filters_by_compose_labels():
    argv = commands.service_containers(make_instance(project_name="terra"), "server")
    assert argv[:2] == ["docker", "ps"]
    assert {"--all", "--quiet", "--no-trunc"} <= set(argv)
    filters = [argv[i + 1] for i, word in enumerate(argv) if word == "--filter"]
    assert sorted(filters) == [
        "label=com.docker.compose.oneoff=False",
        "label=com.docker.compose.project=terra",
        "label=com.docker.compose.service=server",
    ]


def test_service_containers_uses_the_derived_project_name():
    argv = commands.service_containers(make_instance(project_directory="/opt/Terrateam.Prod"), "server")
    assert "label=com.docker.compose.project=terrateamprod" in argv


def test_image_commands_take_the_reference_as_one_argument():
    image = "ghcr.io/terrateamio/terrat-oss:1.2.3@sha256:" + "a" * 64
    assert commands.image_pull(image) == ["docker", "pull", "--quiet", image]
    assert commands.image_id(image) == ["docker", "image", "inspect", "--format", "{{.Id}}", image]
    assert commands.image_repo_digests(image) == [
        "docker",
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        image,
    ]


def test_container_and_file_commands():
    assert commands.inspect_container("c0ffee") == ["docker", "container", "inspect", "c0ffee"]
    assert commands.sync_file("/srv/my app/docker-compose.yml") == ["sync", "/srv/my app/docker-compose.yml"]


# --- quoting ------------------------------------------------------------------------------------------------------

# Anything the fleet file accepts as a project directory: absolute, no `..`, no newline or NUL.
project_directories = st.lists(
    st.text(
        alphabet=string.printable.replace("/", "").replace("\n", "").replace("\r", "") + "é ü", min_size=1, max_size=12
    ).filter(lambda part: part not in (".", "..")),
    min_size=1,
    max_size=3,
).map(lambda parts: "/" + "/".join(parts))


@given(project_directories, st.sampled_from(["v1", "v2"]), st.sampled_from(["server", "terrat.server-1", "web_2"]))
def test_every_argv_survives_one_round_of_shell_quoting(directory: str, version, service: str):
    instance = make_instance(project_directory=directory, project_name="app")
    all_argv = [
        commands.compose_up(instance, version, service),
        commands.with_timeout(commands.compose_up(instance, version, service), 180),
        commands.service_containers(instance, service),
        commands.sync_file(instance.compose_path),
    ]
    for argv in all_argv:
        assert all(isinstance(word, str) for word in argv)
        assert shlex.split(shlex.join(argv)) == argv
    assert instance.project_directory in all_argv[0]
