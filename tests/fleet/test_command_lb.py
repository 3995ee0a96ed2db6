"""`load_balancer.kind: command` on the real test bed: the fleet owner's commands drive
the bed's HAProxy through `socat` and its admin socket, as they would an F5 or a homemade
LB, and a rolling deploy under traffic keeps every request. The commands know the server
only from $ROLLOUT_SERVER; what they print is held to the contract at every call.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose_rollout.testbed import Testbed
from tests.ci import unavailable
from tests.fleet.inflight import SlowRequests
from tests.fleet.test_faults import push_variant
from tests.fleet.test_rollout import deploy_under_traffic, fleet_file, observe

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]


def haproxy_commands(bed: Testbed, log: Path) -> dict[str, str]:
    """The `command` settings a person would write for this HAProxy: each action one admin
    command through socat, whose answer (HAProxy says nothing on success) makes it fail."""
    if shutil.which("socat") is None:
        unavailable("the command LB test drives HAProxy with socat, which is not installed")
    admin = f"socat -t2 - TCP:{bed.lb_admin_address.removeprefix('tcp://')}"
    backend = bed.lb_backend
    noted = f"printf '%s %s\\n' \"$ROLLOUT_ACTION\" \"$ROLLOUT_SERVER\" >> '{log}'; "

    def act(cli: str) -> str:
        return (
            f'{noted}answer=$(echo "{cli}" | {admin}) || exit 1; '
            'if [ -n "$answer" ]; then echo "HAProxy: $answer" >&2; exit 1; fi'
        )

    server = f"{backend}/$ROLLOUT_SERVER"
    return {
        "kind": "command",
        "drain": act(f"set server {server} state drain"),
        "ready": act(f"set server {server} state ready"),
        "recheck": act(f"set server {server} health down"),
        "shutdown_sessions": act(f"shutdown sessions server {server}"),
        # `show stat` CSV: pxname, svname, qcur, qmax, scur (sessions now).
        "in_flight": (
            f'echo "show stat" | {admin} | awk -F, \'$1 == "{backend}" && $2 == ENVIRON["ROLLOUT_SERVER"] '
            "{ print $5; found = 1 } END { if (!found) exit 1 }'"
        ),
        # `show servers state`: srv_op_state 2 is running; srv_admin_state bits 0x08|0x10 are
        # drain, 0x01|0x02|0x20 maintenance (mawk has no bitwise operators, hence the division).
        "state": (
            f'echo "show servers state {backend}" | {admin} | awk \''
            "/^#/ { for (i = 2; i <= NF; i++) column[$i] = i - 1; next } "
            '"srv_name" in column && $column["srv_name"] == ENVIRON["ROLLOUT_SERVER"] '
            '{ op = $column["srv_op_state"]; adm = $column["srv_admin_state"]; found = 1 } '
            'END { if (!found) { print "absent"; exit 0 } '
            'out = (adm % 4 || int(adm / 8) % 4 || int(adm / 32) % 2) ? "drained" : "ready"; '
            'print out, (op == 2 ? "up" : "down") }\''
        ),
    }


def command_fleet(bed: Testbed, tmp_path: Path, log: Path, **overrides: Any) -> str:
    """The bed's fleet file with its `load_balancer` section replaced (bed.fleet_file merges
    overrides into the haproxy section, whose keys a command section refuses)."""
    path = Path(fleet_file(bed, tmp_path, **overrides))
    document = yaml.safe_load(path.read_text())
    document["load_balancer"] = haproxy_commands(bed, log)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


def actions(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.timeout(300)
def test_commands_through_socat_roll_the_fleet_to_v2_without_a_failed_request(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    log = tmp_path / "actions.log"
    slow = SlowRequests(bed, 10)  # one in flight on every instance as the run starts, for certain
    rows, failure, seen = deploy_under_traffic(bed, command_fleet(bed, tmp_path, log), "v2")

    assert failure == "" and rows is not None
    assert [row["result"] for row in rows] == ["updated"] * 3
    v2 = bed.image_id(f"{bed.image_repository}:v2")
    after = observe(bed)
    assert after.images == {i.name: v2 for i in bed.instances}
    assert set(after.lb.values()) == {"UP"}  # every server back in rotation, health UP
    assert {state["srv_admin_state"] for state in bed.haproxy_servers_state().values()} == {"0"}
    assert seen.failed == 0, seen.failures
    assert seen.slow_ok > 0 and seen.slow_failed == 0
    # `in_flight` counted the slow request in flight at app-1's drain, and the wait let it finish.
    assert int(rows[0]["sessions at drain"]) > 0  # type: ignore[call-overload]
    assert set(slow.codes()) == {200}
    assert all(float(str(row["seconds out of rotation"])) > 0 for row in rows)
    # Each server in turn: drained, re-checked after `up`, put back; by name, in order.
    assert actions(log) == [f"{action} {i.name}" for i in bed.instances for action in ("drain", "recheck", "ready")]


@pytest.mark.timeout(300)
def test_a_crashing_image_rolls_back_through_the_commands_leaving_compose_files_byte_identical(
    fresh_fleet: Testbed, tmp_path: Path
) -> None:
    bed = fresh_fleet
    push_variant(bed, "crashes", 'CMD ["/bin/sh", "-c", "httpd -p 8080 -h /www; sleep 1; exit 3"]')
    before = observe(bed)
    log = tmp_path / "actions.log"
    health = {"timeout_seconds": 8, "consecutive_successes": 3, "interval_seconds": 0.5, "stabilization_seconds": 2}
    rows, failure, seen = deploy_under_traffic(bed, command_fleet(bed, tmp_path, log, health=health), "crashes")

    assert rows is None
    assert "instance app-1" in failure and "await-healthy" in failure and "Rolled back app-1" in failure
    after = observe(bed)
    assert after.images == before.images  # every instance on v1 again
    assert after.compose == before.compose  # byte for byte
    assert set(after.lb.values()) == {"UP"}
    assert {state["srv_admin_state"] for state in bed.haproxy_servers_state().values()} == {"0"}
    assert seen.failed == 0, seen.failures
    # app-1 was drained, re-checked after the failed `up` and the rollback's, and put back.
    assert actions(log) == ["drain app-1", "recheck app-1", "recheck app-1", "ready app-1"]
