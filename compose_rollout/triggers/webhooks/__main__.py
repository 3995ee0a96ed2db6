"""`python -m compose_rollout.triggers.webhooks --config webhooks.yaml`: serve the receiver."""

import sys

from compose_rollout.triggers.webhooks.app import main

sys.exit(main())
