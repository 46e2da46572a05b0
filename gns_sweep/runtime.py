"""The only module that imports Ray: connect or start, submit, wait, retry, progress, cancel.

A local instance is private to the command: started whatever RAY_ADDRESS or Ray's
records say, bound to 127.0.0.1 only, no dashboard. Joining a cluster follows its
authentication: a token exactly when its GCS asks for one. Library functions run on
workers unchanged: they receive a `WorkerInfo` (device, node, threads) and return
plain data. A task whose worker process or node dies is run again (Ray's retries);
one whose own code raises is not. `Cluster.run` makes one Ray task per call;
`Cluster.stream` packs many short calls into each Ray task and hands back each
call's result as it finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gns_sweep.allocator import keep_freed_memory
from gns_sweep.errors import GnsError, Interrupted, RunError, Terminated, TerminatedRun, UsageError
from gns_sweep.progress import ProgressEvent, ProgressFn, no_progress

# Ray binds to the machine's routable address unless this is off; checked at
# import time by Ray and read again when a node starts, so set it early.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"  # "token" or "disabled": how this process's Ray calls authenticate
DEFAULT_MAX_RETRIES = 3  # re-runs of a task whose worker process or node died
# While asking a GCS whether it wants a token: give up on a port that is not Ray's in ~6 s, not Ray's 40.
_PROBE_TIMEOUTS = {"RAY_py_gcs_connect_timeout_s": "3", "RAY_gcs_rpc_server_connect_timeout_s": "2"}
# Cluster.stream: how much work one Ray task gets. A Ray task costs a few ms of scheduling; calls that
# take less are packed several to a task, up to about this many seconds of them ...
CHUNK_SECONDS = 0.5
MAX_CHUNK = 1000  # ... and at most this many calls
IN_FLIGHT_PER_SLOT = 2  # tasks submitted per free slot: one running, one queued behind it
SLOTS_REFRESH_SECONDS = 5.0  # how often the cluster's size is asked again (nodes come and go)
PROGRESS_SECONDS = 0.1  # progress events at most this often (and at the end)


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Ray work runs."""

    address: str | None = None  # "host:port" or "auto" joins a running cluster; None starts a private local one
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

    num_cpus: float = 1.0  # Ray CPUs (and torch threads)
    num_gpus: float = 0.0  # Ray GPUs (> 0: the task runs on cuda)
    max_retries: int = DEFAULT_MAX_RETRIES  # re-runs if its worker process or node dies (not for its own error)


class TaskFailed(Exception):
    """Raised on a worker when the task's own code raised: Ray does not retry it, and the driver
    learns the message (one line) and where it ran. Known errors (GnsError) travel as themselves."""

    def __init__(self, message: str, worker: WorkerInfo, error: GnsError | None = None) -> None:
        super().__init__(message, worker, error)  # the args rebuild it after pickling
        self.message, self.worker, self.error = message, worker, error

    def __str__(self) -> str:
        return self.message


