"""The first seconds of `rollout deploy`: from typing the command to the first drain.

Issue 12 asks for the first drain within 5 s of `rollout deploy` when a Prefect server
is running, and within 10 s without one, on the 3-instance bed under the bench's load.
Each run here is the `rollout` command in a new process, as a user runs it, with one of
three Prefect set-ups: a server the user runs (`PREFECT_API_URL` set), no server and a
Prefect home never used (the first run on a new machine), and no server again with that
same home (every later run). *Until first drain* is from starting the process to
HAProxy's first poll that sees a server leave rotation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.scenarios import ActionResult, Results, Run
from bench.surge_report import markdown_table

RUNNER = "rollout deploy"
WITH_SERVER = "a Prefect server running"
FIRST_WITHOUT = "no server, first run on the machine"
AGAIN_WITHOUT = "no server, a later run"
TARGETS = {WITH_SERVER: 5.0, FIRST_WITHOUT: 10.0, AGAIN_WITHOUT: 10.0}


def rollout_command() -> list[str]:
    """The installed `rollout` console script beside this Python (what a user types)."""
    script = Path(sys.executable).parent / "rollout"
    return [str(script)] if script.exists() else [sys.executable, "-m", "compose_rollout.cli"]


def cli_action(fleet_file: Path, tag: str, env: dict[str, str]) -> Callable[[], ActionResult]:
    """`rollout deploy --fleet FLEET --tag TAG` in a new process with exactly `env`."""

    def action() -> ActionResult:
        done = subprocess.run(
            [*rollout_command(), "deploy", "--fleet", str(fleet_file), "--tag", tag],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return ActionResult(done.returncode == 0, "" if done.returncode == 0 else done.stderr[-1000:])

    return action


def environments(workdir: Path, api_url: str) -> list[tuple[str, dict[str, str]]]:
    """The three set-ups, in the order they must run (the later run reuses the first's home)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    served = workdir / "cli-home-served"
    alone = workdir / "cli-home-alone"
    for home in (served, alone):
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
    return [
        (WITH_SERVER, base | {"PREFECT_HOME": str(served), "PREFECT_API_URL": api_url}),
        (FIRST_WITHOUT, base | {"PREFECT_HOME": str(alone)}),
        (AGAIN_WITHOUT, base | {"PREFECT_HOME": str(alone)}),
    ]


def stop_left_server(env: dict[str, str]) -> None:
    """Stop the local Prefect server the runs without one left running (if any)."""
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "stop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def until_first_drain(run: Run) -> float | None:
    first = run.first_drain()
    return None if first is None else first - run.began


@dataclass
class Target:
    what: str
    target: float
    measured: float | None

    @property
    def passed(self) -> bool | None:
        return None if self.measured is None else self.measured <= self.target


def targets(results: Results) -> list[Target]:
    found = []
    for label, target in TARGETS.items():
        run = results.find(RUNNER, label, instances=3)
        measured = until_first_drain(run) if run is not None and run.ok else None
        found.append(Target(f"`rollout deploy` to first drain, {label}", target, measured))
    return found


def section(results: Results) -> list[str]:
    """The report's "first seconds" section (empty when the runs were not made)."""
    runs = [r for r in results.runs if r.runner == RUNNER]
    if not runs:
        return []
    out = ["### 3b. The first seconds of `rollout deploy`", ""]
    out.append(
        "`rollout deploy --fleet demo.yaml --tag v2` run as a new process (the installed `rollout` script), "
        "3 instances, in place, batch 1, under the load above. *Until first drain*: from starting the "
        "process to HAProxy's first poll that sees a server leave rotation. *A Prefect server running*: "
        "`PREFECT_API_URL` names the bench's server. *No server*: no `PREFECT_API_URL`; the first run uses "
        "a Prefect home never used before, the later run the same home after it."
    )
    out.append("")
    rows = []
    for run in runs:
        first = until_first_drain(run)
        target = TARGETS.get(run.label)
        verdict = "-" if first is None or target is None else "**pass**" if first <= target else "**miss**"
        rows.append(
            [
                run.label,
                "-" if first is None else f"{first:.1f}",
                "-" if target is None else f"≤ {target:.0f}",
                verdict,
                f"{run.wall:.1f}",
                "yes" if run.ok else f"**no**: {run.error[-200:]}",
                str(run.failed),
            ]
        )
    header = ["Prefect", "until first drain s", "target s", "", "wall s", "fleet on v2", "failed requests"]
    out.append(markdown_table(header, rows))
    out.append("")
    return out


def findings(results: Results) -> list[str]:
    """One summary bullet: each set-up's time to the first drain against its target."""
    measured = [t for t in targets(results) if t.measured is not None]
    if not measured:
        return []
    return [
        "`rollout deploy` to the first drain: "
        + "; ".join(
            f"{t.what.split(', ', 1)[1]} {t.measured:.1f} s (target ≤ {t.target:.0f} s, "
            + ("**met**)" if t.passed else "**missed**)")
            for t in measured
        )
        + "."
    ]
