"""The only module that imports Ray: connect or start, submit, wait, progress, cancel.

A local instance binds to 127.0.0.1 only and runs no dashboard unless asked.
Library functions run on workers unchanged: they receive a `WorkerInfo`
(device, node, threads) and return plain data.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gns_sweep.allocator import keep_freed_memory
from gns_sweep.errors import GnsError, Interrupted, RunError, Terminated, TerminatedRun, UsageError
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress

# Ray binds to the machine's routable address unless this is off; checked at
# import time by Ray and read again when a node starts, so set it early.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Ray work runs."""

    address: str | None = None  # existing cluster ("host:port" or "auto"); None starts a local instance
    num_cpus: int | None = None  # CPUs of a local instance (default: all)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a task runs; passed to every task function as `worker`."""

    device: str  # "cuda" when the task was given a GPU, else "cpu"
    node_id: str  # Ray node id (hex)
    threads: int  # torch threads set for this task


@dataclass(frozen=True)
class Resources:
    """What one task asks of the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 0  # retries if the worker process dies


@dataclass
class Cluster:
    """A connection to Ray; use as a context manager. Stops a local instance on exit."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    started_local: bool = False
    _sigterm: Any = field(default=None, repr=False)  # the SIGTERM handler to restore on exit

    def __enter__(self) -> Cluster:
        on_main = threading.current_thread() is threading.main_thread()
        self._sigterm = signal.getsignal(signal.SIGTERM) if on_main else None  # before ray.init adds its own
        connect(self)
        if on_main:
            _stop_on_sigterm()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)

    def resources(self) -> dict[str, float]:
        import ray

        return dict(ray.cluster_resources())

    def put(self, obj: Any) -> Any:
        """Store obj in the object store once; pass the handle to many tasks."""
        import ray

        return ray.put(obj)

    def run(
        self,
        fn: Callable[..., Any],
        calls: Sequence[dict[str, Any]],
        *,
        resources: Resources = Resources(),
        stage: str = "tasks",
        progress: ProgressFn = no_progress,
        on_result: Callable[[int, Any, WorkerInfo], None] | None = None,
        on_error: Callable[[int, BaseException], None] | None = None,
    ) -> list[Any]:
        """Run fn(**call, worker=...) for every call as a Ray task; results in call order.

        on_result(i, result, worker) fires as each task finishes (write it to disk
        there). Without on_error the first failure cancels the rest and raises;
        with it, failures are reported and their result slot is None.
        """
        import ray

        self.check_resources(resources)
        remote = ray.remote(_run_on_worker).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=resources.max_retries
        )
        threads = max(1, int(resources.num_cpus))
        pending = {remote.remote(fn, threads, call): i for i, call in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        done = failed = 0
        total = len(calls)
        progress(ProgressEvent(stage, 0, total, 0, min(total, self._slots(resources))))
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        value, worker = ray.get(ref)
                    except Exception as exc:  # a task's own failure
                        cause = _unwrap(exc)
                        if on_error is None:
                            raise cause from None
                        failed += 1
                        on_error(i, cause)
                    else:
                        results[i] = value
                        if on_result is not None:
                            on_result(i, value, worker)
                    done += 1
                running = min(len(pending), self._slots(resources))
                progress(ProgressEvent(stage, done, total, failed, running))
        except KeyboardInterrupt as exc:
            if not self.started_local:  # a local instance stops with its driver, which is on its way out
                _cancel(pending)  # (cancelling there only risks Ray 2.60's cancel/reply race, which aborts)
            stop = TerminatedRun if isinstance(exc, Terminated) else Interrupted
            raise stop(f"interrupted: {done} of {total} {stage} finished, the rest were cancelled") from None
        except BaseException:
            _cancel(pending)
            raise
        return results

    def _slots(self, resources: Resources) -> int:
        have = self.resources()
        slots = int(have.get("CPU", 1) // resources.num_cpus) if resources.num_cpus > 0 else len(have)
        if resources.num_gpus > 0:
            slots = min(slots, int(have.get("GPU", 0) // resources.num_gpus))
        return max(slots, 1)

    def check_resources(self, resources: Resources) -> None:
        """UsageError (not a hang) when no node could ever run a task of this size."""
        have = self.resources()
        if resources.num_gpus > 0 and have.get("GPU", 0) < resources.num_gpus:
            raise UsageError(
                f"each task asks for {resources.num_gpus:g} GPU(s) but the cluster has {have.get('GPU', 0):g}; "
                "use 0 GPUs per task or connect to a cluster with GPUs (--address)"
            )
        if resources.num_cpus > have.get("CPU", 0):
            raise UsageError(
                f"each task asks for {resources.num_cpus:g} CPUs but the largest the cluster offers is "
                f"{have.get('CPU', 0):g}; ask for fewer CPUs per task"
            )


def _stop_on_sigterm() -> None:
    """Make SIGTERM unwind the driver like Ctrl-C (cancel, stop Ray, keep results) while the cluster is open.

    ray.init installs handlers that dump a native stack trace or exit with 15; the Cluster restores
    the handler from before ray.init on exit. Only the main thread may set handlers."""

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


def connect(cluster: Cluster) -> None:
    """Connect to cluster.config.address, or start a loopback-only local instance."""
    import ray

    cfg = cluster.config
    if ray.is_initialized():
        ray.shutdown()
    if cfg.address is None or _is_loopback(cfg.address):
        # Otherwise Ray swaps 127.0.0.1 for the machine's routable address:
        # a local instance would listen on every interface, and a driver could
        # not reach a loopback-only cluster.
        os.environ[_LOOPBACK_ENV] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if cfg.address is None:
        # Say it explicitly (Ray 2.60 already skips usage reports for ray.init clusters): nothing
        # leaves this machine by accident.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,  # nothing listens beyond what the work needs
            dashboard_host="127.0.0.1",
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        cluster.started_local = True
        return
    _check_reachable(cfg.address)
    _use_saved_token()
    try:
        ray.init(address=cfg.address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=_runtime_env())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(
            f"cannot connect to the Ray cluster at --address {cfg.address!r}: {exc}; "
            "check the address printed by `ray start --head`, or drop --address to run locally"
        ) from None


def _runtime_env() -> dict | None:
    """Workers of an existing cluster do not inherit the driver's environment:
    forward PYTHONPATH so user task modules import there as they do here."""
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else None


def _use_saved_token() -> None:
    """Send the token `ray start` saved (~/.ray/auth_token), as `ray start` itself does;
    without it a driver is refused by a token-protected cluster after a long retry."""
    try:
        from ray._private.authentication import authentication_token_setup as auth

        logging.getLogger(auth.__name__).setLevel(logging.ERROR)
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except (ImportError, AttributeError):  # older Ray: no token auth
        pass


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0]
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot reach a Ray cluster at --address {address!r} ({exc.strerror or exc}); start one with "
            "`ray start --head` and pass the address it prints, or drop --address to run locally"
        ) from None


def _run_on_worker(fn: Callable[..., Any], threads: int, call: dict[str, Any]) -> tuple[Any, WorkerInfo]:
    import ray
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()  # workers only run gns-sweep's loops: reuse freed tensors instead of page-faulting
    # Shared objects travel as handles inside the call; fetch them here (cached per node).
    call = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in call.items()}
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    worker = WorkerInfo(device=device, node_id=ray.get_runtime_context().get_node_id(), threads=threads)
    return fn(**call, worker=worker), worker


def _unwrap(exc: BaseException) -> BaseException:
    """A task's own exception, not Ray's wrapper; known errors keep their type."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, GnsError):
            return cause
        if cause is not None:
            return RunError(f"a task failed: {type(cause).__name__}: {cause}")
    return RunError(f"a task failed: {type(exc).__name__}: {exc}")


def _cancel(pending: dict) -> None:
    import ray

    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already finished or gone
            pass
