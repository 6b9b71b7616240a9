"""When to train: debounce and coalesce annotation bursts into one run at a time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    min_new: int
    quiet_seconds: float

    def due(self, changed: int, last_change: float | None, requested: bool, now: float) -> str | None:
        """The reason to start a run now, or None. A run in progress is never joined by another (the caller
        holds the training lock); changes that arrive during it count toward the next one."""
        if requested:
            return "requested"
        if changed <= 0:
            return None
        if changed >= self.min_new:
            return f"{changed} new or changed annotation(s)"
        if last_change is not None and now - last_change >= self.quiet_seconds:
            return f"{changed} annotation(s) and {self.quiet_seconds:.0f} s quiet"
        return None
