"""The per-instance docker-compose.yml of the test bed."""

from __future__ import annotations

LABEL = "compose-rollout.testbed"


def render_compose_file(
    *, instance: str, address: str, image: str, http_port: int = 8080, host_ports: str | None = None
) -> str:
    """A Terrateam-style compose file for one instance.

    Written as text, not dumped from a dict, so it carries comments, a second
    unrelated key and a particular key order: a rollout that rewrites only the
    image value must leave all of that exactly as it was.

    ``host_ports`` is the host side of the published port, ``http_port`` unless
    given: a range such as "8080-8081" lets Docker give a second container of
    the service (the surge strategy's) the other port."""
    published = host_ports if host_ports is not None else str(http_port)
    return f"""\
# Terrateam-style compose file for instance {instance} (compose-rollout test bed).
# Only services.server.image is changed by a rollout; everything else must
# survive a rewrite byte for byte, comments included.
version: "3.7"

services:
  server:
    image: {image}   # the rollout edits only this value
    ports:
      - "{address}:{published}:8080"
    labels:
      # Lets the test bed find and remove its containers, also after a crash.
      {LABEL}: "1"
    environment:
      INSTANCE: {instance}
      LOG_LEVEL: info
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/health"]
      interval: 1s
      timeout: 2s
      retries: 3
      start_period: 2s
    # No restart policy on purpose: after a dockerd restart nothing comes
    # back by itself and holds the published port.
    stop_grace_period: 10s
"""
