"""Traefik's dynamic configuration file (its file provider, YAML): a service's servers,
and the same file with some of them out of the list. Pure: text in, text out.

The file stays the user's. It is never re-serialised: the YAML composer only locates
each item of `http.services.NAME.loadBalancer.servers`, and taking servers out splices
their text out of the original (a block item with the comment lines right above it,
which describe it; a flow item with the separator after it). Putting servers back is
rendering the original again with fewer servers out, so a drain and a ready give back
the original bytes. A server added beside another is a copy of that one's item (its
comment lines and fields) with its URL's port changed, right after it; a server moved
is its item with the port of its URL changed. Every result is parsed again and must be
the original data with exactly that change to the list, else nothing is written.

Refused rather than guessed at: Go templates (`{{ }}`, which Traefik renders before it
parses), a server list built with anchors or aliases, a server URL that Traefik would
apply and then answer 404 with (no scheme), two items for the same HOST:PORT.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from compose_rollout.errors import LoadBalancerError
from compose_rollout.lb.connections import split_address

DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80}
_URL_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s/:?#@\[\]]+)"
    r"(?::(?P<port>[0-9]{1,5}))?(?P<path>/[^\s]*)?"
)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def server_name(url: str, where: str) -> str:
    """HOST:PORT of a server URL as Traefik's file lists it (`http://10.0.1.5:8080`), the
    scheme's port when it has none; LoadBalancerError for what Traefik would not reach."""
    match = _URL_RE.fullmatch(url)
    if not match:
        hint = " (it has no scheme: Traefik applies it and answers 404)" if "://" not in url else ""
        raise LoadBalancerError(f"{where}: server url {url!r} is not SCHEME://HOST[:PORT][/path]{hint}")
    scheme = match.group("scheme").lower()
    if scheme not in DEFAULT_PORTS:
        raise LoadBalancerError(f"{where}: server url {url!r} has scheme {scheme}; Traefik takes http, https or h2c")
    port = match.group("port") or str(DEFAULT_PORTS[scheme])
    name = f"{match.group('host')}:{port}"
    split_address(name)  # a valid host and a port in 1-65535
    return name


def url_at_port(url: str, port: int, where: str) -> str:
    """`url` sending to `port` on the same host (scheme and path kept)."""
    server_name(url, where)
    if not 0 < port < 65536:
        raise LoadBalancerError(f"{where}: port {port} is not 1-65535")
    match = _URL_RE.fullmatch(url)
    assert match is not None  # server_name checked it
    if match.group("port") is None:
        return f"{url[: match.end('host')]}:{port}{url[match.end('host') :]}"
    return f"{url[: match.start('port')]}{port}{url[match.end('port') :]}"


def go_duration(value: object, what: str) -> float:
    """Seconds of a Traefik duration: a Go duration (`500ms`, `1m30s`) or a number of seconds."""
    if isinstance(value, bool):
        raise LoadBalancerError(f"{what}: {value!r} is not a duration")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]*)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise LoadBalancerError(f"{what}: {value!r} is not a duration like 500ms, 10s or 1m30s")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


@dataclass(frozen=True)
class Item:
    """One server of the list: its name, URL and where its text is."""

    name: str  # HOST:PORT
    url: str
    start: int  # the text taken out with it (block: whole lines; flow: the item alone)
    end: int
    url_start: int  # the url's scalar, quotes included
    url_end: int


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _through_line_end(text: str, index: int) -> int:
    """`index` moved to the start of the next line (itself if it already is one)."""
    if index > 0 and text[index - 1] == "\n":
        return index
    found = text.find("\n", index)
    return len(text) if found < 0 else found + 1


def _content_end(node: Node) -> int:
    """Where a node's own text ends: a block collection's end mark lies past the comment
    lines after it (they may belong to the next item), its last value's does not."""
    if isinstance(node, MappingNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1][1])
    if isinstance(node, SequenceNode) and not node.flow_style and node.value:
        return _content_end(node.value[-1])
    return int(node.end_mark.index)


def _get(node: Node | None, key: str) -> Node | None:
    if not isinstance(node, MappingNode):
        return None
    found = [value for name, value in node.value if isinstance(name, ScalarNode) and name.value == key]
    return found[-1] if found else None


