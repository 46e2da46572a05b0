"""GnsMonitor on DistributedDataParallel, in 2 real processes (gloo over loopback): .grad as DDP leaves it
without the monitor, each rank's reading against a single-process micro-batch monitor whose micro-batches
are the ranks' batches, unbiasedness on linear regression, and the errors for misuse.

One spawn runs every scenario on both ranks and saves what it saw; the tests compare in this process."""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_monitor import half_sq, linreg_population, norm_model, regression_batch
from torch import nn

from gns_sweep import GnsMonitor
from gns_sweep.errors import UsageError
from gns_sweep.monitor import accumulation_estimate
from gns_sweep.tasks.builtin import LINREG

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

WORLD = 2
STEPS = 3  # DDP rebuilds its buckets after the first iteration: later steps run on the rebuilt ones
LR = 0.1
LINREG_STEPS = 400
LINREG_BATCH = 16  # per rank


def bn_model(seed: int = 0) -> nn.Module:
    """A BatchNorm in train mode: each rank's (each micro-batch's) statistics are its own."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


class Branches(nn.Module):
    """`extra` is used only by batches whose first target is negative (one rank's here), `spare` never."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 1)
        self.extra = nn.Linear(4, 1)
        self.spare = nn.Linear(4, 1)

    def forward(self, x, use_extra: bool = False):
        return self.body(x) + self.extra(x) if use_extra else self.body(x)


def rank_batches(step: int, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's batch, split into the ranks' consecutive parts of the given sizes."""
    x, y = regression_batch(sum(sizes), seed=100 + step)
    starts = np.cumsum((0,) + sizes)
    return [(x[a:b], y[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


# Each scenario: model, per-rank example counts, local micro-batches per rank (>1: all but the last under
# no_sync), DDP keyword arguments.
SCENARIOS = {
    # tiny buckets: several per step, each holding one or a few tensors
    "equal": (norm_model, (16, 16), 1, {"bucket_cap_mb": 2e-4}),
    "unequal": (norm_model, (10, 22), 1, {}),
    "no_sync": (norm_model, (16, 16), 2, {"gradient_as_bucket_view": True}),  # .grad: views of the buckets
    "batchnorm": (bn_model, (16, 16), 1, {}),
    "unused": (Branches, (12, 12), 1, {"find_unused_parameters": True}),
}


def uses_extra(y: torch.Tensor) -> bool:
    return bool(y[0] < 2.0)


def forward(model, x, y) -> torch.Tensor:
    if isinstance(model, Branches) or isinstance(getattr(model, "module", None), Branches):
        return model(x, uses_extra(y))
    return model(x)


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def readings(monitor: GnsMonitor) -> dict[str, tuple[float, float]]:
    """The last update's |G|^2 and tr(Sigma) per scope, and per parameter tensor ("[name]"): scopes sum
    tensors, so only these would show two tensors of a layer swapped."""
    out = {s: (r.grad_sq_norm, r.trace_sigma) for s, r in monitor.read_all(smoothed=False).items()}
    per_tensor = monitor._last.cpu().tolist()  # (2, G) in layout order
    for g, name in enumerate(monitor.layout.names):
        out[f"[{name}]"] = (per_tensor[0][g], per_tensor[1][g])
    return out


def run_ddp(rank: int, name: str) -> dict:
    """STEPS SGD steps of a scenario on DDP without the monitor and with it, side by side."""
    make, sizes, k, kwargs = SCENARIOS[name]
    plain_ddp = nn.parallel.DistributedDataParallel(make(), **kwargs)
    ddp = nn.parallel.DistributedDataParallel(make(), **kwargs)
    monitor = GnsMonitor(ddp, beta=0.0)
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in (plain_ddp, ddp)]
    out = {"plain": [], "grad": [], "read": []}
    for step in range(STEPS):
        x, y = rank_batches(step, sizes)[rank]
        for model, opt in zip((plain_ddp, ddp), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            for j, (xb, yb) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
                with model.no_sync() if j < k - 1 else contextlib.nullcontext():  # the forward too, as DDP asks
                    (half_sq(forward(model, xb, yb), yb).mean() / k).backward()
        monitor.update(len(x))
        out["plain"].append(grads_of(plain_ddp.module))
        out["grad"].append(grads_of(ddp.module))
        out["read"].append(readings(monitor))
        for opt in opts:
            opt.step()
    out["buckets"] = len({key for key in monitor._bucket_groups})
    return out


def run_manual(rank: int) -> list[dict]:
    """The "equal" scenario without DDP, as docs/monitor.md's loop that all-reduces by itself."""
    model = norm_model()
    monitor = GnsMonitor(model, beta=0.0)
    world = dist.get_world_size()
    params = [dict(model.named_parameters())[name] for name in monitor.layout.names]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        x, y = rank_batches(step, SCENARIOS["equal"][1])[rank]
        opt.zero_grad()
        half_sq(model(x), y).mean().backward()
        local_sq = torch.stack([p.grad.double().square().sum() for p in params])  # (G,) this rank's
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world
        dist.all_reduce(local_sq)  # the sum over the ranks
        total_sq = torch.stack([p.grad.double().square().sum() for p in params])  # (G,) of the mean
        g2, trace = accumulation_estimate(local_sq / world**2, total_sq, [len(x)] * world, [1 / world] * world)
        monitor.observe(g2, trace)
        out.append(readings(monitor))
        opt.step()
    return out


def run_linreg(rank: int) -> np.ndarray:
    """(LINREG_STEPS, 2) unsmoothed |G|^2 and tr(Sigma) at fixed weights, fresh examples on each rank."""
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(LINREG.model())
    monitor = GnsMonitor(ddp)
    gen = torch.Generator().manual_seed(50 + rank)
    rows = []
    for _ in range(LINREG_STEPS):
        ddp.zero_grad(set_to_none=True)
        x, y = LINREG.sample(LINREG_BATCH, gen)
        half_sq(ddp(x), y).mean().backward()
        monitor.update(LINREG_BATCH)
        r = monitor.read(smoothed=False)
        rows.append((r.grad_sq_norm, r.trace_sigma))
    return np.array(rows)


def misuse(rank: int) -> dict[str, str]:
    """The message of each UsageError a DDP monitor raises (or 'no error'); every rank does the same."""
    found: dict[str, str] = {}

    def expect(key, fn):
        try:
            fn()
            found[key] = "no error"
        except UsageError as e:
            found[key] = str(e)

    x, y = rank_batches(0, (8, 8))[rank]
    ddp = nn.parallel.DistributedDataParallel(norm_model())
    expect("loss", lambda: GnsMonitor(ddp, loss=half_sq))
    monitor = GnsMonitor(ddp)
    expect("second hook", lambda: GnsMonitor(ddp))
    expect("no backward", lambda: monitor.update(8))
    expect("micro_batch", lambda: monitor.micro_batch(8))
    expect("forward_backward", lambda: monitor.forward_backward(x, y))
    half_sq(ddp(x), y).mean().backward()
    expect("no n", lambda: monitor.update())
    half_sq(ddp(x), y).mean().backward()
    expect("bad scale", lambda: monitor.update(8, scale=0.0))
    half_sq(ddp(x), y).mean().backward()
    half_sq(ddp(x), y).mean().backward()  # a second all-reducing backward in the step
    expect("twice", lambda: monitor.update(8))
    with ddp.no_sync():
        half_sq(ddp(x), y).mean().backward()
    expect("only no_sync", lambda: monitor.update(8))
    ddp.zero_grad(set_to_none=True)
    half_sq(ddp(x), y).mean().backward()
    expect("fine", lambda: monitor.update(8))
    singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in making each group
    alone = nn.parallel.DistributedDataParallel(norm_model(), process_group=singles[rank])
    expect("one rank", lambda: GnsMonitor(alone))
    ignoring = norm_model()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ignoring, ["1.bias"])
    expect("ignored", lambda: GnsMonitor(nn.parallel.DistributedDataParallel(ignoring)))
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    expect("sparse", lambda: GnsMonitor(nn.parallel.DistributedDataParallel(sparse)))
    return found


def worker(rank: int, store_path: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's connections on loopback only
    torch.set_num_threads(1)
    from sockets import listening

    store = dist.FileStore(store_path, WORLD)  # rendezvous through a file: no port to pick, nothing listening
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        out = {name: run_ddp(rank, name) for name in SCENARIOS}
        out["manual"] = run_manual(rank)
        out["linreg"] = run_linreg(rank)
        out["misuse"] = misuse(rank)
        out["listening"] = sorted(listening({os.getpid()}))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saw, from one spawn."""
    out_dir = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(worker, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(name: str) -> dict:
    """The scenario in one process: the ranks' batches as a micro-batch monitor's micro-batches (each rank's
    whole step's examples as one), c = 1/WORLD each, as DDP's average of the ranks' mean-loss gradients."""
    make, sizes, _, _ = SCENARIOS[name]
    model = make()
    monitor = GnsMonitor(model, beta=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = {"grad": [], "read": []}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for x, y in rank_batches(step, sizes):
            (half_sq(forward(model, x, y), y).mean() / WORLD).backward()
            monitor.micro_batch(len(x), scale=1 / WORLD)
        monitor.update()
        out["grad"].append(grads_of(model))
        out["read"].append(readings(monitor))
        opt.step()
    return out


def assert_grads_equal(got: list, want: list, *, rtol: float, atol: float) -> None:
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_grad_is_what_ddp_leaves_without_the_monitor(ranks, name):
    """With the monitor's hook, .grad after each step equals a DDP model without it, bit for bit, on both
    ranks (also where find_unused_parameters leaves a tensor without gradient), and equals the one-process
    accumulation of the ranks' batches to float32 rounding."""
    ref = single_process(name)
    outs = [rank[name] for rank in ranks]
    for out in outs:
        for step in range(STEPS):
            assert_grads_equal(out["grad"][step], out["plain"][step], rtol=0, atol=0)
            assert_grads_equal(out["grad"][step], ref["grad"][step], rtol=1e-5, atol=1e-6)
            assert_grads_equal(out["grad"][step], outs[0]["grad"][step], rtol=0, atol=0)
    if name == "unused":
        names = [n for n, _ in Branches().named_parameters()]
        assert outs[0]["grad"][0][names.index("spare.weight")] is None
    if name == "equal":
        assert outs[0]["buckets"] > 2  # several buckets, before and after DDP rebuilds them


def assert_readings_match(got: dict, want: dict, *, batch: int, rel: float = 1e-5) -> None:
    """Equal to float32 rounding. Both estimates are differences of squared norms of size |G|^2 + tr(Sigma) / b,
    so their rounding errors scale with that: |G|^2's with tr(Sigma) where noise dominates, tr(Sigma)'s with
    batch |G|^2 where the gradient does (a layer's bias, often)."""
    assert list(got) == list(want)
    for scope, (g2, trace) in want.items():
        assert got[scope][0] == pytest.approx(g2, rel=rel, abs=rel * abs(trace) + 1e-12), scope
        assert got[scope][1] == pytest.approx(trace, rel=rel, abs=rel * batch * abs(g2) + 1e-12), scope


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_rank_reads_the_micro_batch_estimate_of_the_ranks_batches(ranks, name):
    """Per scope, parameter tensor and step, |G|^2 and tr(Sigma) on each rank equal a one-process micro-batch
    monitor's with the ranks' batches as its micro-batches: equal or unequal ranks, accumulation under no_sync,
    BatchNorm, tensors unused on one rank or on all. Both ranks read the same."""
    ref = single_process(name)
    outs = [rank[name] for rank in ranks]
    for out in outs:
        for step in range(STEPS):
            assert_readings_match(out["read"][step], ref["read"][step], batch=sum(SCENARIOS[name][1]))
            assert out["read"][step] == outs[0]["read"][step]
    reading = outs[0]["read"][-1]
    assert reading["total"][1] > 0
    if name == "unused":
        assert reading["spare"] == (0.0, 0.0) and reading["extra"][1] > 0


def test_manual_all_reduce_loop_reads_the_same(ranks):
    """The docs' loop that all-reduces .grad itself and calls accumulation_estimate and observe() reads
    what the DDP monitor does on the same batches."""
    for out in ranks:
        for step in range(STEPS):
            assert_readings_match(out["manual"][step], ranks[0]["equal"]["read"][step], batch=32)


def test_data_parallel_estimator_is_unbiased_on_linear_regression(ranks):
    """At fixed weights, fresh examples on each rank each step: the mean of the unsmoothed estimates comes
    within 4 standard errors of the closed-form population values."""
    torch.manual_seed(0)
    want_g2, want_trace = linreg_population(LINREG.model())
    values = ranks[0]["linreg"]
    np.testing.assert_array_equal(values, ranks[1]["linreg"])
    mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))
    assert abs(mean[0] - want_g2) < 4 * se[0], (mean[0], want_g2, se[0])
    assert abs(mean[1] - want_trace) < 4 * se[1], (mean[1], want_trace, se[1])
    assert se[0] < 0.3 * want_g2 and se[1] < 0.1 * want_trace  # the tolerance is a real one


def test_misuse_is_refused_in_one_line_that_names_the_fix(ranks):
    found = ranks[0]["misuse"]
    assert ranks[1]["misuse"] == found
    wants = {
        "loss": "GnsMonitor(ddp_model)",
        "second hook": "already has a communication hook",
        "no backward": "outside ddp_model.no_sync()",
        "micro_batch": "the ranks are the micro-batches",
        "forward_backward": "call update(n)",
        "no n": "positive int; got None",
        "bad scale": "scale must be a finite number > 0",
        "twice": "under ddp_model.no_sync(), and call update(n) once per step",
        "only no_sync": "outside ddp_model.no_sync()",
        "fine": "no error",
        "one rank": "1 rank",
        "ignored": "'1.bias' (parameters_to_ignore)",
        "sparse": "layer '0' has sparse gradients",
    }
    assert set(found) == set(wants)
    for key, want in wants.items():
        assert want in found[key] and "\n" not in found[key], (key, found[key])
    with pytest.raises(UsageError, match="takes no arguments with micro-batches"):
        GnsMonitor(norm_model()).update(8)


def test_the_ranks_listen_on_loopback_only(ranks):
    for out in ranks:
        assert out["listening"] and all(addr in ("127.0.0.1", "::1") for addr, _ in out["listening"])
