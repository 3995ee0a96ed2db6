"""The SSH layer: the only module that imports paramiko.

One `SshHost` per host holds one connection for the whole run (commands and SFTP are
channels on it), verifies the host key against a known_hosts file (RejectPolicy
semantics: unknown or changed keys are refused with their fingerprint), and bounds
every connect, command and file operation with a timeout. The connection sends a
keepalive when idle, so a long wait (a drain) does not lose it to a NAT or firewall.

A service that listens only on the host (an LB's admin API) is reached through the same
connection (`open_tunnel`, a `direct-tcpip` channel, as `ssh -L`).

Files are written with OpenSSH's SFTP extensions (`posix-rename@openssh.com`,
`fsync@openssh.com`, OpenSSH 6.5 or later) and the host's `sync` command.
"""

from __future__ import annotations

import functools
import posixpath
import secrets
import select
import shlex
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_HANDLE, CMD_OPEN, SFTP_FLAG_CREATE, SFTP_FLAG_EXCL, SFTP_FLAG_WRITE
from pydantic import SecretStr

from compose_rollout.errors import CommandFailed, CommandTimeout, ConnectError, HostKeyError, RemoteError

MAX_FILE_BYTES = 1024 * 1024
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
# Seconds of silence after which the connection sends a keepalive; NATs and firewalls
# commonly drop idle TCP flows after a few minutes, a drain wait can be longer.
KEEPALIVE_SECONDS = 15
# fsync of the directory after the rename (there is no SFTP request for it).
SYNC_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Result:
    """What one remote command did."""

    host: str
    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Stream(Protocol):
    """A connected byte stream with the socket calls `http.client` makes on one."""

    def sendall(self, data: bytes, /) -> None: ...

    def makefile(self, mode: Literal["rb"], /) -> Any: ...

    def settimeout(self, timeout: float | None, /) -> None: ...

    def close(self) -> None: ...


class Executor(Protocol):
    """What the rollout needs from a host. `SshHost` is the real one; tests may fake it."""

    name: str

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result: ...

    def read_file(self, path: str) -> bytes: ...

    def file_mode(self, path: str) -> int: ...

    def write_file_atomic(self, path: str, data: bytes, mode: int, *, durable: bool = True) -> None: ...

    def remove_file(self, path: str) -> None: ...

    def make_directory(self, path: str) -> bool: ...

    def remove_directory(self, path: str) -> None: ...

    def list_directory(self, path: str) -> list[str]: ...

    def close(self) -> None: ...


class TunnelHost(Executor, Protocol):
    """A host that also opens TCP connections from itself (`SshHost.open_tunnel`), for an
    LB whose admin API listens only on its own host."""

    def open_tunnel(self, address: str, port: int, timeout: float) -> Stream: ...


class _RefuseUnknownHost(paramiko.MissingHostKeyPolicy):
    """Refuse any host whose key is not pinned, naming the key's fingerprint."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"{hostname}: host key {key.get_name()} {key.fingerprint} is not in {self.known_hosts}; "
            f"verify it out of band and add it (e.g. ssh-keyscan -p PORT HOST >> {self.known_hosts})"
        )


Method = TypeVar("Method", bound=Callable[..., Any])


def _one_sftp_call_at_a_time(method: Method) -> Method:
    """paramiko's SFTPClient reads its replies without a lock: two threads using one
    session (an instance's step and the run journal's copy on the same host) would read
    each other's packets. Every SFTP operation of a host holds its lock."""

    @functools.wraps(method)
    def serialised(self: SshHost, *args: Any, **kwargs: Any) -> Any:
        with self._sftp_calls:
            return method(self, *args, **kwargs)

    return serialised  # type: ignore[return-value]


