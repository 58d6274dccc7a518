"""A one-line progress display on stderr for long CLI commands (backup, restore, bench).

Shown only when stderr is a terminal or the user asked for it (--progress), so scripts and
logs are not filled with carriage returns. Redrawn at most every `interval` seconds.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressLine:
    def __init__(self, label: str, unit: str = "", *, enabled: bool | None = None,
                 stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.label = label
        self.unit = unit  # "bytes" formats as sizes; anything else is a count noun
        self.interval = interval
        self._t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._shown = False

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{int(n):,}{' ' + self.unit if self.unit else ''}"

    def update(self, done: float, total: float | None = None, extra: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = max(now - self._t0, 1e-6)
        rate = done / elapsed
        text = f"{self.label}: {self._fmt(done)}"
        if total:
            text += f" of {self._fmt(total)} ({100.0 * done / total:.0f}%)"
        text += f", {self._fmt(rate)}/s" if self.unit == "bytes" else f", {rate:,.0f}/s"
        if extra:
            text += f", {extra}"
        pad = max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._shown = True

    def __call__(self, done: int, total: int | None) -> None:
        """Usable directly as the client's progress callback."""
        self.update(done, total)

    def done(self, done: float | None = None, total: float | None = None) -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        if done is not None:
            self.update(done, total, force=True)
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
