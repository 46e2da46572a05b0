"""Tasks: the Task type, the built-ins, and the `module:attr` loader."""

from gns_sweep.tasks.base import Task, check_trainable
from gns_sweep.tasks.builtin import BUILTINS, DEFAULT_TASK
from gns_sweep.tasks.loader import load_task

__all__ = ["BUILTINS", "DEFAULT_TASK", "Task", "check_trainable", "load_task"]
