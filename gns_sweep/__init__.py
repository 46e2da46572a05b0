"""gns-sweep: predict the critical batch size from gradient noise, and measure it."""

from gns_sweep.errors import GnsError, RunError, UsageError

__version__ = "0.1.0"
__all__ = ["GnsError", "GnsMonitor", "RunError", "Task", "UsageError", "load_task", "__version__"]


def __getattr__(name: str):
    # Task, load_task and GnsMonitor need torch; importing them lazily lets `gns_sweep.compare`
    # and the storage code read results without importing torch.
    if name in ("Task", "load_task"):
        from gns_sweep import tasks

        return getattr(tasks, name)
    if name == "GnsMonitor":
        from gns_sweep.monitor import GnsMonitor

        return GnsMonitor
    raise AttributeError(f"module 'gns_sweep' has no attribute {name!r}")
