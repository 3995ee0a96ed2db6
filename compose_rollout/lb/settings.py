"""The fleet file's `load_balancer` section: one strict settings class per kind.

`load_balancer.kind` picks the class (`haproxy` when it is left out, as before there
were other kinds). A setting of another kind is refused naming the kind it belongs to;
an unknown kind is refused naming the kinds that exist.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

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


KINDS: dict[str, type[LbSettings]] = {"haproxy": HaproxySettings, "nginx": NginxSettings}


def _kind(data: Any) -> str:
    kind = data.get("kind", "haproxy") if isinstance(data, dict) else getattr(data, "kind", "haproxy")
    return kind if kind in KINDS else "unknown"


LoadBalancerSettings = Annotated[
    Annotated[HaproxySettings, Tag("haproxy")] | Annotated[NginxSettings, Tag("nginx")],
    Discriminator(
        _kind,
        custom_error_type="load_balancer_kind",
        custom_error_message=f"unknown load balancer kind; the kinds are {', '.join(KINDS)}",
    ),
]
