"""A checkpoint store for tests of background writes: a slow disk that writes only once told to."""

from __future__ import annotations

import threading
from pathlib import Path

from streamkm.checkpoint import CheckpointStore, PreparedCheckpoint
from streamkm.errors import CheckpointError


class GatedStore(CheckpointStore):
    """A store whose writes wait until ``gate`` is set (a slow disk), or fail on cue."""

    def __init__(self, dir: Path, fail: bool = False) -> None:
        super().__init__(dir, keep=3)
        self.gate = threading.Event()
        self.fail = fail

    def commit(self, prepared: PreparedCheckpoint) -> Path:
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise CheckpointError("cannot write checkpoint: No space left on device")
        return super().commit(prepared)
