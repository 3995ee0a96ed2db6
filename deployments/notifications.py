"""Tell someone when a rollout fails (and was rolled back) or crashes: a Prefect automation.

    PREFECT_API_URL=http://prefect:4200/api python -m compose_rollout.deployments.notifications \\
        --slack-webhook-url https://hooks.slack.com/services/...      # or
        --webhook-url https://alerts.example/hook                      # a JSON POST

Creates (or updates, by name) a notification block and an automation that reacts to the
`prefect.flow-run.Failed` and `prefect.flow-run.Crashed` events of the `rolling-deploy`
and `recover-fleet` flows. The message carries the run's final state message, which is
compose-rollout's one-paragraph summary (instance, step, cause, what was rolled back).
The webhook URL is stored as a secret in the block, never printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import cast
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from pydantic import SecretStr

AUTOMATION_NAME = "compose-rollout: rollout failed"
BLOCK_NAME = "compose-rollout-alerts"
FLOWS = ["rolling-deploy", "recover-fleet"]
SUBJECT = "Rollout {{ flow_run.name }} of {{ flow.name }}: {{ flow_run.state.name }}"
BODY = (
    "{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}.\n"
    "{{ flow_run.state.message }}\n"
    "Parameters: {{ flow_run.parameters }}"
)


def save_block(webhook_url: str | None, slack_webhook_url: str | None) -> UUID:
    """Save the notification block; its document id."""
    if slack_webhook_url:
        block_id = SlackWebhook(url=SecretStr(slack_webhook_url)).save(BLOCK_NAME, overwrite=True)
    elif webhook_url:
        block = CustomWebhookNotificationBlock(
            name=BLOCK_NAME,
            url=webhook_url,
            method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}"},
            headers={},
            cookies={},
            timeout=10,
        )
        block_id = block.save(BLOCK_NAME, overwrite=True)
    else:
        raise ValueError("give --webhook-url or --slack-webhook-url")
    return UUID(str(block_id))


def ensure_automation(block_id: UUID) -> Automation:
    """Create the failure automation, or update it if one with its name exists."""
    automation = Automation(
        name=AUTOMATION_NAME,
        description="Notify when a compose-rollout run fails (it rolled back) or crashes.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    )
    # Prefect's sync/async dispatch types these calls as maybe-coroutines; called sync here.
    try:
        existing = cast(Automation, Automation.read(name=AUTOMATION_NAME))
    except ValueError:
        existing = None
    if existing is None:
        return cast(Automation, automation.create())
    automation.id = existing.id
    automation.update()
    return automation


def main(argv: list[str] | None = None) -> int:
    options = argparse.ArgumentParser(prog="python -m compose_rollout.deployments.notifications", description=__doc__)
    target = options.add_mutually_exclusive_group(required=True)
    target.add_argument("--webhook-url", help="POST a JSON {subject, body} to this URL")
    target.add_argument("--slack-webhook-url", help="a Slack incoming-webhook URL")
    args = options.parse_args(argv)
    automation = ensure_automation(save_block(args.webhook_url, args.slack_webhook_url))
    print(f"automation {automation.name!r} ({automation.id}) notifies on failed or crashed rollouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
