"""The micro-batch engine against slow references: a loop over micro-batches with explicit float64
gradient vectors, the per-example estimate on a model without coupling, and linear regression's closed form.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gns_sweep import stats as st
from gns_sweep.errors import UsageError
from gns_sweep.per_example import (
    DEFAULT_MICRO_BATCH,
    MicroBatchEngine,
    coupled_layers,
    get_engine,
    param_layout,
    shard_moments,
)
from gns_sweep.per_example.layout import TOTAL
from gns_sweep.tasks.builtin import LINREG

from .helpers import check, example_ce, f64, half_sq, token_mean_ce

# --- models whose BatchNorm couples the examples ------------------------------


class BNMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.out = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):  # (B, 4)
        return self.out(torch.relu(self.bn(self.a(x))))


class BNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(64, 3)

    def forward(self, x):  # (B, 2, 4, 4)
        return self.out(torch.relu(self.bn(self.conv(x))).flatten(1))


class BNSeq(nn.Module):
    """BatchNorm over channels of a sequence: statistics over the micro-batch's examples and positions."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.out = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 5)

    def forward(self, x):  # (B, T, 3)
        h = self.bn(self.a(x).transpose(1, 2)).transpose(1, 2)  # (B, T, 6), normalised over (B, T)
        return self.out(torch.tanh(h))


def bn_case(kind: str, n: int):
    """(model, inputs, targets, loss) with n examples, the model in train mode."""
    torch.manual_seed(n)
    if kind == "mlp":
        return f64(BNMlp()), torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)), example_ce
    if kind == "conv":
        return f64(BNConv()), torch.randn(n, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (n,)), example_ce
    return f64(BNSeq()), torch.randn(n, 7, 3, dtype=torch.float64), torch.randint(0, 5, (n, 7)), token_mean_ce


def reference(model, x, y, loss, b) -> np.ndarray:
    """Micro-batch mean gradients (M, P) in float64 the obvious way: a fresh copy of the model per
    micro-batch (so its buffers start as given), .backward() on the mean loss, .grad in layout order."""
    names = param_layout(model).names
    rows = []
    for start in range(0, x.shape[0], b):
        replica = copy.deepcopy(model)
        loss(replica(x[start : start + b]), y[start : start + b]).mean().backward()
        params = dict(replica.named_parameters())
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in names]).double().numpy())
    return np.stack(rows)


def formulas(m: np.ndarray, b: int) -> tuple[float, float]:
    """tr(Sigma) = b tr(Sigma_b) and |G|^2 = ||mbar||^2 - tr(Sigma_b)/M from micro-batch means (M, P)."""
    big_m = m.shape[0]
    mbar = m.mean(0)
    trace_b = float(((m - mbar) ** 2).sum()) / (big_m - 1)
    return b * trace_b, float((mbar**2).sum()) - trace_b / big_m


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq"])
@pytest.mark.parametrize(("b", "big_m"), [(2, 2), (2, 5), (3, 4), (4, 3)])
@pytest.mark.parametrize("max_batch", [None, 5])  # None: one call; 5: calls of a multiple of b, or one b
def test_matches_a_loop_over_micro_batches(kind, b, big_m, max_batch):
    model, x, y, loss = bn_case(kind, b * big_m)
    layout = param_layout(model)
    got = shard_moments(
        MicroBatchEngine(b), model, x, y, loss, layout, max_batch=max_batch or x.shape[0], param_moments=True
    )
    m = reference(model, x, y, loss, b)  # (M, P)
    want = st.from_samples(m, layout.offsets, param_moments=True)
    assert got.moments.n == big_m
    np.testing.assert_allclose(got.moments.mean, want.mean, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.moments.m2_group, want.m2_group, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.moments.m2_param, want.m2_param, rtol=1e-9, atol=1e-13)
    trace, g2 = formulas(m, b)
    est = st.estimate_scope(got.moments, layout.scopes[TOTAL], micro_batch=b)
    assert est.n == b * big_m and est.micro_batch == b
    assert est.trace_sigma == pytest.approx(trace, rel=1e-9)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        means = [float(loss(copy.deepcopy(model)(x[s : s + b]), y[s : s + b]).mean()) for s in range(0, len(x), b)]
    assert got.loss_sum == pytest.approx(sum(means), rel=1e-12)  # loss_sum / n: the mean loss


@pytest.mark.parametrize("kind", ["mlp", "conv", "seq"])
def test_batchnorm_model_runs_with_positive_finite_trace(kind):
    model, x, y, loss = bn_case(kind, 8 * DEFAULT_MICRO_BATCH)
    assert [cls for _, cls in coupled_layers(model)] == [type(model.bn)]
    layout = param_layout(model)
    got = shard_moments(get_engine("micro-batch"), model, x, y, loss, layout, max_batch=20, param_moments=True)
    assert got.moments.n == 8
    for scope, groups in layout.scopes.items():
        est = st.estimate_scope(got.moments, groups, micro_batch=DEFAULT_MICRO_BATCH)
        assert np.isfinite(est.trace_sigma) and est.trace_sigma > 0, scope
        assert np.isfinite(est.grad_sq_norm_biased)


