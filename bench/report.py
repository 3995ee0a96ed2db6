"""BENCHMARKS.md and bench/timeline.png from one bench run's results."""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import first_seconds, surge_report
from bench.monitor import Outage
from bench.scenarios import FAST_INTERVAL, FAST_WORKERS, SLOW_SECONDS, SLOW_WORKERS, FloorSample, Results, Run

# A hand-written part of BENCHMARKS.md (experiments with core changes) that a rewrite keeps.
KEEP_BEGIN = "<!-- bench:keep -->"
KEEP_END = "<!-- /bench:keep -->"


# --- numbers --------------------------------------------------------------------------


def floor_seconds(samples: list[FloorSample]) -> float:
    """The restart + ready + rise floor: the median over the probed instances."""
    return statistics.median(s.total for s in samples) if samples else 0.0


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def overlapping_groups(outages: list[Outage]) -> list[list[Outage]]:
    """Outages that overlap in time form one group (a batch, whoever ran it)."""
    groups: list[list[Outage]] = []
    for outage in sorted(outages, key=lambda o: o.left):
        if groups and outage.left < max(o.back for o in groups[-1]):
            groups[-1].append(outage)
        else:
            groups.append([outage])
    return groups


def inherent_seconds(run: Run, floor: float) -> float:
    """The waits no orchestrator can avoid: per batch, the longest (drain + floor)."""
    outages = run.planned()
    return sum(max(o.drain_seconds + floor for o in group) for group in overlapping_groups(outages))


def ssh_range(run: Run) -> str:
    values = sorted(run.ssh_logins.values())
    if not values:
        return "-"
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def task_runs_total(run: Run) -> int:
    return sum(run.task_runs.values())


def summary(results: Results) -> dict[str, Any]:
    """The headline numbers as plain data (for --json and comparisons)."""
    floor = floor_seconds(results.floor)
    return {
        "command": results.command,
        "started": results.started,
        "prefect_startup_s": results.prefect_startup,
        "bed_startup_s": results.bed_startup,
        "floor_s": floor,
        "floor_samples": [vars(s) | {"total": s.total} for s in results.floor],
        "runs": [
            {
                "runner": r.runner,
                "label": r.label,
                "instances": r.instances,
                "batch": r.batch,
                "strategy": r.strategy,
                "ok": r.ok,
                "wall_s": r.wall,
                "capacity_lost_s": r.capacity_lost,
                "serving_min_max": r.serving,
                "servers_left": r.servers_left,
                "task_seconds": r.task_seconds,
                "requests": r.requests,
                "failed": r.failed,
                "steady_p50_ms": r.steady.p50_ms,
                "steady_p99_ms": r.steady.p99_ms,
                "during_p50_ms": r.during.p50_ms,
                "during_p99_ms": r.during.p99_ms,
                "out_of_rotation_s": r.out_of_rotation(),
                "drain_wait_s": r.drain_waits(),
                "inherent_s": inherent_seconds(r, floor),
                "flow_start_s": r.flow_phases()[0],
                "preflight_and_pre_pull_s": r.flow_phases()[1],
                "outages": [
                    {
                        "server": o.server,
                        "left": o.left,
                        "back": o.back,
                        "seconds": o.seconds,
                        "drain_s": o.drain_seconds,
                        "planned": o.planned,
                        "down_at": o.down_at,
                        "up_at": o.up_at,
                    }
                    for outs in r.outages.values()
                    for o in outs
                ],
                "ssh_logins": r.ssh_logins,
                "task_runs": r.task_runs,
                "fleet_on_target": r.fleet_on_target,
                "error": r.error[:500],
            }
            for r in results.runs
        ],
        "targets": [vars(t) for t in surge_report.targets(results)],
        "first_seconds_targets": [vars(t) for t in first_seconds.targets(results)],
        "skipped": results.skipped,
    }


