"""gns-sweep: predict the critical batch size from gradient noise, and measure it."""

from gns_sweep.errors import GnsError, RunError, UsageError
from gns_sweep.tasks import Task, load_task

__version__ = "0.1.0"
__all__ = ["GnsError", "RunError", "Task", "UsageError", "load_task", "__version__"]
