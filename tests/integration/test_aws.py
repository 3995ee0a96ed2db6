"""The aws adapter against moto in server mode: boto3's calls go over HTTP to a moto
server on 127.0.0.1 (no cloud is reachable here, and nothing is mocked in-process).

The adapter talks to moto through `AwsFront`, a small HTTP server of ours on 127.0.0.1
that forwards each request to moto and records it (the call sequence), or answers it
with ELBv2's own `Throttling` error. The VPC, subnets, EC2 instances, target groups and
load balancers are built in moto with boto3, straight to moto.

What moto decides, read from moto/elbv2/models.py (moto 5.2): a registered target is
`healthy` at once unless it is an EC2 instance that is `stopped` (then `unused`,
`Target.InvalidState`); a deregistered one is `unused` (`Target.NotRegistered`) at once,
with no deregistration delay; only a registered instance that is terminated shows
`draining` (and keeps it). moto never reports `initial` or `unhealthy` and runs no
health check. So "AWS holds the target draining while requests finish" is shown with a
terminated instance, and "not healthy yet" with an instance stopped right after it is
registered. moto also keeps one target per id where AWS keeps one per id and port:
registering `i-0abc:8081` replaces `i-0abc:8080`, and asked about one it answers for the
other. The surge tests (a second target at the same id) therefore ask the front to give
moto each id and port as an id of its own (`ports_apart`), which is what AWS does. This
adapter has not been run against real AWS in these tests.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from compose_rollout import procedure
from compose_rollout.config import Fleet
from compose_rollout.context import Context
from compose_rollout.errors import LoadBalancerError, WaitTimeout
from compose_rollout.lb import adapters
from compose_rollout.lb.aws import AwsTargetGroup
from compose_rollout.lb.base import SURGE_NEEDS, AddsServers
from compose_rollout.lb.settings import AwsSettings
from compose_rollout.state.journal import InstanceRecord, Ledger
from tests.unit.fakes import FakeHost

REGION = "eu-west-1"
PORT = 8080
# ELBv2's throttling answer (query protocol): HTTP 400 with this body.
THROTTLING = b"""<ErrorResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/">
  <Error>
    <Type>Sender</Type>
    <Code>Throttling</Code>
    <Message>Rate exceeded</Message>
  </Error>
  <RequestId>9b6e3ab2-6f2c-4f4e-8d8c-0d5f0c6a1e27</RequestId>
