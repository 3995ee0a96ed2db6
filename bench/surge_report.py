"""The report's capacity-lost section (every runner) and the surge strategy's targets.

*Capacity lost* of a rollout: seconds, between its start and its end, with fewer servers
taking requests than the fleet has instances (HAProxy's `show stat` every 50 ms, by the
test bed's `takes_requests`: UP and weight above 0, not drained, not in maintenance).
A server a surge adds counts while it takes requests. The targets are the issue's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.scenarios import Results, Run

# The targets for this machine.
SURGE_CAPACITY_LOST_TARGET = 0.0
PEERS = ("shell script", "Ansible")  # the runners that are not compose-rollout
SURGE_VS_SHELL_AT_3 = 1.0  # surge batch 100 % wall ≤ this x the shell script's wall, 3 instances
SURGE_24_VS_3 = 2.0  # surge batch 100 % wall at 24 ≤ this x its own wall at 3

# The surge strategy's steps in the order it takes them (flows/instance.py), then
# the in-place ones it does not share, for the per-step table.
STEPS = (
    "preflight",
    "pre-pull",
    "set-image",
    "pull",
    "start-second",
    "up",
    "await-healthy",
    "add-server",
    "await-lb-up",
    "surge-ready",
    "drain",
    "wait-for-sessions",
    "remove-old",
    "move-server",
    "enable",
    "remove-surge-server",
)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: a header row, the separator, then `rows`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measured(results: Results) -> list[Run]:
    """The rollouts with a capacity measure (behind HAProxy; not the floor probe)."""
    return [r for r in results.runs if r.runner != "floor probe" and r.capacity_lost is not None]


def name(run: Run) -> str:
    """How a run is named in the capacity table."""
    if run.runner != "compose-rollout":
        return run.runner if run.runner in PEERS else f"{run.runner}, {run.label}"
    if run.strategy == "surge":
        return f"compose-rollout, surge, batch {run.batch}"
    if run.label == "v1 → v2":
        return "compose-rollout, in place"
    return f"compose-rollout, in place: {run.label}" + (f", batch {run.batch}" if run.batch != "1" else "")


def enabled_before_up(run: Run) -> int | None:
    """Surge only: instances whose own server was put back (`enable`, journal) before
    HAProxy's check saw it UP again at the new port (monitor). Its check fails while it
    still points at the removed old container; if the `-surge` twin is drained before
    the own server rises again, the instance has no server taking requests."""
    if run.strategy != "surge" or not run.journal:
        return None
    late = 0
    for record in run.journal.get("records", []):
        enabled = record.get("enabled_at")
        planned = [o for o in run.outages.get(record["name"], []) if o.planned and o.up_at is not None]
        if enabled is not None and any(o.left <= enabled < o.up_at for o in planned):
            late += 1
    return late


def surge_run(results: Results, instances: int, batch: str) -> Run | None:
    return next(
        (r for r in results.runs if r.strategy == "surge" and r.instances == instances and r.batch == batch), None
    )


@dataclass(frozen=True)
class Target:
    """One of the issue's targets with what this run measured."""

    what: str
    target: str
    measured: str
    passed: bool | None  # None: not measured in this run


def targets(results: Results) -> list[Target]:
    """The issue's three targets, from this run's rows (missing rows: not measured)."""
    found: list[Target] = []
    surges = [r for r in results.runs if r.strategy == "surge"]
    if surges:
        worst = max((r.capacity_lost or 0.0) for r in surges)
        failed = [r for r in surges if not r.ok]
        found.append(
            Target(
                "capacity lost, every surge rollout",
                f"{SURGE_CAPACITY_LOST_TARGET:.1f} s",
                f"max {worst:.2f} s over {len(surges)} rollouts"
                + (f" ({len(failed)} of them **failed**)" if failed else ""),
                worst <= SURGE_CAPACITY_LOST_TARGET and not failed,
            )
        )
    else:
        found.append(Target("capacity lost, every surge rollout", "0.0 s", "not measured", None))
    at_3 = surge_run(results, 3, "100%")
    shell = results.find("shell script", "v1 → v2", instances=3)
    if at_3 is not None and shell is not None and at_3.ok and shell.ok:
        ratio = at_3.wall / shell.wall
        found.append(
            Target(
                "surge batch 100 % wall vs the shell script's, 3 instances",
                f"≤ {SURGE_VS_SHELL_AT_3:.1f}x",
                f"{at_3.wall:.1f} s / {shell.wall:.1f} s = **{ratio:.2f}x**",
                ratio <= SURGE_VS_SHELL_AT_3,
            )
        )
    else:
        found.append(
            Target("surge batch 100 % wall vs the shell script's, 3 instances", "≤ 1.0x", "not measured", None)
        )
    at_24 = surge_run(results, 24, "100%")
    if at_3 is not None and at_24 is not None and at_3.ok and at_24.ok:
        ratio = at_24.wall / at_3.wall
        found.append(
            Target(
                "surge batch 100 % wall, 24 instances vs 3",
                f"≤ {SURGE_24_VS_3:.1f}x",
                f"{at_24.wall:.1f} s / {at_3.wall:.1f} s = **{ratio:.2f}x**",
                ratio <= SURGE_24_VS_3,
            )
        )
    else:
        found.append(Target("surge batch 100 % wall, 24 instances vs 3", "≤ 2.0x", "not measured", None))
    return found


