"""Live progress: one terminal line per step change, and a progress value as instances finish."""

from __future__ import annotations

import io
import sys

import pytest

from compose_rollout.progress import Progress
from compose_rollout.state.journal import InstanceRecord, Ledger


def ledger_of(*names: str) -> Ledger:
    ledger = Ledger("demo", "run-1", "registry.example/demo/app:v2")
    for name in names:
        ledger.add(InstanceRecord(name, f"/srv/{name}/docker-compose.yml", "app:v1", "sha256:a", b"", 0o640))
    return ledger


def test_a_terminal_sees_each_step_and_the_artifact_moves_as_instances_finish() -> None:
    ledger = ledger_of("app-1", "app-2", "app-3")
    terminal, published = io.StringIO(), []
    ledger.observer = Progress("demo", 2, terminal, publish=lambda percent, text: published.append((percent, text)))
    ledger.update("app-3", outcome="unchanged")
    ledger.update("app-1", step="drain")
    ledger.update("app-1", step="up")
    ledger.update("app-1", outcome="updated", step="")
    ledger.update("app-2", step="drain")
    ledger.update("app-2", outcome="failed", step="await-healthy")
    assert terminal.getvalue().splitlines() == [
        "rollout [0/2] between steps",
        "rollout [0/2] app-1: drain",
        "rollout [0/2] app-1: up",
        "rollout [1/2] between steps",
        "rollout [1/2] app-2: drain",
        "rollout [2/2] between steps",
    ]
    assert published == [
        (0.0, "0 of 2 instances done"),
        (50.0, "1 of 2 instances done (app-1)"),
        (100.0, "2 of 2 instances done (app-1, app-2)"),
    ]


def test_quiet_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    ledger = ledger_of("app-1")
    ledger.observer = Progress("demo", 1, publish=lambda percent, text: None)
    ledger.update("app-1", step="drain")
    assert capsys.readouterr().err == ""
