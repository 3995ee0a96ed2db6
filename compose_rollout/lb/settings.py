"""The fleet file's `load_balancer` section: one strict settings class per kind.

`load_balancer.kind` picks the class (`haproxy` when it is left out, as before there
were other kinds). A setting of another kind is refused naming the kind it belongs to;
an unknown kind is refused naming the kinds that exist.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from compose_rollout.errors import LoadBalancerError
from compose_rollout.fields import IDENT_RE, USER_RE, Strict, absolute_posix, check, host
from compose_rollout.lb.connections import split_address
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


class SshReach(Strict):
    """An LB host reached over SSH with the fleet's `ssh` settings and its host key pinned
    in `ssh.known_hosts_file`; optional here (a kind that may do without re-declares
    `ssh_host` with its own description), required by `ViaSsh`."""

    ssh_host: Annotated[str | None, Field(description="The LB host, reached over SSH.")] = None
    ssh_port: Annotated[int | None, Field(ge=1, le=65535, description="Overrides ssh.port for the LB host.")] = None
    ssh_user: Annotated[str | None, Field(description="Overrides ssh.user for the LB host.")] = None

    @field_validator("ssh_host")
    @classmethod
    def _ssh_host(cls, value: str | None) -> str | None:
        return None if value is None else host(value, "ssh_host")

    @field_validator("ssh_user")
    @classmethod
    def _ssh_user(cls, value: str | None) -> str | None:
        return None if value is None else check(USER_RE, "SSH user", value)


class ViaSsh(SshReach):
    """An LB whose configuration lives on its host, reached over SSH."""

    ssh_host: Annotated[str, Field(description="The LB host, reached over SSH.")]


class SurgeCheck(Strict):
    """`inter`, `rise` and `fall` of an added server's health check (HAProxy's defaults)."""

    inter_ms: Annotated[int, Field(ge=10, le=3_600_000, description="Time between two checks, in ms.")] = 2000
    rise: Annotated[int, Field(ge=1, le=100, description="Passing checks before the server is UP.")] = 2
    fall: Annotated[int, Field(ge=1, le=100, description="Failing checks before the server is DOWN.")] = 3


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
    surge_check: Annotated[
        SurgeCheck,
        Field(
            description="The health check of the server the surge strategy adds for a new container: HAProxy "
            "applies no `default-server` line to a server added at run time, so give what your server lines use."
        ),
    ] = SurgeCheck()

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


def host_and_port(value: str, what: str) -> str:
    """`HOST:PORT` or `[V6]:PORT` with a port from 1 to 65535; ValueError naming `what`."""
    if not ADDRESS_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}")
    try:
        split_address(value)
    except LoadBalancerError:
        raise ValueError(f"invalid {what} {value!r}: the port must be 1-65535") from None
    return value


class TraefikSettings(LbSettings, ViaSsh):
    """Traefik v3 with its file provider: the instances are the `servers` of one service in
    a YAML dynamic configuration file on the LB host. Drain takes the server's item out of
    the list and ready puts the same bytes back (Traefik reloads the file by itself; each
    change is confirmed through Traefik's API, reached through an SSH tunnel to the LB
    host); in flight counts the LB host's TCP connections to the server (`ss`)."""

    kind: Annotated[Literal["traefik"], Field(description="Load balancer kind.")]
    dynamic_file: Annotated[
        str,
        Field(
            description="The YAML file Traefik's file provider reads (providers.file.filename, or a file in "
            "providers.file.directory) holding the service, e.g. /etc/traefik/dynamic/app.yml."
        ),
    ]
    service: Annotated[str, Field(description="The service under http.services whose servers are the instances.")]
    api_address: Annotated[
        str,
        Field(
            description="Traefik's API (its `traefik` entry point, api.insecure or a router to api@internal) "
            "as HOST:PORT seen from the LB host; reached through an SSH tunnel, so it can listen on loopback only."
        ),
    ] = "127.0.0.1:8080"
    apply_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=300,
            description="How long Traefik may take to apply an edit of the file, as its API shows "
            "(providers.providersThrottleDuration, 2 s by default, plus reading the file).",
        ),
    ] = 10.0
    max_idle_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=300,
            description="The longest idleConnTimeout accepted for the service's serversTransport: idle "
            "connections count as in flight, so each drain may wait this long for nothing.",
        ),
    ] = 5.0
    ready_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=3600,
            description="After putting a server back, the longest wait for Traefik's first health check of it "
            "(the service's healthCheck interval plus timeout must fit in it).",
        ),
    ] = 120.0

    server_what: ClassVar[str] = "server HOST:PORT (of its url http://HOST:PORT)"

    def check_server(self, name: str) -> None:
        host_and_port(name, self.server_what)

    @field_validator("dynamic_file")
    @classmethod
    def _dynamic_file(cls, value: str) -> str:
        path = absolute_posix(value, "dynamic_file")
        suffix = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if suffix == "toml":
            raise ValueError(
                f"dynamic_file {value!r} is TOML: compose-rollout edits YAML dynamic configuration only "
                "(Traefik reads either; keep the service in a .yml file)"
            )
        if suffix not in ("yml", "yaml"):
            raise ValueError(f"dynamic_file must end in .yml or .yaml (Traefik picks the format by it), got {value!r}")
        return path

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        if "@" in value:
            raise ValueError(f"service is the name under http.services, without @file, got {value!r}")
        return check(IDENT_RE, "Traefik service name", value)

    @field_validator("api_address")
    @classmethod
    def _api_address(cls, value: str) -> str:
        return host_and_port(value, "api_address HOST:PORT")


