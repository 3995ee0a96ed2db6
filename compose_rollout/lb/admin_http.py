"""HTTP/1.1 to a load balancer's admin API over a stream the caller opens: a TCP
connection from here, or an SSH tunnel from the LB host (`SshHost.open_tunnel`) to an
API that listens only on that host's loopback (Caddy's `localhost:2019`).

One request per stream (`Connection: close`), with the Host header of the API's own
address (Caddy refuses other hosts on a loopback listener). Never a proxy or credentials
from the environment (`requests` would take HTTP_PROXY and ~/.netrc). Each phase (open,
send, read the head, read each part of the body) waits at most the time left of the
call's `timeout`, and the answer is at most `MAX_ANSWER_BYTES`.

A connection broken after the request was sent and before the answer (reset, closed)
is `AnswerLost`; a GET is first sent again on a new connection (`GET_RESENDS` times),
as HTTP clients do, since Caddy resets connections to its admin API around each config
load. A change is never sent again here: its sender reads the state and decides.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

from compose_rollout.errors import AnswerLost, LoadBalancerError, RolloutError
from compose_rollout.hosts.ssh import Stream

MAX_ANSWER_BYTES = 16 * 1024 * 1024
# A GET whose connection broke before the answer is sent again, on a new connection,
# this many more times: Caddy replaces its admin server on every config load and shuts
# the old one down in the background, which resets a connection it had just accepted.
GET_RESENDS = 2
RESEND_PAUSE_SECONDS = 0.05


# (host, port, timeout) -> a stream connected to the admin API
OpenStream = Callable[[str, int, float], Stream]


def tcp_stream(host: str, port: int, timeout: float) -> Stream:
    """A TCP connection from this machine."""
    return socket.create_connection((host, port), timeout=timeout)


@dataclass(frozen=True)
class Answer:
    """The admin API's answer to one request."""

    status: int
    body: bytes


class AdminApi(Protocol):
    """One request to the admin API. `HttpAdmin` is the real one; unit tests fake it."""

    where: str  # the API, for people: `caddy admin http://localhost:2019 through SSH to lb1`

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        """The answer, whatever its status; LoadBalancerError if none came in time."""
        ...


def request_head(method: str, path: str, host: str, port: int, headers: Mapping[str, str], length: int) -> bytes:
    """The bytes of an HTTP/1.1 request head; ValueError for a method, path or header
    that would not stay on its line (none comes from a user unchecked, this is the guard)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    fields = {"Host": authority, **headers, "Content-Length": str(length), "Connection": "close"}
    parts = [method, path, *fields, *fields.values()]
    if any(not part or any(c in part for c in "\r\n\0") for part in parts) or " " in method + path:
        raise ValueError(f"refusing to send a request with a broken line: {method} {path} {fields}")
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpAdmin:
    """The admin API at `http://host:port`, each request on a new stream from `open_stream`."""

    def __init__(
        self,
        host: str,
        port: int,
        open_stream: OpenStream,
        timeout: float,
        where: str,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.port = port
        self.open_stream = open_stream
        self.timeout = timeout
        self.where = where
        self._monotonic = monotonic
        self._sleep = sleep

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Answer:
        resends = GET_RESENDS if method == "GET" else 0
        for resend in range(resends + 1):
            try:
                return self._once(method, path, body, headers)
            except AnswerLost:
                if resend == resends:
                    raise
                self._sleep(RESEND_PAUSE_SECONDS * (resend + 1))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _once(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> Answer:
        deadline = self._monotonic() + self.timeout
        head = request_head(method, path, self.host, self.port, headers or {}, len(body or b""))
        what = f"{self.where}: {method} {path}"
        try:
            stream = self.open_stream(self.host, self.port, self.timeout)
        except (OSError, RolloutError) as error:
            reason = str(error) if isinstance(error, RolloutError) else _reason(error)
            raise LoadBalancerError(f"{what}: cannot connect ({reason})") from None
        response: http.client.HTTPResponse | None = None
        try:
            self._bound(stream, deadline)
            stream.sendall(head + (body or b""))
            self._bound(stream, deadline)
            # http.client reads the answer (chunked or not) through stream.makefile("rb").
            response = http.client.HTTPResponse(cast(socket.socket, stream), method=method)
            response.begin()
            data = bytearray()
            while True:
                self._bound(stream, deadline)
                part = response.read(65536)
                if not part:
                    if response.length:  # read(amt) ends quietly at a close before Content-Length
                        raise http.client.IncompleteRead(bytes(data), response.length)
                    return Answer(response.status, bytes(data))
                data += part
                if len(data) > MAX_ANSWER_BYTES:
                    raise LoadBalancerError(f"{what}: the answer is longer than {MAX_ANSWER_BYTES} bytes")
        except (OSError, http.client.HTTPException) as error:
            # Reset or closed (not timed out): the request went out, the answer was lost.
            lost = isinstance(error, (ConnectionError, http.client.BadStatusLine, http.client.IncompleteRead))
            raise (AnswerLost if lost else LoadBalancerError)(
                f"{what}: no complete answer ({_reason(error)})"
            ) from None
        finally:
            if response is not None:
                response.close()
            stream.close()

    def _bound(self, stream: Stream, deadline: float) -> None:
        remaining = deadline - self._monotonic()
        if remaining <= 0:
            raise TimeoutError("out of time")
        stream.settimeout(remaining)


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"timed out: {error}" if str(error) else "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
