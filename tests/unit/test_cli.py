"""`rollout deploy` flags: bad values are refused from the fleet file's rules, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compose_rollout.cli import EXIT_FAILED, main
from tests.unit.test_config import minimal


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--drain-timeout", "0"], "rollout.drain_timeout_seconds"),
        (["--pause", "-1"], "rollout.pause_between_batches_seconds"),
        (["--batch-size", "100%"], "rollout"),  # would take every instance out of rotation
    ],
)
def test_a_bad_policy_flag_is_refused_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(minimal()))  # hosts that do not exist: a run would fail differently

    assert main(["deploy", "--fleet", str(fleet), "--tag", "v2", *flags]) == EXIT_FAILED
    error = capsys.readouterr().err
    assert error.startswith(f"error: fleet file {fleet}") and named in error
