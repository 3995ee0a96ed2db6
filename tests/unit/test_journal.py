"""The journal on disk: what recovery reads after a killed run must hold every write-ahead record."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from compose_rollout.state import journal as journal_module
from compose_rollout.state.journal import InstanceRecord, Ledger


def _record(name: str) -> InstanceRecord:
    return InstanceRecord(name, f"/srv/{name}/docker-compose.yml", "app:v1", "sha256:" + "a" * 64, b"x", 0o644)


def test_concurrent_updates_of_a_batch_never_lose_a_write_ahead_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances of one batch record `restarted` at once. The first writer is held up
    just before its rename; whatever the order, the journal on disk ends with both."""
    ledger = Ledger("demo", "run-1", "app:v2", tmp_path / "run-1.json")
    ledger.add(_record("app-1"))
    ledger.add(_record("app-2"))

    real_replace = os.replace
    second_done = threading.Event()
    first_in_rename = threading.Event()

    def slow_first_replace(source: Any, destination: Any) -> None:
        if threading.current_thread().name == "first" and not first_in_rename.is_set():
            first_in_rename.set()
            second_done.wait(timeout=1)  # long enough for the second writer, if it is not kept out
        real_replace(source, destination)
        if threading.current_thread().name == "second":
            second_done.set()

    monkeypatch.setattr(journal_module.os, "replace", slow_first_replace)
    first = threading.Thread(target=ledger.update, args=("app-1",), kwargs={"restarted": True}, name="first")
    second = threading.Thread(target=ledger.update, args=("app-2",), kwargs={"restarted": True}, name="second")
    first.start()
    assert first_in_rename.wait(timeout=10)  # the first writer is inside its rename: now the second updates
    second.start()
    first.join(timeout=10)
    second.join(timeout=10)

    on_disk = json.loads((tmp_path / "run-1.json").read_text())
    assert {r["name"]: r["restarted"] for r in on_disk["records"]} == {"app-1": True, "app-2": True}
    assert Ledger.load(tmp_path / "run-1.json")["app-2"].restarted


def test_a_failed_journal_write_leaves_the_previous_journal_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger("demo", "run-1", "app:v2", tmp_path / "run-1.json")
    ledger.add(_record("app-1"))

    def full_disk(source: Any, destination: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ledger.update("app-1", restarted=True)
    assert not Ledger.load(tmp_path / "run-1.json")["app-1"].restarted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-1.json"]
