"""Serving the receiver: bounds on slow and idle connections, and on requests in progress.

uvicorn alone lets a handful of sockets block the receiver: its h11 protocol has no
limit on the time to send a request head (a new connection that sends nothing, or one
byte a second, stays open for ever), and `limit_concurrency` counts open connections,
so about 64 idle sockets made every webhook answer 503 for as long as they stayed.
Here a connection must complete its request head within `header_timeout_seconds`
(counted from the connection, or from the first byte of a kept-alive connection's next
request) or it is closed; an idle kept-alive connection is closed after
`keep_alive_seconds`; and `max_concurrent_requests` counts only requests whose head
has arrived and whose answer has not been sent (`InFlightLimit`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

from compose_rollout.errors import ConfigError
from compose_rollout.triggers.webhooks.settings import WebhookSettings

logger = logging.getLogger("compose_rollout.triggers.webhooks")

Scope = dict[str, Any]
Receive = Any
Send = Any
ASGIApp = Any


class InFlightLimit:
    """ASGI middleware: at most `limit` HTTP requests in progress; the next ones get 503 at once."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            logger.warning("answered 503: %d requests already in progress", self.in_flight)
            body = json.dumps({"error": f"busy: {self.in_flight} requests in progress, try again"}).encode()
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late.

    The deadline is armed when the connection opens and when a kept-alive connection
    receives the first byte of its next request (uvicorn's own keep-alive timer covers
    the idle time before that byte), and disarmed once a request head is complete.
    """

    header_timeout_seconds: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._request_in_progress():
            self._arm_head_deadline()
        super().data_received(data)
        if self._request_in_progress():
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request's head
        if self._request_in_progress():
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_timer = self.loop.call_later(self.header_timeout_seconds, self._head_too_late)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._request_in_progress():
            return
        # Debug only: under a flood of such connections this line would be the flood.
        client = get_remote_addr(self.transport)
        logger.debug("closed a connection from %s: no request head within %g s", client, self.header_timeout_seconds)
        self.transport.close()


def head_deadline_protocol(header_timeout_seconds: float) -> type[HeadDeadlineProtocol]:
    """The protocol class uvicorn instantiates per connection, with this deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"header_timeout_seconds": header_timeout_seconds})


def serve(app: ASGIApp, settings: WebhookSettings) -> None:
    """Serve `app` with uvicorn until interrupted; ConfigError if the TLS files do not load."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        http=head_deadline_protocol(settings.header_timeout_seconds),
        ws="none",
        lifespan="on",
        access_log=False,  # the Docker Hub URL carries its token
        server_header=False,
        limit_concurrency=None,  # it counts idle connections: InFlightLimit counts requests instead
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 1,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
        log_level="info",
    )
    try:
        config.load()  # reads the TLS files now, so a bad one is a clear error and exit 2
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"tls_certfile/tls_keyfile: {error}") from None
    uvicorn.Server(config).run()