def _verdict(target: Target) -> str:
    return "-" if target.passed is None else "**pass**" if target.passed else "**miss**"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def findings(results: Results) -> list[str]:
    """Summary bullets: capacity lost per runner at 3 instances, and the targets."""
    bullets = []
    at_3 = [r for r in measured(results) if r.instances == 3 and (r.label in ("v1 → v2", "surge"))]
    if at_3:
        bullets.append(
            "Capacity lost per rollout (3 instances, seconds with fewer than 3 servers taking requests): "
            + ", ".join(f"{name(r)} **{r.capacity_lost:.1f} s**" for r in at_3)
            + "."
        )
    for batch in ("1", "100%"):
        walls = sorted(
            (r.instances, r.wall) for r in results.runs if r.strategy == "surge" and r.batch == batch and r.ok
        )
        if len(walls) > 1:
            bullets.append(
                f"Surge wall time, batch {batch}: "
                + ", ".join(f"{n} instances {wall:.1f} s" for n, wall in walls)
                + f" ({walls[-1][1] / walls[0][1]:.1f}x from {walls[0][0]} to {walls[-1][0]})."
            )
    judged = [t for t in targets(results) if t.passed is not None]
    if judged:
        bullets.append(
            "The issue's targets: "
            + "; ".join(f"{t.what} {t.measured.replace('**', '')} ({'pass' if t.passed else 'MISS'})" for t in judged)
            + "."
        )
    return bullets


def _step_means(run: Run) -> Callable[[str], float | None]:
    def per_instance(step: str) -> float | None:
        count = run.task_runs.get(step, 0)
        return run.task_seconds[step] / count if count and step in run.task_seconds else None

    return per_instance


def section(results: Results) -> list[str]:
    """The markdown lines of the capacity section (empty when nothing measured it)."""
    runs = measured(results)
    if not runs:
        return []
    out = ["### 1c. Capacity lost", ""]
    out.append(
        "*Capacity lost*: seconds of the rollout (its wall time) with fewer servers taking requests "
        "than the fleet has instances, from the same 50 ms polls of HAProxy as everything else "
        "(`bench/monitor.py`, with the test bed's definition `capacity.takes_requests`: UP, weight "
        "above 0, neither drained nor in maintenance). A server the surge strategy adds "
        "(`app-N-surge`) counts while it takes requests, so a surge that keeps the old container "
        "serving until the new one is in rotation loses none. *Servers taking requests* is the "
        "fewest and most at once during the rollout. The in-place and peer rows run on the fixed "
        "published port (8080) as always; the surge rows on the port range `8080-8081` "
        "(`Testbed.publish_port_range()`, switched after each reset, undone by the next)."
    )
    out.append("")
    rows = []
    for run in runs:
        lowest, highest = run.serving or (0, 0)
        outs = run.out_of_rotation()
        rows.append(
            [
                name(run),
                "yes" if run.ok else "**failed**" if "broken" not in run.label else "failed (as intended)",
                str(run.instances),
                _s(run.wall),
                f"**{run.capacity_lost:.2f}**" if run.capacity_lost is not None else "-",
                f"{lowest}-{highest} of {run.instances}",
                _s(_mean(outs), 1) if outs else "0",
                "-" if (late := enabled_before_up(run)) is None else f"{late} of {run.instances}",
                str(len(run.unplanned())),
                str(run.failed),
                ", ".join(run.servers_left) or "none",
            ]
        )
    out.append(
        markdown_table(
            [
                "runner",
                "succeeded",
                "instances",
                "wall s",
                "capacity lost s",
                "servers taking requests",
                "own server out of rotation s (mean)",
                "own server put back before UP",
                "HAProxy check DOWN blips",
                "failed requests",
                "added servers left in HAProxy",
            ],
            rows,
        )
    )
    out.append("")
    out.append(
        "With surge, *own server out of rotation* is the instance's own HAProxy server while it is "
        "drained, moved to the new container's port and put back; its `-surge` twin serves meanwhile. "
        "*Own server put back before UP*: instances whose own server was enabled (journal) before "
        "HAProxy's check saw it UP again (monitor): its checks fail between `remove-old` and "
        "`move-server` (it still points at the removed container), and the flow does not await it UP "
        "before `remove-surge-server` drains the twin, so capacity is lost whenever the twin goes "
        "first. *HAProxy check DOWN blips*: a server taken out by HAProxy's own check, nobody having "
        "drained it (checks timing out on the saturated 2-core machine); also capacity lost."
    )
    out.append("")
    out.append("**The issue's targets** (this machine):")
    out.append("")
    out.append(
        markdown_table(
            ["target", "wanted", "measured", "verdict"],
            [[t.what, t.target, t.measured, _verdict(t)] for t in targets(results)],
        )
    )
    out.append("")
    surges = [r for r in results.runs if r.strategy == "surge" and r.task_runs]
    in_place = results.find("compose-rollout", "v1 → v2", instances=3)
    columns = [*surges, *([in_place] if in_place is not None and in_place.task_runs else [])]
    if surges:
        out.append(
            "Where a surge's time goes: each step's task run time (Prefect API, start to end) per instance, "
            "mean over the instances; with batch 100 % all instances take each step at once on this 2-core "
            "machine. In place (last column) for comparison."
        )
        out.append("")
        means = [_step_means(run) for run in columns]
        step_rows = [
            [f"`{step}`", *[_s(per(step), 2) for per in means]]
            for step in STEPS
            if any(per(step) is not None for per in means)
        ]
        step_rows.append(["**wall s**", *[f"**{run.wall:.1f}**" for run in columns]])
        header = [
            "step",
            *[
                f"{'surge' if r.strategy == 'surge' else 'in place'} {r.instances} inst. batch {r.batch}"
                for r in columns
            ],
        ]
        out.append(markdown_table(header, step_rows))
        out.append("")
    return out
