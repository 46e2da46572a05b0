"""One error hierarchy. Only the CLI turns these into exit codes."""

from __future__ import annotations


class GnsError(Exception):
    """Base of every error gns-sweep raises on purpose."""

    exit_code = 1


class UsageError(GnsError):
    """Bad input: the message names the bad value and the fix. Exit code 2."""

    exit_code = 2


class RunError(GnsError):
    """A failure while running: results already computed stay on disk. Exit code 1."""

    exit_code = 1


class Interrupted(GnsError):
    """The user pressed Ctrl-C; pending Ray work was cancelled."""

    exit_code = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, `timeout`), raised where the driver is so it stops like Ctrl-C."""


class TerminatedRun(Interrupted):
    """Stopped by SIGTERM; pending Ray work was cancelled. Exit code 143 (128 + SIGTERM)."""

    exit_code = 143