@dataclass
class Cluster:
    """A connection to Ray; use as a context manager. Stops a local instance on exit."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    started_local: bool = False
    _sigterm: Any = field(default=None, repr=False)  # the SIGTERM handler to restore on exit
    _auth_mode: str | None = field(default=None, repr=False)  # RAY_AUTH_MODE before connecting, restored on exit

    def __enter__(self) -> Cluster:
        on_main = threading.current_thread() is threading.main_thread()
        self._sigterm = signal.getsignal(signal.SIGTERM) if on_main else None  # before ray.init adds its own
        self._auth_mode = os.environ.get(_AUTH_MODE_ENV)
        try:
            connect(self)
        except BaseException:
            self.__exit__()
            raise
        if on_main:
            _stop_on_sigterm()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _set_auth_mode(self._auth_mode)  # the next connection (same process) decides afresh
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
        on_error: Callable[[int, GnsError, WorkerInfo | None], None] | None = None,
    ) -> list[Any]:
        """Run fn(**call, worker=...) for every call as a Ray task; results in call order.

        on_result(i, result, worker) fires once per call as it finishes (write it to disk there),
        however often Ray re-ran it. Without on_error the first failure cancels the rest and raises;
        with it, on_error(i, error, worker or None) reports each failure and its slot stays None.
        """
        import ray

        self.check_resources(resources)
        remote = ray.remote(_run_on_worker).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=resources.max_retries,
            retry_exceptions=False,  # the task's own exception would only repeat
        )
        threads = max(1, int(resources.num_cpus))
        # handles as top-level arguments: Ray fetches them before the task starts
        pending = {remote.remote(fn, threads, tuple(call), *call.values()): i for i, call in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        done = failed = 0
        total = len(calls)
        slots = _Slots(self, resources)
        progress(ProgressEvent(stage, 0, total, 0, min(total, slots.get())))
        try:
            while pending:
                for ref in _ready(list(pending)):
                    i = pending.pop(ref)
                    try:
                        value, worker = ray.get(ref)
                    except Exception as exc:
                        error, where = _failure(exc, resources.max_retries)
                        if on_error is None:
                            raise error from None
                        failed += 1
                        on_error(i, error, where)
                    else:
                        results[i] = value
                        if on_result is not None:
                            on_result(i, value, worker)
                    done += 1
                progress(ProgressEvent(stage, done, total, failed, min(len(pending), slots.get())))
        except KeyboardInterrupt as exc:
            if not self.started_local:  # a local instance stops with its driver, which is on its way out
                _cancel(pending)  # (cancelling there only risks Ray 2.60's cancel/reply race, which aborts)
            stop = TerminatedRun if _terminated(exc) else Interrupted
            raise stop(f"interrupted: {done} of {total} {stage} finished, the rest were cancelled") from None
        except BaseException:
            _cancel(pending)
            raise
        return results

    def stream(
        self,
        fn: Callable[..., Any],
        calls: Sequence[dict[str, Any]],
        *,
        shared: dict[str, Any] | None = None,
        resources: Resources = Resources(),
        stage: str = "tasks",
        progress: ProgressFn = no_progress,
        on_result: Callable[[int, Any, WorkerInfo], None],
        on_error: Callable[[int, GnsError, WorkerInfo | None], None],
        chunk_seconds: float = CHUNK_SECONDS,
    ) -> None:
        """fn(**shared, **call, worker=...) for every call, several calls per Ray task when they are short.

        Each Ray task runs a chunk of consecutive calls and hands back each call's result as soon as
        it returns (a Ray streaming generator): on_result(i, result, worker) fires once per call, in
        the driver, however often Ray re-ran its chunk (a chunk whose worker process or node dies is
        run again, up to resources.max_retries times; calls already handed back are not handed back
        again). A call whose own code raises is reported by on_error(i, error, worker) and the rest of
        its chunk goes on; a chunk that died on every try reports each call it had not handed back.
        Results are not kept: handle each in on_result.

        Chunk sizes follow the measured duration of the calls: one call per task until some have
        finished, then about `chunk_seconds` of calls per task, smaller towards the end so the last
        tasks finish together. Tasks are spread over the nodes. `shared` values (e.g. handles from
        `put`) are fetched once per task; `calls` hold plain data.
        """
        import ray

        self.check_resources(resources)
        remote = ray.remote(_run_chunk_on_worker).options(
            name="_run_on_worker",  # the process title while it runs: ray::_run_on_worker
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=resources.max_retries,
            retry_exceptions=False,  # the task's own exception would only repeat
            num_returns="streaming",
            # Round the nodes: Ray's default packs the driver's node first and was seen leaving a second
            # node idle for seconds at a sweep's start (2 of 18 two-node sweeps, none of 18 with SPREAD)
            scheduling_strategy="SPREAD",
        )
        shared = dict(shared or {})
        names, values = tuple(shared), tuple(shared.values())  # top-level arguments: Ray fetches handles
        threads = max(1, int(resources.num_cpus))
        total = len(calls)
        handed = bytearray(total)  # 1 once a call's result or failure went to on_result / on_error
        pending: dict[Any, range] = {}  # generator -> the calls of its chunk
        slots = _Slots(self, resources)
        state = _ChunkState(total)

        def submit() -> None:
            while state.next_call < total and len(pending) < IN_FLIGHT_PER_SLOT * slots.get():
                size = state.chunk_size(slots.get(), chunk_seconds)
                chunk = range(state.next_call, state.next_call + size)
                state.next_call += size
                gen = remote.remote(fn, threads, names, [calls[i] for i in chunk], *values)
                pending[gen] = chunk
                state.in_flight += size

        def fail_rest(gen: Any, error: GnsError, where: WorkerInfo | None) -> None:
            for i in pending.pop(gen):
                if not handed[i]:
                    handed[i] = 1
                    state.in_flight -= 1
                    state.done += 1
                    state.failed += 1
                    on_error(i, error, where)

        last_event = 0.0
        try:
            submit()
            progress(ProgressEvent(stage, 0, total, 0, min(state.in_flight, slots.get())))
            while pending:
                for gen in _ready(list(pending)):
                    try:
                        ref = next(gen)
                    except StopIteration:  # the chunk is over; a call it never handed back counts as failed
                        fail_rest(gen, RunError("a task ended without the result of one of its calls"), None)
                        continue
                    try:
                        j, value, error, worker, seconds = ray.get(ref)
                    except Exception as exc:  # the chunk died on every try, or could not start
                        fail_rest(gen, *_failure(exc, resources.max_retries))
                        continue
                    i = pending[gen][j]
                    if handed[i]:
                        continue
                    handed[i] = 1
                    state.in_flight -= 1
                    state.done += 1
                    state.measured(seconds)
                    if error is None:
                        on_result(i, value, worker)
                    else:
                        state.failed += 1
                        on_error(i, error, worker)
                submit()
                now = time.monotonic()
                if now - last_event >= PROGRESS_SECONDS or not pending:
                    last_event = now
                    running = min(state.in_flight, slots.get())
                    progress(ProgressEvent(stage, state.done, total, state.failed, running))
        except KeyboardInterrupt as exc:
            if not self.started_local:  # as in run
                _cancel(pending)
            stop = TerminatedRun if _terminated(exc) else Interrupted
            raise stop(f"interrupted: {state.done} of {total} {stage} finished, the rest were cancelled") from None
        except BaseException:
            _cancel(pending)
            raise

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


# Set by the SIGTERM handler: a signal that lands inside a Ray wait comes out of it as a plain
# KeyboardInterrupt (Ray turns the handler's exception into one), so the type alone cannot tell.
_SIGTERM = threading.Event()


def _terminated(exc: KeyboardInterrupt) -> bool:
    """Whether this interrupt is SIGTERM's (exit 143) rather than Ctrl-C's (exit 130)."""
    return isinstance(exc, Terminated) or _SIGTERM.is_set()


class _Slots:
    """How many tasks of this size the cluster runs at once, asked again every few seconds."""

    def __init__(self, cluster: Cluster, resources: Resources) -> None:
        self.cluster, self.resources = cluster, resources
        self.value, self.asked = cluster._slots(resources), time.monotonic()

    def get(self) -> int:
        if time.monotonic() - self.asked > SLOTS_REFRESH_SECONDS:
            self.value, self.asked = self.cluster._slots(self.resources), time.monotonic()
        return self.value


@dataclass
class _ChunkState:
    """Cluster.stream's counts, and the chunk size from the calls' measured durations."""

    total: int
    next_call: int = 0  # the first call not yet submitted
    in_flight: int = 0  # submitted calls not yet handed back
    done: int = 0
    failed: int = 0
    seconds: float | None = None  # a moving average of the calls' durations on the workers

    def measured(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds is None else 0.8 * self.seconds + 0.2 * seconds

    def chunk_size(self, slots: int, chunk_seconds: float) -> int:
        remaining = self.total - self.next_call
        if self.seconds is None:  # nothing measured yet
            return 1
        size = min(int(chunk_seconds / max(self.seconds, 1e-6)), MAX_CHUNK, remaining // (2 * slots))
        return max(1, min(size, remaining))


def _ready(waitables: list) -> list:
    """Those of the refs or generators that are ready: waits up to a second for the first, then takes
    every other one ready by then (one wait per result would cost a pass over all of them each)."""
    import ray

    ready, rest = ray.wait(waitables, num_returns=1, timeout=1.0)
    if ready and rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return ready


def _stop_on_sigterm() -> None:
    """Make SIGTERM unwind the driver like Ctrl-C (cancel, stop Ray, keep results) while the cluster is open.

    ray.init installs handlers that dump a native stack trace or exit with 15; the Cluster restores
    the handler from before ray.init on exit. Only the main thread may set handlers."""
    _SIGTERM.clear()

    def raise_terminated(signum, frame):
        _SIGTERM.set()
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


# --- connecting -------------------------------------------------------------------------------------


def connect(cluster: Cluster) -> None:
    """Start a private local instance (no address), or join the cluster at the address."""
    import ray

    cfg = cluster.config
    if ray.is_initialized():
        ray.shutdown()
    if cfg.address is None:
        _start_local(cfg.num_cpus)
        cluster.started_local = True
        return
    address, found = _resolve(cfg.address)
    if _is_loopback(address):
        _loopback_only()  # a driver could not reach a loopback-only cluster from the routable address
    _check_reachable(address, found)
    _follow_auth(address, found)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=_runtime_env())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(
            f"cannot connect to the Ray cluster at --address {found}: {exc}; "
            "check the address printed by `ray start --head`, or drop --address to run locally"
        ) from None


def _start_local(num_cpus: int | None) -> None:
    """A new instance for this command alone: address "local" makes ray.init ignore RAY_ADDRESS
    and the record of the last `ray start`, which may name a cluster long gone."""
    import ray

    _loopback_only()  # otherwise Ray listens on the machine's routable address
    # Say it explicitly (Ray 2.60 already skips usage reports for ray.init clusters): nothing
    # leaves this machine by accident.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,  # nothing listens beyond what the work needs
        dashboard_host="127.0.0.1",
        logging_level=logging.ERROR,
        log_to_driver=False,
    )


def _loopback_only() -> None:
    os.environ[_LOOPBACK_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _resolve(address: str) -> tuple[str, str]:
    """(host:port, how to name it in messages). "auto" is RAY_ADDRESS, else the cluster `ray start` last
    recorded on this machine, else a running one (as Ray resolves it); messages say which, so a stale
    record can be found."""
    if address != "auto":
        return address, repr(address)
    from ray._private import services, utils

    quiet = logging.getLogger(services.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning about several clusters; the chosen one is named below
    try:
        # as written (Ray's canonical form would swap 127.0.0.1 for the routable address)
        found = services.get_ray_address_from_environment("auto", None)
    except ConnectionError as exc:
        raise UsageError(
            f"--address auto found no running Ray cluster ({exc}); start one with `ray start --head`, "
            "give its host:port, or drop --address to run locally"
        ) from None
    finally:
        quiet.setLevel(level)
    if os.environ.get("RAY_ADDRESS"):
        source = "RAY_ADDRESS"
    elif utils.read_ray_address():
        source = f"the record of the last `ray start`, {utils.get_ray_address_file(None)}"
    else:
        source = "a running Ray process"
    return found, f"'auto' = {found} (found in {source})"


def _runtime_env() -> dict | None:
    """Workers of an existing cluster do not inherit the driver's environment:
    forward PYTHONPATH so user task modules import there as they do here."""
    path = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": path}} if path else None


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0]
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def _check_reachable(address: str, found: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port."""
    if address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--address {found} is not host:port (e.g. 127.0.0.1:6379) or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot reach a Ray cluster at --address {found}: {exc.strerror or exc}; start one with "
            "`ray start --head` and pass the address it prints, or drop --address to run locally"
        ) from None


