"""Every error compose-rollout raises, in one tree.

    RolloutError
    ├── ConfigError            the fleet file or a parameter is invalid (nothing touched)
    ├── PreflightError         a check before any change failed (nothing touched)
    ├── RemoteError            a host could not be used
    │   ├── HostKeyError       unknown or changed SSH host key (never retried)
    │   ├── ConnectError       TCP/SSH connection or authentication failed
    │   ├── CommandFailed      a remote command exited non-zero
    │   └── CommandTimeout     a remote command did not finish in time
    ├── LoadBalancerError      the LB admin interface refused or did not answer
    │   └── AnswerLost         the connection broke after the request was sent, before the answer
    ├── RegistryError          the registry did not resolve the image
    ├── WaitTimeout            a bounded wait ended without the awaited state
    ├── Interrupted            Ctrl-C, SIGTERM or a Prefect cancel: waits stop at once
    ├── StepFailed             one step on one instance failed (wraps any of the above)
    └── DeployFailed           the run failed; carries the one-paragraph summary

Messages name the instance, the step and the cause, and carry evidence (command,
exit code, last lines of output, the last state observed).
"""

from __future__ import annotations


class RolloutError(Exception):
    """Base class of all compose-rollout errors."""


class ConfigError(RolloutError):
    """The fleet file or a parameter is invalid; raised before anything is touched."""


class PreflightError(RolloutError):
    """A check that runs before any change failed; nothing was touched."""


class RemoteError(RolloutError):
    """A host could not be used."""


class HostKeyError(RemoteError):
    """The host presented an unknown or changed SSH host key."""


class ConnectError(RemoteError):
    """Could not connect or authenticate to a host."""


def _tail(text: str, lines: int = 5) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept)


class CommandFailed(RemoteError):
    """A remote command exited with a non-zero status."""

    def __init__(self, host: str, command: str, exit_code: int, stdout: str, stderr: str) -> None:
        self.host = host
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        output = _tail(stderr) or _tail(stdout) or "    (no output)"
        super().__init__(f"on {host}: `{command}` exited {exit_code}; last output:\n{output}")


class CommandTimeout(RemoteError):
    """A remote command did not finish within its timeout."""

    def __init__(self, host: str, command: str, timeout_seconds: float, output: str) -> None:
        self.host = host
        self.command = command
        self.timeout_seconds = timeout_seconds
        tail = _tail(output) or "    (no output)"
        super().__init__(f"on {host}: `{command}` did not finish within {timeout_seconds:g} s; last output:\n{tail}")


class LoadBalancerError(RolloutError):
    """The load balancer's admin interface refused a command or did not answer."""


class AnswerLost(LoadBalancerError):
    """The admin API's connection broke after the request was sent and before its answer
    was read: a change may or may not have been applied (read the state again)."""


class RegistryError(RolloutError):
    """The registry could not resolve an image reference."""


class HookFailed(RolloutError):
    """A hook (`hooks:` in the fleet file) exited non-zero or outlasted its timeout."""


class WaitTimeout(RolloutError):
    """A bounded wait ended before the awaited state was observed."""

    def __init__(self, what: str, timeout_seconds: float, last_seen: str) -> None:
        self.what = what
        self.timeout_seconds = timeout_seconds
        self.last_seen = last_seen
        super().__init__(f"waited {timeout_seconds:g} s for {what}; last seen: {last_seen}")


class Interrupted(RolloutError):
    """The run was interrupted (Ctrl-C, SIGTERM, a cancel in Prefect): the instance in
    progress stops at its next step or poll, and the run rolls back."""


class StepFailed(RolloutError):
    """One step on one instance failed; `cause` is the underlying error."""

    def __init__(self, instance: str, step: str, cause: BaseException) -> None:
        self.instance = instance
        self.step = step
        self.cause = cause
        super().__init__(f"instance {instance}, step {step}: {cause}")


class DeployFailed(RolloutError):
    """The rollout failed (and was rolled back as far as possible); str() is the summary."""