def _plain(text: str, where: str) -> Any:
    try:
        return YAML(typ="safe", pure=True).load(io.StringIO(text))
    except YAMLError as error:
        raise LoadBalancerError(f"{where}: not valid YAML: {error}") from None


class DynamicFile:
    """A dynamic configuration file and one service's server list in it."""

    def __init__(self, text: str, service: str, where: str) -> None:
        self.text = text
        self.service = service
        self.where = where
        if "{{" in text:
            raise LoadBalancerError(
                f"{where} is a Go template (it has `{{{{`): Traefik renders it before reading it, so "
                "compose-rollout cannot edit what Traefik sees; keep the servers in a plain YAML file"
            )
        try:
            root = YAML(typ="rt").compose(io.StringIO(text))
        except YAMLError as error:
            raise LoadBalancerError(f"{where}: not valid YAML: {error}") from None
        self.data = _plain(text, where)
        services = _get(_get(root, "http"), "services") if root is not None else None
        if not isinstance(services, MappingNode):
            raise LoadBalancerError(f"{where} has no `http.services` mapping (is it Traefik's dynamic configuration?)")
        definition = _get(services, service)
        if definition is None:
            known = ", ".join(str(name.value) for name, _ in services.value) or "none"
            raise LoadBalancerError(f"{where} has no service {service!r} under http.services (services: {known})")
        balancer = _get(definition, "loadBalancer")
        if balancer is None:
            raise LoadBalancerError(f"{where}: service {service!r} is not a loadBalancer service")
        servers = _get(balancer, "servers")
        if not isinstance(servers, SequenceNode):
            raise LoadBalancerError(f"{where}: service {service!r} has no `loadBalancer.servers` list")
        self.flow = bool(servers.flow_style)
        self._sequence = (int(servers.start_mark.index), int(servers.end_mark.index))
        self.items = tuple(self._item(i, node) for i, node in enumerate(servers.value))
        names = [item.name for item in self.items]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise LoadBalancerError(f"{where}: service {service!r} lists {', '.join(twice)} more than once")
        if not self.flow:
            for before, after in zip(self.items, self.items[1:], strict=False):
                if before.end > after.start:
                    raise LoadBalancerError(f"{where}: the server list of {service!r} has a layout not understood")

    def _item(self, index: int, node: Node) -> Item:
        what = f"{self.where}: server #{index + 1} of service {self.service!r}"
        start, end = int(node.start_mark.index), _content_end(node)
        # An alias refers to a node elsewhere: taking it out of the list would not be a splice.
        if not self._sequence[0] <= start < self._sequence[1] or getattr(node, "anchor", None):
            raise LoadBalancerError(f"{what} is a YAML anchor or alias; list the servers plainly")
        url = _get(node, "url")
        if not isinstance(url, ScalarNode) or not str(url.tag).endswith(":str"):
            raise LoadBalancerError(f"{what} has no `url:` string")
        name = server_name(str(url.value), what)
        spans = (int(url.start_mark.index), int(url.end_mark.index))
        if self.flow:
            return Item(name, str(url.value), start, end, *spans)
        dash = start - 1
        while dash >= 0 and self.text[dash] in " \t\r\n":
            dash -= 1
        if dash < 0 or self.text[dash] != "-" or self.text[_line_start(self.text, dash) : dash].strip():
            raise LoadBalancerError(f"{what}: its `-` is not where a block list item has it")
        begin = _line_start(self.text, dash)
        while begin > 0:  # the comment lines right above an item are about it
            above = _line_start(self.text, begin - 1)
            if not self.text[above:begin].strip().startswith("#"):
                break
            begin = above
        return Item(name, str(url.value), begin, _through_line_end(self.text, end), *spans)

    @property
    def names(self) -> list[str]:
        """The servers' HOST:PORT, in the file's order."""
        return [item.name for item in self.items]

    def urls(self, without: AbstractSet[str] = frozenset()) -> list[str]:
        """The servers' URLs as Traefik's API lists them, in order, less `without`."""
        return [item.url for item in self.items if item.name not in without]

    def without(self, names: AbstractSet[str]) -> str:
        """The text with the servers `names` taken out, and nothing else changed."""
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise LoadBalancerError(
                f"{self.where}: service {self.service!r} has no server {', '.join(unknown)} "
                f"(servers: {', '.join(self.names)})"
            )
        if not names:
            return self.text
        if set(names) == set(self.names):
            raise LoadBalancerError(
                f"{self.where}: taking out {', '.join(sorted(names))} would leave service {self.service!r} with no "
                "server (Traefik would answer 503); refused"
            )
        kept = [item for item in self.items if item.name not in names]
        if self.flow:
            pieces = []
            for item in kept:
                pieces.append(self.text[item.start : item.end])
                following = self.items.index(item) + 1
                if item is not kept[-1]:  # the separator (comma, spaces, comments) after it
                    pieces.append(self.text[item.end : self.items[following].start])
            text = self.text[: self.items[0].start] + "".join(pieces) + self.text[self.items[-1].end :]
        else:
            text = self.text
            for item in reversed(self.items):
                if item.name in names:
                    text = text[: item.start] + text[item.end :]
        self._prove(text, names)
        return text

    def with_copy(self, beside: str, port: int) -> tuple[str, str]:
        """The text with a copy of `beside`'s item sending to `port` right after it, and
        nothing else changed; and the new server's name. Its comment lines come with it:
        when `beside` is later taken out for good, the copy reads as the original did."""
        item = self._known(beside)
        url = url_at_port(item.url, port, self.where)
        copied = self._rewritten(item, url)
        if self.flow:
            following = self.items.index(item) + 1
            gap = self.text[item.end : self.items[following].start] if following < len(self.items) else ", "
            text = self.text[: item.end] + gap + copied + self.text[item.end :]
        else:
            text = self.text[: item.end] + copied + self.text[item.end :]
        servers = self._servers()
        index = self.items.index(item)
        servers.insert(index + 1, {**copy.deepcopy(servers[index]), "url": url})
        self._compare(text, servers, f"add a server beside {beside} to")
        return text, server_name(url, self.where)

    def with_port(self, name: str, port: int) -> tuple[str, str]:
        """The text with server `name` sending to `port`, and nothing else changed; and its
        name afterwards."""
        item = self._known(name)
        url = url_at_port(item.url, port, self.where)
        text = self.text[: item.start] + self._rewritten(item, url) + self.text[item.end :]
        servers = self._servers()
        servers[self.items.index(item)]["url"] = url
        self._compare(text, servers, f"move {name} to port {port} in")
        return text, server_name(url, self.where)

    def _known(self, name: str) -> Item:
        for item in self.items:
            if item.name == name:
                return item
        raise LoadBalancerError(
            f"{self.where}: service {self.service!r} has no server {name} (servers: {', '.join(self.names)})"
        )

    def _rewritten(self, item: Item, url: str) -> str:
        """`item`'s text with its URL replaced where it is written (quotes kept)."""
        scalar = self.text[item.url_start : item.url_end]
        if scalar.count(item.url) != 1:
            raise LoadBalancerError(
                f"{self.where}: the url of {item.name} is written in a way compose-rollout does not rewrite "
                f"({scalar!r}); write it on one line, without escapes"
            )
        before, after = self.text[item.start : item.url_start], self.text[item.url_end : item.end]
        return before + scalar.replace(item.url, url) + after

    def _servers(self) -> list[Any]:
        """A copy of the service's server list as data."""
        return list(copy.deepcopy(self.data["http"]["services"][self.service]["loadBalancer"]["servers"]))

    def _prove(self, text: str, names: AbstractSet[str]) -> None:
        """`text` must read as this file's data with exactly those servers out of the list."""
        servers = [server for server, item in zip(self._servers(), self.items, strict=True) if item.name not in names]
        self._compare(text, servers, f"take {', '.join(sorted(names))} out of")

    def _compare(self, text: str, servers: list[Any], what: str) -> None:
        """`text` must read as this file's data with `servers` as the service's list."""
        expected = copy.deepcopy(self.data)
        expected["http"]["services"][self.service]["loadBalancer"]["servers"] = servers
        try:
            found = _plain(text, self.where)
        except LoadBalancerError:
            found = None
        if found != expected:
            raise LoadBalancerError(
                f"{self.where}: cannot {what} service {self.service!r} without changing something else in the "
                "file; nothing written"
            )


