"""Deploy policy on the real fleet: the failure budget, hooks, a tag in .env, the 5xx gate, the weighted canary,
an edition switch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose_rollout.errors import DeployFailed
from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from compose_rollout.testbed.traffic import Traffic
from tests.fleet.test_faults import docker, push_variant
from tests.fleet.test_rollout import deploy_under_traffic, fleet_file, latest_artifact, observe

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


def journals(state: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted(state.glob("*/runs/*.json"))]


def unhealthy_on_v2(bed: Testbed, name: str) -> None:
    """The instance's container fails /health when it runs v2 (and only then)."""
    compose = bed.instance(name).compose_file
    text = compose.read_text()
    compose.write_text(text.replace("LOG_LEVEL: info", "LOG_LEVEL: info\n      UNHEALTHY_ON_VERSION: v2"))
    bed.compose(name, "up", "-d")
    bed.wait_all_up()


@pytest.mark.timeout(300)
def test_within_the_failure_budget_a_failed_instance_is_rolled_back_alone_and_the_run_goes_on(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    unhealthy_on_v2(bed, "app-2")  # app-2 alone fails its health gate, on v2 only
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, rollout={"max_failed_instances": 1}, health={"timeout_seconds": 5})

    rows, failure, seen = deploy_under_traffic(bed, fleet, "v2")

    assert rows is None
    assert "ended partial: 2 of 3 instances run it (app-1, app-3)" in failure
    assert "app-2 (rolled back: instance app-2, step await-healthy" in failure and "HTTP 404" in failure
    after = observe(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert after.images["app-1"] == after.images["app-3"] == v2
    assert after.images["app-2"] == before.images["app-2"]  # its old container, back
    assert after.compose["app-2"] == before.compose["app-2"]  # byte for byte
    assert set(after.lb.values()) == {"UP"} and after.locks == ()  # nothing left out of rotation, unlocked
    assert seen.failed == 0, seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["status"] == "partial"


@pytest.mark.timeout(300)
def test_a_second_failure_beyond_the_budget_rolls_back_every_instance(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    for name in ("app-2", "app-3"):  # one more failure than the budget
        unhealthy_on_v2(bed, name)
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, rollout={"max_failed_instances": 1}, health={"timeout_seconds": 5})

    rows, failure, seen = deploy_under_traffic(bed, fleet, "v2")

    assert rows is None and "failed on instance app-3 at step await-healthy" in failure
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["status"] == "rolled back"


def unpulled_release(bed: Testbed, tag: str) -> str:
    """Push `tag` with content no host holds (the hosts share one engine: it is removed
    from it once pushed), so every host must pull it; its digest."""
    digest = push_variant(bed, tag, f"RUN echo {tag}-{uuid.uuid4()} > /www/version")
    docker("rmi", f"{bed.image_repository}:{tag}")
    return digest


@pytest.mark.timeout(300)
def test_within_the_failure_budget_a_host_that_cannot_pull_is_left_untouched_and_the_others_move(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    digest = unpulled_release(bed, "v3")
    bed.break_pulls("app-2")  # the registry refuses app-2's pulls; app-1 and app-3 pull fine
    before = observe(bed)
    fleet = fleet_file(bed, tmp_path, rollout={"max_failed_instances": 1})

    rows, failure, seen = deploy_under_traffic(bed, fleet, "v3")

    assert rows is None
    assert "ended partial: 2 of 3 instances run it (app-1, app-3)" in failure
    assert "app-2 (failed: pre-pull: " in failure and "docker pull" in failure and "pull access denied" in failure
    after = observe(bed)
    assert after.images["app-1"] == after.images["app-3"] == bed.image_id(f"{bed.image_repository}@{digest}")
    # app-2 never touched: the same container on its old image, its compose file byte for byte, in rotation.
    assert after.containers["app-2"] == before.containers["app-2"]
    assert after.images["app-2"] == before.images["app-2"] and after.compose["app-2"] == before.compose["app-2"]
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["status"] == "partial"
    (app2,) = [r for r in found["records"] if r["name"] == "app-2"]  # type: ignore[attr-defined]
    assert (app2["outcome"], app2["drained"], app2["file_written"]) == ("failed", False, False)  # never drained


@pytest.mark.timeout(180)
def test_without_a_failure_budget_one_host_that_cannot_pull_refuses_the_run_before_anything_is_touched(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    unpulled_release(bed, "v3")
    bed.break_pulls("app-2")
    before = observe(bed)

    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path), "v3")

    assert rows is None and "refused before any instance was touched" in failure
    assert "failed, nothing was drained: app-2: " in failure and "pull access denied" in failure
    assert "app-1" not in failure and "app-3" not in failure  # they pulled
    assert observe(bed) == before  # compose files, containers, LB, no lock left
    assert seen.failed == 0, seen.failures


def rollout_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compose_rollout.cli", *args], capture_output=True, text=True, timeout=240
    )


