"""The demo: a real local fleet, real traffic, a real rolling deploy.

    python -m compose_rollout.demo [--tag v2|broken] [--lb haproxy|nginx|...] [--strategy surge] [--keep]

Starts the test bed (Docker engine, registry, three Compose instances each with its
own sshd and address, a load balancer in front: HAProxy by default), sends traffic
through that LB the whole time (slow requests included), rolls the fleet from v1 to
the tag, and prints what happened to the fleet and to the requests, and the capacity
lost: the seconds the LB sent requests to fewer servers than the fleet has instances
(sampled every 50 ms). `--tag broken` shows an automatic rollback; `--strategy surge`
starts each new container beside the old one (the instances publish the port range
8080-8081 for it), so no capacity is lost.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from compose_rollout.cli import table
from compose_rollout.errors import RolloutError
from compose_rollout.testbed.bed import LB_KINDS


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(prog="./dev demo", description=__doc__)
    options.add_argument("--tag", default="v2", help="tag to roll out: v2 (good) or broken (fails /health)")
    options.add_argument(
        "--workdir", type=Path, default=Path(".testbed/demo"), help="where the fleet lives (default: .testbed/demo)"
    )
    options.add_argument("--keep", action="store_true", help="leave the fleet running afterwards")
    options.add_argument(
        "--strategy",
        default="in-place",
        choices=("in-place", "surge"),
        help="in-place (default) or surge: the new container starts beside the old one",
    )
    options.add_argument(
        "--lb", default="haproxy", choices=LB_KINDS, help="the load balancer in front (default: haproxy)"
    )
    args = options.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    from compose_rollout.flows.rolling_deploy import rolling_deploy
    from compose_rollout.testbed import Testbed
    from compose_rollout.testbed.capacity import CapacitySampler
    from compose_rollout.testbed.traffic import Traffic

    print(f"Starting the demo fleet in {args.workdir} (Docker engine, registry, 3 instances, {args.lb})...")
    bed = Testbed(args.workdir)
    bed.start()
    failure = ""
    try:
        if args.lb != "haproxy":
            bed.front(args.lb)  # started before a port range is published, as it is reset with it
        if args.strategy == "surge":
            bed.publish_port_range()
        fleet_file = bed.fleet_file(lb=args.lb, rollout={"strategy": args.strategy})
        url = bed.lb_url_of(args.lb)
        print(
            f"Fleet file: {fleet_file} (strategy {args.strategy})\n"
            f"All instances run v1. Traffic through {args.lb} at {url} starts now."
        )
        if args.lb == "haproxy":
            capacity = CapacitySampler(bed.admin.server_stats, bed.lb_backend)
        else:
            front = bed.front(args.lb)
            capacity = CapacitySampler(lambda _: {name: {"status": "UP"} for name in front.serving()}, args.lb)
        traffic = Traffic(url, slow_seconds=3)
        traffic.start()
        try:
            with capacity:
                rows = rolling_deploy(fleet_file=str(fleet_file), tag=args.tag, triggered_by="demo")
        except RolloutError as error:
            failure, rows = str(error), []
        finally:
            seen = traffic.stop()
        print()
        if rows:
            print(table(rows))
        else:
            print(f"DEPLOY FAILED: {failure}")
        running = {instance.name: bed.running_image(instance.name)[:19] for instance in bed.instances}
        print(f"\nRunning image IDs now: {running}")
        print(
            f"Traffic through {args.lb} during the rollout: {seen.total} requests, {seen.failed} failed, "
            f"{seen.retried} resent after the LB closed an idle kept-alive connection, "
            f"{seen.slow_ok} slow ({traffic.slow_seconds} s) requests completed; versions served: {seen.versions}"
        )
        for item in seen.failures[:5]:
            print(f"  failed: {item}")
        instances = len(bed.instances)
        if capacity.samples:
            print(
                f"Capacity lost: {capacity.seconds_below(instances):.1f} s with fewer than {instances} servers "
                f"taking requests in {args.lb} (fewest at once: {capacity.minimum}, most: {capacity.maximum}; "
                f"sampled every 50 ms)"
            )
        else:
            print(f"Capacity lost: not measured, {args.lb} never answered the sampler: {capacity.errors[-1:]}")
        if args.keep:
            print(f"\nThe fleet keeps running. Try: rollout status --fleet {fleet_file}")
    finally:
        if not args.keep:
            bed.stop()
    return 0 if not failure and seen.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
