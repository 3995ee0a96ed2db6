"""The SSH layer against a real OpenSSH sshd of this module's own on 127.0.9.x.

No test bed (Docker, HAProxy) and no machine-wide lock: the module starts one sshd in a
temp directory as root, bounded, and stops it. The sshd runs on this machine, so a test
checks the remote side of a write directly with os.stat / os.readlink.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import socketserver
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from compose_rollout.errors import RemoteError
from compose_rollout.hosts import ssh
from compose_rollout.hosts.ssh import SshHost
from compose_rollout.lb.haproxy import HaproxyClient
from compose_rollout.testbed import sshd
from compose_rollout.testbed._util import Daemon, run, tcp_accepts, wait_for
from tests.ci import unavailable

SSHD = "/usr/sbin/sshd"
# Its own loopback address, never the test bed's 127.0.1.x; the last octet from the pid
# so that two sessions on one machine do not meet either.
ADDRESS = f"127.0.9.{2 + os.getpid() % 250}"


@dataclass(frozen=True)
class Server:
    address: str
    port: int
    client_key: Path
    known_hosts: Path
    sftp_log: Path

    def host(self, **overrides: object) -> SshHost:
        arguments: dict[str, object] = {
            "name": "sshd-under-test",
            "hostname": self.address,
            "port": self.port,
            "user": "root",
            "key_file": self.client_key,
            "known_hosts_file": self.known_hosts,
            "connect_timeout": 5.0,
        }
        arguments.update(overrides)
        return SshHost(**arguments)  # type: ignore[arg-type]


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if os.geteuid() != 0 or not Path(SSHD).is_file():
        unavailable("needs root and OpenSSH's sshd (a real sshd on 127.0.9.x)")
    work = tmp_path_factory.mktemp("sshd")
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    host_key = sshd.generate_key(work / "ssh_host_ed25519_key", "sshd-under-test")
    client_key = sshd.generate_key(work / "client_key", "compose-rollout-test-client")
    (work / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    port = _free_port(ADDRESS)
    config = sshd.render_config(
        address=ADDRESS,
        port=port,
        host_key=host_key,
        pid_file=work / "sshd.pid",
        authorized_keys=work / "authorized_keys",
    )
    # Debian's default SFTP server (a subsystem command runs through the user's shell), logging
    # each request at DEBUG3 to a file of ours, so a test can see the fsync it asked for.
    sftp_log = work / "sftp-server.log"
    config = config.replace("internal-sftp", f"/usr/lib/openssh/sftp-server -e -l DEBUG3 2>>{sftp_log}")
    (work / "sshd_config").write_text(config)
    known_hosts = work / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line(ADDRESS, port, host_key.with_suffix(".pub")) + "\n")
    log = work / "sshd.log"
    daemon = Daemon(
        "sshd-under-test",
        [SSHD, "-D", "-f", str(work / "sshd_config"), "-E", str(log)],
        work / "sshd.out",
        die_with_parent=True,
    )
    daemon.start()
    try:
        wait_for(
            lambda: tcp_accepts(ADDRESS, port, banner=b"SSH-"),
            timeout=20,
            what="the test sshd to accept connections",
            abort=daemon.exit_reason,
        )
        yield Server(ADDRESS, port, client_key, known_hosts, sftp_log)
    finally:
        daemon.stop()


@pytest.fixture
def host(server: Server) -> Iterator[SshHost]:
    connection = server.host()
    yield connection
    connection.close()


# --- run: the whole output, to EOF ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    # Several hundred KB of distinct lines, so a lost chunk anywhere changes the bytes.
    content = b"".join(b"line %07d of the big output\n" % number for number in range(20_000))
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_bytes(content)
    return path, content


def test_output_written_as_the_command_exits_is_read_whole(host: SshHost, big_file: tuple[Path, bytes]) -> None:
    # `cat` fills the pipe until its last write and exits; sshd sends the exit status while
    # the pipe still holds data. Repeated, because the race is lost only some of the time.
    path, content = big_file
    for _ in range(30):
        result = host.run(["cat", str(path)], timeout=30)
        assert len(result.stdout) == len(content)
        assert result.stdout.encode() == content


def test_output_of_a_background_writer_is_read_whole(host: SshHost, big_file: tuple[Path, bytes]) -> None:
    # The shell exits at once (exit status sent) while its child still writes both streams.
    path, content = big_file
    script = 'cat "$1" & cat "$1" >&2 & exit 0'
    for _ in range(5):
        result = host.run(["sh", "-c", script, "sh", str(path)], timeout=30)
        assert result.exit_code == 0
        assert (len(result.stdout), len(result.stderr)) == (len(content), len(content))


def test_output_beyond_the_cap_is_refused(host: SshHost, big_file: tuple[Path, bytes]) -> None:
    path, content = big_file
    copies = ssh.MAX_OUTPUT_BYTES // len(content) + 2
    with pytest.raises(RemoteError, match=r"more than \d+ bytes of output"):
        host.run(["sh", "-c", 'for i in $(seq "$2"); do cat "$1"; done', "sh", str(path), str(copies)], timeout=30)


class _StatsSocket(socketserver.StreamRequestHandler):
    """HAProxy's admin socket as `socat` on the LB host meets it: one command, one answer."""

    servers = 4000

    def handle(self) -> None:
        command = self.rfile.readline().strip()
        names = [f"app-{number}" for number in range(self.servers)]
        if command == b"show stat":
            # A wide row, as HAProxy's (~80 columns): several hundred KB for the backend.
            rows = [f"app,{name},1,UP,L7OK,{'x' * 100}" for name in names]
            answer = "# pxname,svname,scur,status,check_status,padding\n" + "\n".join(rows) + "\n\n"
        else:
            rows = [f"3 app {number} {name} 127.0.0.1 2 0" for number, name in enumerate(names)]
            answer = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n" + "\n".join(rows)
        self.wfile.write(answer.encode())


