"""The fleet file's `load_balancer` section: one strict settings class per kind.

`load_balancer.kind` picks the class (`haproxy` when it is left out, as before there
were other kinds). A setting of another kind is refused naming the kind it belongs to;
an unknown kind is refused naming the kinds that exist.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from compose_rollout.errors import LoadBalancerError
from compose_rollout.fields import IDENT_RE, USER_RE, Strict, absolute_posix, check, host
from compose_rollout.lb.haproxy import check_socket_path

# An upstream server as nginx writes it: `HOST:PORT` (IPv4, DNS name, or [IPv6]).
ADDRESS_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):[0-9]{1,5}")


class LbSettings(Strict):
    """What every kind has."""

    timeout_seconds: Annotated[float, Field(gt=0, le=60, description="Limit for one call to the LB.")] = 5.0

    def check_server(self, name: str) -> None:
        """Raise ValueError if `name` cannot name a server of this kind."""

    @model_validator(mode="before")
    @classmethod
    def _other_kinds_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            own = set(cls.model_fields)
            for key in data:
                if key in own:
                    continue
                owners = [kind for kind, settings in KINDS.items() if key in settings.model_fields]
                kind = data.get("kind", "haproxy")
                if owners:
                    raise ValueError(f"{key} is a setting of kind {' or '.join(owners)}, not of kind {kind}")
        return data


class ViaSsh(Strict):
    """An LB whose configuration lives on its host, reached over SSH with the fleet's
    `ssh` settings and its host key pinned in `ssh.known_hosts_file`."""

    ssh_host: Annotated[str, Field(description="The LB host, reached over SSH.")]
    ssh_port: Annotated[int | None, Field(ge=1, le=65535, description="Overrides ssh.port for the LB host.")] = None
    ssh_user: Annotated[str | None, Field(description="Overrides ssh.user for the LB host.")] = None

    @field_validator("ssh_host")
    @classmethod
    def _ssh_host(cls, value: str) -> str:
        return host(value, "ssh_host")

    @field_validator("ssh_user")
    @classmethod
    def _ssh_user(cls, value: str | None) -> str | None:
        return None if value is None else check(USER_RE, "SSH user", value)


class HaproxySettings(LbSettings):
    """HAProxy through its runtime API (the stats socket with `level admin`)."""

    kind: Annotated[Literal["haproxy"], Field(description="Load balancer kind.")] = "haproxy"
    admin_address: Annotated[
        str,
        Field(
            description="HAProxy stats socket with `level admin`: `tcp://HOST:PORT`, `unix:///path`, or "
            "`ssh://HOST[:PORT]/path` (a unix socket on the LB host, reached over SSH with `socat`)."
        ),
    ]
    backend: Annotated[str, Field(description="HAProxy backend holding the instances' servers.")]

    def check_server(self, name: str) -> None:
        check(IDENT_RE, "HAProxy server name", name)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        return check(IDENT_RE, "backend name", value)

    @field_validator("admin_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value.startswith("unix://"):
            absolute_posix(value[len("unix://") :], "admin socket path")
            return value
        if value.startswith("ssh://"):
            match = re.fullmatch(r"ssh://([^:/]+)(?::([0-9]{1,5}))?(/.+)", value)
            if not match or (match.group(2) and not 0 < int(match.group(2)) < 65536):
                raise ValueError(f"admin_address must be ssh://HOST[:PORT]/path/to/socket, got {value!r}")
            host(match.group(1), "admin host")
            absolute_posix(match.group(3), "admin socket path")
            try:
                check_socket_path(match.group(3))  # socat would read , ! : and friends as options
            except LoadBalancerError as error:
                raise ValueError(str(error)) from None
            return value
        match = re.fullmatch(r"tcp://([^:/]+):([0-9]{1,5})", value)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(f"admin_address must be tcp://HOST:PORT, unix:///path or ssh://HOST/path, got {value!r}")
        host(match.group(1), "admin host")
        return value


class NginxSettings(LbSettings, ViaSsh):
    """Open-source nginx: the instances are `server` lines of an `upstream` block in a
    file on the LB host. Drain marks the line `down`, checks with `nginx -t` and reloads
    gracefully; in flight counts the LB host's TCP connections to the server (`ss`)."""

    kind: Annotated[Literal["nginx"], Field(description="Load balancer kind.")]
    upstream_file: Annotated[
        str, Field(description="The file on the LB host holding the upstream block, e.g. /etc/nginx/conf.d/app.conf.")
    ]
    upstream: Annotated[str, Field(description="The name of the `upstream` block holding the instances.")]
    nginx_binary: Annotated[
        str, Field(description="nginx on the LB host (a name on its PATH or an absolute path).")
    ] = "nginx"
    main_config: Annotated[
        str | None, Field(description="nginx's main configuration file (`nginx -c`), if not the built-in default.")
    ] = None
    reload_timeout_seconds: Annotated[
        float, Field(gt=0, le=300, description="Limit for `nginx -t` and for `nginx -s reload`.")
    ] = 30.0

    server_what: ClassVar[str] = "upstream server address HOST:PORT"

    def check_server(self, name: str) -> None:
        check(ADDRESS_RE, self.server_what, name)

    @field_validator("upstream_file")
    @classmethod
    def _upstream_file(cls, value: str) -> str:
        return absolute_posix(value, "upstream_file")

    @field_validator("main_config")
    @classmethod
    def _main_config(cls, value: str | None) -> str | None:
        return None if value is None else absolute_posix(value, "main_config")

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        return check(IDENT_RE, "upstream name", value)

    @field_validator("nginx_binary")
    @classmethod
    def _binary(cls, value: str) -> str:
        if value.startswith("/"):
            return absolute_posix(value, "nginx_binary")
        return check(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*"), "nginx_binary", value)


# A command is the fleet owner's shell text, run by `sh`: long enough for a small script.
MAX_COMMAND_CHARS = 16384


def _command_field(description: str) -> Any:
    return Field(min_length=1, max_length=MAX_COMMAND_CHARS, description=description)


class CommandSettings(LbSettings):
    """Any other load balancer (F5, Cloudflare, a cloud LB, a homemade one): shell commands
    its owner writes, run by `sh` on the orchestrator (prefect-shell's ShellOperation) or,
    with `ssh_host`, on that host over SSH. The server, its instance, host and port reach
    each command as environment variables (ROLLOUT_SERVER, ...), never inside its text;
    what `in_flight` and `state` must print is in `lb/command.py`, anything else is refused.
    The commands are trusted configuration: keep credentials in the environment, not in them."""

    kind: Annotated[Literal["command"], Field(description="Load balancer kind.")]
    drain: Annotated[
        str,
        _command_field(
            "Stops new requests to $ROLLOUT_SERVER (those in flight go on); exits 0 once the LB applies it."
        ),
    ]
    ready: Annotated[str, _command_field("Puts $ROLLOUT_SERVER back in rotation; exits 0 once the LB applies it.")]
    in_flight: Annotated[
        str,
        _command_field(
            "Prints one non-negative integer: the requests in flight to $ROLLOUT_SERVER "
            "(never fewer: count connections if the LB cannot count requests)."
        ),
    ]
    state: Annotated[
        str,
        _command_field(
            "Prints one line: `ready` or `drained`, then `up`, `down` or `unknown` (the LB's health check), "
            "e.g. `drained up`; or `absent` when the LB has no such server."
        ),
    ]
    shutdown_sessions: Annotated[
        str | None,
        _command_field(
            "Cuts what is still in flight to $ROLLOUT_SERVER (rollout.on_drain_timeout: proceed). "
            "Without it nothing is cut by the LB; stopping the container does."
        ),
    ] = None
    recheck: Annotated[
        str | None,
        _command_field(
            "Makes the LB's health check forget what it saw of $ROLLOUT_SERVER (down until its checks pass "
            "again), so that `up` after a restart is about the new container. Without it, `up` may be stale."
        ),
    ] = None
    ssh_host: Annotated[
        str | None, Field(description="Run the commands on this host over SSH instead of on the orchestrator.")
    ] = None
    ssh_port: Annotated[int | None, Field(ge=1, le=65535, description="Overrides ssh.port for ssh_host.")] = None
    ssh_user: Annotated[str | None, Field(description="Overrides ssh.user for ssh_host.")] = None

    @field_validator("drain", "ready", "in_flight", "state", "shutdown_sessions", "recheck")
    @classmethod
    def _command(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError(f"the {info.field_name} command is blank")
        if "\0" in value:
            raise ValueError(f"the {info.field_name} command holds a NUL byte, which no shell command can")
        return value

    @field_validator("ssh_host")
    @classmethod
    def _ssh_host(cls, value: str | None) -> str | None:
        return None if value is None else host(value, "ssh_host")

    @field_validator("ssh_user")
    @classmethod
    def _ssh_user(cls, value: str | None) -> str | None:
        return None if value is None else check(USER_RE, "SSH user", value)

    @model_validator(mode="after")
    def _ssh_needs_a_host(self) -> CommandSettings:
        for name in ("ssh_port", "ssh_user"):
            if getattr(self, name) is not None and self.ssh_host is None:
                raise ValueError(f"{name} is set but ssh_host is not: the commands run on the orchestrator")
        return self


KINDS: dict[str, type[LbSettings]] = {"haproxy": HaproxySettings, "nginx": NginxSettings, "command": CommandSettings}


def _kind(data: Any) -> str:
    kind = data.get("kind", "haproxy") if isinstance(data, dict) else getattr(data, "kind", "haproxy")
    return kind if kind in KINDS else "unknown"


LoadBalancerSettings = Annotated[
    Annotated[HaproxySettings, Tag("haproxy")]
    | Annotated[NginxSettings, Tag("nginx")]
    | Annotated[CommandSettings, Tag("command")],
    Discriminator(
        _kind,
        custom_error_type="load_balancer_kind",
        custom_error_message=f"unknown load balancer kind; the kinds are {', '.join(KINDS)}",
    ),
]
