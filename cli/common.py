"""What every command shares: error handling, progress bars, output folders, the cluster."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gns_sweep.errors import GnsError, Terminated, UsageError
from gns_sweep.progress import ProgressEvent
from gns_sweep.runtime import Cluster, ClusterConfig
from gns_sweep.storage import SweepDir

out = Console(highlight=False, soft_wrap=True, emoji=False)  # ":ok:" in a value stays as typed
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
RESULTS_ROOT = Path("results")


def handle_errors(fn: Callable) -> Callable:
    """Turn GnsError into a one-line message and its exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GnsError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # outside a Ray wait (e.g. the reference run): nothing to cancel
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        except Exception as exc:  # a bug, or a failure in the user's task code: still one line
            if os.environ.get("GNS_SWEEP_DEBUG"):
                raise
            err.print(
                f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} "
                "(set GNS_SWEEP_DEBUG=1 for the traceback)"
            )
            raise typer.Exit(1) from None

    return wrapper


def default_out(kind: str, task_name: str) -> Path:
    """A new folder under results/ for this run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)
    path = RESULTS_ROOT / f"{safe}-{kind}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = RESULTS_ROOT / f"{safe}-{kind}-{stamp}-{n}"
    return path


def check_out_dir(path: Path) -> Path:
    """An output folder that exists and is writable, or that can be made (tried, then undone: nothing is left)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a folder; give a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out {path} is not writable; give a folder you can write to")
        return path
    target = Path(os.path.abspath(path))  # '..' resolved, so only real folders are made
    missing = [p for p in (target, *target.parents) if not p.exists()][::-1]  # outermost first
    made = []
    try:
        for p in missing:
            p.mkdir()
            made.append(p)
    except OSError as exc:
        raise UsageError(
            f"--out {path} cannot be made ({exc.strerror}: {exc.filename}); give a folder you can write to"
        ) from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):  # another run may have started writing there meanwhile
                p.rmdir()
    return path


def results_dir(out_dir: Path | None, kind: str, task_name: str) -> SweepDir:
    """--out, or a new folder under results/ named after the task and the command; checked writable."""
    return SweepDir(check_out_dir(out_dir or default_out(kind, task_name)))


def cluster(address: str | None, num_cpus: int | None) -> Cluster:
    if address is not None and num_cpus is not None:
        raise UsageError("--num-cpus sizes a local Ray instance; it cannot be used with --address")
    return Cluster(ClusterConfig(address=address, num_cpus=num_cpus))


class Bars:
    """A rich progress bar per stage, drawn on stderr (stdout stays clean for --json)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            console=err,
            transient=False,
            disable=not self.enabled,
        )
        self.tasks: dict[str, int] = {}
        self.last_stage: str | None = None

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, e: ProgressEvent) -> None:
        if not self.enabled and e.done == e.total and e.stage != self.last_stage:
            # Not a terminal: one line per finished stage.
            self.last_stage = e.stage
            extra = f" ({e.failed} failed)" if e.failed else ""
            err.print(f"{e.stage}: {e.done}/{e.total} done{extra}")
            return
        if e.stage not in self.tasks:
            self.tasks[e.stage] = self.progress.add_task(e.stage, total=e.total, extra="")
        extra = f"failed {e.failed} running {e.running}" if (e.failed or e.running) else ""
        self.progress.update(self.tasks[e.stage], completed=e.done, total=e.total, extra=extra)


def json_ready(value):
    """JSON has no NaN or infinity: use null (recursively through dicts and lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a terminal table: 3 significant digits, '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"