# --- the machine ----------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "unknown"
    return ((done.stdout or done.stderr).strip().splitlines() or ["unknown"])[0]


def machine_facts() -> list[tuple[str, str]]:
    """What the numbers depend on."""
    mem_kib = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    haproxy = _first_line(["haproxy", "-v"])
    haproxy = re.sub(r"\s*-\s*https?://\S+", "", haproxy)
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return [
        ("CPU", f"{os.cpu_count()} x {cpu} (nproc {_first_line(['nproc'])})"),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", platform.release()),
        ("OS", f"Debian {debian}"),
        ("Docker engine", _first_line(["dockerd", "--version"])),  # the binary: no daemon needed
        ("Compose", f"docker-compose {_first_line(['docker-compose', 'version', '--short'])} (v1)"),
        ("HAProxy", haproxy),
        ("OpenSSH", _first_line(["ssh", "-V"])),
        ("Python", platform.python_version()),
        ("Prefect", pkg("prefect")),
        ("paramiko", pkg("paramiko")),
        ("Ansible", f"ansible {pkg('ansible')}, ansible-core {pkg('ansible-core')}"),
    ]


# --- markdown -------------------------------------------------------------------------


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kept_section(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text()
    begin, end = text.find(KEEP_BEGIN), text.find(KEEP_END)
    return text[begin : end + len(KEEP_END)] if 0 <= begin < end else ""


def _phase_rows(run: Run) -> list[list[str]]:
    """Per instance from the compose-rollout journal: where its time out of rotation went."""
    if not run.journal or "records" not in run.journal:
        return []
    rows = []
    for record in run.journal["records"]:
        d, u, h, lb, e = (record.get(k) for k in ("drained_at", "up_at", "healthy_at", "lb_up_at", "enabled_at"))
        if None in (d, u, h, lb, e):
            continue
        outage = next((o for o in run.outages.get(record["name"], []) if o.planned), None)
        drain = outage.drain_seconds if outage else None
        rows.append(
            [
                record["name"],
                _s(e - d, 2),
                _s(drain, 2),
                _s(u - d - (drain or 0), 2),
                _s(h - u, 2),
                _s(lb - h, 2),
                _s(e - lb, 2),
                _s(outage.seconds if outage else None, 2),
            ]
        )
    return rows


def findings(results: Results) -> list[str]:
    """The headline numbers in words, computed from this run."""
    floor = floor_seconds(results.floor)
    runs = [r for r in results.runs if r.runner != "floor probe"]
    bullets = [
        f"{len(runs)} rollouts under load, {sum(r.requests for r in runs):,} requests through HAProxy, "
        f"**{sum(r.failed for r in runs)} failed** (the rollback run included)."
    ]
    main = results.find("compose-rollout", "v1 → v2")
    minimal = results.find("compose-rollout", "v1 → v2, minimal health policy")
    if main is not None and main.ok and results.floor:
        out = mean(main.out_of_rotation())
        inherent = mean([d + floor for d in main.drain_waits()])
        text = (
            f"compose-rollout keeps an instance out of rotation {out:.1f} s on average, "
            f"{out / inherent:.1f}x its floor ({inherent:.1f} s = mean drain wait {mean(main.drain_waits()):.1f} s "
            f"+ {floor:.2f} s restart-to-ready)"
        )
        if minimal is not None and minimal.ok:
            text += (
                f"; with the health policy at its minimum (1 success, no stabilisation window) "
                f"{mean(minimal.out_of_rotation()):.1f} s: the default policy (3 successes + 2 s "
                "stabilisation) is most of the gap"
            )
        bullets.append(text + ".")
    peers = [r for r in runs if r.label == "v1 → v2" and r.instances == 3 and r.ok]
    peers += [r for r in runs if r.strategy == "surge" and r.instances == 3 and r.ok]
    if len(peers) > 1:
        bullets.append(
            "Wall time for 3 instances: "
            + ", ".join(
                f"{surge_report.name(r)} {r.wall:.1f} s"
                + (
                    f" ({(r.wall - inherent_seconds(r, floor)) / r.wall * 100:.0f} % overhead)"
                    if results.floor and r.strategy != "surge"
                    else ""
                )
                for r in peers
            )
            + "."
        )
    scale = sorted(
        (
            r
            for r in runs
            if r.runner == "compose-rollout"
            and r.ok
            and r.batch == "1"
            and r.strategy == "in-place"
            and r.label in ("scale", "v1 → v2")
        ),
        key=lambda r: r.instances,
    )
    if len(scale) > 1:
        bullets.append(
            "Batch 1 wall time grows linearly with the fleet: "
            + ", ".join(f"{r.instances} instances {r.wall:.0f} s" for r in scale)
            + f"; {task_runs_total(scale[-1]) / scale[-1].instances:.0f} Prefect task runs and "
            f"{ssh_range(scale[-1])} SSH login per host whatever the size."
        )
    bullets.extend(surge_report.findings(results))
    bullets.extend(first_seconds.findings(results))
    return bullets


def render(results: Results, plot_name: str) -> str:
    """The whole BENCHMARKS.md text."""
    floor = floor_seconds(results.floor)
    runs = results.runs
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    minutes = (results.finished - results.started - results.lock_wait) / 60
    waited = (
        f" (not counting {results.lock_wait / 60:.1f} min waiting for another test bed)" if results.lock_wait else ""
    )
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(
        "Measured on the real local test bed (Docker engine, local registry, one sshd and address per "
        "instance, HAProxy, a temporary Prefect server), everything on one machine, in one run of:"
    )
    add("")
    add(f"```sh\n{results.command}\n```")
    add("")
    add(
        f"Run on {when}; the whole suite took {minutes:.1f} min{waited}. "
        f"{'This is the `--quick` subset. ' if results.quick else ''}"
        f"{'This is the `--surge` subset (the rows the surge strategy is judged by). ' if results.surge_only else ''}"
        "Not part of `./dev test`: speed is measured here, never in timed tests."
    )
    add("")
    add(surge_report.markdown_table(["machine", ""], [[k, v] for k, v in machine_facts()]))
    add("")
    add(
        f"**Load** (every run, every runner alike): through HAProxy at `http://127.0.0.1:18080`, "
        f"{FAST_WORKERS} loops of `GET /` with a {FAST_INTERVAL * 1000:.0f} ms pause, plus {SLOW_WORKERS} "
        f"`GET /cgi-bin/slow?{SLOW_SECONDS}` ({SLOW_SECONDS} s each) always in flight; a separate process "
        "(`bench/load.py`) records every request's start, latency and outcome. A failure is any error or "
        "non-200 answer. Latency percentiles are over successful fast requests. Each run has 5 s of steady "
        "load before the rollout starts; *steady* is that window, *during* is the rollout."
    )
    add("")
    add(
        "**Out of rotation** is measured the same way for every runner, by polling HAProxy every 50 ms "
        "(`bench/monitor.py`): from the first poll where a server is not UP-and-ready (drained, in "
        "maintenance or DOWN) to the first poll where it is again. *Drain wait* is the part until its "
        "session count reached 0."
    )
    add("")
    add(
        f"One-time costs, not in any wall time below: temporary Prefect server start "
        f"{results.prefect_startup:.1f} s; test bed start "
        + ", ".join(f"{n} instances {s:.0f} s" for n, s in sorted(results.bed_startup.items()))
        + "."
    )
    add("")

    bullets = findings(results)
    if bullets:
        add("## Summary")
        add("")
        out.extend(f"- {b}" for b in bullets)
        add("")

    # 1. zero downtime -------------------------------------------------------------------
    add("## 1. Zero downtime under load")
    add("")
    rows = []
    for run in runs:
        if run.runner == "floor probe":
            continue
        rows.append(
            [
                f"{run.runner}: {run.label}"
                + (f" ({run.instances} inst., batch {run.batch})" if run.instances != 3 or run.batch != "1" else ""),
                "yes" if run.ok else "**failed** (as intended)" if "broken" in run.label else "**failed**",
                f"{run.requests:,}",
                f"**{run.failed}**",
                f"{run.during.slow_total - run.during.slow_failed}/{run.during.slow_total}",
                f"{run.steady.per_second:.0f} / {run.during.per_second:.0f}",
                f"{_s(run.steady.p50_ms)} / {_s(run.steady.p99_ms)}",
                f"{_s(run.during.p50_ms)} / {_s(run.during.p99_ms)}",
                f"{_s(run.during.max_ms, 0)}",
                _s(run.capacity_lost, 2),
                str(len(run.unplanned())),
            ]
        )
    add(
        surge_report.markdown_table(
            [
                "run (3 instances, batch 1 unless said)",
                "rollout succeeded",
                "requests",
                "failed",
                "slow requests ok (during)",
                "req/s steady / during",
                "p50 / p99 ms steady",
                "p50 / p99 ms during",
                "max ms during",
                "capacity lost s",
                "HAProxy check DOWN blips",
            ],
            rows,
        )
    )
    add("")
    add(
        "*HAProxy check DOWN blips*: a server that HAProxy's own health check took out of rotation "
        "while nobody had drained it (checks timing out when the machine's two cores are saturated). "
        "No request failed because of them; they are not counted as time out of rotation below."
    )
    add("")
    broken = next((r for r in runs if "broken" in r.label), None)
    if broken is not None:
        add(
            f"The broken-image run fails its health gate on the first instance "
            f"(`health.timeout_seconds: 10`), restores it and exits 1; afterwards every instance runs v1 and "
            f"is UP in HAProxy: **{'yes' if broken.fleet_on_target else 'NO'}**. "
            f"Out of rotation during it: "
            + ", ".join(f"{n} {o.seconds:.1f} s" for n, outs in broken.outages.items() for o in outs)
            + "."
        )
        add("")
    add(
        "Latency *during* includes the CPU the rollout itself uses on this 2-core machine (Compose v1 "
        "starts a Python interpreter per call; the orchestrator, dockerd, sshd and HAProxy share the cores)."
    )
    add("")

    # 1b. the same rollout through each load balancer ---------------------------------------
    by_lb = [r for r in runs if r.runner == "compose-rollout" and (r.label == "v1 → v2" or "through" in r.label)]
    if len(by_lb) > 1:
        add("### 1b. The same rollout through each load balancer")
        add("")
        add(
            "The same fleet, load and v1 → v2 rollout, behind each real LB the test bed runs. Time out of "
            "rotation: behind HAProxy as its monitor saw it; behind the others from compose-rollout's journal "
            "(drain asked → back in rotation). The load's clients do not resend a request, so a request sent on "
            "an idle kept-alive connection that a reloading LB (nginx, Caddy) closed at that instant counts as "
            "failed here (a browser would resend it; the tests count those apart)."
        )
        add("")
        add(
            surge_report.markdown_table(
                ["LB", "rollout succeeded", "requests", "failed", "out of rotation s, mean (min-max)", "wall s"],
                [
                    [
                        r.lb,
                        "yes" if r.ok else "**failed**",
                        f"{r.requests:,}",
                        f"**{r.failed}**",
                        f"{_s(mean(r.out_of_rotation()), 2)} ({_s(min(r.out_of_rotation(), default=0), 1)}-"
                        f"{_s(max(r.out_of_rotation(), default=0), 1)})",
                        _s(r.wall, 1),
                    ]
                    for r in by_lb
                ],
            )
        )
        add("")

    out.extend(surge_report.section(results))

    # 2. out of rotation vs floor ---------------------------------------------------------
    add("## 2. Time out of rotation per instance vs. its floor")
    add("")
    if results.floor:
        add(
            "The floor, measured directly on this machine with no orchestration (20 ms polls): write the "
            "new image into the compose file, `docker-compose up -d --no-deps server`, until `/health` "
            "answers 200, until HAProxy's own check (`inter 500ms rise 2 fall 2`) reports it UP."
        )
        add("")
        add(
            surge_report.markdown_table(
                ["instance", "restart (`up -d`)", "app ready", "LB rise", "floor", "LB saw it DOWN"],
                [
                    [
                        s.instance,
                        _s(s.restart, 2),
                        _s(s.ready, 2),
                        _s(s.rise, 2),
                        _s(s.total, 2),
                        "yes" if s.lb_saw_down else "no",
                    ]
                    for s in results.floor
                ],
            )
        )
        add("")
        if not any(sample.lb_saw_down for sample in results.floor):
            add(
                "HAProxy never saw these restarts: the old container is replaced in less than its "
                "`fall 2` x `inter 500ms`, so no check failed twice and the LB rise cost nothing."
            )
            add("")
        add(
            f"Floor per instance = its own drain wait (in-flight requests finishing, measured in each run) "
            f"+ the median restart-to-LB-up floor above, **{floor:.2f} s**."
        )
        add("")
        rows = []
        for run in runs:
            if (
                run.runner == "floor probe"
                or "broken" in run.label
                or not run.ok
                or run.lb != "haproxy"
                or run.strategy == "surge"  # its own server leaves rotation with its twin serving: 1c
            ):
                continue
            outs = run.out_of_rotation()
            drains = run.drain_waits()
            inherent = [d + floor for d in drains]
            rows.append(
                [
                    f"{run.runner}: {run.label}",
                    str(run.instances),
                    run.batch,
                    f"{_s(mean(outs), 2)} ({_s(min(outs, default=0), 1)}-{_s(max(outs, default=0), 1)})",
                    _s(mean(drains), 2),
                    _s(mean(inherent), 2),
                    f"**{mean(outs) / mean(inherent):.2f}x**" if inherent else "-",
                ]
            )
        add(
            surge_report.markdown_table(
                [
                    "runner: run",
                    "instances",
                    "batch",
                    "out of rotation s, mean (min-max)",
                    "drain wait s",
                    "floor s",
                    "ratio",
                ],
                rows,
            )
        )
        add("")
    if results.timeline is not None:
        phase = _phase_rows(results.timeline)
        if phase:
            add(
                "Where compose-rollout's time out of rotation goes (v1 → v2 run, from its run journal; "
                "`up_at` is stamped just before `up`, `healthy_at` after the health gate *including* the "
                "stabilisation window):"
            )
            add("")
            add(
                surge_report.markdown_table(
                    [
                        "instance",
                        "out of rotation (journal)",
                        "drain wait (LB)",
                        "set image + pull check",
                        "up + health gate",
                        "await LB UP",
                        "enable",
                        "out of rotation (LB)",
                    ],
                    phase,
                )
            )
            add("")

    # 3. overhead ------------------------------------------------------------------------
    add("## 3. Orchestration overhead")
    add("")
    add(
        "Wall time of the rollout (for compose-rollout: the flow run, preflight and pre-pull included, "
        "the Prefect server start excluded) minus the inherent waits: per batch, the longest drain wait "
        "+ floor of its instances."
    )
    add("")
    rows = []
    for run in runs:
        if run.runner == "floor probe" or not run.ok or run.strategy == "surge":
            continue  # surge restarts nothing out of rotation: its time is in 1c
        waits = inherent_seconds(run, floor)
        first = run.first_drain()
        rows.append(
            [
                f"{run.runner}: {run.label}",
                str(run.instances),
                run.batch,
                _s(run.wall),
                _s((first - run.began) if first else None),
                _s(waits),
                _s(run.wall - waits),
                f"**{(run.wall - waits) / run.wall * 100:.0f} %**" if run.wall else "-",
            ]
        )
    add(
        surge_report.markdown_table(
            [
                "runner: run",
                "instances",
                "batch",
                "wall s",
                "until first drain s",
                "inherent s",
                "overhead s",
                "overhead / wall",
            ],
            rows,
        )
    )
    add("")
    add(
        "For compose-rollout, *overhead* in this sense includes its deliberate safety work beyond the "
        "floor: preflight of every host and the pre-pull before anything is drained, and per instance "
        "3 consecutive health successes 0.5 s apart plus a 2 s stabilisation window (the "
        "minimal-health-policy row shows what is left without them). The peers do none of that."
    )
    add("")

    out.extend(first_seconds.section(results))

    # 4. peers ---------------------------------------------------------------------------
    add("## 4. Against the peers (same fleet, same load, v1 → v2, 3 instances, one at a time unless said)")
    add("")
    rows = []
    for run in runs:
        if not (run.label == "v1 → v2" or run.strategy == "surge") or run.instances != 3:
            continue
        outs = run.out_of_rotation()
        rows.append(
            [
                surge_report.name(run),
                "yes" if run.ok and run.fleet_on_target else "**no**",
                _s(run.wall),
                f"{_s(mean(outs), 1)} (max {_s(max(outs, default=0), 1)})",
                _s(run.capacity_lost, 1),
                f"**{run.failed}**",
                ssh_range(run),
                "yes" if run.runner == "compose-rollout" else "no",
            ]
        )
    add(
        surge_report.markdown_table(
            [
                "runner",
                "fleet on v2, all UP",
                "wall s",
                "out of rotation s per instance",
                "capacity lost s",
                "failed requests",
                "SSH logins per host",
                "rolls back on failure",
            ],
            rows,
        )
    )
    add("")
    add(
        "- *shell script*: `bench/baselines/seed_procedure.sh`, the seed procedure by hand: `socat` to the "
        "admin socket, drain, poll `scur` to 0 every 0.1 s, one `ssh` per instance running `sed` on the "
        "image line + `docker-compose pull` + `docker-compose up -d`, poll `/health` and HAProxy's check "
        "every 0.1 s, `state ready`. No preflight, no pre-pull, no rollback."
    )
    add(
        "- *Ansible*: `bench/baselines/rollout.yml`, `serial: 1`, `community.general.haproxy` "
        "`state: disabled, drain: true, wait: true` (drain, wait for 0 sessions, MAINT), `replace` on the "
        "image line, one `shell` step `docker-compose pull && up -d`, `uri` until 200 (`delay: 0.5`), "
        "`state: enabled, wait: true`. Pipelining and SSH ControlPersist on; `wait_interval: 1`, the "
        "module's minimum (whole seconds; its default is 5)."
    )
    add(
        "- `shared/ANCHORS.md` recorded 31 s / 10.3 s (hand script) and 72 s / 21 s (Ansible) for wall / "
        "out of rotation earlier, at ~800 req/s. The peers here are tuned as far as their tools allow "
        "(0.1 s polls; `wait_interval: 1`, pipelining, ControlPersist) and the load is lighter, so they "
        "are faster here: the comparison above is like for like, the earlier numbers are not."
    )
    add(
        "- *Docker Swarm* was not measured: its routing mesh needs IPVS, which this kernel lacks "
        "(`docker swarm init` works, published ports do not), so it cannot serve the same load here."
    )
    add(
        "- All instances share one Docker engine, so every `pull` finds the image already there: a real "
        "fleet adds network pull time, which compose-rollout spends before draining (pre-pull) and the "
        "peers spend while the instance is drained."
    )
    add("")

    # 5. scale ---------------------------------------------------------------------------
    add("## 5. Scale")
    add("")
    scale_runs = [
        r
        for r in runs
        if r.runner == "compose-rollout"
        and r.ok
        and (r.label in ("scale", "surge") or (r.label == "v1 → v2" and r.instances == 3))
    ]
    base: dict[tuple[str, str], float] = {}
    for run in scale_runs:
        if run.instances == 3:
            base.setdefault((run.strategy, run.batch), run.wall)
    rows = []
    for run in sorted(scale_runs, key=lambda r: (r.strategy, r.batch, r.instances)):
        key = (run.strategy, run.batch)
        per_instance = run.wall / run.instances
        total_tasks = task_runs_total(run)
        batch_size = max(1, run.instances * int(run.batch[:-1]) // 100) if run.batch.endswith("%") else int(run.batch)
        rows.append(
            [
                run.strategy,
                str(run.instances),
                f"{run.batch} (= {batch_size})" if run.batch.endswith("%") else run.batch,
                _s(run.wall),
                _s(per_instance, 2),
                f"{run.wall / base[key]:.1f}x" if key in base else "-",
                _s(run.flow_phases()[0]),
                _s(run.flow_phases()[1]) if run.strategy != "surge" else "-",
                _s(mean(run.out_of_rotation()), 1),
                _s(run.capacity_lost, 2),
                f"{total_tasks} ({total_tasks / run.instances:.1f})" if total_tasks else "-",
                ssh_range(run),
                str(run.failed),
            ]
        )
    add(
        surge_report.markdown_table(
            [
                "strategy",
                "instances",
                "batch",
                "wall s",
                "s per instance",
                "growth vs 3",
                "flow start s",
                "preflight + pre-pull s",
                "out of rotation s (mean)",
                "capacity lost s",
                "Prefect task runs (per instance)",
                "SSH logins per host",
                "failed requests",
            ],
            rows,
        )
    )
    add("")
    add(
        "With batches of 25 %, instances in a batch are replaced at the same time on this one 2-core "
        "machine (their `docker-compose up` and health polls compete for CPU), so each stays out of "
        "rotation longer than with batch 1; on real hosts each has its own CPU. A batch also waits for "
        "its slowest member before the next starts."
    )
    add("")
    add(
        "*flow start*: from calling the flow until its run ledger exists (flow run created in the "
        "Prefect API, fleet file loaded); *preflight + pre-pull*: from then until the first drain "
        "(in place only: a surge drains late, after its new container is in rotation; see 1c for its "
        "steps). Both from the run journal. With surge, *out of rotation* is the instance's own server "
        "while its `-surge` twin serves."
    )
    add("")
    example = next((r for r in scale_runs if r.task_runs), None)
    if example is not None:
        add(
            "Task runs by name in one run ("
            + f"{example.instances} instances, batch {example.batch}): "
            + ", ".join(f"`{name}` {count}" for name, count in sorted(example.task_runs.items()))
            + "."
        )
        add("")

    # timeline -----------------------------------------------------------------------------
    add("## Timeline of one rollout")
    add("")
    add(
        f"![timeline]({plot_name})\n\ncompose-rollout, v1 → v2, 3 instances, batch 1, under the load above. "
        "Per instance: the phases from its run journal (drained → `up` issued → healthy, stabilisation "
        "included → HAProxy sees it UP → back in rotation) and, as a black line, when HAProxy's own check "
        "had it DOWN. Below: responses per second through HAProxy (errors in red) and the latency of the "
        "fast requests."
    )
    add("")
    if results.skipped:
        add("Skipped: " + "; ".join(results.skipped) + ".")
        add("")
    return "\n".join(out)


def write(results: Results, out: Path, plot: Path) -> None:
    """Rewrite the report and the plot (keeping the hand-written experiments section)."""
    kept = _kept_section(out)
    if results.timeline is not None and results.timeline.load is not None:
        from bench.plot import timeline

        timeline(results.timeline, plot)
    relative = os.path.relpath(plot, out.parent)
    text = render(results, relative)
    if kept:
        text += "\n" + kept + "\n"
    out.write_text(text)