def test_model_left_as_found():
    """BatchNorm's forward updates its running statistics: they are put back, as are .grad and the mode."""
    model, x, y, loss = bn_case("conv", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.full_like(model.out.weight, 3.0)
    model.out.weight.grad = marker
    MicroBatchEngine(2).batch_sums(model, x, y, loss, param_layout(model), param_moments=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.out.weight.grad is marker and model.conv.weight.grad is None
    assert model.training and model.bn.training


def test_a_partial_micro_batch_is_refused():
    model, x, y, loss = bn_case("mlp", 7)
    layout = param_layout(model)
    match = "7 examples do not split into micro-batches of 2; give a multiple of 2 examples"
    with pytest.raises(UsageError, match=match):
        MicroBatchEngine(2).batch_sums(model, x, y, loss, layout, param_moments=False)
    with pytest.raises(UsageError, match=match):
        shard_moments(MicroBatchEngine(2), model, x, y, loss, layout, max_batch=4, param_moments=False)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_micro_batch_must_be_a_positive_integer(bad):
    with pytest.raises(UsageError, match="micro_batch must be a positive integer"):
        MicroBatchEngine(bad)


def test_other_engines_still_refuse_coupling_layers():
    model, x, y, loss = bn_case("mlp", 4)
    for name in ("fast", "general", "loop"):
        with pytest.raises(UsageError, match=r"layer 'bn' \(BatchNorm1d\).*engine 'micro-batch'"):
            shard_moments(get_engine(name), model, x, y, loss, param_layout(model), max_batch=4, param_moments=False)


def test_coupled_layers_names_the_layers_that_couple_now():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.BatchNorm1d(4, track_running_stats=False)
    )
    assert coupled_layers(model) == [("1.0", nn.BatchNorm1d), ("2", nn.BatchNorm1d)]
    model.eval()  # running statistics replace the batch's; without them, the batch's are used still
    assert coupled_layers(model) == [("2", nn.BatchNorm1d)]
    assert coupled_layers(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))) == []


# --- without coupling: the per-example quantities -----------------------------


@pytest.mark.parametrize("shape", [(5, 4), (3, 6, 4)])
def test_micro_batches_of_one_are_the_per_example_gradients(shape):
    model = f64(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)))
    x = torch.randn(*shape, dtype=torch.float64)
    loss, y = (example_ce, torch.randint(0, 3, shape[:1])) if len(shape) == 2 else (half_sq, torch.randn(*shape[:2], 3))
    check(model, x, y.double() if y.is_floating_point() else y, loss, engine=lambda: MicroBatchEngine(1))


@pytest.mark.parametrize("b", [2, 4, 8])
def test_linear_regression_agrees_with_per_example_and_the_closed_form(b):
    """Isotropic linear regression (d = 16, noise 0.5, loss 0.5 (w.x - y)^2) at weights with ||e||^2 = 1:
    B_simple = ((||e||^2 + s^2) d + ||e||^2) / ||e||^2 = 21. On one sample of N = 16384 examples, the
    micro-batch and per-example estimates share ||gbar||^2 exactly (the mean of full micro-batches' means
    is the mean of the examples), so they differ only by their tr(Sigma) estimates."""
    gen = torch.Generator().manual_seed(7)
    n, e = 16384, torch.randn(LINREG.dim, generator=gen, dtype=torch.float64)
    x, y = LINREG.sample(n, gen)
    model = LINREG.model().double()
    with torch.no_grad():
        model.weight.copy_(LINREG.w_star() + e / e.norm())  # ||e|| = 1
    x, y = x.double(), y.double()
    loss = lambda out, t: 0.5 * (out[:, 0] - t) ** 2  # noqa: E731 -- (B,)
    layout = param_layout(model)
    groups = layout.scopes[TOTAL]
    per = st.estimate_scope(shard_moments(get_engine("fast"), model, x, y, loss, layout, max_batch=4096,
                                          param_moments=False).moments, groups)  # fmt: skip
    got = shard_moments(MicroBatchEngine(b), model, x, y, loss, layout, max_batch=4096, param_moments=False)
    micro = st.estimate_scope(got.moments, groups, micro_batch=b)
    assert micro.n == per.n == n and got.moments.n == n // b
    assert micro.grad_sq_norm_biased == pytest.approx(per.grad_sq_norm_biased, rel=1e-10)
    # |G|^2 = ||gbar||^2 - tr(Sigma)/N in both
    assert micro.grad_sq_norm + micro.trace_sigma / n == pytest.approx(
        per.grad_sq_norm + per.trace_sigma / n, rel=1e-10
    )
    # tr(Sigma)'s sampling error here is ~1.5 % per-example and ~1 % for micro-batches; |G|^2's ~2.5 %
    assert micro.trace_sigma == pytest.approx(per.trace_sigma, rel=0.06)
    assert micro.b_simple == pytest.approx(per.b_simple, rel=0.06)
    closed = ((1 + LINREG.noise_std**2) * LINREG.dim + 1) / 1
    assert micro.b_simple == pytest.approx(closed, rel=0.10)
    assert LINREG.b_simple(model.weight.detach()) == pytest.approx(closed, rel=1e-9)
