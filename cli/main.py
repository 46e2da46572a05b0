"""The `gns-sweep` command line: parse, call the library, print."""

from __future__ import annotations

import sys

import typer
from gns_sweep_cli import compare as compare_cmd
from gns_sweep_cli import empirical as empirical_cmd
from gns_sweep_cli import predict as predict_cmd
from gns_sweep_cli import run as run_cmd
from gns_sweep_cli import tasks as tasks_cmd
from gns_sweep_cli.common import err
from rich.markup import escape

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
app.command("empirical")(empirical_cmd.empirical)
app.command("compare")(compare_cmd.compare)
app.command("run")(run_cmd.run)


def _parse_errors() -> tuple[type[Exception], ...]:
    """Click's exception base: Typer >= 0.2x bundles click and raises its own copy's, older Typer raises click's."""
    found = [getattr(typer, "TyperException", None)]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(c for c in found if c is not None)


_PARSE_ERRORS = _parse_errors()


def main() -> None:
    keep_freed_memory()  # this process runs training loops (predict's reference run): see gns_sweep.allocator
    if len(sys.argv) <= 1:
        app()  # the help
        return
    try:
        code = app(standalone_mode=False)  # parse errors come back as exceptions, not click's boxed usage text
    except _PARSE_ERRORS as exc:
        ctx = getattr(exc, "ctx", None)
        sub = sys.argv[1] if not sys.argv[1].startswith("-") else ""  # click gives no context for some errors
        where = ctx.command_path if ctx is not None else f"gns-sweep {sub}".strip()
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if hasattr(exc, "possibilities"):  # an unknown option: click's guesses at what was meant often mislead
            message = f"No such option: {exc.option_name}"
        err.print(f"[bold red]error:[/] {escape(message)} (see `{escape(where)} --help`)")
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