# --- authentication -----------------------------------------------------------------------------------


def _follow_auth(address: str, found: str) -> None:
    """Send a token exactly when the cluster wants one. A driver that sends one to a tokenless
    cluster also demands one from its nodes, which then cannot fetch the objects it owns; one
    that sends none (or a wrong one) to a token cluster is refused. So ask the GCS first."""
    if address.startswith("ray://"):  # Ray Client: the server's side connects
        return
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # older Ray: no token authentication
        return
    _set_auth_mode("disabled")
    if _gcs_accepts(address, found):
        return
    _set_auth_mode("token")
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        raise UsageError(
            f"the Ray cluster at --address {found} requires a token and this machine has none; copy the "
            "head node's token (`ray get-auth-token` there) to ~/.ray/auth_token, or set RAY_AUTH_TOKEN"
        )
    if not _gcs_accepts(address, found):
        raise UsageError(
            f"the Ray cluster at --address {found} refused the token from {_token_source()}; use the head "
            "node's token (`ray get-auth-token` there)"
        )


def _set_auth_mode(mode: str | None) -> None:
    """Set this process's Ray authentication mode (None: Ray's default) and make Ray read it again."""
    if mode is None:
        os.environ.pop(_AUTH_MODE_ENV, None)
    else:
        os.environ[_AUTH_MODE_ENV] = mode
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _gcs_accepts(address: str, found: str) -> bool:
    """Whether the GCS answers a request made in this process's current authentication mode."""
    from ray._raylet import Config, GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _env(_PROBE_TIMEOUTS), _quiet_stderr():
            Config.initialize("")
            GcsClient(address=address).internal_kv_get(b"gns_sweep_probe", None, timeout=5)
        return True
    except AuthenticationError:
        return False
    except Exception as exc:  # reachable, but not a Ray GCS (or not answering)
        raise UsageError(
            f"--address {found} answers but not as a Ray cluster ({type(exc).__name__}: {exc}); "
            "give the address printed by `ray start --head`"
        ) from None
    finally:
        Config.initialize("")  # Ray's own timeouts again


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return "~/.ray/auth_token"


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Ray's C++ client logs each refused attempt to fd 2; the caller reports the outcome in one line."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- on the worker, and back ------------------------------------------------------------------------


