"""The test bed is real: instances, HAProxy, sshd, registry and the traffic
generator are the actual programs, observed from outside."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
import yaml

from compose_rollout.config import load_fleet
from compose_rollout.hosts import commands
from compose_rollout.testbed import HaproxyAdmin, Testbed
from compose_rollout.testbed import registry as registry_config
from compose_rollout.testbed.capacity import CapacitySampler
from compose_rollout.testbed.traffic import Traffic, check_loopback_url

pytestmark = pytest.mark.fleet


def _get(url: str, timeout: float = 5.0) -> requests.Response:
    # trust_env=False: loopback traffic must never go through a proxy from the environment.
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=timeout)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _ssh(bed: Testbed, name: str) -> paramiko.SSHClient:
    instance = bed.instance(name)
    client = paramiko.SSHClient()
    client.load_host_keys(str(bed.known_hosts_file))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        instance.address,
        port=instance.ssh_port,
        username="root",
        key_filename=str(bed.ssh_key_file),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
        banner_timeout=5,
        auth_timeout=5,
    )
    return client


def _run_ssh(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, stdout, _ = client.exec_command(command, timeout=30)
    output = stdout.read().decode()
    return stdout.channel.recv_exit_status(), output


@pytest.mark.timeout(240)
def test_every_instance_serves_v1_on_its_own_address(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    v1 = bed.image_id(f"{bed.image_repository}:v1")
    assert v1 != bed.image_id(f"{bed.image_repository}:v2")
    for instance in bed.instances:
        base = f"http://{instance.address}:8080"
        assert _get(base + "/").text.strip() == "v1"
        health = _get(instance.health_url)
        assert (health.status_code, health.text.strip()) == (200, "ok")
        assert _get(base + "/cgi-bin/whoami").text.strip() == instance.name
        assert _get(base + "/instance").text.strip() == instance.name
        slow = _get(base + "/cgi-bin/slow?1")
        assert (slow.status_code, slow.text.strip()) == (200, "v1")
        assert bed.running_image(instance.name) == v1
        assert f"image: {bed.image_repository}:v1" in instance.compose_file.read_text()
        assert instance.compose_file == instance.project_directory / "docker-compose.yml"


@pytest.mark.timeout(120)
def test_haproxy_reports_every_server_up_on_both_admin_sockets(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    states = bed.haproxy_server_states()
    assert {name: row["status"] for name, row in states.items()} == {i.lb_server: "UP" for i in bed.instances}
    servers = bed.haproxy_servers_state()
    assert {row["srv_admin_state"] for row in servers.values()} == {"0"}
    unix = HaproxyAdmin(str(bed.lb_admin_unix_socket)).server_stats(bed.lb_backend)
    assert {name: row["status"] for name, row in unix.items()} == {i.lb_server: "UP" for i in bed.instances}


@pytest.mark.timeout(120)
def test_traffic_through_the_load_balancer_has_no_failures(fresh_fleet: Testbed, tmp_path: Path) -> None:
    out = tmp_path / "traffic.json"
    traffic = Traffic(fresh_fleet.lb_url, duration_seconds=3, slow_seconds=1, slow_workers=2, out=out)
    traffic.start()
    result = traffic.wait()
    assert result.failed == 0, result.failures
    assert result.fast_ok > 20 and result.slow_ok >= 2
    assert set(result.versions) == {"v1"}
    assert sum(second["ok"] for second in result.per_second) == result.total
    assert json.loads(out.read_text())["total"] == result.total


@pytest.mark.timeout(60)
def test_traffic_stop_lets_slow_requests_finish(fresh_fleet: Testbed) -> None:
    traffic = Traffic(fresh_fleet.lb_url, duration_seconds=60, fast_workers=1, slow_workers=2, slow_seconds=2)
    traffic.start()
    result = traffic.stop()
    # The slow requests in flight at SIGTERM completed instead of being cut off.
    assert result.failed == 0, result.failures
    assert result.slow_ok >= 2


def test_traffic_refuses_non_loopback_targets() -> None:
    for url in ("http://10.0.0.1:80", "http://example.com", "https://127.0.0.1:1"):
        with pytest.raises(ValueError, match=r"loopback|must be http://"):
            check_loopback_url(url)
    assert check_loopback_url("http://127.0.0.1:18080/") == "http://127.0.0.1:18080"


@pytest.mark.timeout(120)
def test_ssh_with_known_hosts_and_reject_policy_runs_docker(fresh_fleet: Testbed, tmp_path: Path) -> None:
    bed = fresh_fleet
    for instance in bed.instances:
        with _ssh(bed, instance.name) as client:
            code, output = _run_ssh(
                client,
                f"docker ps --filter label=com.docker.compose.project={instance.name} --format '{{{{.Names}}}}'",
            )
            assert code == 0
            # The project's one container (Compose numbers them: after a surge the survivor is _2, _3, ...).
            (name,) = output.split()
            assert re.fullmatch(rf"{instance.name}_server_[0-9]+", name), output
    # The host keys really are checked: an empty known_hosts is refused.
    client = paramiko.SSHClient()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    client.load_host_keys(str(empty))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException):
        client.connect(
            bed.instances[0].address,
            port=bed.instances[0].ssh_port,
            username="root",
            key_filename=str(bed.ssh_key_file),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()


@pytest.mark.timeout(120)
def test_stopped_sshd_is_a_host_down_until_started_again(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    bed.stop_sshd("app-2")
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        _ssh(bed, "app-2")
    # The other hosts are unaffected.
    _ssh(bed, "app-1").close()
    bed.start_sshd("app-2")
    with _ssh(bed, "app-2") as client:
        assert _run_ssh(client, "true")[0] == 0


@pytest.mark.timeout(120)
def test_drain_takes_a_server_out_of_rotation_until_ready(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    whoami = bed.lb_url + "/cgi-bin/whoami"
    bed.set_server_state("app-1", "drain")
    assert bed.haproxy_server_states()["app-1"]["status"] == "DRAIN"
    assert bed.haproxy_servers_state()["app-1"]["srv_admin_state"] == "8"
    seen = Counter(_get(whoami).text.strip() for _ in range(30))
    assert "app-1" not in seen
    assert set(seen) == {"app-2", "app-3"}

    bed.haproxy_command("set server app/app-1 state ready")
    assert bed.haproxy_server_states()["app-1"]["status"] == "UP"
    seen = Counter(_get(whoami).text.strip() for _ in range(30))
    assert set(seen) == {"app-1", "app-2", "app-3"}


@pytest.mark.timeout(120)
def test_drained_server_keeps_its_in_flight_request(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    # Only app-1 in rotation, so the slow request surely lands there.
    bed.set_server_state("app-2", "maint")
    bed.set_server_state("app-3", "maint")
    answer: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: answer.update(r=_get(bed.lb_url + "/cgi-bin/slow?2", timeout=15)))
    thread.start()
    try:
        _wait(lambda: bed.haproxy_server_states()["app-1"]["scur"] == "1", 5, "the slow request on app-1")
        bed.set_server_state("app-1", "drain")
        row = bed.haproxy_server_states()["app-1"]
        assert (row["status"], row["scur"]) == ("DRAIN", "1")
    finally:
        thread.join(15)
    assert answer["r"].status_code == 200
    _wait(lambda: bed.haproxy_server_states()["app-1"]["scur"] == "0", 5, "app-1 to have no session")


@pytest.mark.timeout(180)
def test_reset_undoes_a_broken_rollout_and_a_registry_outage(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    instance = bed.instance("app-3")
    original = instance.compose_file.read_text()
    instance.compose_file.write_text(original.replace("demo/app:v1", "demo/app:v2"))
    bed.compose("app-3", "up", "-d")  # how long a recreate takes is measured in bench/, not here
    assert bed.running_image("app-3") == bed.image_id(f"{bed.image_repository}:v2")
    _wait(lambda: _get(f"http://{instance.address}:8080/").text.strip() == "v2", 10, "app-3 to serve v2")

    instance.compose_file.write_text(original.replace("demo/app:v1", "demo/app:broken"))
    bed.compose("app-3", "up", "-d")
    _wait(lambda: _get(f"http://{instance.address}:8080/").text.strip() == "broken", 10, "app-3 to serve broken")
    assert _get(instance.health_url).status_code == 404
    _wait(lambda: bed.haproxy_server_states()["app-3"]["status"] == "DOWN", 10, "HAProxy to mark app-3 DOWN")

    bed.stop_registry()
    with pytest.raises(requests.ConnectionError):
        _get(f"http://{bed.registry}/v2/")

    bed.reset()
    assert instance.compose_file.read_text() == original
    assert bed.running_image("app-3") == bed.image_id(f"{bed.image_repository}:v1")
    assert {row["status"] for row in bed.haproxy_server_states().values()} == {"UP"}
    tags = _get(f"http://{bed.registry}/v2/demo/app/tags/list").json()["tags"]
    assert {"broken", "v1", "v2"} <= set(tags)  # other tests push variants; these must be back


@pytest.mark.timeout(240)
def test_a_port_range_takes_a_second_container_beside_and_reset_undoes_a_half_done_surge(
    fresh_fleet: Testbed,
) -> None:
    """What the surge strategy does by hand, as far as the bed must support and undo it:
    Compose starts a second container on the other port of the range, HAProxy takes it
    as an added server (counted by the CapacitySampler), another server is re-addressed."""
    bed = fresh_fleet
    fixed = {i.name: i.compose_file.read_text() for i in bed.instances}
    bed.publish_port_range()
    for instance in bed.instances:
        mapping = f'"{instance.address}:8080-8081:8080"'
        assert instance.compose_file.read_text() == fixed[instance.name].replace(
            f'"{instance.address}:8080:8080"', mapping
        )
        assert bed.published_port(instance.name) == 8080

    app1 = bed.instance("app-1")
    old = bed.container_id("app-1")
    bed.compose("app-1", "up", "-d", "--no-deps", "--no-recreate", "--scale", "server=2", "server")
    containers = bed.project_containers("app-1")
    assert len(containers) == 2 and containers[0]["Id"].startswith(old)  # the old one kept
    assert [c["State"]["Running"] for c in containers] == [True, True]
    second = containers[1]["NetworkSettings"]["Ports"]["8080/tcp"][0]
    assert (second["HostIp"], second["HostPort"]) == (app1.address, "8081")
    _wait(lambda: _get(f"http://{app1.address}:8081/health").status_code == 200, 10, "the second container")
    with CapacitySampler(bed.admin.server_stats, bed.lb_backend) as capacity:
        answer = bed.haproxy_command(f"add server app/app-1-surge {app1.address}:8081 check inter 500 rise 2 fall 2")
        assert answer.strip() == "New server registered."
        assert bed.haproxy_server_states()["app-1-surge"]["status"] == "MAINT"  # added servers start there
        bed.haproxy_command("set server app/app-1-surge state ready")
        bed.haproxy_command("enable health app/app-1-surge")
        _wait(lambda: bed.haproxy_server_states()["app-1-surge"]["status"] == "UP", 10, "app-1-surge UP")
        _wait(lambda: capacity.maximum == 4, 5, "the sampler to see four servers taking requests")
    assert capacity.minimum == 3 and capacity.seconds_below(3) == 0
    bed.admin.set_server_address(bed.lb_backend, "app-2", "127.0.1.3", 8081)  # nothing listens there
    assert bed.haproxy_server_addresses()["app-2"] == ("127.0.1.3", 8081)

    bed.reset()
    assert {i.name: i.compose_file.read_text() for i in bed.instances} == fixed
    assert {i.name: len(bed.project_containers(i.name)) for i in bed.instances} == {i.name: 1 for i in bed.instances}
    assert {i.name: bed.published_port(i.name) for i in bed.instances} == {i.name: 8080 for i in bed.instances}
    assert bed.haproxy_server_addresses() == {i.lb_server: (i.address, 8080) for i in bed.instances}  # no -surge
    assert {row["status"] for row in bed.haproxy_server_states().values()} == {"UP"}


@pytest.mark.timeout(120)
def test_a_host_that_cannot_pull_fails_its_pulls_and_gets_no_new_image_until_reset(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    v2 = f"{bed.image_repository}:v2"
    pull = shlex.join(commands.with_timeout(commands.image_pull(v2), 60)) + " 2>&1"  # as a rollout pulls
    bed.break_pulls("app-2")
    # An image that reaches the shared engine afterwards (as another host's pull would bring it).
    fresh = f"{bed.image_repository}:fresh"
    build = ["docker", "build", "-q", "-t", fresh, "-"]
    dockerfile = f"FROM {v2}\nLABEL fresh={time.time_ns()}\n"
    legacy = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the 28.x client has no buildx plugin here
    subprocess.run(build, input=dockerfile, text=True, capture_output=True, timeout=60, check=True, env=legacy)
    try:
        with _ssh(bed, "app-2") as client:
            code, output = _run_ssh(client, pull)
            assert code == 1 and "pull access denied for " + bed.image_repository in output, output
            assert _run_ssh(client, shlex.join(commands.image_id(v2))) == (0, bed.tag_image_id("v2") + "\n")
            assert _run_ssh(client, shlex.join(commands.image_id(fresh)) + " 2>&1") == (
                1,
                f"Error: No such image: {fresh}\n",
            )
        for other in ("app-1", "app-3"):
            with _ssh(bed, other) as client:
                assert _run_ssh(client, pull)[0] == 0
                assert _run_ssh(client, shlex.join(commands.image_id(fresh)))[0] == 0

        bed.reset()
        with _ssh(bed, "app-2") as client:
            code, output = _run_ssh(client, pull)
            assert code == 0, output
            assert _run_ssh(client, shlex.join(commands.image_id(fresh)))[0] == 0
    finally:
        subprocess.run(["docker", "rmi", fresh], capture_output=True, timeout=60, check=True)


@pytest.mark.timeout(60)
def test_reset_of_an_untouched_bed_touches_nothing(fresh_fleet: Testbed) -> None:
    bed = fresh_fleet
    containers = {i.name: bed.container_id(i.name) for i in bed.instances}
    composes = {i.name: i.compose_file.stat().st_mtime_ns for i in bed.instances}
    bed.reset()
    assert {i.name: bed.container_id(i.name) for i in bed.instances} == containers  # nothing recreated
    assert {i.name: i.compose_file.stat().st_mtime_ns for i in bed.instances} == composes  # nothing rewritten


@pytest.mark.timeout(60)
def test_fleet_file_describes_the_bed(testbed: Testbed, tmp_path: Path) -> None:
    path = testbed.fleet_file(tmp_path / "fleet.yml", rollout={"batch_size": 2}, health={"timeout_seconds": 10})
    document = yaml.safe_load(path.read_text())
    assert document["load_balancer"] == {
        "kind": "haproxy",
        "admin_address": "tcp://127.0.0.1:19999",
        "backend": "app",
        "surge_check": {"inter_ms": 500, "rise": 2, "fall": 2},
    }
    assert document["rollout"] == {"batch_size": 2}
    assert [i["host"] for i in document["instances"]] == ["127.0.1.2", "127.0.1.3", "127.0.1.4"]
    assert document["instances"][0]["project_directory"] == str(testbed.instances[0].project_directory)
    fleet = load_fleet(path)
    assert [instance.name for instance in fleet.instances] == ["app-1", "app-2", "app-3"]
    assert fleet.rollout.batch_size == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A loopback HTTP server collecting the registry's notification events."""
    events: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            events.extend(json.loads(body)["events"])
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events", events
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(120)
def test_registry_notification_config_delivers_push_events(
    testbed: Testbed, tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, events = webhook
    port = _free_port()
    config = tmp_path / "config.yml"
    config.write_text(registry_config.render_config(port=port, storage=tmp_path / "storage", notify_url=url))
    with open(tmp_path / "registry.log", "wb") as log:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    ref = f"127.0.0.1:{port}/demo/app:notify"
    try:
        _wait(lambda: _status(f"http://127.0.0.1:{port}/v2/") == 200, 20, "the second registry")
        subprocess.run(["docker", "tag", f"{testbed.image_repository}:v1", ref], check=True, timeout=30)
        subprocess.run(["docker", "push", ref], check=True, timeout=60, capture_output=True)
        _wait(
            lambda: any(e["action"] == "push" and e["target"].get("tag") == "notify" for e in events),
            20,
            "a push event for the tag",
        )
    finally:
        process.terminate()
        process.wait(10)
        subprocess.run(["docker", "rmi", ref], timeout=30, capture_output=True)


def _status(url: str) -> int | None:
    try:
        return _get(url, timeout=1).status_code
    except requests.RequestException:
        return None
