"""The `gns-sweep` command line: parse, call the library, print."""

from __future__ import annotations

import typer
from gns_sweep_cli import predict as predict_cmd
from gns_sweep_cli import tasks as tasks_cmd

from gns_sweep.allocator import keep_freed_memory

app = typer.Typer(
    name="gns-sweep",
    help="Predict the critical batch size from gradient noise (predict), measure it (empirical), compare them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("tasks")(tasks_cmd.tasks)
app.command("predict")(predict_cmd.predict)


def _register_optional() -> None:
    """Commands in their own modules; each module adds itself if present."""
    import importlib

    for name in ("empirical", "compare", "run"):
        try:
            module = importlib.import_module(f"gns_sweep_cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gns_sweep_cli.{name}":
                raise
            continue
        app.command(name)(getattr(module, name))


_register_optional()


def main() -> None:
    keep_freed_memory()  # this process runs training loops (predict's reference run): see gns_sweep.allocator
    app()


if __name__ == "__main__":
    main()