def last_summary() -> str:
    """The summary of the fleet's last run, as the Prefect UI shows it (its artifact)."""
    return latest_artifact("rollout-demo").description or ""


def created_from(bed: Testbed) -> dict[str, str]:
    """The image reference each instance's container was created from."""
    return {i.name: str(bed.project_containers(i.name)[0]["Config"]["Image"]) for i in bed.instances}


@pytest.mark.timeout(300)
def test_an_edition_switch_says_so_and_tag_only_runs_are_refused_until_the_fleet_file_names_it(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    app, edition = bed.image_repository, bed.push_edition()  # demo/app-ee: v1 and v2 of the app
    fleet = fleet_file(bed, tmp_path, allowed_repositories=[edition])
    switch = f"it switches repository: {app} on app-1, app-2, app-3 -> {edition}"

    plan = rollout_cli("plan", "--fleet", fleet, "--image", f"{edition}:v2")
    assert plan.returncode == 0 and f"\nNote: {switch}\n" in plan.stdout, plan.stdout + plan.stderr
    traffic = Traffic(bed.lb_url)
    traffic.start()
    deploy = rollout_cli("deploy", "--fleet", fleet, "--image", f"{edition}:v2")
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert last_summary().endswith(f" Note: {switch}; update image_repository in the fleet file to match.")
    switched = observe(bed)
    assert set(switched.images.values()) == {bed.tag_image_id("v2")}
    assert all(ref.startswith(f"{edition}:v2@sha256:") for ref in created_from(bed).values())

    # A run given only a tag (a schedule, a webhook) would switch the fleet back: refused, naming both.
    runs = f"fleet demo runs {edition} on app-1, app-2, app-3, not its image_repository {app}"
    refused = rollout_cli("plan", "--fleet", fleet, "--tag", "v1")
    assert refused.returncode == 1 and runs in refused.stderr, refused.stdout + refused.stderr
    with pytest.raises(DeployFailed) as raised:
        rolling_deploy(fleet_file=fleet, tag="v1", triggered_by="schedule")
    assert "refused before any instance was touched" in str(raised.value)
    assert f"{runs}: a run given only a tag would switch it to {app}." in str(raised.value)
    assert observe(bed) == switched  # compose files, containers, LB, no lock left

    # The fleet file follows the switch: the next tag-only run deploys from the edition.
    fleet = fleet_file(bed, tmp_path, image_repository=edition, allowed_repositories=[app])
    rows = rolling_deploy(fleet_file=fleet, tag="v1", triggered_by="schedule")
    assert [row["result"] for row in rows] == ["updated"] * 3
    assert "switches repository" not in last_summary()
    assert set(observe(bed).images.values()) == {bed.tag_image_id("v1")}
    assert all(ref.startswith(f"{edition}:v1@sha256:") for ref in created_from(bed).values())
    seen = traffic.stop()
    assert seen.failed == 0, seen.failures


def with_hooks(bed: Testbed, tmp_path: Path, hooks: dict[str, object], **overrides: object) -> str:
    return fleet_file(bed, tmp_path, hooks=hooks, **overrides)


@pytest.mark.timeout(300)
def test_a_failing_before_deploy_hook_touches_nothing(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    before = observe(bed)
    hook = {"command": 'echo "backing up $ROLLOUT_FLEET"; echo "pg_dump: connection refused" >&2; exit 2'}
    fleet = with_hooks(bed, tmp_path, {"before_deploy": hook})

    rows, failure, seen = deploy_under_traffic(bed, fleet, "v2")

    assert rows is None and "refused before any instance was touched" in failure
    assert "hook before_deploy (on the orchestrator) exited 2" in failure and "pg_dump: connection refused" in failure
    assert observe(bed) == before  # compose files, containers, LB, no lock left
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(300)
def test_a_failing_after_instance_hook_on_the_second_instance_rolls_back_it_and_the_first(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    before = observe(bed)
    smoke = (  # the new container answers at the URL the hook is given; app-2's smoke test fails
        'busybox wget -q -O /dev/null "$ROLLOUT_HEALTH_URL" || exit 4; '
        'if [ "$ROLLOUT_INSTANCE" = app-2 ]; then echo "smoke test of $ROLLOUT_INSTANCE failed"; exit 3; fi'
    )
    fleet = with_hooks(bed, tmp_path, {"after_instance": {"command": smoke, "run_on": "host", "timeout_seconds": 20}})

    rows, failure, seen = deploy_under_traffic(bed, fleet, "v2")

    assert rows is None
    assert "failed on instance app-2 at step after_instance" in failure and "exited 3" in failure
    assert "smoke test of app-2 failed" in failure and "Rolled back app-2, app-1" in failure
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(300)
def test_hostile_values_reach_hooks_as_plain_text_never_as_shell(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    marker = tmp_path / "pwned"
    hostile = f"ci; touch {marker} $(touch {marker}) `touch {marker}` \"'"
    record = f'printf %s "$ROLLOUT_TRIGGERED_BY" > {tmp_path}/seen-$ROLLOUT_HOOK-$ROLLOUT_INSTANCE'
    hooks = {"before_instance": {"command": record, "run_on": "host"}, "after_instance": {"command": record}}

    rolling_deploy(fleet_file=with_hooks(bed, tmp_path, hooks), tag="v2", triggered_by=hostile)

    seen = {path.name: path.read_text() for path in tmp_path.glob("seen-*")}
    expected = {f"seen-{hook}-{i.name}" for hook in ("before_instance", "after_instance") for i in bed.instances}
    assert set(seen) == expected and set(seen.values()) == {hostile}  # on the host and here, byte for byte
    assert not marker.exists()


@pytest.fixture
def tag_in_env_file(fresh_fleet: Testbed) -> Iterator[Testbed]:
    """The bed's compose files written the Terrateam way: `image: REPO:${APP_VERSION}`,
    the value in the project's `.env`."""
    bed = fresh_fleet
    for instance in bed.instances:
        text = instance.compose_file.read_text()
        instance.compose_file.write_text(
            text.replace(f"{bed.image_repository}:v1", f"{bed.image_repository}:${{APP_VERSION}}")
        )
        (instance.project_directory / ".env").write_text("# written by hand\nAPP_VERSION=v1   # the app's version\n")
    try:
        yield bed
    finally:
        for instance in bed.instances:
            (instance.project_directory / ".env").unlink(missing_ok=True)


def env_files(bed: Testbed) -> dict[str, bytes]:
    return {i.name: (i.project_directory / ".env").read_bytes() for i in bed.instances}


@pytest.mark.timeout(300)
def test_a_tag_kept_in_env_is_changed_there_and_the_compose_file_is_not_touched(
    tag_in_env_file: Testbed, tmp_path: Path
) -> None:
    bed = tag_in_env_file
    before, env_before = observe(bed), env_files(bed)
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path), "v2")

    assert failure == "" and rows is not None and {row["result"] for row in rows} == {"updated"}
    after = observe(bed)
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert set(after.images.values()) == {v2} and after.compose == before.compose  # not one byte changed
    for name, env in env_files(bed).items():
        value = env.split(b"APP_VERSION=")[1].split()[0]
        assert value.startswith(b"v2@sha256:") and env == env_before[name].replace(b"=v1 ", b"=" + value + b" ")
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(300)
def test_a_failed_run_puts_env_back_byte_for_byte(tag_in_env_file: Testbed, tmp_path: Path) -> None:
    bed = tag_in_env_file
    before, env_before = observe(bed), env_files(bed)
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, health={"timeout_seconds": 5}), "broken")

    assert rows is None and "Rolled back app-1" in failure
    after = observe(bed)  # app-1's container is a new one (the rollback recreated it), on v1
    assert after.images == before.images and after.compose == before.compose and env_files(bed) == env_before
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert seen.failed == 0, seen.failures


