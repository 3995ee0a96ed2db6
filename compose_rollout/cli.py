"""`rollout`: deploy, plan, status and recover for a fleet file.

rollout deploy --fleet FLEET --tag TAG      roll the fleet to TAG (exit 0), or roll back (exit 1);
                                            --batch-size, --canary, --pause, --drain-timeout,
                                            --on-drain-timeout, --on-locked, --strategy: the fleet file's
                                            `rollout` settings, for this run
rollout plan   --fleet FLEET --tag TAG      what would change; touches nothing
rollout status --fleet FLEET                per instance: image, container, /health, LB
rollout recover --fleet FLEET               revert what a killed run left half-done, unlock;
                                            --i-checked: release a fleet that needed a person as
                                            it is now, or take over a holder this machine cannot see
rollout history --fleet FLEET               every recorded run: who, when, what, result
rollout rollback --fleet FLEET              back to the image before the last successful deploy
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from compose_rollout import inspection, local_server, procedure, surge
from compose_rollout.config import Fleet, Instance, load_fleet
from compose_rollout.context import Context
from compose_rollout.errors import RolloutError
from compose_rollout.hosts.compose_file import unified_diff
from compose_rollout.registry import RegistryClient
from compose_rollout.state import history
from compose_rollout.state.fleet_journals import FleetJournals
from compose_rollout.state.journal import InstanceRecord
from compose_rollout.target import repository_change, target_image

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
T = TypeVar("T")


def _quiet_prefect_defaults() -> None:
    """Defaults for a local run: no telemetry noise, time for a fresh ephemeral server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def table(rows: list[dict[str, object]]) -> str:
    """Rows as an aligned plain-text table."""
    if not rows:
        return "(nothing)"
    headers = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(h, "")) if row.get(h) is not None else "-" for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(line.rstrip() for line in lines)


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a supervisor stopping us) like Ctrl-C: the flow rolls back, then exits."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _recover(args: argparse.Namespace) -> int:
    load_fleet(args.fleet)
    _quiet_prefect_defaults()
    from compose_rollout.flows.rolling_deploy import recover_fleet  # imports Prefect

    _interrupt_on_sigterm()
    with local_server.prefect_api():
        print(recover_fleet(fleet_file=args.fleet, i_checked=args.i_checked))
    return EXIT_OK


def _from_journals(fleet: Fleet, read: Callable[[FleetJournals], T]) -> T:
    """`read` the fleet's journals, here and on its first host (a host that cannot be
    reached leaves this machine's, said on stderr)."""
    ctx = Context.connect(fleet)
    journals = FleetJournals(fleet, ctx.hosts[fleet.instances[0].name])
    try:
        found = read(journals)
    finally:
        ctx.close()
    for failure in journals.failures:
        print(
            f"warning: the fleet's copies of the journals could not be read, showing this machine's: {failure}",
            file=sys.stderr,
        )
    return found