# AWS's names: regions (eu-west-1, us-gov-west-1, cn-north-1), partitions (aws, aws-cn,
# aws-us-gov, aws-iso-b, ...), target groups (1-32 letters, digits, inner hyphens) and
# EC2 instance ids (i- and 8 or 17 hex digits).
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
TARGET_GROUP_ARN_RE = re.compile(
    r"arn:aws(-[a-z]+)*:elasticloadbalancing:(?P<region>[a-z0-9-]+):[0-9]{12}:"
    r"targetgroup/[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?/[0-9a-f]{16}"
)
INSTANCE_ID_RE = re.compile(r"i-([0-9a-f]{8}|[0-9a-f]{17})")


def aws_target(name: str) -> tuple[str, int]:
    """(target id, port) of an aws `lb_server`: `i-0123456789abcdef0:8080`,
    `10.0.1.5:8080` or `[fd00::5]:8080`; ValueError if it is none of these."""
    target, colon, port = name.rpartition(":")
    if not colon or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError(f"invalid target TARGET:PORT {name!r}: it needs a port from 1 to 65535")
    if INSTANCE_ID_RE.fullmatch(target):
        return target, int(port)
    bracketed = target.startswith("[") and target.endswith("]")
    address = target[1:-1] if bracketed else target
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"invalid target TARGET:PORT {name!r}: TARGET is an EC2 instance id (i-...) or IP") from None
    if bracketed != (ip.version == 6) or str(ip) != address:
        written = f"[{ip}]" if ip.version == 6 else str(ip)
        raise ValueError(f"invalid target TARGET:PORT {name!r}: write the address as AWS does, {written}:{port}")
    return address, int(port)


class AwsSettings(LbSettings):
    """An AWS target group of an Application or Network Load Balancer (the elbv2 API).

    Drain deregisters the instance's target (AWS keeps it `draining` for the group's
    deregistration delay while requests in flight finish); ready registers it again and
    waits for AWS's own health check to report it `healthy`. Credentials come only from
    boto3's standard chain (environment, shared files, SSO, the instance or task role),
    never from the fleet file.
    """

    kind: Annotated[Literal["aws"], Field(description="Load balancer kind.")]
    region: Annotated[str, Field(description="The target group's AWS region, e.g. eu-west-1.")]
    target_group_arn: Annotated[
        str,
        Field(
            description="The target group holding the instances, e.g. "
            "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/app/0123456789abcdef."
        ),
    ]
    endpoint_url: Annotated[
        str | None,
        Field(description="Another elbv2 endpoint (a VPC interface endpoint, a test server); default: AWS's own."),
    ] = None
    healthy_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            le=3600,
            description="After registering a target, how long to wait for AWS's health check to report it healthy "
            "(at least the group's healthy threshold count times its interval).",
        ),
    ] = 300.0
    poll_interval_seconds: Annotated[
        float, Field(gt=0, le=60, description="Pause between two reads of a target's health while waiting.")
    ] = 5.0
    max_attempts: Annotated[
        int,
        Field(
            ge=1,
            le=10,
            description="Attempts per AWS API call, the first included: throttling and transient errors are "
            "retried with botocore's standard backoff.",
        ),
    ] = 5

    def check_server(self, name: str) -> None:
        aws_target(name)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        return check(REGION_RE, "AWS region", value)

    @field_validator("target_group_arn")
    @classmethod
    def _arn(cls, value: str) -> str:
        if not TARGET_GROUP_ARN_RE.fullmatch(value):
            raise ValueError(
                f"target_group_arn must be a target group's ARN, "
                f"arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID, got {value!r}"
            )
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/:?#@\[\]]+)(:[0-9]{1,5})?(/[^\s?#@]*)?", value)
        if not match:
            raise ValueError(f"endpoint_url must be an http(s) URL without credentials, got {value!r}")
        if not match.group(1).startswith("["):
            host(match.group(1), "endpoint_url host")
        if match.group(2) and not 0 < int(match.group(2)[1:]) < 65536:
            raise ValueError(f"endpoint_url has an invalid port: {value!r}")
        return value

    @model_validator(mode="after")
    def _same_region(self) -> AwsSettings:
        match = TARGET_GROUP_ARN_RE.fullmatch(self.target_group_arn)
        if match and match.group("region") != self.region:
            raise ValueError(f"target_group_arn is in region {match.group('region')}, but region is {self.region}")
        return self


