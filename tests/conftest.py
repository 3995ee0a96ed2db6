"""Suite-wide set-up: an isolated, quiet Prefect, started once for the whole session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Before Prefect is imported anywhere: its own home, no telemetry (which printed SQLite
# "database is locked" tracebacks on a fresh database), time for a cold server start.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="compose-rollout-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every flow run in the session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        # The CLI processes the tests start use it too, instead of a temporary server each.
        os.environ["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]