</ErrorResponse>
"""


@dataclass(frozen=True)
class Call:
    """One elbv2 request as it reached the front."""

    action: str
    group: str
    targets: tuple[str, ...]  # TARGET:PORT
    throttled: bool


# The target id moto is given in `ports_apart` mode, and its way back in moto's answers.
APART = "@"
APART_ID_RE = re.compile(rb"<Id>([^<@]+)@[0-9]+</Id>")


class AwsFront:
    """An HTTP server on 127.0.0.1 in front of moto: it records each request and forwards
    it, or answers it with `Throttling` while `throttle[action]` is above zero. `after`
    runs once moto has answered a forwarded request, before the adapter gets the answer.
    With `ports_apart`, each target `ID:PORT` reaches moto as the id `ID@PORT` (and comes
    back as `ID`), so moto keeps a target per id and port, as AWS does."""

    def __init__(self, upstream: str) -> None:
        self.calls: list[Call] = []
        self.throttle: dict[str, int] = {}
        self.ports_apart = False
        self.after: Callable[[Call, int], None] = lambda call, index: None
        target = urlsplit(upstream)
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                params = {key: values[0] for key, values in parse_qs(body.decode()).items()}
                throttled = front.throttle.get(params.get("Action", ""), 0) > 0
                call = Call(params.get("Action", ""), params.get("TargetGroupArn", ""), _targets(params), throttled)
                front.calls.append(call)
                if throttled:
                    front.throttle[call.action] -= 1
                    self._answer(400, "text/xml", THROTTLING)
                    return
                if front.ports_apart:
                    body = _ports_apart(params)
                upstream = http.client.HTTPConnection(str(target.hostname), target.port, timeout=10)
                try:
                    skip = ("connection", "keep-alive", "content-length")
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                    upstream.request("POST", self.path, body, headers)
                    reply = upstream.getresponse()
                    status, kind, data = reply.status, reply.getheader("Content-Type", "text/xml"), reply.read()
                finally:
                    upstream.close()
                if front.ports_apart:
                    data = APART_ID_RE.sub(rb"<Id>\1</Id>", data)
                front.after(call, len(front.calls) - 1)
                self._answer(status, kind, data)

            def _answer(self, status: int, kind: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def actions(self) -> list[str]:
        return [call.action for call in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def _targets(params: dict[str, str]) -> tuple[str, ...]:
    found = []
    for n in range(1, 100):
        target_id = params.get(f"Targets.member.{n}.Id")
        if target_id is None:
            break
        port = params.get(f"Targets.member.{n}.Port", "")
        found.append(f"[{target_id}]:{port}" if ":" in target_id else f"{target_id}:{port}")
    return tuple(found)


def _ports_apart(params: dict[str, str]) -> bytes:
    """The request with each target's id made `ID@PORT` (every target the adapter names has a port)."""
    apart = dict(params)
    for key, value in params.items():
        if key.startswith("Targets.member.") and key.endswith(".Id"):
            apart[key] = f"{value}{APART}{params[key[: -len('Id')] + 'Port']}"
    return urlencode(apart).encode()


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials from the environment (boto3's chain); nothing of the developer's
    own AWS set-up (profiles, files, instance role, proxies) takes part."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class World:
    """What moto holds for one test: an ALB whose target group has two EC2 instances."""

    url: str
    ec2: Any
    elbv2: Any
    vpc: str
    subnets: list[str]
    arn: str
    instances: list[str]
    servers: list[str] = field(default_factory=list)  # TARGET:PORT, the instances' lb_server

    def registered(self, arn: str | None = None) -> set[str]:
        """The targets moto holds healthy (registered), asked directly (an id the front
        gave moto as `ID@PORT` read as `ID`)."""
        found = self.elbv2.describe_target_health(TargetGroupArn=arn or self.arn)["TargetHealthDescriptions"]
        return {
            f"{d['Target']['Id'].split(APART)[0]}:{d['Target']['Port']}"
            for d in found
            if d["TargetHealth"]["State"] == "healthy"
        }


@pytest.fixture
def world(moto_url: str) -> World:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=moto_url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{n}.0/24", AvailabilityZone=f"{REGION}{zone}")["Subnet"][
            "SubnetId"
        ]
        for n, zone in ((1, "a"), (2, "b"))
    ]
    launched = ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2, SubnetId=subnets[0])
    instances = [instance["InstanceId"] for instance in launched["Instances"]]
    group = elbv2.create_target_group(
        Name="app", Protocol="HTTP", Port=PORT, VpcId=vpc, TargetType="instance", HealthCheckPath="/health"
    )["TargetGroups"][0]["TargetGroupArn"]
    alb = elbv2.create_load_balancer(Name="app", Subnets=subnets, Type="application")["LoadBalancers"][0]
    elbv2.create_listener(
        LoadBalancerArn=alb["LoadBalancerArn"],
        Protocol="HTTP",
        Port=80,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": group}],
    )
    elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": i, "Port": PORT} for i in instances])
    return World(moto_url, ec2, elbv2, vpc, subnets, group, instances, [f"{i}:{PORT}" for i in instances])


@pytest.fixture
def front(world: World) -> Iterator[AwsFront]:
    proxy = AwsFront(world.url)
    try:
        yield proxy
    finally:
        proxy.close()


def settings(world: World, endpoint_url: str, **overrides: Any) -> AwsSettings:
    values: dict[str, Any] = {
        "kind": "aws",
        "region": REGION,
        "target_group_arn": world.arn,
        "endpoint_url": endpoint_url,
        "timeout_seconds": 5,
        "healthy_timeout_seconds": 5,
        "poll_interval_seconds": 0.1,
        "max_attempts": 3,
    }
    return AwsSettings(**{**values, **overrides})


def target_group(world: World, front: AwsFront, **overrides: Any) -> AwsTargetGroup:
    return AwsTargetGroup(settings(world, front.url, **overrides))


# --- what the group looks like --------------------------------------------------------


