"""What the receiver remembers across restarts: one small JSON file, written atomically.

`state_directory/receiver-state.json` holds the recent idempotency keys and delivery ids
(so a replayed or redelivered request starts nothing after a restart too) and, per
fleet, the tag of the last run the receiver created (so an older push is not a
downgrade nobody asked for). Every list is bounded; the file is rewritten whole
through a temporary file, flushed and renamed, so a crash leaves the old or the new
version, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compose_rollout.errors import ConfigError

STATE_FILE = "receiver-state.json"
MAX_FLEETS = 1024
_FORMAT = 1


class _Stored(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    keys: list[Annotated[str, Field(max_length=512)]]
    deliveries: list[Annotated[str, Field(max_length=64)]]
    started: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=128)]]


@dataclass
class Memory:
    """The remembered keys and delivery ids (oldest first) and each fleet's last started tag."""

    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)
    deliveries: OrderedDict[str, None] = field(default_factory=OrderedDict)
    started: OrderedDict[str, str] = field(default_factory=OrderedDict)


def _bounded(items: OrderedDict[str, None], limit: int) -> OrderedDict[str, None]:
    while len(items) > limit:
        items.popitem(last=False)
    return items


class StateFile:
    """The receiver's memory on disk (owner-only permissions)."""

    def __init__(self, directory: Path, remembered: int) -> None:
        self.directory = directory.expanduser()
        self.path = self.directory / STATE_FILE
        self.remembered = remembered

    def load(self) -> Memory:
        """The memory as last saved (empty if there is none); ConfigError if the file is unreadable."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Memory()
        except OSError as error:
            raise ConfigError(f"webhook state {self.path}: {error}") from None
        try:
            stored = _Stored.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "file"
            raise ConfigError(
                f"webhook state {self.path} is damaged ({where}: {first['msg']}); "
                "move it aside to start with an empty memory (replays of old pushes are then refused only "
                "by Prefect's idempotency keys)"
            ) from None
        if stored.format != _FORMAT:
            raise ConfigError(f"webhook state {self.path} has format {stored.format}, this receiver reads {_FORMAT}")
        started = OrderedDict(stored.started)
        while len(started) > MAX_FLEETS:
            started.popitem(last=False)
        return Memory(
            _bounded(OrderedDict.fromkeys(stored.keys), self.remembered),
            _bounded(OrderedDict.fromkeys(stored.deliveries), self.remembered),
            started,
        )

    def save(self, memory: Memory) -> None:
        """Write `memory` (bounded) atomically; OSError if the disk refuses."""
        _bounded(memory.keys, self.remembered)
        _bounded(memory.deliveries, self.remembered)
        while len(memory.started) > MAX_FLEETS:
            memory.started.popitem(last=False)
        text = json.dumps(
            {
                "format": _FORMAT,
                "keys": list(memory.keys),
                "deliveries": list(memory.deliveries),
                "started": dict(memory.started),
            },
            separators=(",", ":"),
        )
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".receiver-state-", dir=self.directory)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as output:
                output.write(text)
                output.flush()
                os.fsync(output.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
