"""Resolve --task: a built-in name, or `package.module:attr` (a zero-argument callable returning a Task)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from gns_sweep.errors import UsageError
from gns_sweep.tasks.base import Task
from gns_sweep.tasks.builtin import BUILTINS


def load_task(spec: str) -> Task:
    if spec in BUILTINS:
        return BUILTINS[spec]()
    if ":" not in spec:
        raise UsageError(
            f"unknown task '{spec}'; built-ins are {', '.join(BUILTINS)} (see `gns-sweep tasks`), "
            "or give your own as package.module:attr"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"task '{spec}' is not of the form package.module:attr")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module's
        raise UsageError(
            f"cannot import module '{module_name}' for task '{spec}': {type(exc).__name__}: {exc}; "
            "check the name and that its folder is on PYTHONPATH"
        ) from None
    _share_with_workers(module, module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise UsageError(f"module '{module_name}' has no attribute '{attr}' (task '{spec}')")
    if not callable(factory):
        raise UsageError(f"'{spec}' is a {type(factory).__name__}, not a zero-argument callable returning a Task")
    try:
        task = factory()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"calling '{spec}()' failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(task, Task):
        raise UsageError(
            f"'{spec}()' returned a {type(task).__name__}, not a gns_sweep.Task; return gns_sweep.Task(...)"
        )
    return task


def _share_with_workers(module, module_name: str) -> None:
    """Put the folder the module was imported from on PYTHONPATH, which Ray
    workers inherit (and runtime.connect forwards to a cluster's workers), so
    they can unpickle the task's model class and loss function."""
    file = getattr(module, "__file__", None)
    if not file:
        return
    root = Path(file).resolve().parents[module_name.count(".")]
    if module_name.count(".") == 0 and Path(file).name == "__init__.py":
        root = root.parent
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(root) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *paths])