def test_show_stat_over_ssh_sees_every_server(server: Server, host: SshHost) -> None:
    # The drain counts sessions from `show stat` read through socat over SSH: a row lost to a
    # short read is a server with 0 sessions while its requests are still in flight.
    directory = tempfile.mkdtemp(prefix="haproxy-")  # short: a unix socket path has 107 bytes
    path = os.path.join(directory, "admin.sock")
    with socketserver.ThreadingUnixStreamServer(path, _StatsSocket) as stats:
        threading.Thread(target=stats.serve_forever, daemon=True).start()
        try:
            lb = HaproxyClient(f"ssh://{server.address}:{server.port}{path}", "app", timeout=10.0, host=host)
            for _ in range(10):
                servers = lb.servers()
                assert len(servers) == _StatsSocket.servers
                assert sum(state.sessions for state in servers.values()) == _StatsSocket.servers
        finally:
            stats.shutdown()
    shutil.rmtree(directory)


# --- keepalive -----------------------------------------------------------------------------------------------------


def test_idle_connection_sends_keepalives(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    # A long drain wait leaves the connection idle; a NAT or firewall would drop it silently
    # without traffic. Observed for real: paramiko logs each keepalive request it sends.
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    connection = server.host(keepalive_seconds=1)
    try:
        connection.run(["true"], timeout=10)
        wait_for(
            lambda: any("keepalive" in record.getMessage() for record in caplog.records),
            timeout=10,
            what="a keepalive request on the idle connection",
        )
        assert connection.run(["echo", "still here"], timeout=10).stdout == "still here\n"
    finally:
        connection.close()


def test_keepalive_is_on_by_default(host: SshHost) -> None:
    host.run(["true"], timeout=10)
    transport = host._connected().get_transport()
    assert transport is not None
    # paramiko has no getter; the packetizer holds the interval the transport was given.
    assert transport.packetizer._Packetizer__keepalive_interval == 15  # type: ignore[attr-defined]


# --- write_file_atomic ----------------------------------------------------------------------------------------------


def test_write_replaces_content_and_keeps_mode_owner_group(host: SshHost, tmp_path: Path) -> None:
    target = tmp_path / "compose.yaml"
    target.write_bytes(b"image: app:v1\n")
    os.chown(target, 1000, 1000)
    target.chmod(0o600)
    host.write_file_atomic(str(target), b"image: app:v2\n", 0o600)
    info = target.stat()
    assert target.read_bytes() == b"image: app:v2\n"
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o600, 1000, 1000)
    assert os.listdir(tmp_path) == ["compose.yaml"]  # no temp file left behind


def test_write_through_a_symlink_replaces_its_target(host: SshHost, tmp_path: Path) -> None:
    real = tmp_path / "releases" / "compose.yaml"
    real.parent.mkdir()
    real.write_bytes(b"image: app:v1\n")
    real.chmod(0o640)
    link = tmp_path / "current" / "compose.yaml"
    link.parent.mkdir()
    link.symlink_to(Path("..") / "releases" / "compose.yaml")
    host.write_file_atomic(str(link), b"image: app:v2\n", 0o640)
    assert link.is_symlink() and os.readlink(link) == "../releases/compose.yaml"
    assert real.read_bytes() == b"image: app:v2\n"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert os.listdir(real.parent) == ["compose.yaml"] and os.listdir(link.parent) == ["compose.yaml"]


def test_write_refuses_a_dangling_symlink(host: SshHost, tmp_path: Path) -> None:
    link = tmp_path / "compose.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(RemoteError, match="dangling"):
        host.write_file_atomic(str(link), b"image: app:v2\n", 0o644)
    assert link.is_symlink() and not (tmp_path / "gone.yaml").exists()


def test_write_creates_a_missing_file_with_the_mode_asked(host: SshHost, tmp_path: Path) -> None:
    target = tmp_path / "holder.json"
    host.write_file_atomic(str(target), b"{}", 0o600)
    assert target.read_bytes() == b"{}" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_planted_symlink_at_the_old_temp_name_is_not_followed(host: SshHost, tmp_path: Path) -> None:
    target = tmp_path / "compose.yaml"
    target.write_bytes(b"image: app:v1\n")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / ".compose.yaml.rollout-tmp").symlink_to(victim)
    host.write_file_atomic(str(target), b"image: app:v2\n", 0o644)
    assert victim.read_bytes() == b"precious\n"
    assert target.read_bytes() == b"image: app:v2\n" and not target.is_symlink()


