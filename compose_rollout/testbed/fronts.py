"""The load balancers the test bed can put in front of its instances besides HAProxy
(which always runs): one module each, registered here by `load_balancer.kind`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from . import caddy, nginx, traefik


class Front(Protocol):
    """A real LB process in front of the bed's instances, started on demand."""

    in_rotation: str  # what view() says of a server in rotation
    status_in_rotation: str  # what `rollout status` shows for such a server
    url: str  # the frontend the traffic goes through

    def __init__(self, directory: Path, servers: Sequence[str], log_file: Path, die_with_parent: bool) -> None: ...

    def fleet_settings(self, ssh_host: str, ssh_port: int) -> dict[str, object]:
        """The fleet file's `load_balancer` section for this LB (reached through the bed's LB host)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def running(self) -> bool: ...

    def reset(self) -> None:
        """Every server in rotation again, as at start."""
        ...

    def in_flight(self) -> dict[str, int]:
        """Requests in flight to each server (by the LB's name for it), measured by the
        bed independently of the adapter where it can be."""
        ...

    def view(self) -> dict[str, str]:
        """Each server (by the LB's name for it) as this LB sees it now."""
        ...

    def serving(self) -> set[str]:
        """Every server (HOST:PORT) this LB sends new requests to now, those a run added
        included: what the surge tests sample."""
        ...

    def known(self) -> set[str]:
        """Every server the LB has, in rotation or drained (for Traefik: those its API
        lists; a drained one is only in the adapter's record beside the file)."""
        ...


FRONTS: dict[str, type[Front]] = {
    "nginx": nginx.NginxFront,
    "caddy": caddy.CaddyFront,
    "traefik": traefik.TraefikFront,
}
