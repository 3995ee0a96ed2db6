"""Caddy in front of the bed's instances (Debian's caddy package), started on demand.

Its JSON config is the one the caddy adapter asks for: the instances are the upstreams
of a reverse_proxy handler with an `@id`, and a parking handler in a route that never
matches lists them too (so Caddy keeps counting a drained one's requests). The admin
API listens on 127.0.0.1 only; the adapter reaches it through an SSH tunnel from the
bed's LB host. Caddy's config and data directories are the front's own (it never
writes ~/.config/caddy), and a change made through the admin API is not saved.
"""

from __future__ import annotations

import copy
import http.client
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._util import Daemon, TestbedError, ensure_port_free, http_status, wait_for

PORT = 18082
ADMIN_PORT = 12019
UPSTREAMS_ID = "app_upstreams"
PARKING_ID = "rollout_parking"


def render_config(servers: Sequence[str], port: int = PORT, admin_port: int = ADMIN_PORT) -> dict[str, Any]:
    """Caddy's config: round robin over `servers` (dial addresses), active health check on
    /health every 500 ms, and the parking handler listing the same upstreams."""
    upstreams = [{"dial": server} for server in servers]
    return {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "config": {"persist": False}},
        "apps": {
            "http": {
                "servers": {
                    "app": {
                        "listen": [f"127.0.0.1:{port}"],
                        "automatic_https": {"disable": True},
                        "routes": [
                            {
                                "handle": [
                                    {
                                        "@id": UPSTREAMS_ID,
                                        "handler": "reverse_proxy",
                                        "upstreams": upstreams,
                                        "load_balancing": {"selection_policy": {"policy": "round_robin"}},
                                        "health_checks": {
                                            "active": {"uri": "/health", "interval": "500ms", "timeout": "2s"}
                                        },
                                    }
                                ]
                            },
                            {
                                "match": [{"expression": "false"}],
                                "handle": [
                                    {
                                        "@id": PARKING_ID,
                                        "handler": "reverse_proxy",
                                        "upstreams": copy.deepcopy(upstreams),
                                    }
                                ],
                            },
                        ],
                    }
                }
            }
        },
    }


class CaddyFront:
    """Caddy on 127.0.0.1:18082, its admin API on 127.0.0.1:12019."""

    in_rotation = "in rotation"  # what view() says of a server in rotation
    status_in_rotation = "in rotation"  # what `rollout status` says of one

    def __init__(self, directory: Path, servers: Sequence[str], log_file: Path, die_with_parent: bool) -> None:
        self.directory = directory
        self.port = PORT
        self.admin_port = ADMIN_PORT
        self.url = f"http://127.0.0.1:{PORT}"
        self.servers = list(servers)
        self.config_file = directory / "caddy.json"
        self._config = render_config(self.servers)
        xdg = [f"XDG_CONFIG_HOME={directory / 'config'}", f"XDG_DATA_HOME={directory / 'data'}"]
        self._daemon = Daemon(
            "caddy",
            ["env", *xdg, "caddy", "run", "--config", str(self.config_file)],
            log_file,
            die_with_parent=die_with_parent,
        )

    def fleet_settings(self, ssh_host: str, ssh_port: int) -> dict[str, object]:
        return {
            "kind": "caddy",
            "ssh_host": ssh_host,
            "ssh_port": ssh_port,
            "admin_url": f"http://127.0.0.1:{self.admin_port}",
            "upstreams_id": UPSTREAMS_ID,
            "parking_id": PARKING_ID,
        }

    def running(self) -> bool:
        return self._daemon.running()

    def start(self) -> None:
        ensure_port_free("127.0.0.1", self.port, "the Caddy frontend")
        ensure_port_free("127.0.0.1", self.admin_port, "Caddy's admin API")
        for name in ("config", "data"):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(self._config, indent=2) + "\n")
        self._daemon.start()
        wait_for(self._answers, timeout=20, what="Caddy to answer", abort=self._daemon.exit_reason)

    def _answers(self) -> bool:
        return http_status(self.url + "/health", timeout=1) == 200 and self._admin("GET", "/config/")[0] == 200

    def stop(self) -> None:
        self._daemon.stop()

    def reset(self) -> None:
        """Every server in rotation again (the config as loaded at start)."""
        if not self.running():
            self.start()
            return
        status, body = self._admin("GET", "/config/")
        if status != 200 or json.loads(body) != self._config:
            self.load(self._config)

    def load(self, config: dict[str, Any]) -> None:
        """Run another config (as a person would with `caddy load`); reset() puts back the first."""
        status, body = self._admin("POST", "/load", json.dumps(config).encode())
        if status != 200:
            raise TestbedError(f"Caddy refused the config at /load: HTTP {status}: {body[:300]!r}")

    @property
    def initial_config(self) -> dict[str, Any]:
        """A copy of the config Caddy was started with."""
        return copy.deepcopy(self._config)

    def in_flight(self) -> dict[str, int]:
        """Caddy's own count of the requests in flight to each server (num_requests of
        GET /reverse_proxy/upstreams; the parking handler keeps every server listed)."""
        status, body = self._admin("GET", "/reverse_proxy/upstreams")
        if status != 200:
            raise TestbedError(f"Caddy's GET /reverse_proxy/upstreams: HTTP {status}: {body[:300]!r}")
        counts = {entry["address"]: int(entry["num_requests"]) for entry in json.loads(body)}
        return {server: counts.get(server, 0) for server in self.servers}

    def _dials(self, handler: str) -> set[str]:
        status, body = self._admin("GET", f"/id/{handler}/upstreams")
        if status != 200:
            raise TestbedError(f"Caddy's GET /id/{handler}/upstreams: HTTP {status}: {body[:300]!r}")
        return {upstream["dial"] for upstream in json.loads(body)}

    def serving(self) -> set[str]:
        """The upstreams of the instances' handler in the running config."""
        return self._dials(UPSTREAMS_ID)

    def known(self) -> set[str]:
        """The parking handler's upstreams: every upstream, in rotation or drained."""
        return self._dials(PARKING_ID)

    def view(self) -> dict[str, str]:
        """Each server: `in rotation` while the handler lists it, else `drained`."""
        status, body = self._admin("GET", f"/id/{UPSTREAMS_ID}/upstreams")
        if status != 200:
            raise TestbedError(f"Caddy's GET /id/{UPSTREAMS_ID}/upstreams: HTTP {status}: {body[:300]!r}")
        listed = {upstream["dial"] for upstream in json.loads(body)}
        return {server: self.in_rotation if server in listed else "drained" for server in self.servers}

    def _admin(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One admin call; a GET whose connection Caddy reset (it replaces its admin server
        on every config load) is sent again, twice at most."""
        for attempt in range(3 if method == "GET" else 1):
            connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (ConnectionResetError, http.client.BadStatusLine, http.client.IncompleteRead):
                if method != "GET" or attempt == 2:
                    raise
                time.sleep(0.05 * (attempt + 1))
            finally:
                connection.close()
        raise AssertionError("unreachable")