def test_servers_are_the_group_s_targets_by_target_and_port(world: World, front: AwsFront) -> None:
    lb = target_group(world, front)
    servers = lb.servers()
    assert sorted(servers) == sorted(world.servers)
    for view in servers.values():
        assert (view.up, view.in_rotation, view.drained, view.sessions) == (True, True, False, 0)
        assert view.describe() == "AWS target health healthy"
    assert world.arn in lb.backend
    assert front.calls == [Call("DescribeTargetHealth", world.arn, (), False)]


# --- drain ------------------------------------------------------------------------------


def test_drain_deregisters_only_that_target_and_it_leaves_rotation(world: World, front: AwsFront) -> None:
    lb = target_group(world, front)
    drained, other = world.servers
    lb.set_state(drained, "drain")
    view = lb.server(drained)
    assert (view.drained, view.in_rotation, view.up, view.sessions) == (True, False, None, 0)
    assert (view.state, view.reason) == ("unused", "Target.NotRegistered")
    assert world.registered() == {other}  # as moto itself says, asked directly
    assert sorted(lb.servers()) == [other]
    lb.set_state(drained, "drain")  # a repeated drain (a retried step, a rollback) sends nothing more
    assert front.actions().count("DeregisterTargets") == 1


def test_a_target_aws_holds_draining_counts_as_in_flight_until_it_leaves(world: World, front: AwsFront) -> None:
    """moto's only `draining` target is a registered instance that was terminated (moto has
    no deregistration delay: a deregistered target is `unused` at once)."""
    lb = target_group(world, front)
    leaving = world.servers[1]
    world.ec2.terminate_instances(InstanceIds=[world.instances[1]])
    view = lb.server(leaving)
    assert (view.state, view.reason) == ("draining", "Target.DeregistrationInProgress")
    assert (view.drained, view.in_rotation, view.up, view.sessions) == (True, False, None, 1)
    lb.set_state(leaving, "drain")
    assert "DeregisterTargets" not in front.actions()  # already leaving: nothing to ask

    the_fleet = fleet(world, front, rollout={"drain_timeout_seconds": 0.5})
    ctx = Context(fleet=the_fleet, hosts={}, lb=lb)
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        procedure.wait_for_sessions(ctx, the_fleet.instances[1], ledger(the_fleet))
    assert time.monotonic() - started < 5
    assert f"{leaving} to finish its sessions" in str(caught.value)
    assert "last seen: AWS target health draining (Target.DeregistrationInProgress" in str(caught.value)


# --- ready ------------------------------------------------------------------------------


def test_ready_registers_and_returns_once_aws_reports_healthy(world: World, front: AwsFront) -> None:
    """Right after RegisterTargets the instance is stopped (moto: `unused`,
    `Target.InvalidState`); after AWS has said so three times it is started again."""
    lb = target_group(world, front)
    server, instance = world.servers[0], world.instances[0]
    lb.set_state(server, "drain")
    since_register: list[int] = []

    def instance_stops_then_comes_back(call: Call, index: int) -> None:
        if call.action == "RegisterTargets":
            world.ec2.stop_instances(InstanceIds=[instance])
            since_register.append(index)
        elif since_register and call.action == "DescribeTargetHealth" and index - since_register[0] == 3:
            world.ec2.start_instances(InstanceIds=[instance])

    front.after = instance_stops_then_comes_back
    started = time.monotonic()
    lb.set_state(server, "ready")
    assert time.monotonic() - started >= 3 * 0.1  # three polls saw it not healthy
    after = front.calls[since_register[0] :]
    assert [call.action for call in after] == ["RegisterTargets"] + ["DescribeTargetHealth"] * 4
    assert all(call.targets == (server,) for call in after)
    assert lb.server(server).in_rotation and world.registered() == set(world.servers)