# A command is the fleet owner's shell text, run by `sh`: long enough for a small script.
MAX_COMMAND_CHARS = 16384


def _command_field(description: str) -> Any:
    return Field(min_length=1, max_length=MAX_COMMAND_CHARS, description=description)


class CommandSettings(LbSettings, SshReach):
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

    @model_validator(mode="after")
    def _ssh_needs_a_host(self) -> CommandSettings:
        for name in ("ssh_port", "ssh_user"):
            if getattr(self, name) is not None and self.ssh_host is None:
                raise ValueError(f"{name} is set but ssh_host is not: the commands run on the orchestrator")
        return self


# Caddy's `@id` values as compose-rollout accepts them: one URL path segment (/id/<id>/...).
CADDY_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def admin_url_parts(value: str) -> tuple[str, int]:
    """(host, port) of a Caddy `admin_url` `http://HOST:PORT` (an IPv6 address in
    brackets); ValueError for anything else (a path, credentials, https, no port)."""
    match = re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[^\s/:?#@\[\]]+):([0-9]{1,5})/?", value)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"admin_url must be http://HOST:PORT (Caddy's `admin.listen`), got {value!r}")
    name = match.group(1)
    if name.startswith("["):
        try:
            return str(ipaddress.IPv6Address(name[1:-1])), int(match.group(2))
        except ValueError:
            raise ValueError(f"admin_url has an invalid IPv6 address: {value!r}") from None
    return host(name, "admin_url host"), int(match.group(2))


class CaddySettings(LbSettings, SshReach):
    """Caddy through its admin API: the instances are the upstreams of one `reverse_proxy`
    handler, found by its `@id`; a second, never-matching handler (the parking handler,
    its own `@id`) lists them too, so that Caddy keeps counting a drained one's requests.
    Drain takes the upstream out of the handler's list, ready puts it back."""

    kind: Annotated[Literal["caddy"], Field(description="Load balancer kind.")]
    admin_url: Annotated[
        str,
        Field(
            description="Caddy's admin API, http://HOST:PORT as its `admin.listen` says; with ssh_host it is "
            "reached from the LB host through an SSH tunnel (Caddy's default, localhost:2019, listens only there)."
        ),
    ] = "http://localhost:2019"
    ssh_host: Annotated[
        str | None,
        Field(description="The LB host: admin_url is reached from it through an SSH tunnel. Unset: directly."),
    ] = None
    upstreams_id: Annotated[
        str, Field(description="The `@id` of the reverse_proxy handler whose `upstreams` are the instances.")
    ]
    parking_id: Annotated[
        str,
        Field(
            description="The `@id` of the parking reverse_proxy handler: in a route that never matches "
            '(`"match": [{"expression": "false"}]`), listing every upstream of upstreams_id, with the same fields.'
        ),
    ] = "rollout_parking"

    server_what: ClassVar[str] = "upstream dial address HOST:PORT"

    def check_server(self, name: str) -> None:
        check(ADDRESS_RE, self.server_what, name)
        if not 0 < int(name.rpartition(":")[2]) < 65536:
            raise ValueError(f"invalid {self.server_what} {name!r}: the port is not from 1 to 65535")

    @field_validator("admin_url")
    @classmethod
    def _admin_url(cls, value: str) -> str:
        admin_url_parts(value)
        return value.rstrip("/")

    @field_validator("upstreams_id", "parking_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check(CADDY_ID_RE, "Caddy @id", value)

    @model_validator(mode="after")
    def _two_handlers(self) -> CaddySettings:
        if self.upstreams_id == self.parking_id:
            raise ValueError(f"upstreams_id and parking_id must name two handlers, both are {self.upstreams_id!r}")
        if self.ssh_host is None and (self.ssh_port is not None or self.ssh_user is not None):
            raise ValueError("ssh_port and ssh_user need ssh_host (the LB host to tunnel through)")
        return self


KINDS: dict[str, type[LbSettings]] = {
    "haproxy": HaproxySettings,
    "nginx": NginxSettings,
    "caddy": CaddySettings,
    "traefik": TraefikSettings,
    "aws": AwsSettings,
    "command": CommandSettings,
}


def _kind(data: Any) -> str:
    kind = data.get("kind", "haproxy") if isinstance(data, dict) else getattr(data, "kind", "haproxy")
    return kind if kind in KINDS else "unknown"


LoadBalancerSettings = Annotated[
    Annotated[HaproxySettings, Tag("haproxy")]
    | Annotated[NginxSettings, Tag("nginx")]
    | Annotated[AwsSettings, Tag("aws")]
    | Annotated[CaddySettings, Tag("caddy")]
    | Annotated[CommandSettings, Tag("command")]
    | Annotated[TraefikSettings, Tag("traefik")],
    Discriminator(
        _kind,
        custom_error_type="load_balancer_kind",
        custom_error_message=f"unknown load balancer kind; the kinds are {', '.join(KINDS)}",
    ),
]
