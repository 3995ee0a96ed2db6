"""What `pip install .` puts into an environment: one top-level name, `compose_rollout`.

flows/, tasks/ and deployments/ live at the top of the repository (prefect.yaml names
them there) but must not land in site-packages as `flows`, `tasks` and `deployments`,
where they would shadow another project's `tasks` module (a Celery app's, say).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def _checkout(destination: Path) -> Path:
    """The files git tracks, links kept as links: what a fresh clone builds (a work tree's
    build/ may still hold modules that no longer exist)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source, target = REPO / name, destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return destination


def test_the_wheel_installs_one_top_level_package_holding_the_flows_tasks_and_deployments(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(source)],
        tmp_path,
    )
    [wheel] = (tmp_path / "dist").glob("compose_rollout-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip()
    )
    before = {p.name for p in site.iterdir()}

    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)], tmp_path
    )

    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"compose_rollout"}
    for module in ("flows/rolling_deploy.py", "tasks/steps.py", "deployments/notifications.py"):
        installed = site / "compose_rollout" / module
        assert installed.is_file() and not installed.is_symlink(), module
        assert installed.read_bytes() == (REPO / module).read_bytes(), module
    # Found as subpackages of compose_rollout from outside the repository (-I: no cwd, no PYTHONPATH).
    found = _run(
        [
            str(python),
            "-I",
            "-c",
            "import importlib.util as u; print([u.find_spec(n) is not None for n in "
            "('compose_rollout.flows', 'compose_rollout.tasks', 'compose_rollout.deployments', 'flows', 'tasks')])",
        ],
        tmp_path,
    )
    assert found.strip() == "[True, True, True, False, False]"