def test_ready_never_healthy_fails_after_the_bounded_wait_naming_what_aws_said(world: World, front: AwsFront) -> None:
    """The instance stops right after it is registered again, and stays stopped."""
    lb = target_group(world, front, healthy_timeout_seconds=1, poll_interval_seconds=0.2)
    server, instance = world.servers[0], world.instances[0]
    lb.set_state(server, "drain")
    front.after = lambda call, index: (
        world.ec2.stop_instances(InstanceIds=[instance]) if call.action == "RegisterTargets" else None
    )
    started = time.monotonic()
    with pytest.raises(LoadBalancerError) as caught:
        lb.set_state(server, "ready")
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 5
    message = str(caught.value)
    assert world.arn in message and f"target {server} was not healthy 1 s after RegisterTargets" in message
    assert "AWS last reported AWS target health unused (Target.InvalidState: Target is in the stopped state)" in (
        message
    )
    polls = front.actions().count("DescribeTargetHealth")
    assert 4 <= polls <= 10  # polled every 0.2 s for 1 s, then stopped


# --- the procedure's verbs, one instance's turn ----------------------------------------


def fleet(world: World, front: AwsFront, **overrides: Any) -> Fleet:
    return Fleet.model_validate(
        {
            "name": "demo",
            "image_repository": "registry.example/demo/app",
            "load_balancer": settings(world, front.url).model_dump(),
            "compose": {"command": "v2"},
            "instances": [
                {
                    "name": f"app-{n}",
                    "host": f"10.0.1.{n}",
                    "project_directory": f"/srv/app-{n}",
                    "lb_server": server,
                    "health_url": f"http://10.0.1.{n}:8080/health",
                }
                for n, server in enumerate(world.servers, start=1)
            ],
            **overrides,
        }
    )


def ledger(the_fleet: Fleet) -> Ledger:
    run = Ledger("demo", "run-1", "registry.example/demo/app:v2")
    for instance in the_fleet.instances:
        run.add(InstanceRecord(instance.name, instance.compose_path, "registry.example/demo/app:v1", "", b"", 0o644))
    return run


def test_one_instance_s_turn_makes_these_calls_in_this_order(world: World, front: AwsFront) -> None:
    """The procedure's own verbs (preflight, drain, wait for sessions, up, await LB up,
    enable) with the adapter `adapters.connect` picks for kind aws."""

    def no_ssh(host: str, port: int | None, user: str | None) -> Any:
        raise AssertionError("the aws adapter needs no SSH connection")

    the_fleet = fleet(world, front)
    lb, lb_host = adapters.connect(the_fleet.load_balancer, no_ssh, the_fleet.instances)
    assert isinstance(lb, AwsTargetGroup) and lb_host is None
    hosts = {instance.name: FakeHost(instance.name) for instance in the_fleet.instances}
    hosts["app-1"].on(["timeout"], lambda argv: "")  # `docker compose up`, under coreutils timeout
    ctx = Context(fleet=the_fleet, hosts=hosts, lb=lb)  # type: ignore[arg-type]
    run, instance = ledger(the_fleet), the_fleet.instances[0]

    procedure.preflight_lb(ctx)
    assert procedure.drain(ctx, instance, run) == 0
    assert procedure.wait_for_sessions(ctx, instance, run) == 0
    assert procedure.up(ctx, instance, run) is True  # deregistered: AWS checks it afresh once registered
    assert procedure.await_lb_up(ctx, instance) is False  # not registered: AWS cannot tell yet
    procedure.enable(ctx, instance, run)

    mine = (instance.lb_server,)
    assert front.calls == [
        Call("DescribeTargetHealth", world.arn, (), False),  # preflight: every target in rotation
        Call("DescribeTargetHealth", world.arn, mine, False),  # drain: still registered?
        Call("DeregisterTargets", world.arn, mine, False),
        Call("DescribeTargetHealth", world.arn, mine, False),  # drain: sessions at drain
        Call("DescribeTargetHealth", world.arn, mine, False),  # wait for sessions
        Call("DescribeTargetHealth", world.arn, mine, False),  # up: recheck
        Call("DescribeTargetHealth", world.arn, mine, False),  # await LB up
        Call("RegisterTargets", world.arn, mine, False),  # enable
        Call("DescribeTargetHealth", world.arn, mine, False),  # enable: healthy
    ]
    assert world.registered() == set(world.servers) and run["app-1"].drained is False