def servers_transport(dynamic: DynamicFile) -> tuple[str | None, dict[str, Any] | None]:
    """(the name of the service's serversTransport as written, its definition in this file
    or None when it is not here)."""
    balancer = dynamic.data["http"]["services"][dynamic.service]["loadBalancer"]
    name = balancer.get("serversTransport") if isinstance(balancer, dict) else None
    if name is None:
        return None, None
    own, _, provider = str(name).partition("@")
    transports = (dynamic.data.get("http") or {}).get("serversTransports") or {}
    if provider not in ("", "file") or not isinstance(transports, dict):
        return str(name), None
    found = transports.get(own)
    return str(name), found if isinstance(found, dict) else None


def check_idle_connections(dynamic: DynamicFile, limit_seconds: float) -> str:
    """How the service's servers transport keeps connections == requests in flight; or
    LoadBalancerError saying what to set.

    compose-rollout counts requests in flight as Traefik's TCP connections to the server.
    Traefik's default transport keeps idle connections open 90 s: a drain would wait for
    them. Either no idle pool (`maxIdleConnsPerHost: -1`) or a short idle timeout."""
    name, definition = servers_transport(dynamic)
    fix = (
        "compose-rollout counts requests in flight as Traefik's TCP connections to a server, so idle ones "
        "must not linger: give the service a serversTransport defined in this file with "
        "`maxIdleConnsPerHost: -1` or `forwardingTimeouts: {idleConnTimeout: 1s}` "
        f"(at most load_balancer.max_idle_seconds = {limit_seconds:g} s)"
    )
    where = f"{dynamic.where}: service {dynamic.service!r}"
    if name is None:
        raise LoadBalancerError(
            f"{where} uses Traefik's default servers transport, which keeps idle connections open 90 s unless the "
            f"static configuration says otherwise (which compose-rollout cannot read). {fix}"
        )
    if definition is None:
        raise LoadBalancerError(f"{where} uses serversTransport {name}, which is not defined in this file. {fix}")
    per_host = definition.get("maxIdleConnsPerHost")
    if isinstance(per_host, int) and not isinstance(per_host, bool) and per_host < 0:
        return f"serversTransport {name}: maxIdleConnsPerHost {per_host} (no idle connections)"
    timeouts = definition.get("forwardingTimeouts") or {}
    idle = timeouts.get("idleConnTimeout") if isinstance(timeouts, dict) else None
    if idle is None:
        raise LoadBalancerError(f"{where}: serversTransport {name} keeps idle connections 90 s (the default). {fix}")
    seconds = go_duration(idle, f"{where}: serversTransport {name} idleConnTimeout")
    if not 0 < seconds <= limit_seconds:  # 0 is no limit at all in Go
        raise LoadBalancerError(f"{where}: serversTransport {name} has idleConnTimeout {idle}. {fix}")
    return f"serversTransport {name}: idleConnTimeout {idle}"


PARKED_FORMAT = "compose-rollout traefik parked servers"


@dataclass(frozen=True)
class Parked:
    """What compose-rollout keeps beside the file while it has servers out of the list:
    the file as it was with all of them in it, and which are out. A later run (or
    `rollout recover`) puts them back from it exactly. A server added, and not yet put
    in, is one of them: `original` has its item, the file never had it."""

    service: str
    original: str
    parked: frozenset[str]

    def encode(self) -> bytes:
        document = {
            "format": PARKED_FORMAT,
            "version": 1,
            "service": self.service,
            "parked": sorted(self.parked),
            "original": self.original,
        }
        return (json.dumps(document, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> Parked:
        try:
            document = json.loads(data)
            if document.get("format") != PARKED_FORMAT or document.get("version") != 1:
                raise ValueError("not a record compose-rollout wrote")
            parked = document["parked"]
            if not isinstance(parked, list) or not all(isinstance(name, str) for name in parked):
                raise ValueError("parked is not a list of servers")
            return cls(str(document["service"]), str(document["original"]), frozenset(parked))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LoadBalancerError(
                f"{where}: unreadable ({error}); move it away once the file is as it should be"
            ) from None
