"""`gns-sweep tasks`: list the built-in tasks."""

from __future__ import annotations

from gns_sweep_cli.common import handle_errors, out
from rich.table import Table

from gns_sweep.tasks import BUILTINS, DEFAULT_TASK


@handle_errors
def tasks() -> None:
    """List the built-in tasks (use --task NAME, or --task package.module:attr for your own)."""
    table = Table(title="built-in tasks")
    for col in ("name", "description", "lr", "batch", "target loss", "train examples"):
        table.add_column(col)
    for name, factory in BUILTINS.items():
        t = factory()
        label = f"{name} (default)" if name == DEFAULT_TASK else name
        target = "pilot" if t.target_loss is None else f"{t.target_loss:g}"
        table.add_row(label, t.description, f"{t.lr:g}", str(t.batch_size), target, str(t.n_train))
    out.print(table)
