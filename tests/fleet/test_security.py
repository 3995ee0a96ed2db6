"""Secrets used by a real run never appear in what the run leaves behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from compose_rollout.flows.rolling_deploy import rolling_deploy
from compose_rollout.testbed import Testbed
from tests.fleet.test_rollout import fleet_file

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("prefect_server")]

PASSPHRASE = "correct-horse-4b8d21f0-passphrase"
REGISTRY_PASSWORD = "registry-token-9e1c77aa"  # the test registry has no auth: sent, never needed


@pytest.mark.timeout(300)
def test_secrets_never_reach_logs_artifacts_or_journals(
    fresh_fleet: Testbed, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    bed = fresh_fleet
    key = tmp_path / "deploy_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(key)], check=True, timeout=30)
    authorized = bed.workdir / "ssh" / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + key.with_suffix(".pub").read_text())
    try:
        fleet = fleet_file(
            bed,
            tmp_path,
            ssh={"key_file": str(key), "key_passphrase": PASSPHRASE},
            registry={"username": "deploy", "password": REGISTRY_PASSWORD},
            health={"timeout_seconds": 6},
        )
        rolling_deploy(fleet_file=fleet, tag="v2", triggered_by="test")  # uses the encrypted key for real
        with pytest.raises(Exception, match="await-healthy"):
            rolling_deploy(fleet_file=fleet, tag="broken", triggered_by="test")  # failure paths log more
    finally:
        authorized.write_text(original)

    seen = [record.getMessage() for record in caplog.records]
    seen += [str(record.__dict__) for record in caplog.records]
    seen += list(capfd.readouterr())
    seen += [path.read_text() for path in (tmp_path / "state").rglob("*.json")]
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(limit=200):
            seen.append(json.dumps(run.parameters))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            seen += [log.message for log in logs]
        seen += [f"{a.description} {a.data}" for a in client.read_artifacts(limit=200)]
    everything = "\n".join(seen)
    assert "await-healthy" in everything and "Rolled back" in everything  # we did look at the real output
    assert PASSPHRASE not in everything
    assert REGISTRY_PASSWORD not in everything
