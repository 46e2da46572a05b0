"""Progress events: the library reports, the CLI draws."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # what is being done, e.g. "reference run", "checkpoint 3/8", "trials"
    done: int  # units finished
    total: int  # units in the stage
    failed: int = 0  # units that failed (counted in done)
    running: int = 0  # units currently running


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    return None