class SshHost:
    """One host reached over SSH, with a lazily opened connection reused by every call."""

    def __init__(
        self,
        name: str,
        hostname: str,
        port: int,
        user: str,
        key_file: Path,
        known_hosts_file: Path,
        connect_timeout: float,
        key_passphrase: SecretStr | None = None,
        keepalive_seconds: int = KEEPALIVE_SECONDS,
    ) -> None:
        self.name = name
        self.hostname = hostname
        self.port = port
        self.user = user
        self.key_file = key_file.expanduser()
        self.known_hosts_file = known_hosts_file.expanduser()
        self.connect_timeout = connect_timeout
        self._passphrase = key_passphrase
        self.keepalive_seconds = keepalive_seconds
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_calls = threading.RLock()
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"SshHost({self.name}: {self.user}@{self.hostname}:{self.port})"

    def _connected(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is not None and transport.is_active():
                return self._client  # type: ignore[return-value]
            self._close_locked()
            self._client = self._connect()
            self.connections_opened += 1
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        if not self.known_hosts_file.is_file():
            raise HostKeyError(f"{self.name}: known_hosts file {self.known_hosts_file} does not exist")
        client = paramiko.SSHClient()
        client.load_system_host_keys(str(self.known_hosts_file))
        client.set_missing_host_key_policy(_RefuseUnknownHost(self.known_hosts_file))
        where = f"{self.name} ({self.user}@{self.hostname}:{self.port})"
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.user,
                key_filename=str(self.key_file),
                passphrase=self._passphrase.get_secret_value() if self._passphrase else None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                look_for_keys=False,
                allow_agent=False,
            )
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as error:
            client.close()
            raise HostKeyError(
                f"{where}: host key CHANGED: it presents {error.key.get_name()} {error.key.fingerprint}, "
                f"{self.known_hosts_file} pins {error.expected_key.fingerprint}. "
                "Possible man-in-the-middle; refusing to connect."
            ) from None
        except paramiko.AuthenticationException as error:
            client.close()
            raise ConnectError(f"{where}: authentication failed with key {self.key_file}: {error}") from None
        except (OSError, paramiko.SSHException) as error:
            client.close()
            raise ConnectError(f"{where}: cannot connect: {error or type(error).__name__}") from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(self.keepalive_seconds)
        return client

    def run(self, argv: list[str], timeout: float, check: bool = True, stdin: bytes = b"") -> Result:
        """Run `argv` on the host (feeding it `stdin`); raise CommandFailed (if `check`) or CommandTimeout."""
        command = shlex.join(argv)
        client = self._connected()
        try:
            channel = client.get_transport().open_session(timeout=self.connect_timeout)  # type: ignore[union-attr]
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (OSError, paramiko.SSHException) as error:
            self.close()
            raise ConnectError(f"{self.name}: lost the connection starting `{command}`: {error}") from None
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        try:
            # Read both streams to EOF, not just until the exit status: OpenSSH sends the
            # status when the process exits, while its last output may still sit in the pipe
            # (or come from a child that outlives it). A `show stat` cut short fails open.
            while True:
                while channel.recv_ready():
                    out += channel.recv(65536)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                if len(out) + len(err) > MAX_OUTPUT_BYTES:
                    raise RemoteError(
                        f"{self.name}: `{command}` wrote more than {MAX_OUTPUT_BYTES} bytes of output; "
                        "refusing to read more"
                    )
                at_eof = (channel.eof_received or channel.closed) and not (
                    channel.recv_ready() or channel.recv_stderr_ready()
                )
                if at_eof and channel.exit_status_ready():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(self.name, command, timeout, (out + err).decode(errors="replace"))
                if at_eof:  # the exit status may follow the EOF
                    channel.status_event.wait(min(remaining, 0.5))
                else:  # wakes on stdout, stderr or EOF; the cap only bounds a missed wake-up
                    select.select([channel], [], [], min(remaining, 0.5))
            code = channel.recv_exit_status()
        except OSError as error:
            raise ConnectError(f"{self.name}: connection failed while running `{command}`: {error}") from None
        finally:
            channel.close()
        result = Result(self.name, command, code, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and not result.ok:
            raise CommandFailed(self.name, command, code, result.stdout, result.stderr)
        return result

    def open_tunnel(self, address: str, port: int, timeout: float) -> paramiko.Channel:
        """A TCP connection made by the host to `address:port`, as `ssh -L` makes one (an SSH
        `direct-tcpip` channel on this host's pinned connection): the way to a service that
        listens only on the host's loopback, such as Caddy's admin API on localhost:2019.

        Opening it waits at most `timeout`, and so does each read or write on it (the
        channel's timeout); the caller closes it. ConnectError if the host cannot be
        reached or will not connect (nothing listens there, forwarding is disabled)."""
        client = self._connected()
        where = f"{self.name}: cannot connect to {address}:{port} from this host through an SSH tunnel"
        try:
            transport = client.get_transport()
            if transport is None:
                raise paramiko.SSHException("the SSH connection is closed")
            channel = transport.open_channel(
                "direct-tcpip", dest_addr=(address, port), src_addr=("127.0.0.1", 0), timeout=timeout
            )
        except paramiko.ChannelException as error:  # the host answered: it could not connect
            raise ConnectError(f"{where}: {error.text or error} (SSH open-failure code {error.code})") from None
        except (OSError, paramiko.SSHException) as error:
            self.close()
            raise ConnectError(f"{where}: {error or type(error).__name__}") from None
        channel.settimeout(timeout)
        return channel

    def _sftp_client(self) -> paramiko.SFTPClient:
        client = self._connected()
        with self._lock:
            if self._sftp is None or self._sftp.get_channel().closed:  # type: ignore[union-attr]
                try:
                    self._sftp = client.open_sftp()
                except (OSError, paramiko.SSHException) as error:
                    raise ConnectError(f"{self.name}: cannot open SFTP: {error}") from None
                self._sftp.get_channel().settimeout(self.connect_timeout * 3)  # type: ignore[union-attr]
            return self._sftp

    @_one_sftp_call_at_a_time
    def read_file(self, path: str) -> bytes:
        """The bytes of a remote file (at most 1 MiB)."""
        sftp = self._sftp_client()
        try:
            size = sftp.stat(path).st_size or 0
            if size > MAX_FILE_BYTES:
                raise RemoteError(f"{self.name}: {path} is {size} bytes, more than a compose file should be")
            with sftp.open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise RemoteError(f"{self.name}: {path} does not exist") from None
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot read {path}: {error}") from None

    @_one_sftp_call_at_a_time
    def file_mode(self, path: str) -> int:
        """Permission bits of a remote file."""
        try:
            return (self._sftp_client().stat(path).st_mode or 0o644) & 0o7777
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot stat {path}: {error}") from None

    @_one_sftp_call_at_a_time
    def write_file_atomic(self, path: str, data: bytes, mode: int, *, durable: bool = True) -> None:
        """Replace the file at `path` with `data` (permission bits `mode`), all or nothing.

        The file replaced keeps its owner and group; if `path` is a symlink, its target is
        replaced and the symlink stays. The data goes to a temp file beside it, created
        exclusively (a planted file or symlink is never followed) under a random name with
        no more than `mode` from the start, fsynced, then renamed over; the directory is
        synced after. A failure before the rename (a full disk, say) leaves the original
        untouched and removes the temp file.

        `durable=False` skips the directory sync, a command on the host (~0.1 s, most of a
        write's time): a crash of the host's kernel may then leave the previous file, whole.
        For copies whose original is kept elsewhere (the run journal's copy on the fleet).
        """
        sftp = self._sftp_client()
        target, existing = self._write_target(sftp, path)
        directory, base = posixpath.split(target)
        temp = posixpath.join(directory or ".", f".{base}.{_random_suffix()}.rollout-tmp")
        created = False
        try:
            with _create_exclusive(sftp, temp, mode) as handle:
                created = True
                if existing is not None and existing.st_uid is not None and existing.st_gid is not None:
                    # Owner first: chown clears setuid/setgid, so the mode is set after it.
                    try:
                        handle.chown(existing.st_uid, existing.st_gid)
                    except OSError as error:
                        raise OSError(f"cannot keep its owner {existing.st_uid}:{existing.st_gid}: {error}") from None
                handle.chmod(mode)  # exactly `mode`: the server's umask only narrowed it
                handle.write(data)
                handle.flush()
                sftp._request(CMD_EXTENDED, "fsync@openssh.com", handle.handle)  # type: ignore[attr-defined]
            sftp.posix_rename(temp, target)
        except (OSError, paramiko.SSHException) as error:
            reason = str(error) or type(error).__name__
            if not created and self._exists(sftp, temp):
                reason = f"something already exists at the temp name {temp} (not ours: left alone)"
            elif reason == "Failure":  # SFTP v3 has no code for a full disk: say what df sees
                reason += self._free_space(directory or ".")
            if created:  # only ours: a name someone planted is left for the operator to see
                try:
                    sftp.remove(temp)
                except (OSError, paramiko.SSHException):
                    pass
            raise RemoteError(f"{self.name}: could not write {path} (original left intact): {reason}") from None
        # The rename is durable only once the directory is; SFTP has no request for that.
        if not durable:
            return
        try:
            self.run(["sync", "--", directory or "."], timeout=SYNC_TIMEOUT_SECONDS)
        except RemoteError as error:
            raise RemoteError(
                f"{self.name}: wrote {path}, but could not sync its directory {directory}: {error}"
            ) from None

    def _free_space(self, directory: str) -> str:
        """`; DIR has N KiB free`, from df on the host ("" if df cannot tell)."""
        try:
            found = self.run(["df", "-Pk", "--", directory], timeout=10, check=False)
            available = int(found.stdout.splitlines()[-1].split()[3]) if found.ok else None
        except (RemoteError, ValueError, IndexError):
            available = None
        return "" if available is None else f"; {directory} has {available} KiB free"

    @staticmethod
    def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
        # OpenSSH answers an O_EXCL open of an existing name with a bare "Failure"; look.
        try:
            sftp.lstat(path)
        except (OSError, paramiko.SSHException):
            return False
        return True

    def _write_target(self, sftp: paramiko.SFTPClient, path: str) -> tuple[str, paramiko.SFTPAttributes | None]:
        """The file a write to `path` replaces (a symlink's target, resolved on the host) and
        its attributes, or (`path`, None) when nothing is there yet."""
        try:
            link = sftp.lstat(path)
        except FileNotFoundError:
            return path, None
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot stat {path}: {error}") from None
        target = path
        try:
            if stat.S_ISLNK(link.st_mode or 0):
                target = sftp.normalize(path)
            existing = sftp.stat(target)
        except FileNotFoundError:
            raise RemoteError(f"{self.name}: {path} is a dangling symlink; refusing to replace it") from None
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot resolve {path}: {error}") from None
        if not stat.S_ISREG(existing.st_mode or 0):
            raise RemoteError(f"{self.name}: {path} is not a regular file; refusing to replace it")
        return target, existing

    @_one_sftp_call_at_a_time
    def remove_file(self, path: str) -> None:
        """Remove a remote file if it exists."""
        try:
            self._sftp_client().remove(path)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot remove {path}: {error}") from None

    @_one_sftp_call_at_a_time
    def make_directory(self, path: str) -> bool:
        """Create a directory; False if it already exists. Atomic on the host, so it is a lock."""
        sftp = self._sftp_client()
        try:
            sftp.mkdir(path, mode=0o700)
            return True
        except OSError as error:
            try:
                if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                    return False
            except OSError:
                pass
            raise RemoteError(f"{self.name}: cannot create {path}: {error}") from None

    @_one_sftp_call_at_a_time
    def remove_directory(self, path: str) -> None:
        """Remove an empty directory if it exists."""
        try:
            self._sftp_client().rmdir(path)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot remove {path}: {error}") from None

    @_one_sftp_call_at_a_time
    def list_directory(self, path: str) -> list[str]:
        """The names in a remote directory (no `.` or `..`); [] if it does not exist."""
        sftp = self._sftp_client()
        try:
            return sftp.listdir(path)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot list {path}: {error}") from None
        # OpenSSH answers "no such file" for a path that is not a directory as well.
        try:
            sftp.stat(path)
        except FileNotFoundError:
            return []
        except (OSError, paramiko.SSHException) as error:
            raise RemoteError(f"{self.name}: cannot list {path}: {error}") from None
        raise RemoteError(f"{self.name}: cannot list {path}: not a directory")

    def _close_locked(self) -> None:
        for closable in (self._sftp, self._client):
            if closable is not None:
                try:
                    closable.close()
                except (OSError, paramiko.SSHException):
                    pass
        self._sftp = None
        self._client = None

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        with self._lock:
            self._close_locked()


def _random_suffix() -> str:
    """The unpredictable part of a temp file's name."""
    return secrets.token_hex(8)


def _create_exclusive(sftp: paramiko.SFTPClient, path: str, mode: int) -> paramiko.SFTPFile:
    """Open a new file for writing: O_CREAT|O_EXCL, with `mode` given at creation.

    `SFTPClient.open(path, "x")` cannot pass attributes, so the file would first exist with
    the server's default mode (often world-readable) and a reader who opened it then would
    keep reading after a chmod. Hence the raw SSH_FXP_OPEN request, with the permission bits
    (never setuid/setgid/sticky before the owner is set) in its attributes.
    """
    attributes = paramiko.SFTPAttributes()
    attributes.st_mode = mode & 0o777
    kind, message = sftp._request(  # type: ignore[attr-defined]
        CMD_OPEN, path, SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL, attributes
    )
    if kind != CMD_HANDLE:
        raise paramiko.SSHException(f"unexpected answer to opening {path}")
    return paramiko.SFTPFile(sftp, message.get_binary(), "wb")
