"""Registry push webhooks → Prefect flow runs of a fleet's rollout deployment.

Its own process: `python -m compose_rollout.triggers.webhooks --config webhooks.yaml` serves

    POST /hooks/distribution      CNCF distribution (docker registry) notifications
    POST /hooks/github            GitHub `package` events for ghcr.io images
    POST /hooks/dockerhub/TOKEN   Docker Hub webhooks
    GET  /healthz

and turns each accepted push into `POST {PREFECT_API_URL}/deployments/{id}/create_flow_run`
with the parameters `fleet_file`, `tag`, `triggered_by` and `requested_at` (the source's
own push time when it gives one that is not in the future, else when the push was
received; the flow's newest-request rule orders runs by it, so a push that waited for a
window does not undo an urgent deploy made meanwhile). Open-source Prefect has no
webhooks of its own (they are a Prefect Cloud feature), hence this relay.

Authentication (a request that fails it gets 401 and starts nothing):

- distribution: the exact `Authorization` header value configured, which the registry
  sends through its endpoint configuration::

      notifications:
        endpoints:
          - name: compose-rollout
            url: https://deploy.example.com/hooks/distribution
            headers:
              Authorization: [Bearer <the secret>]

- GitHub: `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the raw body>` with the
  webhook's secret (content type `application/json`).
- Docker Hub signs nothing, so the URL carries a long random token:
  `https://deploy.example.com/hooks/dockerhub/<token>`. Anyone who sees that URL can
  trigger a deploy of a tag that exists; keep it out of proxy access logs (this
  process logs no request paths).

Every secret is a SecretStr, compared with `hmac.compare_digest`, and never logged.
The distribution secret and the Docker Hub token travel in every request: serve HTTPS
(`tls_certfile`/`tls_keyfile`), or listen on 127.0.0.1 behind a TLS proxy (Caddy, nginx);
the receiver warns at start when it serves plain HTTP on another address.

What is started:

- Only tag pushes of routed repositories; every tag passes `validate_tag` and the
  route's `TagPolicy` (never `latest`, `sha-*`, a non-version or a pre-release unless
  allowed). A GitHub or Docker Hub request carrying a malformed tag, repository or
  digest (or a Docker Hub `pushed_at` that is not a finite time) is refused (422/400)
  and starts nothing. In a distribution envelope each event stands alone: the good
  ones start, the malformed ones are listed under `refused` in the 2xx answer and
  logged (a registry resends a refused envelope for ever). A request over
  `max_body_bytes` gets 413 before it is read.
- The same push delivered twice starts one run: the idempotency key is
  `compose-rollout/<fleet>/<tag>/<digest>` (Docker Hub sends no digest: its
  `pushed_at` stands in). The receiver remembers recent keys and GitHub delivery ids
  (`X-GitHub-Delivery`, required) in `state_directory`, across restarts, and Prefect
  itself returns the existing run for a known key. A push whose run could not be
  created, for whatever reason, is forgotten, so a redelivery is tried again.
- A push older than the version of the fleet's last webhook run (remembered across
  restarts) starts nothing, unless the route sets `allow_downgrade: true`: a late
  delivery or a replayed request never rolls a fleet back.
- Pushes for one fleet within `debounce_seconds` of each other (at most
  `debounce_max_seconds` after the first) coalesce: only the newest starts. Newest is
  the highest version by `tag_policy.version_key` when both tags are versions, else
  the one received last.
- A route may carry its fleet's maintenance windows: a run for a push outside them is
  created Scheduled for the next window start (`windows.scheduled_start`).
- Once a run exists, this fleet's older webhook runs that are still Scheduled are set
  Cancelling (as `prefect flow-run cancel` does; the server makes a run no worker
  holds Cancelled at once), so runs waiting for a window do not pile up.
- The answer is 202 as soon as the push is accepted; creating the run happens after
  the debounce, retried `prefect.attempts` times (the idempotency key makes retries
  safe). A run that still cannot be created is logged as an error.

Bounds: the time to send a request head (`header_timeout_seconds`) and a body
(`body_timeout_seconds`), idle keep-alive (`keep_alive_seconds`), the body size, the
events per request, the requests in progress (`max_concurrent_requests`; idle or
half-sent connections do not count), one pending push per fleet, one run creation in
flight per fleet, the remembered keys and delivery ids, and every Prefect call's timeout.

Modules: `settings` (the YAML file), `payloads` (the three sources, pure), `routing`
(push → planned run, pure), `coalescer` (bursts, downgrades, pure), `state` (the memory
file), `prefect_runs` (Prefect's REST API), `receiver` (debounce, create, retry), `app`
(HTTP routes and `main`), `serving` (uvicorn with the connection bounds).
"""

from compose_rollout.triggers.webhooks.app import create_app, main
from compose_rollout.triggers.webhooks.coalescer import Coalescer
from compose_rollout.triggers.webhooks.payloads import (
    Push,
    github_signature,
    parse_distribution,
    parse_dockerhub,
    parse_github,
)
from compose_rollout.triggers.webhooks.prefect_runs import RUN_TAG, PrefectApiError, PrefectRuns
from compose_rollout.triggers.webhooks.receiver import Receiver
from compose_rollout.triggers.webhooks.routing import PlannedRun, plan_runs
from compose_rollout.triggers.webhooks.settings import PrefectApi, WebhookRoute, WebhookSettings, load_webhook_settings

__all__ = [
    "RUN_TAG",
    "Coalescer",
    "PlannedRun",
    "PrefectApi",
    "PrefectApiError",
    "PrefectRuns",
    "Push",
    "Receiver",
    "WebhookRoute",
    "WebhookSettings",
    "create_app",
    "github_signature",
    "load_webhook_settings",
    "main",
    "parse_distribution",
    "parse_dockerhub",
    "parse_github",
    "plan_runs",
]
