"""Validators shared by the fleet file's sections (config.py, lb/settings.py)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Compose service names and HAProxy backend/server names: a conservative common subset.
IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# An LB's name for a server: an identifier, or an address as nginx and Traefik name
# their servers (`10.0.0.5:8080`, `[fd00::5]:8080`).
SERVER_RE = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9_.:\[\]-]{0,127}")
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check(pattern: re.Pattern[str], what: str, value: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def absolute_posix(value: str, what: str) -> str:
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts or any(c in value for c in "\n\r\0"):
        raise ValueError(f"{what} must be an absolute path without '..', got {value!r}")
    return str(path)


def host(value: str, what: str = "host") -> str:
    """An IP address (normalised) or a DNS name."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return check(HOST_RE, what, value)
