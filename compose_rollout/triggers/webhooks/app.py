"""The ASGI app (routes, authentication, bounds) and the `main` that serves it."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compose_rollout.errors import ConfigError
from compose_rollout.triggers.webhooks.payloads import (
    EventRefusal,
    PayloadError,
    Push,
    Source,
    github_signature,
    parse_distribution,
    parse_dockerhub,
    parse_github,
    same_secret,
)
from compose_rollout.triggers.webhooks.prefect_runs import PrefectRuns, RunCreator
from compose_rollout.triggers.webhooks.receiver import Receiver
from compose_rollout.triggers.webhooks.routing import plan_runs, validate_push
from compose_rollout.triggers.webhooks.serving import InFlightLimit, serve
from compose_rollout.triggers.webhooks.settings import PrefectApi, WebhookSettings, load_webhook_settings

DISTRIBUTION_MEDIA_TYPES = (
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",  # distribution v3
    "application/json",
)
# GitHub's X-GitHub-Delivery is a GUID; anything else is refused rather than remembered.
_DELIVERY_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
logger = logging.getLogger("compose_rollout.triggers.webhooks")


class Refused(Exception):
    """A request answered with a 4xx (and nothing started)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Refused(400, "invalid Content-Length")
        if int(length) > limit:
            raise Refused(413, f"body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"body over {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Refused(408, f"body not received within {timeout:g} s") from None
    return b"".join(chunks)


def _require_json(request: Request, accepted: Sequence[str]) -> None:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in accepted:
        raise Refused(415, f"content type must be one of {', '.join(accepted)}")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _prefect_defaults(api: PrefectApi) -> tuple[str, PrefectApi]:
    if api.api_url is not None:
        return api.api_url, api
    # Only when the file leaves them out: Prefect's own settings (profile, environment).
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("set prefect.api_url in the webhook config, or PREFECT_API_URL")
    auth = PREFECT_API_AUTH_STRING.value()
    if api.auth_string is None and api.api_key is None and auth:
        api = api.model_copy(update={"auth_string": SecretStr(str(auth))})
    return str(url), api


def create_app(
    settings: WebhookSettings,
    *,
    runs: RunCreator | None = None,
    prefect_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Starlette:
    """The receiver as an ASGI app. `runs` or `prefect_transport` replace the Prefect side
    and the clocks are injectable, for tests; the app's state holds the `receiver`
    (pending pushes, started runs)."""
    prefect_runs: PrefectRuns | None = None
    if runs is None:
        api_url, api = _prefect_defaults(settings.prefect)
        prefect_runs = PrefectRuns(api, api_url, transport=prefect_transport)
        runs = prefect_runs
    receiver = Receiver(settings, runs, clock, wall_clock)

    async def accept(
        request: Request,
        source: Source,
        pushes: list[Push],
        refused: Sequence[EventRefusal] | None = None,
        delivery: str | None = None,
    ) -> Response:
        """Offer the request's pushes; a malformed one refuses the whole request (422).
        `refused`: the events a multi-event source refused on their own, reported in the answer."""
        for push in pushes:
            try:
                validate_push(push)
            except ConfigError as error:
                logger.warning("refused a %s request from %s: %s", source, _client(request), error)
                raise Refused(422, str(error)) from None
        for refusal in refused or []:
            logger.warning(
                "refused event %d (id %r) of a %s request from %s: %s",
                refusal.index,
                refusal.event_id,
                source,
                _client(request),
                refusal.error,
            )
        planned, ignored = plan_runs(pushes, settings.routes, receiver.clock(), receiver.wall_clock(), delivery)
        accepted = []
        for run in planned:
            outcome = receiver.offer(run)
            logger.info("%s push of %s for fleet %s: %s", source, run.push, run.fleet, outcome)
            accepted.append({"fleet": run.fleet, "tag": run.push.tag, "outcome": outcome})
        for item in ignored:
            logger.info("%s push of %s:%s ignored: %s", source, item.repository, item.tag, item.reason)
        if delivery is not None:
            receiver.remember_delivery(delivery)
        receiver.save()
        body: dict[str, object] = {"accepted": accepted, "ignored": [asdict(item) for item in ignored]}
        if refused is not None:
            body["refused"] = [{"event": r.index, "id": r.event_id, "error": r.error} for r in refused]
        return JSONResponse(body, status_code=202 if accepted else 200)

    def unauthorized(request: Request, source: Source) -> Refused:
        logger.warning("refused an unauthenticated %s request from %s", source, _client(request))
        return Refused(401, "not authenticated")

    async def distribution(request: Request) -> Response:
        source = settings.distribution
        assert source is not None
        if not same_secret(request.headers.get("authorization"), source.authorization.get_secret_value()):
            raise unauthorized(request, "distribution")
        _require_json(request, DISTRIBUTION_MEDIA_TYPES)
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        # A registry retries a refused envelope for ever: the good events count, the bad are reported.
        pushes, refused = parse_distribution(body, source.registry_host)
        return await accept(request, "distribution", pushes, refused)

    async def github(request: Request) -> Response:
        source = settings.github
        assert source is not None
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        if not same_secret(request.headers.get("x-hub-signature-256"), github_signature(source.secret, body)):
            raise unauthorized(request, "github")
        _require_json(request, ("application/json",))
        event = request.headers.get("x-github-event", "")
        if event == "ping":
            return JSONResponse({"pong": True})
        # Not signed, so no proof on its own; but a replay of a delivery already accepted
        # (captured, or resent as is) starts nothing, and GitHub's Redeliver of a delivery
        # whose run could not be created is tried again (its id is forgotten then).
        delivery = request.headers.get("x-github-delivery", "")
        if not _DELIVERY_RE.fullmatch(delivery):
            raise Refused(400, "missing or malformed X-GitHub-Delivery")
        if receiver.known_delivery(delivery):
            logger.warning("refused a repeated github delivery %s from %s", delivery, _client(request))
            return JSONResponse({"accepted": [], "ignored": [], "duplicate_delivery": delivery})
        return await accept(request, "github", parse_github(body, event), delivery=delivery)

    async def dockerhub(request: Request) -> Response:
        source = settings.dockerhub
        assert source is not None
        if not same_secret(request.path_params.get("token"), source.token.get_secret_value()):
            raise unauthorized(request, "dockerhub")
        _require_json(request, ("application/json",))
        body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_seconds)
        return await accept(request, "dockerhub", parse_dockerhub(body))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "pending": receiver.coalescer.pending_count, "creating": receiver.creating})

    async def refused(request: Request, error: Exception) -> Response:
        assert isinstance(error, Refused)
        return JSONResponse({"error": error.message}, status_code=error.status)

    async def malformed(request: Request, error: Exception) -> Response:
        logger.warning("refused a malformed request from %s: %s", _client(request), error)
        return JSONResponse({"error": str(error)}, status_code=400)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop_task = asyncio.create_task(receiver.run())
        try:
            yield
        finally:
            loop_task.cancel()
            with suppress(asyncio.CancelledError):
                await loop_task
            await receiver.drain(settings.shutdown_grace_seconds)
            if prefect_runs is not None:
                await prefect_runs.aclose()

    routes = [Route("/healthz", healthz, methods=["GET"])]
    if settings.distribution is not None:
        routes.append(Route("/hooks/distribution", distribution, methods=["POST"]))
    if settings.github is not None:
        routes.append(Route("/hooks/github", github, methods=["POST"]))
    if settings.dockerhub is not None:
        routes.append(Route("/hooks/dockerhub/{token}", dockerhub, methods=["POST"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Refused: refused, PayloadError: malformed},
        middleware=[Middleware(InFlightLimit, limit=settings.max_concurrent_requests)],
    )
    app.state.receiver = receiver
    return app


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m compose_rollout.triggers.webhooks --config FILE`: serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m compose_rollout.triggers.webhooks", description="Registry push webhooks → Prefect rollout runs."
    )
    parser.add_argument("--config", required=True, type=Path, help="the receiver's YAML file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_webhook_settings(args.config)
        app = create_app(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    logger.info(
        "listening on %s:%d (%s) for %s; %d routes",
        settings.listen_host,
        settings.listen_port,
        "https" if settings.tls_certfile else "http",
        ", ".join(s for s in ("distribution", "github", "dockerhub") if getattr(settings, s) is not None),
        len(settings.routes),
    )
    if settings.tls_certfile is None and not _loopback(settings.listen_host):
        logger.warning(
            "serving plain HTTP on %s: the shared secret and the Docker Hub token cross the network in clear; "
            "set tls_certfile/tls_keyfile or put a TLS proxy in front and listen on 127.0.0.1",
            settings.listen_host,
        )
    try:
        serve(app, settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
