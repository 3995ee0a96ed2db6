"""The test bed: a real fleet of Compose instances behind a real HAProxy, a
real registry and one real sshd per instance, all on this machine."""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from . import compose, haproxy, image, registry, sshd
from ._util import (
    Daemon,
    TestbedError,
    clean_env,
    ensure_port_free,
    http_status,
    run,
    tcp_accepts,
    wait_for,
)
from .fronts import FRONTS, Front

log = logging.getLogger("compose_rollout.testbed")

LABEL = compose.LABEL
HTTP_PORT = 8080
SSH_PORT = 2222
# The host ports published by publish_port_range(): the surge strategy starts a second
# container beside the running one, and Docker gives it the port of the range still free.
SURGE_HOST_PORTS = f"{HTTP_PORT}-{HTTP_PORT + 1}"
# The check of the backend's server lines (haproxy.render_config's default-server), which
# the fleet file gives for a server added at run time too (no default-server applies to it).
SURGE_CHECK = {"inter_ms": 500, "rise": 2, "fall": 2}

# Binaries the bed runs; checked up front so a missing package is one clear error.
REQUIRED_BINARIES = ("docker", "dockerd", "docker-compose", "docker-registry", "haproxy", "ssh-keygen")
SSHD = "/usr/sbin/sshd"
LOCK_PATH = "/run/lock/compose-rollout-testbed.lock"
LOCK_WAIT_SECONDS = 1800

# Top-level entries of the workdir that belong to the bed (removed by stop()
# unless keep_workdir); anything else a caller put there is left alone.
_OWNED_ENTRIES = ("hosts", "ssh", "registry", "haproxy", *FRONTS, "lbhost", "image", "logs", "faults", "fleet.yml")
# The load balancers a bed can put in front of its instances (HAProxy always runs; the
# others start on first use, each on its own frontend port).
LB_KINDS = ("haproxy", *FRONTS)
LB_HOST_ADDRESS = "127.0.2.1"
# Another repository of the app in the bed's registry, pushed on demand (Testbed.push_edition).
EDITION = "demo/app-ee"
EDITION_TAGS = ("v1", "v2")


@dataclass(frozen=True)
class TestbedInstance:
    """One instance ("host") of the fleet."""

    __test__ = False  # not a pytest test class despite the name

    name: str
    address: str
    ssh_port: int
    project_directory: Path
    compose_file: Path
    lb_server: str
    health_url: str
    sshd_pid_file: Path


