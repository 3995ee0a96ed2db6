"""Fixtures for tests against the real test bed (see compose_rollout.testbed).

`testbed` starts one bed per session (dockerd too, if none is running);
`fresh_fleet` puts it back into its initial state before a test.
Set COMPOSE_ROLLOUT_KEEP_TESTBED=1 to keep the bed's workdir (configs, logs)
after the session for inspection."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose_rollout.testbed import Testbed
from compose_rollout.testbed.bed import REQUIRED_BINARIES, SSHD
from compose_rollout.testbed.traffic import Traffic
from tests.ci import unavailable


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fleet: needs the real test bed (root, docker, haproxy, sshd)")


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the fleet test bed needs root (it runs sshd, dockerd and logs in as root)"
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    missing += [path for path in (SSHD, "/bin/busybox") if not Path(path).is_file()]
    if missing:
        return f"the fleet test bed needs these binaries: {', '.join(missing)}"
    return None


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """A started test bed shared by the whole session."""
    reason = _missing_prerequisites()
    if reason is not None:
        unavailable(reason)
    bed = Testbed(
        tmp_path_factory.mktemp("testbed"),
        keep_workdir=os.environ.get("COMPOSE_ROLLOUT_KEEP_TESTBED") == "1",
    )
    bed.start()
    try:
        yield bed
    finally:
        bed.stop()


@pytest.fixture
def fresh_fleet(testbed: Testbed) -> Testbed:
    """The session's test bed, reset to its initial state: every instance on
    v1 from its original compose file, all HAProxy servers ready and UP,
    every sshd and the registry running. Cheap when nothing changed."""
    testbed.reset()
    return testbed


@pytest.fixture(autouse=True)
def no_traffic_left_running(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that fails between starting traffic and stopping it must not leave the load
    generator running into the next test (its leftovers would fail that one)."""
    started: list[Traffic] = []
    start = Traffic.start

    def recorded(self: Traffic, timeout: float = 30.0) -> None:
        started.append(self)
        start(self, timeout)

    monkeypatch.setattr(Traffic, "start", recorded)
    yield
    for traffic in started:
        traffic.__exit__(RuntimeError, None, None)  # kills what still runs, removes its files