def test_a_target_never_healthy_fails_enable_and_stays_for_the_rollback(world: World, front: AwsFront) -> None:
    """`enable` fails, the journal still says drained, and the rollback's safety net
    (`release_all`) registers it again once the instance can serve."""
    the_fleet = fleet(world, front)
    lb = target_group(world, front, healthy_timeout_seconds=0.5)
    ctx = Context(fleet=the_fleet, hosts={}, lb=lb)
    run, instance = ledger(the_fleet), the_fleet.instances[0]
    procedure.drain(ctx, instance, run)
    front.after = lambda call, index: (
        world.ec2.stop_instances(InstanceIds=[world.instances[0]]) if call.action == "RegisterTargets" else None
    )
    with pytest.raises(LoadBalancerError, match=r"not healthy 0\.5 s after RegisterTargets"):
        procedure.enable(ctx, instance, run)
    assert run["app-1"].drained is True and not lb.server(instance.lb_server).in_rotation
    front.after = lambda call, index: None
    world.ec2.start_instances(InstanceIds=[world.instances[0]])
    assert procedure.release_all(ctx, run) == []
    assert run["app-1"].drained is False and lb.server(instance.lb_server).in_rotation


# --- errors -----------------------------------------------------------------------------


def test_an_unknown_target_group_is_refused_naming_the_arn_the_region_and_aws_s_message(
    world: World, front: AwsFront
) -> None:
    missing = world.arn[:-16] + "0123456789abcdef"
    lb = target_group(world, front, target_group_arn=missing)
    with pytest.raises(LoadBalancerError) as caught:
        lb.servers()
    message = str(caught.value)
    assert f"target group {missing} not found in region {REGION}" in message
    assert "TargetGroupNotFound: One or more target groups not found" in message
    assert front.actions() == ["DescribeTargetHealth"]  # not retried: a retry cannot find it


def test_throttling_is_retried_within_max_attempts(world: World, front: AwsFront) -> None:
    lb = target_group(world, front, max_attempts=3)
    front.throttle["DeregisterTargets"] = 2
    lb.set_state(world.servers[0], "drain")
    deregistrations = [call for call in front.calls if call.action == "DeregisterTargets"]
    assert [call.throttled for call in deregistrations] == [True, True, False]
    assert world.registered() == {world.servers[1]}


def test_throttling_beyond_max_attempts_fails_naming_the_call(world: World, front: AwsFront) -> None:
    lb = target_group(world, front, max_attempts=3)
    front.throttle["DescribeTargetHealth"] = 3
    with pytest.raises(LoadBalancerError) as caught:
        lb.servers()
    assert "DescribeTargetHealth failed after 3 attempts: Throttling: Rate exceeded" in str(caught.value)
    assert [call.throttled for call in front.calls] == [True, True, True]  # and no fourth attempt


def test_an_endpoint_that_refuses_connections_fails_naming_the_call(world: World) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again below: nothing listens there
    lb = AwsTargetGroup(settings(world, f"http://127.0.0.1:{port}", max_attempts=2))
    with pytest.raises(LoadBalancerError) as caught:
        lb.server(world.servers[0])
    message = str(caught.value)
    assert f"DescribeTargetHealth for target {world.servers[0]} failed (up to 2 attempts)" in message
    assert "EndpointConnectionError" in message


def test_an_endpoint_that_never_answers_is_bounded_by_the_timeout(world: World) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nobody reads or answers
        lb = AwsTargetGroup(settings(world, f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_seconds=0.5))
        started = time.monotonic()
        with pytest.raises(LoadBalancerError, match=r"DescribeTargetHealth failed .*ReadTimeoutError"):
            lb.servers()
        # three attempts of 0.5 s and botocore's backoff between them (at most 1 s, then 2 s)
        assert time.monotonic() - started < 3 * 0.5 + 3 + 1


