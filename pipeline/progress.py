"""One line of progress on a terminal: counts and a rate, redrawn in place.

``Progress("rebuild")`` draws ``rebuild: 12,400 items (3,100/s)`` on standard error,
redrawn at most every ``REDRAW_S`` and ended with a newline by :meth:`done`. It draws
only where someone watches: when standard error is a terminal and the caller is not
in a quiet (``--json``) mode; otherwise every call is a no-op, so logs and JSON
output stay clean. The rate is the count over the time since the first update.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_S = 0.2
"""Least time between two redraws of the line."""


def wanted(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether progress is drawn: not ``quiet`` and ``stream`` (stderr) a terminal."""
    out = stream or sys.stderr
    return not quiet and out.isatty()


class Progress:
    """A count (or several) and its rate on one redrawn line."""

    def __init__(self, label: str, *, quiet: bool = False, stream: TextIO | None = None,
                 unit: str = "") -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = wanted(quiet, self.stream)
        self.count = 0
        self.extra = ""
        self._started = time.monotonic()
        self._drawn = 0.0

    def update(self, count: int, extra: str = "") -> None:
        """The count is now ``count``; ``extra`` is shown after the rate."""
        self.count, self.extra = count, extra
        now = time.monotonic()
        if self.enabled and now - self._drawn >= REDRAW_S:
            self._drawn = now
            self._draw(now)

    def add(self, n: int = 1, extra: str = "") -> None:
        self.update(self.count + n, extra)

    def _draw(self, now: float) -> None:
        rate = self.count / max(now - self._started, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        extra = f", {self.extra}" if self.extra else ""
        self.stream.write(f"\r\033[K{self.label}: {self.count:,}{unit} ({rate:,.0f}/s){extra}")
        self.stream.flush()

    def clear(self) -> None:
        """Blank the line (before printing something else); the next update redraws it."""
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = 0.0

    def done(self) -> None:
        """Draw the final figures and end the line."""
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