def _run_on_worker(fn: Callable[..., Any], threads: int, names: tuple[str, ...], *values: Any) -> tuple:
    """fn(**call, worker=...), with any exception of its own turned into TaskFailed (not retried)."""
    import ray
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()  # workers only run gns-sweep's loops: reuse freed tensors instead of page-faulting
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    worker = WorkerInfo(device=device, node_id=ray.get_runtime_context().get_node_id(), threads=threads)
    try:
        _check_device(worker)
        return fn(**dict(zip(names, values, strict=True)), worker=worker), worker
    except Exception as exc:
        known = exc if isinstance(exc, GnsError) else None
        message = " ".join(str(exc).split())  # one line, for a table cell and the terminal
        raise TaskFailed(message if known else f"{type(exc).__name__}: {message}", worker, known) from None


def _run_chunk_on_worker(fn: Callable[..., Any], threads: int, names: tuple[str, ...], calls: list, *values: Any):
    """fn(**shared, **call, worker=...) for each call in turn, yielding (index in the chunk, result, error,
    worker, seconds) as each returns. A call whose own code raises yields its error (a GnsError) and
    the next call runs: one broken trial does not take its chunk with it."""
    import ray
    import torch

    torch.set_num_threads(threads)
    keep_freed_memory()
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    worker = WorkerInfo(device=device, node_id=ray.get_runtime_context().get_node_id(), threads=threads)
    shared = dict(zip(names, values, strict=True))
    for j, call in enumerate(calls):
        start = time.perf_counter()
        try:
            _check_device(worker)
            value, error = fn(**shared, **call, worker=worker), None
        except Exception as exc:
            message = " ".join(str(exc).split())
            value, error = None, exc if isinstance(exc, GnsError) else RunError(f"{type(exc).__name__}: {message}")
        yield j, value, error, worker, time.perf_counter() - start


def _check_device(worker: WorkerInfo) -> None:
    """A task given a GPU trains on it or fails: never on the CPU while a GPU sits reserved."""
    import torch

    if worker.device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise RunError(
            f"Ray gave this task a GPU on node {worker.node_id}, but torch there ({torch.__version__}, {build}) "
            "sees no CUDA device; install a CUDA torch and driver on that node, or start it without --num-gpus"
        )


def _failure(exc: BaseException, retries: int) -> tuple[GnsError, WorkerInfo | None]:
    """The error to report for a task that did not return, and where it ran if known."""
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, TaskFailed):
            return (cause.error or RunError(cause.message)), cause.worker
        if cause is not None:  # raised before the task's code ran, e.g. its arguments did not unpickle
            return RunError(f"a task failed: {type(cause).__name__}: {_first_line(cause)}"), None
    # Ray's own failure: the worker process or node died on every try, or an object was lost
    tries = "with --max-retries 0" if retries == 0 else f"on each of its {retries + 1} tries"
    return RunError(f"{type(exc).__name__} {tries}: {_first_line(exc)}"), None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _cancel(pending: dict) -> None:
    """Cancel the tasks behind these refs or generators."""
    import ray

    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # already finished or gone
            pass