@pytest.mark.timeout(120)
def test_a_variable_used_beyond_the_tag_is_refused_before_anything_is_touched(
    tag_in_env_file: Testbed, tmp_path: Path
) -> None:
    bed = tag_in_env_file
    compose = bed.instances[1].compose_file
    compose.write_text(compose.read_text().replace("LOG_LEVEL: info", "LOG_LEVEL: info\n      VERSION: ${APP_VERSION}"))
    before, env_before = observe(bed), env_files(bed)
    rows, failure, _ = deploy_under_traffic(bed, fleet_file(bed, tmp_path), "v2")

    assert rows is None and "refused before any instance was touched" in failure
    assert "app-2:" in failure and "${APP_VERSION} is used on lines" in failure
    assert observe(bed) == before and env_files(bed) == env_before


HALF_FAILING_CGI = """#!/bin/sh
# "/" answers 500 every other time (the index.html it replaces is gone); /health stays 200.
n=$(cat /www/count 2>/dev/null || echo 0)
echo $((n + 1)) > /www/count
if [ $((n % 2)) = 1 ]; then
  printf 'Status: 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nfailed\\n'
else
  printf 'Content-Type: text/plain\\r\\n\\r\\nv2\\n'
fi
"""


def push_half_failing(bed: Testbed, context: Path) -> None:
    """The `errors` tag: v2 whose /health passes while half its answers to / are 500."""
    context.mkdir()
    script = context / "index.cgi"
    script.write_text(HALF_FAILING_CGI)
    script.chmod(0o755)
    (context / "Dockerfile").write_text(
        f'FROM {bed.image_repository}:v2\nCOPY index.cgi /www/cgi-bin/index.cgi\nRUN ["/bin/rm", "/www/index.html"]\n'
    )
    ref = f"{bed.image_repository}:errors"
    for argv in (["docker", "build", "-q", "-t", ref, str(context)], ["docker", "push", ref]):
        subprocess.run(argv, check=True, capture_output=True, timeout=120, env={**os.environ, "DOCKER_BUILDKIT": "0"})