def _history(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    print(table(_from_journals(fleet, lambda journals: history.rows(fleet, journals))))
    return EXIT_OK


def _rollback(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    args.image, args.tag = _from_journals(fleet, lambda journals: history.previous_image(fleet, journals)), None
    print(f"Rolling back to {args.image}")
    return _deploy(args, triggered_by=history.ROLLBACK_TRIGGER)


# `rollout deploy` flags that override the fleet file's `rollout` section for one run.
POLICY_FLAGS = (
    "batch_size",
    "canary",
    "pause_between_batches_seconds",
    "drain_timeout_seconds",
    "on_drain_timeout",
    "on_locked",
    "strategy",
)


def _deploy(args: argparse.Namespace, triggered_by: str = "cli") -> int:
    # Refuse bad input at once, before paying for Prefect's start-up (the flow checks again).
    policy = {name: getattr(args, name, None) for name in POLICY_FLAGS}
    policy = {name: value for name, value in policy.items() if value is not None}
    fleet = load_fleet(args.fleet, **({"rollout": policy} if policy else {}))
    if args.tag or args.image or fleet.tag_policy is None:
        target_image(fleet, args.tag, args.image)
    _quiet_prefect_defaults()
    from compose_rollout.flows.rolling_deploy import rolling_deploy  # imports Prefect: only when deploying

    _interrupt_on_sigterm()
    try:
        with local_server.prefect_api():
            rows = rolling_deploy(
                fleet_file=args.fleet,
                tag=args.tag,
                image=args.image,
                **policy,
                urgent=getattr(args, "urgent", False),
                triggered_by=triggered_by,
            )
    except RolloutError as error:
        print(f"\nFAILED: {error}", file=sys.stderr)
        return EXIT_FAILED
    print()
    print(table(rows))
    return EXIT_OK


def _per_instance(fleet: Fleet, ctx: Context, action: object) -> list[dict[str, object]]:
    with ThreadPoolExecutor(max_workers=min(16, len(fleet.instances))) as pool:
        return list(pool.map(action, fleet.instances))  # type: ignore[arg-type]


def _plan(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    target = target_image(fleet, args.tag, args.image)
    with RegistryClient(fleet.registry) as registry:
        pinned = target.with_digest(registry.resolve_digest(target))
    ctx = Context.connect(fleet)
    diffs: dict[str, str] = {}

    def one(instance: Instance) -> dict[str, object]:
        found = inspection.snapshot(ctx, instance)
        if fleet.rollout.strategy == "surge":  # refused here as a deploy would refuse it
            surge.preflight(ctx, instance, procedure.preflight_instance(ctx, instance))
        path = found.edited_path or instance.compose_path
        record = InstanceRecord(
            instance.name, path, found.image, "", found.edited or found.compose, found.mode,
            image_variable=found.variable, image_prefix=found.image_prefix,
        )  # fmt: skip
        after = procedure.edit(record, fleet.service, str(pinned), f"{instance.name}:{path}")
        change = "none (already there)" if found.image == str(pinned) else "update"
        diffs[instance.name] = unified_diff(record.original, after, path)
        return {"instance": instance.name, "now": found.image, "after": str(pinned), "change": change}

    try:
        ctx.fleet = procedure.find_servers(ctx)  # as a deploy finds them (a surge renames some)
        servers = procedure.preflight_lb(ctx)
        backend = ctx.lb.backend
        rows = _per_instance(fleet, ctx, one)
    finally:
        ctx.close()
    size = fleet.rollout.batch_count(len(fleet.instances))
    print(f"Plan for fleet {fleet.name}: {target} = {pinned.digest}")
    images = {str(row["instance"]): str(row["now"]) for row in rows}
    switch = repository_change(fleet, images, pinned, tag_only=args.image is None)
    if switch:
        print(f"Note: {switch}")
    canary = " after a canary" if fleet.rollout.canary else ""
    print(f"Batches of {size}{canary}, strategy {fleet.rollout.strategy}; LB {backend}:")
    for row in rows:
        row["lb"] = servers[ctx.fleet.instance(str(row["instance"])).lb_server].describe()
    print(table(rows))
    for name, diff in diffs.items():
        if diff:
            print(f"\n{name}:\n{diff}", end="")
    print("\nNothing was changed.")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    ctx = Context.connect(fleet)
    try:
        try:
            servers = {name: s.describe() for name, s in ctx.lb.servers().items()}
            ctx.fleet = procedure.find_servers(ctx)  # as a deploy finds them (a surge renames some)
        except RolloutError as error:
            servers = {}
            print(f"LB: {error}", file=sys.stderr)

        def one(instance: Instance) -> dict[str, object]:
            instance = ctx.fleet.instance(instance.name)  # its server as found
            row: dict[str, object] = {"instance": instance.name}
            url = instance.health_url
            try:
                found = inspection.snapshot(ctx, instance)
                row["compose image"] = found.image
                row["running"] = inspection.running_digest(ctx, instance, found.container)
                row["container"] = found.container.status
                followed = inspection.service_ports(ctx, instance, found)
                if followed is not None:  # which port of a published range the container got
                    ports, port = followed
                    row["port"] = f"{port} ({ports.container_port})"
                    url = ports.url_at(url, port)
            except RolloutError as error:
                row["compose image"] = f"ERROR: {error}"
            _, seen = ctx.probe(url, fleet.health.request_timeout_seconds)
            row["health"] = seen
            row["lb"] = servers.get(instance.lb_server, "unknown")
            return row

        print(table(_per_instance(fleet, ctx, one)))
        strays = sorted(set(servers) - {instance.lb_server for instance in ctx.fleet.instances})
        for name in strays:
            print(f"{ctx.lb.backend} also has {name}: {servers[name]}")
    finally:
        ctx.close()
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    """The `rollout` argument parser."""
    top = argparse.ArgumentParser(
        prog="rollout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = top.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("deploy", "roll the fleet to a new image, rolling back on failure"),
        ("plan", "show what a deploy would change, touching nothing"),
        ("status", "show each instance's image, container, health and LB state"),
        ("recover", "revert what an interrupted (killed) run changed, re-enable, unlock"),
        ("history", "every recorded run of the fleet, newest first"),
        ("rollback", "roll the fleet back to the image it ran before its last successful deploy"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("--fleet", required=True, help="fleet YAML file")
        if name in ("deploy", "plan"):
            which = sub.add_mutually_exclusive_group(required=name == "plan")
            which.add_argument("--tag", help="tag in the fleet's image_repository (deploy: default by tag_policy)")
            which.add_argument("--image", help="full image reference REPO:TAG")
        if name == "deploy":
            sub.add_argument("--batch-size", help="instances at once: a count or a percentage like 25%%")
            sub.add_argument(
                "--canary", action=argparse.BooleanOptionalAction, help="update one instance alone first (or not)"
            )
            sub.add_argument(
                "--pause", dest="pause_between_batches_seconds", type=float, metavar="SECONDS", help="between batches"
            )
            sub.add_argument(
                "--drain-timeout",
                dest="drain_timeout_seconds",
                type=float,
                metavar="SECONDS",
                help="how long a drained instance's requests may take to finish",
            )
            sub.add_argument(
                "--on-drain-timeout", choices=("fail", "proceed"), help="when requests outlast it: fail, or cut them"
            )
            sub.add_argument("--on-locked", choices=("fail", "wait"), help="when another run holds the fleet")
            sub.add_argument(
                "--strategy",
                choices=("in-place", "surge"),
                help="in-place: replace each container out of rotation; surge: start the new one beside it first",
            )
            sub.add_argument("--urgent", action="store_true", help="deploy now even outside maintenance windows")
        if name == "recover":
            sub.add_argument(
                "--i-checked",
                action="store_true",
                help="you checked the fleet: release a run that needed attention as it is (no rollback), "
                "or take over a lock whose holder this machine cannot see",
            )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handlers = {
        "deploy": _deploy,
        "plan": _plan,
        "status": _status,
        "recover": _recover,
        "history": _history,
        "rollback": _rollback,
    }
    try:
        return handlers[args.command](args)
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
