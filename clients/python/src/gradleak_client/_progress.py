"""A progress display for `jobs.wait(progress=True)`: a bar redrawn in place on a terminal, and
a plain line per change (at most one every LOG_INTERVAL_S while a job runs) in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gradleak_client.types import Run

BAR_WIDTH = 30
LOG_INTERVAL_S = 10.0


def describe(job: Run) -> str:
    """One line: id, status, stage, iteration, losses, elapsed time."""
    parts = [job.id, job.status]
    p = job.progress
    if p is not None:
        parts.append(p.stage)
        if p.total:
            parts.append(f"{p.iteration}/{p.total}")
        if p.best_loss is not None:
            parts.append(f"best loss {p.best_loss:.4g}")
        parts.append(f"{p.elapsed_s:.1f}s")
    if job.error is not None:
        parts.append(f"{job.error.code}: {job.error.message}")
    return "  ".join(parts)


class ProgressBar:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = ""
        self._last_key: tuple[str, str | None] | None = None
        self._last_log = 0.0

    def update(self, job: Run) -> None:
        line = describe(job)
        if self.tty:
            p = job.progress
            fraction = min(1.0, p.iteration / p.total) if p is not None and p.total else 0.0
            filled = round(fraction * BAR_WIDTH)
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
            text = f"{bar} {line}"
            pad = max(0, len(self._last_line) - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._last_line = text
            return
        key = (job.status, None if job.progress is None else job.progress.stage)
        now = time.monotonic()
        if key != self._last_key or now - self._last_log >= LOG_INTERVAL_S:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_key, self._last_log = key, now

    def close(self, job: Run | None = None) -> None:
        if job is not None:
            self.update(job)
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