def test_credentials_come_from_boto3_s_chain_and_their_absence_is_named(
    world: World, front: AwsFront, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    lb = target_group(world, front)
    with pytest.raises(LoadBalancerError, match=r"DescribeTargetHealth failed .*NoCredentialsError"):
        lb.servers()
    assert front.calls == []  # nothing was sent unsigned


# --- a Network Load Balancer with IP targets --------------------------------------------


def nlb_of_ips(world: World, *, ports_apart: bool = False) -> tuple[str, list[str]]:
    """A Network Load Balancer whose target group has two IP targets at PORT: its ARN and
    the targets. `ports_apart`: registered as the front's `ports_apart` gives moto ids."""
    group = world.elbv2.create_target_group(
        Name="tcp-app", Protocol="TCP", Port=PORT, VpcId=world.vpc, TargetType="ip"
    )["TargetGroups"][0]["TargetGroupArn"]
    nlb = world.elbv2.create_load_balancer(Name="tcp-app", Subnets=world.subnets, Type="network")
    world.elbv2.create_listener(
        LoadBalancerArn=nlb["LoadBalancers"][0]["LoadBalancerArn"],
        Protocol="TCP",
        Port=80,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": group}],
    )
    addresses = ["10.0.1.10", "10.0.1.11"]
    ids = [f"{a}{APART}{PORT}" if ports_apart else a for a in addresses]
    world.elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": i, "Port": PORT} for i in ids])
    return group, [f"{a}:{PORT}" for a in addresses]


def test_an_nlb_target_group_of_ip_targets_drains_and_comes_back(world: World, front: AwsFront) -> None:
    group, servers = nlb_of_ips(world)
    lb = target_group(world, front, target_group_arn=group)
    server = servers[0]
    assert sorted(lb.servers()) == servers
    lb.set_state(server, "drain")
    assert lb.server(server).drained and world.registered(group) == {servers[1]}
    lb.set_state(server, "ready")
    assert lb.server(server).in_rotation and world.registered(group) == set(servers)


# --- the surge strategy: adding, moving and removing targets ----------------------------


def surge_group(world: World, front: AwsFront) -> tuple[AwsTargetGroup, str, list[str]]:
    """An NLB of IP targets, moto keeping a target per id and port (`ports_apart`)."""
    front.ports_apart = True
    group, servers = nlb_of_ips(world, ports_apart=True)
    return target_group(world, front, target_group_arn=group), group, servers


def changes(front: AwsFront) -> list[Call]:
    return [call for call in front.calls if call.action in ("RegisterTargets", "DeregisterTargets")]


def test_a_surge_adds_a_drained_target_readies_it_and_moves_the_own_server_onto_it(
    world: World, front: AwsFront
) -> None:
    """The surge's calls in its order: add, ready, drain the own target, its sessions,
    move it onto the added one, remove what is left."""
    lb, group, (own, other) = surge_group(world, front)
    assert set(SURGE_NEEDS) <= lb.capabilities and isinstance(lb, AddsServers)
    assert lb.server_address(own) == ("10.0.1.10", PORT)
    assert lb.server_address("10.0.1.10:8081") == ("10.0.1.10", 8081)  # not registered: read from the name

    added = lb.add_server(f"{own}-surge", own, 8081)
    assert added == "10.0.1.10:8081"
    assert lb.add_server(f"{own}-surge", own, 8081) == added  # a repeated step
    assert changes(front) == []  # added drained: not registered
    listed = lb.servers()
    assert sorted(listed) == sorted([own, other, added])
    view = listed[added]
    assert (view.drained, view.in_rotation, view.up, view.sessions) == (True, False, None, 0)
    assert view.reason == "Target.NotRegistered"
    assert listed[own].in_rotation and world.registered(group) == {own, other}

    lb.set_state(added, "ready")
    assert world.registered(group) == {own, other, added}  # moto: healthy once registered
    assert lb.server(added).in_rotation and lb.servers()[added].in_rotation

    lb.set_state(own, "drain")
    assert lb.server(own).sessions == 0  # moto has no deregistration delay
    assert world.registered(group) == {other, added}

    assert lb.move_server(own, 8081) == added  # the own server is the added target from now on
    assert lb.move_server(own, 8081) == added  # a repeated step
    assert sorted(lb.servers()) == sorted([other, added])  # the old target is forgotten
    assert lb.server(added).in_rotation

    lb.remove_server(own)  # out of the group and forgotten: nothing to do
    lb.remove_server(own)
    assert sorted(lb.servers()) == sorted([other, added]) and world.registered(group) == {other, added}
    assert [(call.action, call.targets) for call in changes(front)] == [
        ("RegisterTargets", (added,)),
        ("DeregisterTargets", (own,)),
    ]


def test_a_drained_target_moved_to_a_port_aws_does_not_know_stays_drained_until_ready(
    world: World, front: AwsFront
) -> None:
    """As after `up` gave the container another port of the range, or a rollback moving
    the own server back to the old container."""
    lb, group, (own, other) = surge_group(world, front)
    lb.set_state(own, "drain")
    moved = lb.move_server(own, 8082)
    assert moved == "10.0.1.10:8082"
    assert lb.move_server(moved, 8082) == moved
    listed = lb.servers()
    assert sorted(listed) == sorted([other, moved]) and listed[moved].drained and not listed[moved].in_rotation
    assert world.registered(group) == {other}
    assert len(changes(front)) == 1  # the drain's DeregisterTargets only

    assert lb.move_server(moved, PORT) == own  # and back, still drained
    assert sorted(lb.servers()) == sorted([other, own]) and lb.servers()[own].drained
    lb.set_state(own, "ready")
    assert world.registered(group) == {own, other} and sorted(lb.servers()) == sorted([own, other])


def test_an_added_target_never_readied_is_removed_by_forgetting_it(world: World, front: AwsFront) -> None:
    """A new adapter (another process) does not list an unregistered added target: the
    run's journal keeps its name."""
    lb, group, (own, other) = surge_group(world, front)
    added = lb.add_server(f"{own}-surge", own, 8081)
    assert added in lb.servers()
    assert added not in target_group(world, front, target_group_arn=group).servers()
    lb.remove_server(added)
    lb.remove_server(added)
    lb.remove_server("10.0.1.10:8090")  # never known: nothing to do
    assert sorted(lb.servers()) == sorted([own, other])
    assert changes(front) == []


def test_a_registered_target_is_neither_moved_nor_removed(world: World, front: AwsFront) -> None:
    lb, group, (own, other) = surge_group(world, front)
    added = lb.add_server(f"{own}-surge", own, 8081)
    lb.set_state(added, "ready")
    with pytest.raises(LoadBalancerError) as caught:
        lb.move_server(own, 8081)
    message = str(caught.value)
    assert f"{group}: will not move target {own}: it is registered and takes new requests" in message
    assert "(AWS target health healthy); drain it first" in message
    for server in (own, added):
        with pytest.raises(LoadBalancerError, match=f"will not remove target {server}: it is registered"):
            lb.remove_server(server)
    assert world.registered(group) == {own, other, added} and sorted(lb.servers()) == sorted([own, other, added])
    assert [call.action for call in changes(front)] == ["RegisterTargets"]  # the ready only
    with pytest.raises(LoadBalancerError, match=f"cannot add a target beside {own} at its own port {PORT}"):
        lb.add_server(f"{own}-surge", own, PORT)


def test_a_target_still_draining_is_not_moved_and_is_let_go_on_remove(world: World, front: AwsFront) -> None:
    """moto's only `draining` target: a registered instance that was terminated."""
    lb = target_group(world, front)
    leaving = world.servers[1]
    world.ec2.terminate_instances(InstanceIds=[world.instances[1]])
    with pytest.raises(LoadBalancerError) as caught:
        lb.move_server(leaving, 8081)
    assert f"will not move target {leaving}: it is still draining, requests may be in flight" in str(caught.value)
    assert "wait for its sessions first" in str(caught.value)
    lb.remove_server(leaving)  # AWS ends the deregistration by itself
    assert changes(front) == []


def test_moto_s_one_target_per_id_is_refused_not_taken_for_the_target_asked(world: World, front: AwsFront) -> None:
    """Without `ports_apart`: asked about `i-...:8081`, moto answers for the registered
    `i-...:8080` (same id); the adapter names the mismatch rather than report the added
    target healthy."""
    lb = target_group(world, front)
    own = world.servers[0]
    added = lb.add_server(f"{own}-surge", own, 8081)
    with pytest.raises(LoadBalancerError) as caught:
        lb.servers()
    assert f"asked about target {added}, AWS described {own}" in str(caught.value)
    with pytest.raises(LoadBalancerError, match=f"asked about target {added}, AWS described {own}"):
        lb.server(added)
    assert changes(front) == []
