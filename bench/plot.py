"""The timeline PNG of one compose-rollout run (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files only

import matplotlib.pyplot as plt

from bench.load import percentile
from bench.monitor import OP_RUNNING
from bench.scenarios import Run

PHASES = (
    ("drained_at", "up_at", "drained: sessions finish, image set", "#f4a261"),
    ("up_at", "healthy_at", "up -d + health gate (incl. stabilisation)", "#e76f51"),
    ("healthy_at", "lb_up_at", "awaiting HAProxy UP", "#2a9d8f"),
    ("lb_up_at", "enabled_at", "enable", "#264653"),
)


def timeline(run: Run, path: Path) -> None:
    """Per-instance phases over time, with request rate, errors and latency below."""
    assert run.load is not None and run.journal is not None
    t0 = run.began
    load = run.load
    records = [r for r in run.journal.get("records", []) if r.get("drained_at")]
    first = min(load.start) if load.start else t0
    last = max(s + lat for s, lat in zip(load.start, load.latency, strict=True)) if load.start else run.ended
    fig, (ax_bars, ax_rate, ax_lat) = plt.subplots(
        3, 1, figsize=(12, 7.5), sharex=True, gridspec_kw={"height_ratios": [max(2, len(records)), 2.2, 1.6]}
    )

    # Per instance: the journal's phases, and HAProxy's own view (DOWN) from the monitor.
    labelled: set[str] = set()
    for row, record in enumerate(records):
        y = len(records) - 1 - row
        for begin_key, end_key, label, color in PHASES:
            begin, end = record.get(begin_key), record.get(end_key)
            if begin is None or end is None:
                continue
            ax_bars.barh(
                y, end - begin, left=begin - t0, height=0.5, color=color,
                label=label if label not in labelled else None,
            )  # fmt: skip
            labelled.add(label)
        # HAProxy's view from the 50 ms monitor: out of rotation, and when the last session ended.
        planned = [o for o in run.outages.get(record["name"], []) if o.planned]
        for outage in planned:
            ax_bars.plot([outage.left - t0, outage.back - t0], [y + 0.36, y + 0.36], color="#6c757d", lw=1.5,
                         label="out of rotation (HAProxy's view)" if "out" not in labelled else None)  # fmt: skip
            labelled.add("out")
            if outage.sessions_done is not None:
                ax_bars.plot([outage.sessions_done - t0], [y], marker="|", markersize=16, color="black",
                             label="last session ended" if "done" not in labelled else None)  # fmt: skip
                labelled.add("done")
        samples = run.monitor.samples.get(record["name"], []) if run.monitor else []
        down_since: float | None = None
        for sample in samples:
            if sample.op_state != OP_RUNNING and down_since is None:
                down_since = sample.t
            elif sample.op_state == OP_RUNNING and down_since is not None:
                ax_bars.plot([down_since - t0, sample.t - t0], [y - 0.36, y - 0.36], color="black", lw=2.5,
                             label="HAProxy check: DOWN" if "down" not in labelled else None)  # fmt: skip
                labelled.add("down")
                down_since = None
    if "down" not in labelled:
        ax_bars.plot([], [], color="black", lw=2.5, label="HAProxy check: DOWN (never, here)")
    ax_bars.set_yticks([-0.9, *range(len(records))], ["run", *[r["name"] for r in reversed(records)]])
    ax_bars.axvline(0, color="grey", lw=0.8, ls="--")
    ax_bars.axvline(run.ended - t0, color="grey", lw=0.8, ls="--")
    started = run.journal.get("started_at")
    if started and records:
        first_drain = min(r["drained_at"] for r in records)
        ax_bars.barh(-0.9, first_drain - started, left=started - t0, height=0.35, color="#adb5bd",
                     label="preflight + pre-pull")  # fmt: skip
    # Headroom above the top row for the legend, so it never hides a bar.
    ax_bars.set_ylim(-1.4, len(records) + 0.9)
    ax_bars.legend(loc="upper center", fontsize=7, ncol=4, frameon=False)
    ax_bars.set_title(
        f"compose-rollout v1 → v2, {run.instances} instances, batch {run.batch}: wall {run.wall:.1f} s, "
        f"{run.requests:,} requests through HAProxy, {run.failed} failed",
        fontsize=10,
    )

    # Responses per second by completion time, and errors.
    bin_s = 0.25
    xs, good, bad = load.rate_series(first, last, bin_s)
    offset = first - t0
    ax_rate.plot([x + offset for x in xs], [g / bin_s for g in good], color="#1d3557", lw=0.9, label="200 responses/s")
    if any(bad):
        ax_rate.bar([x + offset for x in xs], [b / bin_s for b in bad], width=bin_s, color="red", label="errors/s")
    else:
        ax_rate.plot([], [], color="red", label="errors/s (none)")
    ax_rate.set_ylabel("req/s")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend(loc="lower right", fontsize=7)
    for x in (0, run.ended - t0):
        ax_rate.axvline(x, color="grey", lw=0.8, ls="--")

    # Latency of the fast requests, p50 and p99 per second.
    width = 1.0
    buckets: dict[int, list[float]] = {}
    for start, lat, slow, ok in zip(load.start, load.latency, load.slow, load.ok, strict=True):
        if not slow and ok:
            buckets.setdefault(int((start - t0) // width), []).append(lat * 1000)
    keys = sorted(buckets)
    p50 = [percentile(sorted(buckets[k]), 50) for k in keys]
    p99 = [percentile(sorted(buckets[k]), 99) for k in keys]
    ax_lat.plot([k * width for k in keys], p50, color="#457b9d", lw=1, label="p50")
    ax_lat.plot([k * width for k in keys], p99, color="#e63946", lw=1, label="p99")
    ax_lat.set_ylabel("ms")
    ax_lat.set_ylim(bottom=0)
    ax_lat.legend(loc="upper right", fontsize=7)
    ax_lat.set_xlim(first - t0 - 0.5, run.ended - t0 + 1.0)
    ax_lat.set_xlabel("seconds since the rollout started (dashed: start and end of the rollout)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