def _deep_merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Testbed:
    """A fleet of ``instances`` Compose projects (service ``server``) behind
    HAProxy, with a registry holding ``demo/app:v1|v2|broken`` and an sshd per
    instance. Use as a context manager, or call start()/stop().

    Daemons are children of the process that calls start() and, unless
    ``die_with_parent`` is False, die with the thread that started them (so a
    killed test run leaves no daemon holding the fixed ports): call start()
    from a thread that outlives the bed."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        workdir: Path,
        instances: int = 3,
        registry_port: int = 5000,
        lb_port: int = 18080,
        lb_admin_port: int = 19999,
        *,
        registry_notify_url: str | None = None,
        keep_workdir: bool = False,
        die_with_parent: bool = True,
        docker: str = "docker",
        compose_command: tuple[str, ...] = ("docker-compose",),
    ) -> None:
        if not 1 <= instances <= 250:
            raise ValueError("instances must be between 1 and 250")
        self.workdir = Path(workdir).absolute()
        self.registry_port = registry_port
        self.lb_port = lb_port
        self.lb_admin_port = lb_admin_port
        self.registry_notify_url = registry_notify_url
        self._registry_notify_headers: dict[str, list[str]] | None = None
        self.keep_workdir = keep_workdir
        self.die_with_parent = die_with_parent
        self.docker = docker
        self.compose_command = compose_command

        self.registry = f"127.0.0.1:{registry_port}"
        self.image_repository = f"{self.registry}/demo/app"
        self.edition_repository = f"{self.registry}/{EDITION}"
        self.lb_url = f"http://127.0.0.1:{lb_port}"
        self.lb_admin_address = f"tcp://127.0.0.1:{lb_admin_port}"
        self.lb_admin_unix_socket = self.workdir / "haproxy" / "haproxy.sock"
        self.lb_backend = "app"
        self.known_hosts_file = self.workdir / "ssh" / "known_hosts"
        self.ssh_key_file = self.workdir / "ssh" / "id_ed25519"
        self.tags = image.TAGS
        self.initial_tag = "v1"

        self.instances: list[TestbedInstance] = []
        for index in range(1, instances + 1):
            name = f"app-{index}"
            address = f"127.0.1.{index + 1}"
            project_directory = self.workdir / "hosts" / name
            self.instances.append(
                TestbedInstance(
                    name=name,
                    address=address,
                    ssh_port=SSH_PORT,
                    project_directory=project_directory,
                    compose_file=project_directory / "docker-compose.yml",
                    lb_server=name,
                    health_url=f"http://{address}:{HTTP_PORT}/health",
                    sshd_pid_file=project_directory / "sshd.pid",
                )
            )

        # The LB host: the machine the LBs run on, reached over SSH as a user's would be.
        self.lb_host = TestbedInstance(
            name="lb",
            address=LB_HOST_ADDRESS,
            ssh_port=SSH_PORT,
            project_directory=self.workdir / "lbhost",
            compose_file=self.workdir / "lbhost" / "none",
            lb_server="",
            health_url="",
            sshd_pid_file=self.workdir / "lbhost" / "sshd.pid",
        )
        self._fronts: dict[str, Front] = {}

        self.admin = haproxy.HaproxyAdmin(self.lb_admin_address)
        self._logs = self.workdir / "logs"
        self._dockerd: Daemon | None = None
        self._registry: Daemon | None = None
        self._haproxy: Daemon | None = None
        self._sshd: dict[str, Daemon] = {}
        # State recorded after start() brought everything up, for reset().
        self._initial_compose_text: dict[str, str] = {}
        self._initial_config_hash: dict[str, str] = {}
        self._image_ids: dict[str, str] = {}
        self._started = False
        self._lock_file: IO[str] | None = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def instance(self, name: str) -> TestbedInstance:
        if name == self.lb_host.name:
            return self.lb_host
        """The instance called ``name`` (e.g. "app-1")."""
        for candidate in self.instances:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def start(self) -> None:
        """Bring the whole bed up and return once every instance runs v1,
        answers /health with 200 and is UP and ready in HAProxy. On failure
        everything already started is stopped again before the error is
        raised."""
        began = time.monotonic()
        self._take_machine_lock()
        try:
            self._check_prerequisites()
            self._ensure_docker_engine()
            self._remove_containers()
            self._check_ports()
            self._prepare_directories()
            self._prepare_ssh()
            self.start_registry()
            self._build_and_push_images()
            for instance in [*self.instances, self.lb_host]:
                self.start_sshd(instance.name)
            self._bring_up_instances()
            self._start_haproxy()
            self.wait_all_up(timeout=60)
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info("test bed up in %.1fs (%s)", time.monotonic() - began, self.workdir)

    def stop(self) -> None:
        """Stop everything start() started and remove the bed's containers;
        idempotent. Every step is attempted; the first failure is raised at
        the end."""
        errors: list[BaseException] = []

        def attempt(step: str, action: Any) -> None:
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - teardown goes on with the other steps
                log.warning("test bed stop: %s failed: %s", step, exc)
                errors.append(exc)

        if self._haproxy is not None:
            attempt("stop haproxy", self._haproxy.stop)
        for kind, front in self._fronts.items():
            attempt(f"stop {kind}", front.stop)
        for name, daemon in list(self._sshd.items()):
            attempt(f"stop sshd {name}", daemon.stop)
        if self._docker_reachable():
            attempt("remove containers", self._remove_containers)
            attempt("remove networks", self._remove_networks)
        if self._registry is not None:
            attempt("stop registry", self._registry.stop)
        if self._dockerd is not None:
            # Containers are gone already, so dockerd has nothing slow to stop.
            attempt("stop dockerd", lambda: self._dockerd.stop(timeout=30) if self._dockerd else None)
            self._dockerd = None
        if not self.keep_workdir:
            attempt("remove workdir", self._remove_workdir)
        self._started = False
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        if errors:
            raise TestbedError(f"test bed stop had {len(errors)} failure(s); first: {errors[0]}") from errors[0]

    def _take_machine_lock(self) -> None:
        """One bed per machine at a time: they share fixed addresses, ports and the
        engine's labelled containers. A second bed (a demo during a test run, say)
        waits for the first, up to LOCK_WAIT_SECONDS, then fails saying why."""
        if self._lock_file is not None:
            return
        Path(LOCK_PATH).parent.mkdir(parents=True, exist_ok=True)
        handle = open(LOCK_PATH, "a")  # held (locked) until stop()
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    raise TestbedError(
                        f"another test bed holds {LOCK_PATH} (a test run or a demo); waited {LOCK_WAIT_SECONDS} s"
                    ) from None
                if not announced:
                    log.warning("another test bed is running; waiting for %s", LOCK_PATH)
                    announced = True
                time.sleep(0.5)
        self._lock_file = handle

    # ------------------------------------------------------------ docker engine

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the test bed must run as root (sshd, dockerd, root logins)")
        missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
        if not Path(SSHD).is_file():
            missing.append(SSHD)
        if not image.BUSYBOX.is_file():
            missing.append(str(image.BUSYBOX))
        if missing:
            raise TestbedError(f"missing binaries: {', '.join(missing)}")

    def _docker_reachable(self) -> bool:
        try:
            return run([self.docker, "info", "--format", "{{.ServerVersion}}"], timeout=15, check=False).returncode == 0
        except TestbedError:
            return False

    def _ensure_docker_engine(self) -> None:
        if self._docker_reachable():
            return
        log.info("no docker engine answering; starting dockerd")
        # Not tied to our lifetime: if we die, the engine (and the removal of
        # our containers by label next time) is better left to the next run.
        self._dockerd = Daemon("dockerd", ["dockerd"], self._logs / "dockerd.log", die_with_parent=False)
        self._dockerd.start()
        wait_for(
            self._docker_reachable,
            timeout=60,
            interval=0.5,
            what="dockerd to answer `docker info`",
            abort=self._dockerd.exit_reason,
        )

    def _containers(self) -> list[dict[str, Any]]:
        """`docker inspect` of every container (running or not) with our label."""
        ids = run([self.docker, "ps", "-aq", "--filter", f"label={LABEL}=1"], timeout=30).stdout.split()
        if not ids:
            return []
        result = run([self.docker, "inspect", *ids], timeout=30, check=False)
        if result.returncode != 0:
            # A container vanished between ps and inspect; ask once more.
            ids = run([self.docker, "ps", "-aq", "--filter", f"label={LABEL}=1"], timeout=30).stdout.split()
            if not ids:
                return []
            result = run([self.docker, "inspect", *ids], timeout=30)
        containers: list[dict[str, Any]] = json.loads(result.stdout)
        return containers

    def _remove_containers(self, project: str | None = None) -> None:
        """`docker rm -f` the bed's containers (all, or one project's)."""
        filters = ["--filter", f"label={LABEL}=1"]
        if project is not None:
            filters += ["--filter", f"label=com.docker.compose.project={project}"]
        ids = run([self.docker, "ps", "-aq", *filters], timeout=30).stdout.split()
        if ids:
            run([self.docker, "rm", "-f", *ids], timeout=120)

    def _remove_networks(self) -> None:
        names = [f"{instance.name}_default" for instance in self.instances]
        existing = run([self.docker, "network", "ls", "--format", "{{.Name}}"], timeout=30).stdout.split()
        ours = [name for name in names if name in existing]
        if ours:
            run([self.docker, "network", "rm", *ours], timeout=60)

    def _check_ports(self) -> None:
        ensure_port_free("127.0.0.1", self.registry_port, "the registry")
        ensure_port_free("127.0.0.1", self.lb_port, "the HAProxy frontend")
        ensure_port_free("127.0.0.1", self.lb_admin_port, "the HAProxy admin socket")
        ensure_port_free(self.lb_host.address, self.lb_host.ssh_port, "sshd of the LB host")
        for instance in self.instances:
            ensure_port_free(instance.address, instance.ssh_port, f"sshd of {instance.name}")
            ensure_port_free(instance.address, HTTP_PORT, f"the app of {instance.name}")

    # -------------------------------------------------------------------- files

    def _prepare_directories(self) -> None:
        for path in (self._logs, self.workdir / "ssh", self.workdir / "haproxy", self.workdir / "registry"):
            path.mkdir(parents=True, exist_ok=True)
        for instance in self.instances:
            instance.project_directory.mkdir(parents=True, exist_ok=True)
        # sshd's privilege separation directory; the package normally creates it at boot.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    def _prepare_ssh(self) -> None:
        sshd.generate_key(self.ssh_key_file, "compose-rollout-testbed-client")
        authorized_keys = self.workdir / "ssh" / "authorized_keys"
        authorized_keys.write_text(self.ssh_key_file.with_suffix(".pub").read_text())
        lines = []
        for instance in [*self.instances, self.lb_host]:
            instance.project_directory.mkdir(parents=True, exist_ok=True)
            host_key = sshd.generate_key(self._host_key(instance), f"{instance.name}-host")
            lines.append(sshd.known_hosts_line(instance.address, instance.ssh_port, host_key.with_suffix(".pub")))
            self._sshd_config(instance).write_text(self._render_sshd_config(instance))
        self.known_hosts_file.write_text("\n".join(lines) + "\n")

    def _host_key(self, instance: TestbedInstance) -> Path:
        return instance.project_directory / "ssh_host_ed25519_key"

    def _sshd_config(self, instance: TestbedInstance) -> Path:
        return instance.project_directory / "sshd_config"

    def _render_sshd_config(self, instance: TestbedInstance, session_path: str | None = None) -> str:
        return sshd.render_config(
            address=instance.address,
            port=instance.ssh_port,
            host_key=self._host_key(instance),
            pid_file=instance.sshd_pid_file,
            authorized_keys=self.workdir / "ssh" / "authorized_keys",
            session_path=session_path,
        )

    def front(self, kind: str) -> Front:
        """The LB of `kind` (not HAProxy, which always runs) in front of the instances,
        started on first use and stopped with the bed."""
        if kind not in self._fronts:
            if kind not in FRONTS:
                raise ValueError(f"the test bed has no {kind} front; it has {', '.join(LB_KINDS)}")
            front = FRONTS[kind](
                self.workdir / kind,
                [self.lb_server_of(kind, i) for i in self.instances],
                self._logs / f"{kind}.log",
                self.die_with_parent,
            )
            front.start()
            self._fronts[kind] = front
        return self._fronts[kind]

    def lb_server_of(self, kind: str, instance: TestbedInstance) -> str:
        """The instance's server as the LB of `kind` names it."""
        return instance.lb_server if kind == "haproxy" else f"{instance.address}:{HTTP_PORT}"

    def in_flight(self, kind: str) -> dict[str, int]:
        """Requests in flight from the LB of `kind` to each instance, as the bed measures
        them (HAProxy's own count, or the front's, see `Front.in_flight`)."""
        if kind == "haproxy":
            states = self.haproxy_server_states()
            return {i.name: int(states[i.lb_server]["scur"]) for i in self.instances}
        seen = self.front(kind).in_flight()
        return {i.name: seen[self.lb_server_of(kind, i)] for i in self.instances}

    def lb_view(self, kind: str) -> dict[str, str]:
        """Each instance as the LB of `kind` sees it: HAProxy's status, or the front's view."""
        if kind == "haproxy":
            states = self.haproxy_server_states()
            return {i.name: states[i.lb_server]["status"] for i in self.instances}
        seen = self.front(kind).view()
        return {i.name: seen[self.lb_server_of(kind, i)] for i in self.instances}

    def lb_url_of(self, kind: str) -> str:
        return self.lb_url if kind == "haproxy" else self.front(kind).url

    def fleet_file(self, path: Path | None = None, lb: str = "haproxy", **overrides: Any) -> Path:
        """Write the fleet YAML describing this bed for the core library and
        return its path (default ``<workdir>/fleet.yml``), with the LB of kind `lb` in
        front. ``overrides`` are deep-merged into the top-level mapping, e.g.
        ``rollout={"batch_size": 2}``."""
        if lb == "haproxy":
            lb_section: dict[str, Any] = {
                "kind": "haproxy",
                "admin_address": self.lb_admin_address,
                "backend": self.lb_backend,
                "surge_check": dict(SURGE_CHECK),
            }
        else:
            lb_section = self.front(lb).fleet_settings(self.lb_host.address, self.lb_host.ssh_port)
        document: dict[str, Any] = {
            "name": "demo",
            "service": "server",
            "image_repository": self.image_repository,
            "ssh": {
                "user": "root",
                "key_file": str(self.ssh_key_file),
                "known_hosts_file": str(self.known_hosts_file),
            },
            "load_balancer": lb_section,
            "instances": [
                {
                    "name": instance.name,
                    "host": instance.address,
                    "ssh_port": instance.ssh_port,
                    "project_directory": str(instance.project_directory),
                    "compose_file": instance.compose_file.name,
                    "lb_server": self.lb_server_of(lb, instance),
                    "health_url": instance.health_url,
                }
                for instance in self.instances
            ],
        }
        document = _deep_merge(document, overrides)
        target = Path(path) if path is not None else self.workdir / "fleet.yml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(document, sort_keys=False))
        return target

    def _remove_workdir(self) -> None:
        for entry in _OWNED_ENTRIES:
            path = self.workdir / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        try:
            self.workdir.rmdir()
        except OSError:
            pass  # not empty: someone else's files are in it

    # ----------------------------------------------------------------- registry

    def start_registry(self) -> None:
        """Start the registry (if not running) and wait until /v2/ answers 200."""
        if self._registry is None:
            config = self.workdir / "registry" / "config.yml"
            config.write_text(
                registry.render_config(
                    port=self.registry_port,
                    storage=self.workdir / "registry" / "storage",
                    notify_url=self.registry_notify_url,
                    notify_headers=self._registry_notify_headers,
                )
            )
            self._registry = Daemon(
                "docker-registry",
                ["docker-registry", "serve", str(config)],
                self._logs / "registry.log",
                die_with_parent=self.die_with_parent,
            )
        self._registry.start()
        wait_for(
            lambda: http_status(f"http://{self.registry}/v2/") == 200,
            timeout=30,
            what="the registry's /v2/ to answer 200",
            abort=self._registry.exit_reason,
        )

    def notify_registry_pushes(self, url: str | None, headers: dict[str, list[str]] | None = None) -> None:
        """Make the registry POST its push notifications to `url` (None: stop), with
        `headers` (e.g. an Authorization secret); restarts the registry."""
        self.stop_registry()
        self.registry_notify_url, self._registry_notify_headers = url, headers
        self._registry = None  # start_registry writes the new config
        self.start_registry()

    def stop_registry(self) -> None:
        """Stop the registry process (a real registry outage)."""
        if self._registry is not None:
            self._registry.stop()
        wait_for(
            lambda: not tcp_accepts("127.0.0.1", self.registry_port, timeout=0.3),
            timeout=10,
            what="the registry port to close",
        )

    def registry_running(self) -> bool:
        """True while the registry process is running."""
        return self._registry is not None and self._registry.running()

    def _registry_has(self, tag: str, repository: str = "demo/app") -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.registry_port, timeout=5)
        try:
            connection.request(
                "HEAD",
                f"/v2/{repository}/manifests/{tag}",
                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
            )
            response = connection.getresponse()
            response.read()
            return response.status == 200
        finally:
            connection.close()

    # ------------------------------------------------------------------- images

    def _build_and_push_images(self) -> None:
        context = image.prepare_context(self.workdir / "image")
        for tag in self.tags:
            image.build(self.docker, context, self.image_repository, tag)
            image.push(self.docker, self.image_repository, tag)
            self._image_ids[tag] = self.image_id(f"{self.image_repository}:{tag}")

    def push_edition(self) -> str:
        """Push v1 and v2 also as another repository of the registry (``demo/app-ee``,
        as an Enterprise Edition of the app would be), once per bed, and return it: a
        fleet can switch repository to it. The images are the bed's own (same IDs)."""
        for tag in EDITION_TAGS:
            if not self._registry_has(tag, EDITION):
                run([self.docker, "tag", self._image_ids[tag], f"{self.edition_repository}:{tag}"], timeout=30)
                image.push(self.docker, self.edition_repository, tag)
        return self.edition_repository

    def image_id(self, ref: str) -> str:
        """The engine's image ID (sha256:...) for an image reference."""
        return run([self.docker, "image", "inspect", "--format", "{{.Id}}", ref], timeout=30).stdout.strip()

    def tag_image_id(self, tag: str) -> str:
        """The image ID the bed built for ``tag`` (v1, v2, broken)."""
        return self._image_ids[tag]

    def _ensure_images(self) -> None:
        """Make the engine's tags point at the images built by start() and the
        registry hold every tag again (a test may delete or re-point them)."""
        refs = [f"{self.image_repository}:{tag}" for tag in self.tags]
        result = run([self.docker, "image", "inspect", "--format", "{{.Id}}", *refs], timeout=30, check=False)
        current = result.stdout.split()
        if result.returncode != 0 or current != [self._image_ids[tag] for tag in self.tags]:
            log.info("image tags changed; rebuilding")
            self._build_and_push_images()
            return
        for tag in self.tags:
            if not self._registry_has(tag):
                image.push(self.docker, self.image_repository, tag)

    # --------------------------------------------------------------------- sshd

    def start_sshd(self, name: str) -> None:
        """Start the instance's sshd (if not running) and wait for its banner."""
        instance = self.instance(name)
        daemon = self._sshd.get(name)
        if daemon is None:
            daemon = Daemon(
                f"sshd {name}",
                # -D: stay a child of ours, so stop can wait for it; -E: log to a file.
                [
                    SSHD,
                    "-D",
                    "-f",
                    str(self._sshd_config(instance)),
                    "-E",
                    str(self._logs / f"sshd-{name}.log"),
                ],
                self._logs / f"sshd-{name}.out",
                die_with_parent=self.die_with_parent,
            )
            self._sshd[name] = daemon
        daemon.start()
        wait_for(
            lambda: tcp_accepts(instance.address, instance.ssh_port, banner=b"SSH-"),
            timeout=20,
            what=f"sshd of {name} to accept connections",
            abort=daemon.exit_reason,
        )

    def stop_sshd(self, name: str) -> None:
        """Stop the instance's sshd: new SSH connections to it are refused (a
        real "host down"). Sessions already open keep running, as with a
        listener restart on a real host."""
        instance = self.instance(name)
        daemon = self._sshd.get(name)
        if daemon is not None:
            daemon.stop()
        wait_for(
            lambda: not tcp_accepts(instance.address, instance.ssh_port, timeout=0.3),
            timeout=10,
            what=f"sshd of {name} to stop listening",
        )

    def cut_host(self, name: str) -> None:
        """The host drops off the network: its sshd stops listening and every SSH
        session already open to it is killed (the orchestrator's connection included)."""
        daemon = self._sshd.get(name)
        listener = daemon.process.pid if daemon is not None and daemon.process is not None else None
        sessions = []
        if listener is not None:
            # sshd forks one process per connection (and one more per privilege-separated child).
            for stat_file in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat_file.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == listener:
                    sessions.append(int(stat_file.parent.name))
        self.stop_sshd(name)
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def break_pulls(self, name: str) -> None:
        """The instance's host cannot pull: `docker pull` in its SSH sessions fails as a
        registry refusing that host does (`pull access denied ... may require 'docker
        login'`, exit 1), and the host keeps only the images the engine holds now (one
        another host pulls later is not there for it). Every other docker command works.
        The engine is shared, so the fault is in the host's sessions: its sshd, restarted,
        gives them a PATH whose first `docker` is that host's. reset() puts it back."""
        instance = self.instance(name)
        real_docker = shutil.which(self.docker, path=sshd.SESSION_PATH)
        if real_docker is None:
            raise TestbedError(f"no {self.docker} on the sessions' PATH {sshd.SESSION_PATH}")
        faults = self.workdir / "faults" / name
        faults.mkdir(parents=True, exist_ok=True)
        held = faults / "images"
        held.write_text(run([self.docker, "image", "ls", "--quiet", "--no-trunc"], timeout=30).stdout)
        wrapper = faults / "docker"
        wrapper.write_text(sshd.render_docker_refusing_pulls(real_docker, held))
        wrapper.chmod(0o755)
        self._sshd_config(instance).write_text(self._render_sshd_config(instance, f"{faults}:{sshd.SESSION_PATH}"))
        self.stop_sshd(name)  # sshd reads its configuration when it starts
        self.start_sshd(name)

    def ssh_logins(self, name: str) -> int:
        """How many SSH logins the instance's sshd has accepted so far (from its own log)."""
        log_file = self._logs / f"sshd-{name}.log"
        if not log_file.exists():
            return 0
        return sum("Accepted publickey" in line for line in log_file.read_text(errors="replace").splitlines())

    def sshd_running(self, name: str) -> bool:
        """True while the instance's sshd process is running."""
        daemon = self._sshd.get(name)
        return daemon is not None and daemon.running()

    # ---------------------------------------------------------------- instances

    def compose(self, name: str, *args: str, timeout: float = 120) -> str:
        """Run ``docker-compose -f FILE --project-directory DIR ARGS`` for one
        instance and return its output."""
        instance = self.instance(name)
        argv = [
            *self.compose_command,
            "-f",
            str(instance.compose_file),
            "--project-directory",
            str(instance.project_directory),
            *args,
        ]
        result = run(argv, timeout=timeout, env=clean_env(), cwd=instance.project_directory)
        return result.stdout + result.stderr

    def _render_compose(self, instance: TestbedInstance, host_ports: str | None = None) -> str:
        return compose.render_compose_file(
            instance=instance.name,
            address=instance.address,
            image=f"{self.image_repository}:{self.initial_tag}",
            http_port=HTTP_PORT,
            host_ports=host_ports,
        )

    def _bring_up_instances(self) -> None:
        for instance in self.instances:
            text = self._render_compose(instance)
            instance.compose_file.write_text(text)
            self._initial_compose_text[instance.name] = text
        # Each docker-compose call spends ~1.4 s starting Python; run them side by side.
        self._compose_up([instance.name for instance in self.instances])
        self._wait_healthy([instance.name for instance in self.instances])
        for container in self._containers():
            labels = container["Config"]["Labels"]
            self._initial_config_hash[labels["com.docker.compose.project"]] = labels["com.docker.compose.config-hash"]

    def publish_port_range(self) -> None:
        """Publish each instance's app on the host port range ``ADDRESS:8080-8081``
        instead of the fixed 8080, as the surge strategy needs: its compose file is
        written again with only the ports line changed, its container recreated from
        it on 8080 as before, and every server awaited UP. Call it before starting
        traffic: the recreate takes each app away for a moment. reset() puts the
        fixed port back."""
        names = [instance.name for instance in self.instances]
        for instance in self.instances:
            instance.compose_file.write_text(self._render_compose(instance, host_ports=SURGE_HOST_PORTS))
        self._compose_up(names)
        # Docker gives the ports of a range in turn (the one after the last it gave for
        # that address and range since the engine started, wrapping), not the lowest
        # free one: a container that got 8081 gets 8080 when created once more.
        for _ in range(2):
            elsewhere = [name for name in names if self.published_port(name) != HTTP_PORT]
            self._compose_up(elsewhere, "--force-recreate")
        elsewhere = [name for name in names if self.published_port(name) != HTTP_PORT]
        if elsewhere:
            raise TestbedError(f"the containers of {', '.join(elsewhere)} never got host port {HTTP_PORT}")
        self.wait_all_up()

    def _compose_up(self, names: list[str], *flags: str) -> None:
        if not names:
            return
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for future in [pool.submit(self.compose, name, "up", "-d", *flags) for name in names]:
                future.result()

    def _wait_healthy(self, names: list[str], timeout: float = 60) -> None:
        for name in names:
            url = self.instance(name).health_url

            def healthy(url: str = url) -> bool:
                return http_status(url, timeout=1) == 200

            wait_for(healthy, timeout=timeout, what=f"{url} to answer 200")

    def _server_container(self, name: str) -> str:
        ids = run(
            [
                self.docker,
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={name}",
                "--filter",
                "label=com.docker.compose.service=server",
            ],
            timeout=30,
        ).stdout.split()
        if len(ids) != 1:
            raise TestbedError(f"expected one running server container for {name}, found {len(ids)}")
        return ids[0]

    def project_containers(self, name: str) -> list[dict[str, Any]]:
        """`docker inspect` of every container of the instance's Compose project,
        running or not, oldest first (a surge leaves two while it runs)."""
        found = [c for c in self._containers() if c["Config"]["Labels"].get("com.docker.compose.project") == name]
        return sorted(found, key=lambda container: str(container["Created"]))

    def published_port(self, name: str) -> int:
        """The host port the instance's running ``server`` container publishes for
        the app (`docker port CONTAINER 8080/tcp`): 8080 or, with a port range, 8081."""
        container = self._server_container(name)
        answer = run([self.docker, "port", container, f"{HTTP_PORT}/tcp"], timeout=30).stdout.split()
        if not answer:
            raise TestbedError(f"the server container of {name} publishes no host port for {HTTP_PORT}/tcp")
        return int(answer[0].rsplit(":", 1)[1])

    def container_id(self, name: str) -> str:
        """ID of the running ``server`` container of an instance."""
        return self._server_container(name)

    def running_image(self, name: str) -> str:
        """The image ID (sha256:...) the instance's running ``server`` container runs."""
        container = self._server_container(name)
        return run([self.docker, "inspect", "--format", "{{.Image}}", container], timeout=30).stdout.strip()

    # ------------------------------------------------------------------ haproxy

    def _start_haproxy(self) -> None:
        config = self.workdir / "haproxy" / "haproxy.cfg"
        config.write_text(
            haproxy.render_config(
                lb_port=self.lb_port,
                admin_port=self.lb_admin_port,
                admin_unix_socket=self.lb_admin_unix_socket,
                backend=self.lb_backend,
                servers=[haproxy.BackendServer(i.lb_server, i.address, HTTP_PORT) for i in self.instances],
            )
        )
        if self._haproxy is None:
            # -db: foreground, a single process we own directly (no master/worker).
            self._haproxy = Daemon(
                "haproxy",
                ["haproxy", "-db", "-f", str(config)],
                self._logs / "haproxy.log",
                die_with_parent=self.die_with_parent,
            )
        self._haproxy.start()
        wait_for(
            lambda: self.admin.command("show info") != "",
            timeout=20,
            what="the HAProxy admin socket",
            abort=self._haproxy.exit_reason,
        )

    def haproxy_command(self, command: str) -> str:
        """Send one command to the HAProxy admin socket and return the answer."""
        return self.admin.command(command)

    def haproxy_server_states(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the backend's servers keyed by server name:
        {"status": "UP"|"DOWN"|"DRAIN"|"MAINT"|..., "scur": "0", ...}."""
        return self.admin.server_stats(self.lb_backend)

    def haproxy_servers_state(self) -> dict[str, dict[str, str]]:
        """`show servers state` of the backend keyed by server name
        (srv_op_state, srv_admin_state, ...)."""
        return self.admin.show_servers_state(self.lb_backend)

    def haproxy_server_addresses(self) -> dict[str, tuple[str, int]]:
        """Where HAProxy sends each server of the backend: {name: (address, port)}."""
        return {
            name: (state["srv_addr"], int(state["srv_port"])) for name, state in self.haproxy_servers_state().items()
        }

    def set_server_state(self, name: str, state: str) -> None:
        """`set server app/NAME state ready|drain|maint`."""
        self.admin.set_server_state(self.lb_backend, self.instance(name).lb_server, state)

    def wait_all_up(self, timeout: float = 60) -> None:
        """Wait until every instance answers /health with 200 and HAProxy
        reports every server UP (operational, admin state ready)."""

        def all_up() -> bool:
            for instance in self.instances:
                if http_status(instance.health_url, timeout=1) != 200:
                    return False
            stats = self.haproxy_server_states()
            states = self.haproxy_servers_state()
            for instance in self.instances:
                if stats.get(instance.lb_server, {}).get("status") != "UP":
                    return False
                state = states.get(instance.lb_server, {})
                # srv_op_state 2 = running, srv_admin_state 0 = no maint/drain flag.
                if state.get("srv_op_state") != "2" or state.get("srv_admin_state") != "0":
                    return False
            return True

        wait_for(
            all_up,
            timeout=timeout,
            interval=0.1,
            what="every instance healthy and UP in HAProxy",
            abort=self._haproxy.exit_reason if self._haproxy else None,
        )

    # -------------------------------------------------------------------- reset

    def reset(self, timeout: float = 90) -> None:
        """Bring the bed back to the state start() left it in: every daemon
        running, every sshd with its own configuration (no fault left in it),
        images and registry tags as built, every compose file as
        written, every instance running v1 from it, every HAProxy server
        ready and UP. Only what differs is repaired, so a reset of an
        untouched bed costs a few cheap probes."""
        if not self._started:
            raise TestbedError("reset() needs a started test bed")
        if self._haproxy is not None and not self._haproxy.running():
            self._start_haproxy()
        if not self.registry_running():
            self.start_registry()
        for instance in [*self.instances, self.lb_host]:
            config = self._render_sshd_config(instance)
            if self._sshd_config(instance).read_text() != config:  # a fault in it (break_pulls)
                self._sshd_config(instance).write_text(config)
                self.stop_sshd(instance.name)
            if not self.sshd_running(instance.name) or not tcp_accepts(instance.address, instance.ssh_port):
                self.start_sshd(instance.name)
        shutil.rmtree(self.workdir / "faults", ignore_errors=True)
        self._ensure_images()

        needs_up: set[str] = set()
        for instance in self.instances:
            # What a rollout may leave beside a compose file: its lock, an interrupted temp file.
            for stray in instance.project_directory.glob(".compose-rollout-*"):
                shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
            for stray in instance.project_directory.glob(".*.rollout-tmp"):
                stray.unlink()
            text = self._initial_compose_text[instance.name]
            try:
                unchanged = instance.compose_file.read_text() == text
            except OSError:
                unchanged = False
            if not unchanged:
                instance.compose_file.write_text(text)
                needs_up.add(instance.name)
        by_project: dict[str, list[dict[str, Any]]] = {}
        for container in self._containers():
            project = container["Config"]["Labels"].get("com.docker.compose.project", "")
            by_project.setdefault(project, []).append(container)
        v1 = self._image_ids[self.initial_tag]
        for instance in self.instances:
            containers = by_project.get(instance.name, [])
            if len(containers) != 1:
                # Missing, or debris of an interrupted recreate: start clean.
                self._remove_containers(instance.name)
                needs_up.add(instance.name)
                continue
            container = containers[0]
            labels = container["Config"]["Labels"]
            if (
                not container["State"]["Running"]
                or container["Image"] != v1
                or labels.get("com.docker.compose.config-hash") != self._initial_config_hash.get(instance.name)
            ):
                needs_up.add(instance.name)
        if needs_up:
            log.info("reset: bringing up %s again", ", ".join(sorted(needs_up)))
            self._compose_up(sorted(needs_up))

        self._restore_haproxy_servers()
        for instance in self.instances:
            self.admin.command(f"enable health {self.lb_backend}/{instance.lb_server}")
            self.set_server_state(instance.name, "ready")
        for front in self._fronts.values():
            front.reset()
        self.wait_all_up(timeout=timeout)

    def _restore_haproxy_servers(self) -> None:
        """Delete the servers a run added to the backend (a surge's ``NAME-surge``)
        and send every instance's server to its address and port 8080 again (a
        surge leaves it at whichever port of the range its new container got)."""
        ours = {instance.lb_server for instance in self.instances}
        for server in self.haproxy_server_states():
            if server not in ours:
                log.info("reset: deleting HAProxy server %s/%s", self.lb_backend, server)
                self.admin.delete_server(self.lb_backend, server, timeout=30)
        addresses = self.haproxy_server_addresses()
        for instance in self.instances:
            if addresses.get(instance.lb_server) != (instance.address, HTTP_PORT):
                log.info("reset: HAProxy server %s back to %s:%d", instance.lb_server, instance.address, HTTP_PORT)
                self.admin.set_server_address(self.lb_backend, instance.lb_server, instance.address, HTTP_PORT)
