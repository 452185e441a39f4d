"""Ctrl+C during training: the first one finishes the step, saves a checkpoint and stops; a second
one aborts at once (the checkpoints already written stay; a half-written one is never trusted)."""

from __future__ import annotations

import contextlib
import signal
from typing import Callable


class StopFlag:
    """Set by the first Ctrl+C (finish the step, save, stop); a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def install(self, notify: Callable[[str], None] | None = None,
                abort_on_second: bool = True) -> dict:
        """Handle SIGINT/SIGTERM (main thread only); returns the handlers it replaced.

        Workers under `accelerate launch` pass abort_on_second=False: the launcher relays the
        user's Ctrl+C as a second signal, and must not cut the save short.
        """
        def handler(signum, frame):
            if self.requested:
                if abort_on_second:
                    raise KeyboardInterrupt
                return
            self.requested = True
            if notify:
                notify("stopping after this step and saving a checkpoint "
                       "(press Ctrl+C again to abort without saving)")

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @contextlib.contextmanager
    def installed(self, notify: Callable[[str], None] | None = None):
        previous = self.install(notify)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