WATCH = {"watch_seconds": 4, "min_requests": 10, "max_5xx_ratio": 0.2}


@pytest.mark.timeout(300)
def test_the_5xx_gate_rolls_back_an_image_whose_health_passes_but_half_its_answers_fail(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    push_half_failing(bed, tmp_path / "context")
    before = observe(bed)
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, health=WATCH), "errors")

    assert rows is None and "failed on instance app-1 at step watch-responses" in failure
    assert re.search(r"app-1 answered (\d+) of (\d+) requests with 5xx \(\d+%\)", failure), failure
    assert "Rolled back app-1" in failure
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    # What clients saw: only the bad instance's 500s, while it was watched.
    assert seen.failures and all(str(f["error"]).startswith("HTTP 500") for f in seen.failures), seen.failures
    (found,) = journals(tmp_path / "state")
    assert found["records"][0]["watched_5xx"] > 0  # type: ignore[index]


@pytest.mark.timeout(300)
def test_the_5xx_gate_lets_a_good_image_through_and_reports_what_it_counted(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, health=WATCH), "v2")

    assert failure == "" and rows is not None
    assert all(int(str(row["responses watched"])) >= 10 and row["5xx watched"] == 0 for row in rows), rows
    assert seen.failed == 0, seen.failures


class RequestCounts:
    """HAProxy's per-server request totals (`stot`), sampled every 0.1 s in a thread."""

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rows = self.bed.haproxy_server_states()
            self.samples.append((time.time(), {name: int(row["stot"]) for name, row in rows.items()}))

    def __enter__(self) -> RequestCounts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def between(self, start: float, end: float) -> dict[str, int]:
        """Requests each server took from `start` to `end` (Unix times)."""
        first = next(counts for t, counts in self.samples if t >= start)
        last = [counts for t, counts in self.samples if t <= end][-1]
        return {name: last[name] - first.get(name, 0) for name in last}


def weights(bed: Testbed) -> dict[str, str]:
    return {i.name: bed.haproxy_command(f"get weight app/{i.lb_server}").split()[0] for i in bed.instances}


CANARY = {"canary_weight": "10%", "canary_bake_seconds": 8}


@pytest.mark.timeout(300)
def test_a_weighted_canary_takes_about_its_share_while_it_bakes_then_the_rest_follows(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    with RequestCounts(bed) as counts:
        rows, failure, seen = deploy_under_traffic(bed, fleet_file(bed, tmp_path, rollout=CANARY, health=WATCH), "v2")

    assert failure == "" and rows is not None and seen.failed == 0, (failure, seen.failures)
    (found,) = journals(tmp_path / "state")
    canary = found["records"][0]  # type: ignore[index]
    assert canary["name"] == "app-1" and canary["baked_at"] is not None
    # Measured from HAProxy's own counters, from half a second after the canary took traffic to the bake's end.
    taken = counts.between(canary["enabled_at"] + 0.5, canary["baked_at"])
    share = taken["app-1"] / sum(taken.values())
    assert abs(share - 0.10) < 0.04, taken
    assert weights(bed) == {"app-1": "1", "app-2": "1", "app-3": "1"}  # every weight back
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    assert set(observe(bed).images.values()) == {v2}


@pytest.mark.timeout(300)
def test_a_bad_weighted_canary_is_rolled_back_before_the_rest_is_touched(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    push_half_failing(bed, tmp_path / "context")
    before = observe(bed)
    health = {**WATCH, "min_requests": 5}
    rows, failure, _ = deploy_under_traffic(bed, fleet_file(bed, tmp_path, rollout=CANARY, health=health), "errors")

    assert rows is None and "failed on instance app-1 at step bake" in failure and "with 5xx" in failure
    after = observe(bed)
    assert after.images == before.images and after.compose == before.compose  # app-1 back on v1
    assert {n: after.containers[n] for n in ("app-2", "app-3")} == {n: before.containers[n] for n in ("app-2", "app-3")}
    assert set(after.lb.values()) == {"UP"} and after.locks == ()
    assert weights(bed) == {"app-1": "1", "app-2": "1", "app-3": "1"}
