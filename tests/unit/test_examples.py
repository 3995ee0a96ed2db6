"""Every example fleet file loads: what the README points people at must be valid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compose_rollout.config import load_fleet
from compose_rollout.lb.settings import KINDS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ROLLOUT_")]:
        monkeypatch.delenv(name)
    fleet = load_fleet(path)
    assert f"kind: {fleet.load_balancer.kind}" in path.read_text()


def test_every_load_balancer_kind_has_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ROLLOUT_")]:
        monkeypatch.delenv(name)
    assert {load_fleet(path).load_balancer.kind for path in EXAMPLES} == set(KINDS)