def test_planted_symlink_at_the_temp_name_is_refused(
    host: SshHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name is random; make it predictable to prove the create is exclusive (O_EXCL).
    monkeypatch.setattr(ssh, "_random_suffix", lambda: "predictable")
    target = tmp_path / "compose.yaml"
    target.write_bytes(b"image: app:v1\n")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    planted = tmp_path / ".compose.yaml.predictable.rollout-tmp"
    planted.symlink_to(victim)
    with pytest.raises(RemoteError, match=r"already exists at the temp name \S+predictable"):
        host.write_file_atomic(str(target), b"image: app:v2\n", 0o644)
    assert victim.read_bytes() == b"precious\n" and target.read_bytes() == b"image: app:v1\n"
    assert planted.is_symlink()  # not ours: left where it was


def test_temp_file_is_never_readable_beyond_the_final_mode(
    host: SshHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injected at the first thing done to the temp file after it is created (chown,
    # chmod or the first write of data): look at it on disk (its mode then is what any other
    # user could have opened it with, and an open file stays readable after a chmod) and fail.
    target = tmp_path / "compose.yaml"
    target.write_bytes(b"password: hunter2\n")
    target.chmod(0o600)
    seen: list[tuple[str, int]] = []

    def fail_at_first_touch(self: paramiko.SFTPFile, *args: object) -> None:
        for name in os.listdir(tmp_path):
            if name != "compose.yaml":
                seen.append((name, stat.S_IMODE((tmp_path / name).stat().st_mode)))
        raise OSError("injected: disk gone mid-write")

    for method in ("chown", "chmod", "write"):
        monkeypatch.setattr(paramiko.SFTPFile, method, fail_at_first_touch)
    with pytest.raises(RemoteError, match=r"original left intact\): .*injected"):
        host.write_file_atomic(str(target), b"password: swordfish\n", 0o600)
    assert len(seen) == 1 and seen[0][1] == 0o600, seen
    assert os.listdir(tmp_path) == ["compose.yaml"]
    assert target.read_bytes() == b"password: hunter2\n"


def test_write_fails_cleanly_on_a_full_disk(host: SshHost, tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        unavailable("needs mount(8) for a real full disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], timeout=10)
    try:
        target = disk / "compose.yaml"
        target.write_bytes(b"image: app:v1\n")
        with pytest.raises(RemoteError, match=rf"original left intact\): Failure; {disk} has 0 KiB free"):
            host.write_file_atomic(str(target), b"x" * 256 * 1024, 0o644)
        assert os.listdir(disk) == ["compose.yaml"] and target.read_bytes() == b"image: app:v1\n"
    finally:
        run(["umount", str(disk)], timeout=10)


def test_write_flushes_the_file_to_disk(server: Server, host: SshHost, tmp_path: Path) -> None:
    # sftp-server logs each fsync@openssh.com request (DEBUG3): the data reached the disk
    # before the rename made it the compose file.
    def fsyncs() -> int:
        return server.sftp_log.read_text(errors="replace").count("fsync") if server.sftp_log.exists() else 0

    before = fsyncs()
    host.write_file_atomic(str(tmp_path / "compose.yaml"), b"image: app:v2\n", 0o644)
    wait_for(lambda: fsyncs() > before, timeout=10, what="an fsync request in the sshd log")


# --- list_directory -------------------------------------------------------------------------------------------------


def test_list_directory_names_the_entries(host: SshHost, tmp_path: Path) -> None:
    for name in ("run-1.json", "run-2.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "sub").mkdir()
    assert sorted(host.list_directory(str(tmp_path))) == ["run-1.json", "run-2.json", "sub"]


def test_list_directory_of_a_missing_directory_is_empty(host: SshHost, tmp_path: Path) -> None:
    assert host.list_directory(str(tmp_path / "journals")) == []


def test_list_directory_of_a_file_is_an_error(host: SshHost, tmp_path: Path) -> None:
    (tmp_path / "journals").write_text("")
    with pytest.raises(RemoteError, match="cannot list"):
        host.list_directory(str(tmp_path / "journals"))


# --- one SFTP session, several threads --------------------------------------------------------------------------


def test_threads_sharing_a_host_never_mix_up_their_files(host: SshHost, tmp_path: Path) -> None:
    """The first host serves its instance's steps and, at the same time, the run journal's
    copies: every read and write from every thread gets exactly its own bytes."""
    errors: list[BaseException] = []

    def writer(number: int) -> None:
        path = str(tmp_path / f"file-{number}")
        try:
            for round_ in range(10):
                data = f"thread {number} round {round_}\n".encode() * (number + 1) * 50
                host.write_file_atomic(path, data, 0o600)
                assert host.read_file(path) == data
                assert host.file_mode(path) == 0o600
            assert f"file-{number}" in host.list_directory(str(tmp_path))
        except BaseException as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
