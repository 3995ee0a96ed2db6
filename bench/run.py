"""The benchmark suite: `python -m bench.run [--quick]`.

Runs every measurement of issue #5 on the real test bed, in one go, on this machine,
and rewrites BENCHMARKS.md and bench/timeline.png:

1. zero downtime under load (a rollout, and one that fails and rolls back);
2. time out of rotation per instance vs. its floor (restart + ready + LB rise);
3. orchestration overhead (wall time minus the inherent waits);
4. the peers: the seed procedure by hand (shell) and an Ansible playbook;
5. scale: 3, 12 and 24 instances, batch 1 and 25 % in place, batch 1 and 100 % with
   the surge strategy.

Every measured rollout also reports its *capacity lost*: seconds with fewer servers
taking requests than instances (HAProxy's view, the same for every runner).

`--quick` does a subset (3 instances, no Ansible, no 12/24) in a few minutes and writes
bench/BENCHMARKS-quick.md. `--surge` does what the surge strategy is judged by (in
place, shell script, Ansible and surge at 3 instances, surge alone at 12 and 24) and
writes bench/BENCHMARKS-surge.md. Not part of the test run: speed is measured here,
never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quiet_prefect_env() -> None:
    """Prefect settings that must be in place before Prefect is imported: an isolated
    home, no telemetry, and time for a cold start of the temporary server."""
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"


_quiet_prefect_env()

from bench import first_seconds, peers, report  # noqa: E402 - after the environment above
from bench.scenarios import (  # noqa: E402
    ActionResult,
    FloorSample,
    Results,
    Run,
    attach_flow_details,
    compose_rollout_action,
    fleet_on,
    measure,
    measure_floor,
)
from compose_rollout.testbed import Testbed  # noqa: E402
from compose_rollout.testbed.fronts import FRONTS  # noqa: E402

log = logging.getLogger("bench")

# Surge is measured one instance at a time and with the whole fleet at once (which only
# surge allows: nothing leaves rotation).
SURGE_BATCHES = ("1", "100%")


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class MachineLock:
    """The machine-wide test bed lock, taken by the first bed and kept until the run
    ends: with beds of 3, 12 and 24 in turn, a test run waiting for the lock would
    otherwise get it between two beds, and the bench would wait for it again.

    The lock is a flock on an open file: a duplicate descriptor of the first bed's
    keeps it held when that bed's stop() closes its own, and each later bed gets a
    duplicate as its lock file, so its start() finds the lock taken by itself."""

    def __init__(self) -> None:
        self._held: int | None = None

    def give(self, bed: Testbed, results: Results) -> None:
        if self._held is None:
            waiting = time.monotonic()
            bed._take_machine_lock()
            results.lock_wait += time.monotonic() - waiting
            assert bed._lock_file is not None
            self._held = os.dup(bed._lock_file.fileno())
        else:
            bed._lock_file = os.fdopen(os.dup(self._held), "a")

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None


@contextmanager
def test_bed(workdir: Path, instances: int, results: Results, lock: MachineLock) -> Iterator[Testbed]:
    """A started bed of `instances`; its start-up is reported apart from the rollouts."""
    bed = Testbed(workdir / f"bed-{instances}", instances=instances)
    say(f"starting a test bed of {instances} instances (waits if another bed holds the machine lock)")
    # Take the machine-wide lock first (start() would too, idempotently) so that
    # waiting for another engineer's bed is not counted as start-up time.
    lock.give(bed, results)
    began = time.monotonic()
    bed.start()
    results.bed_startup[instances] = time.monotonic() - began
    say(f"test bed of {instances} up in {results.bed_startup[instances]:.1f} s")
    try:
        yield bed
    finally:
        say(f"stopping the test bed of {instances}")
        bed.stop()


class Suite:
    """Runs the measurements in order on the beds, recording into `results`."""

    def __init__(self, results: Results, workdir: Path, steady_seconds: float) -> None:
        self.results = results
        self.workdir = workdir
        self.steady = steady_seconds

    def fleet_file(self, bed: Testbed, name: str, lb: str = "haproxy", **overrides: object) -> tuple[Path, Path]:
        state = self.workdir / "state"
        path = bed.fleet_file(self.workdir / "fleets" / f"{name}.yaml", lb=lb, state_directory=str(state), **overrides)
        return path, state

    def _record(self, run: Run) -> Run:
        self.results.runs.append(run)
        failed = f", {run.failed} failed requests" if run.failed else ", 0 failed requests"
        lost = f", capacity lost {run.capacity_lost:.2f} s" if run.capacity_lost is not None else ""
        state = "ok" if run.ok else f"FAILED: {run.error[:300]}"
        say(f"  {run.runner} / {run.label}: {run.wall:.1f} s{failed}{lost}; {state}")
        return run

    def compose_rollout(
        self,
        bed: Testbed,
        label: str,
        tag: str,
        batch: str = "1",
        keep_series: bool = False,
        lb: str = "haproxy",
        strategy: str = "in-place",
        **overrides: object,
    ) -> Run:
        """One `rolling-deploy` flow run under load through the LB of kind `lb`.

        The surge strategy needs a published host port range: the bed switches to it
        after the reset (which puts the fixed port back for every other run)."""
        bed.reset()
        if strategy == "surge":
            bed.publish_port_range()
        batch_value: int | str = int(batch) if batch.isdigit() else batch
        fleet, state = self.fleet_file(
            bed, f"{label}-{len(bed.instances)}-{batch}".replace(" ", "-").replace("%", "pct"),
            lb=lb, rollout={"batch_size": batch_value, "strategy": strategy}, **overrides,
        )  # fmt: skip
        say(f"compose-rollout: {label} ({len(bed.instances)} instances, batch {batch}, {strategy})")
        run = measure(
            bed,
            "compose-rollout",
            label,
            batch,
            compose_rollout_action(fleet, tag),
            steady_seconds=self.steady,
            keep_series=keep_series,
            lb=lb,
            strategy=strategy,
        )
        attach_flow_details(run, state)
        run.fleet_on_target = fleet_on(bed, tag if run.ok else bed.initial_tag)
        return self._record(run)

    def surge(self, bed: Testbed) -> None:
        """The surge strategy, one instance at a time and the whole fleet at once."""
        for batch in SURGE_BATCHES:
            self.compose_rollout(bed, "surge", "v2", batch=batch, strategy="surge")

    def shell(self, bed: Testbed) -> None:
        self._peer(
            bed, "shell script", "shell script (seed procedure by hand)", peers.shell_available, peers.run_shell_script
        )

    def ansible(self, bed: Testbed) -> None:
        self._peer(
            bed,
            "Ansible",
            "Ansible playbook (serial: 1, community.general.haproxy drain + wait)",
            peers.ansible_available,
            peers.run_ansible,
        )

    def _peer(
        self,
        bed: Testbed,
        name: str,
        description: str,
        missing: Callable[[], str | None],
        deploy: Callable[[Testbed, str], peers.PeerOutcome],
    ) -> None:
        """A peer's v1 → v2 rollout of the same fleet under the same load, or why it was skipped."""
        absent = missing()
        if absent:
            self.results.skipped.append(f"{name} peer: {absent}")
            return
        bed.reset()
        say(description)
        image = f"{bed.image_repository}:v2"

        def action() -> ActionResult:
            outcome = deploy(bed, image)
            return ActionResult(outcome.ok, "" if outcome.ok else outcome.output_tail)

        run = measure(bed, name, "v1 → v2", "1", action, steady_seconds=self.steady)
        run.fleet_on_target = fleet_on(bed, "v2")
        self._record(run)

    def first_seconds(self, bed: Testbed) -> None:
        """`rollout deploy` as a new process, with and without a Prefect server: how soon
        the first drain comes (see bench/first_seconds.py)."""
        from prefect.settings import PREFECT_API_URL

        envs = first_seconds.environments(self.workdir, str(PREFECT_API_URL.value()))
        try:
            for label, env in envs:
                bed.reset()
                fleet, _ = self.fleet_file(bed, f"cli-{len(self.results.runs)}")
                say(f"{first_seconds.RUNNER}: {label}")
                action = first_seconds.cli_action(fleet, "v2", env)
                run = measure(bed, first_seconds.RUNNER, label, "1", action, steady_seconds=self.steady)
                run.fleet_on_target = fleet_on(bed, "v2")
                self._record(run)
        finally:
            first_seconds.stop_left_server(envs[-1][1])

    def floor(self, bed: Testbed) -> None:
        bed.reset()
        say("floor: restart + app ready + LB rise, measured directly (no orchestration)")
        samples: list[FloorSample] = []

        def action() -> ActionResult:
            samples.extend(measure_floor(bed, "v2"))
            return ActionResult(True)

        run = measure(bed, "floor probe", "direct", "1", action, steady_seconds=2.0)
        self.results.floor = samples
        for sample in samples:
            say(
                f"  {sample.instance}: restart {sample.restart:.2f} s, ready {sample.ready:.2f} s, "
                f"rise {sample.rise:.2f} s (LB saw it down: {sample.lb_saw_down})"
            )
        if run.failed:
            say(f"  the floor probe itself saw {run.failed} failed requests")

    def on_small_bed(self, bed: Testbed, quick: bool, compose_rollout_only: bool) -> None:
        """Measurements 1-4 and the 3-instance scale point, on one bed of 3."""
        self.results.timeline = self.compose_rollout(bed, "v1 → v2", "v2", keep_series=True)
        self.first_seconds(bed)
        for kind in FRONTS:  # the same rollout through each other LB the bed runs
            self.compose_rollout(bed, f"v1 → v2 through {kind}", "v2", lb=kind)
        if compose_rollout_only:
            # For before/after comparisons of core changes: the floor (for the ratios)
            # and compose-rollout's own runs only.
            self.floor(bed)
            self.surge(bed)
            self.results.skipped.append("rollback run and peers (--compose-rollout-only)")
            if not quick:
                self.compose_rollout(bed, "scale", "v2", batch="25%")
            return
        # A rollout that fails its health gate on the first instance and rolls back.
        self.compose_rollout(bed, "broken image → rollback", "broken", health={"timeout_seconds": 10})
        self.floor(bed)
        self.shell(bed)
        if quick:
            self.results.skipped.append("Ansible peer (--quick)")
        else:
            self.ansible(bed)
            # The same rollout with the health policy at its minimum: 1 success, no
            # stabilisation window. Shows what the default policy costs per instance.
            self.compose_rollout(
                bed,
                "v1 → v2, minimal health policy",
                "v2",
                health={"consecutive_successes": 1, "stabilization_seconds": 0},
            )
            self.compose_rollout(bed, "scale", "v2", batch="25%")
        # Last on this bed: each surge run switches the bed to the port range.
        self.surge(bed)

    def surge_on_small_bed(self, bed: Testbed) -> None:
        """`--surge` on 3 instances: the rows the issue compares surge with, on one
        fleet under one load (in place, the shell script, Ansible), then surge."""
        self.results.timeline = self.compose_rollout(bed, "v1 → v2", "v2", keep_series=True)
        self.first_seconds(bed)
        self.shell(bed)
        self.ansible(bed)
        self.surge(bed)
        self.results.skipped.append(
            "the other LBs, the rollback run, the floor probe and the minimal health policy (--surge)"
        )

    def scale(self, bed: Testbed, in_place: bool = True) -> None:
        if in_place:
            for batch in ("1", "25%"):
                self.compose_rollout(bed, "scale", "v2", batch=batch)
        self.surge(bed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="a subset in a few minutes (3 instances, no Ansible)")
    modes.add_argument(
        "--surge",
        action="store_true",
        help="the surge strategy's measurements: in place, shell, Ansible and surge at 3, surge alone at 12 and 24",
    )
    modes.add_argument(
        "--first-seconds",
        action="store_true",
        help="only `rollout deploy` to the first drain, with and without a Prefect server (3 instances)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="report to rewrite (default: BENCHMARKS.md, bench/BENCHMARKS-quick.md or bench/BENCHMARKS-surge.md)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        help="timeline PNG to rewrite (default: bench/timeline.png, timeline-quick.png or timeline-surge.png)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary numbers as JSON (to compare runs)")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "compose-rollout-bench", help="beds and state"
    )
    parser.add_argument(
        "--sizes", default=None, help="scale sizes, e.g. 3,12,24 (default: 3 with --quick, else 3,12,24)"
    )
    parser.add_argument(
        "--compose-rollout-only",
        action="store_true",
        help="skip the rollback run and the peers (to compare core changes before/after)",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        help="only re-render the report from the results.pickle a run saved in its workdir",
    )
    args = parser.parse_args(argv)
    suffix = "-quick" if args.quick else "-surge" if args.surge else "-first-seconds" if args.first_seconds else ""
    args.out = args.out or (ROOT / "bench" / f"BENCHMARKS{suffix}.md" if suffix else ROOT / "BENCHMARKS.md")
    args.plot = args.plot or ROOT / "bench" / f"timeline{suffix}.png"
    if args.report_from:
        saved: Results = pickle.loads(args.report_from.read_bytes())  # noqa: S301 - our own file
        report.write(saved, args.out, args.plot)
        say(f"wrote {args.out} and {args.plot} from {args.report_from}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = [int(s) for s in (args.sizes or ("3" if args.quick or args.first_seconds else "3,12,24")).split(",")]
    command = (
        "python -m bench.run"
        + (" --quick" if args.quick else "")
        + (" --surge" if args.surge else "")
        + (" --first-seconds" if args.first_seconds else "")
        + (f" --sizes {args.sizes}" if args.sizes else "")
        + (" --compose-rollout-only" if args.compose_rollout_only else "")
    )
    results = Results(quick=args.quick, command=command, surge_only=args.surge)
    args.workdir.mkdir(parents=True, exist_ok=True)
    suite = Suite(results, args.workdir, steady_seconds=5.0)

    from prefect.testing.utilities import prefect_test_harness

    say("starting a temporary Prefect server (paid once, reported apart)")
    began = time.monotonic()
    lock = MachineLock()
    with prefect_test_harness(server_startup_timeout=120):
        results.prefect_startup = time.monotonic() - began
        say(f"Prefect server up in {results.prefect_startup:.1f} s")
        try:
            for size in sizes:
                with test_bed(args.workdir, size, results, lock) as bed:
                    if args.first_seconds:
                        suite.first_seconds(bed)
                        results.skipped.append("everything but `rollout deploy`'s first seconds (--first-seconds)")
                    elif size == 3 and args.surge:
                        suite.surge_on_small_bed(bed)
                    elif size == 3:
                        suite.on_small_bed(bed, args.quick, args.compose_rollout_only)
                    else:
                        suite.scale(bed, in_place=not args.surge)
        finally:
            lock.release()
    results.finished = time.time()
    (args.workdir / "results.pickle").write_bytes(pickle.dumps(results))
    report.write(results, args.out, args.plot)
    plotted = f" and {args.plot}" if results.timeline is not None else ""
    say(f"wrote {args.out}{plotted} ({(results.finished - results.started) / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps(report.summary(results), indent=1))
    failed = [r for r in results.runs if r.failed]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
