"""SIGTERM as a request, not a death: SLURM pre-empts a job with SIGTERM, and the trainer answers it
by checkpointing at the next step boundary and exiting 0, so the requeued job resumes there."""

from __future__ import annotations

import signal


class Preemption:
    """Remembers a SIGTERM (`requested`) until `restore` puts the previous handler back."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)
