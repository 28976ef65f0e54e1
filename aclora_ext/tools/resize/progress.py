"""The progress bar of ``aclora resize`` (stderr, on a terminal, for files with many modules)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

#: files with at least this many modules get a progress bar on a terminal
PROGRESS_MIN_MODULES = 64


class Progress:
    """A one-line progress bar on ``stream`` (stderr), redrawn at most ten times a second."""

    def __init__(self, total: int, enabled: bool, stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.total, self.enabled, self.width = max(total, 1), enabled, width
        self.stream = stream or sys.stderr
        self.done, self.drawn_at = 0, 0.0

    def advance(self, n: int, label: str) -> None:
        if not self.enabled:
            return
        self.done = min(self.done + n, self.total)
        now = time.monotonic()
        if now - self.drawn_at < 0.1 and self.done < self.total:
            return
        self.drawn_at = now
        filled = self.width * self.done // self.total
        self.stream.write(
            f"\raclora resize: [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{100 * self.done // self.total:3d}% {label:<10}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def _wants_progress(progress: Optional[bool], modules: int) -> bool:
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and modules >= PROGRESS_MIN_MODULES
