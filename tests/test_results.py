"""The headline: B_simple averaged over the reference run, and its bootstrap over checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import numpy as np
import pytest

from gns_sweep import stats as st
from gns_sweep.results import PRECOND_FIELDS, ScopeRow, headline, scope_row


def row(checkpoint: int, eval_loss: float, g2: float, tr: float, scope: str = "total") -> ScopeRow:
    b = tr / g2 if g2 > 0 else math.nan
    return ScopeRow(
        task="t", checkpoint=checkpoint, step=10 * checkpoint, examples_seen=80 * checkpoint, train_loss=eval_loss,
        eval_loss=eval_loss, n_checkpoints=6, scope=scope, n_params=3, n_examples=64, estimator="per-example",
        micro_batch=1, engine="fast", grad_sq_norm=g2, grad_sq_norm_biased=g2 + tr / 64, trace_sigma=tr, b_simple=b,
        b_simple_lo=b / 2, b_simple_hi=b * 2, b_simple_lower_bound=b, resolved=g2 > 0, snr_mean=0.1, update_ratio=0.01,
    )  # fmt: skip


ROWS = [
    row(0, 1.0, 0.50, 10.0),
    row(1, 0.9, 0.20, 12.0),
    row(2, 0.8, -0.01, 11.0),  # unresolved alone: averaged with the others it still counts
    row(3, 0.85, 0.10, 9.0),  # the loss goes up again: 0.8 was first reached at checkpoint 2
    row(4, 0.7, 0.05, 10.0),
    row(5, 0.6, 0.02, 13.0),
    row(5, 0.6, 0.01, 6.0, scope="layer"),  # other scopes do not count
]


def test_the_headline_is_a_ratio_of_means_over_the_whole_run():
    h = headline(ROWS)
    total = [r for r in ROWS if r.scope == "total"]
    assert h.b_simple == pytest.approx(sum(r.trace_sigma for r in total) / sum(r.grad_sq_norm for r in total))
    assert h.checkpoints == 6 and h.reached
    assert h.b_simple_start == pytest.approx(20.0)
    late = total[-2:]  # the last quarter of 6, rounded up
    assert h.b_simple_late == pytest.approx(sum(r.trace_sigma for r in late) / sum(r.grad_sq_norm for r in late))
    assert h.b_simple_lo <= h.b_simple <= h.b_simple_hi


def test_until_a_loss_stops_at_the_first_checkpoint_that_reaches_it():
    h = headline(ROWS, until_loss=0.8)
    assert h.checkpoints == 3 and h.reached
    assert h.b_simple == pytest.approx((10.0 + 12.0 + 11.0) / (0.50 + 0.20 - 0.01))
    never = headline(ROWS, until_loss=0.1)
    assert not never.reached and never.checkpoints == 6


def test_bootstrap_ratio_of_means_matches_a_loop():
    rng = np.random.default_rng(3)
    num, den = rng.uniform(5, 15, 40), rng.normal(0.2, 0.15, 40)
    lo, hi = st.bootstrap_ratio_of_means(num, den, resamples=300, rng_seed=7)
    draws = np.random.default_rng(7).integers(0, 40, size=(300, 40))
    ratios = []
    for idx in draws:  # the slow way, one resample at a time
        m = float(np.mean(den[idx]))
        ratios.append(float(np.mean(num[idx])) / m if m > 0 else math.inf)
    ratios.sort()
    assert (lo, hi) == pytest.approx((ratios[math.ceil(0.025 * 300) - 1], ratios[math.ceil(0.975 * 300) - 1]))
    assert lo < float(np.mean(num) / np.mean(den)) < hi


def test_bootstrap_of_identical_pairs_collapses_and_one_pair_has_none():
    assert st.bootstrap_ratio_of_means([4.0] * 5, [2.0] * 5) == pytest.approx((2.0, 2.0))
    assert all(math.isnan(x) for x in st.bootstrap_ratio_of_means([4.0], [2.0]))


def test_the_preconditioned_headline_is_the_same_average_of_tr_p_sigma_and_gpg():
    """Preconditioned columns set to (3 tr, 2 |G|^2) at every checkpoint: the ratio of means is 1.5 times the
    plain one, its bootstrap draws the same resamples, and the plain headline does not move."""
    rows = [
        replace(r, optimizer="adam", trace_sigma_precond=3 * r.trace_sigma, grad_sq_norm_precond=2 * r.grad_sq_norm,
                b_simple_precond=1.5 * r.b_simple)
        for r in ROWS
    ]  # fmt: skip
    plain, pre = headline(rows), headline(rows, preconditioned=True)
    assert plain == headline(ROWS)
    assert pre.b_simple == pytest.approx(1.5 * plain.b_simple)
    assert (pre.b_simple_lo, pre.b_simple_hi) == pytest.approx((1.5 * plain.b_simple_lo, 1.5 * plain.b_simple_hi))
    assert pre.b_simple_late == pytest.approx(1.5 * plain.b_simple_late)
    assert pre.b_simple_start == pytest.approx(1.5 * plain.b_simple_start)
    upto = headline(rows, until_loss=0.8, preconditioned=True)
    assert upto.checkpoints == 3 and upto.b_simple == pytest.approx(1.5 * headline(ROWS, until_loss=0.8).b_simple)
    none = headline(ROWS, preconditioned=True)  # an SGD run has none
    assert math.isnan(none.b_simple) and none.checkpoints == 0
    # a checkpoint without a preconditioner (Adam's initial weights) is left out of the preconditioned average
    first = replace(rows[0], trace_sigma_precond=math.nan, grad_sq_norm_precond=math.nan, b_simple_precond=math.nan)
    later = headline([first, *rows[1:]], preconditioned=True)
    kept = [r for r in rows[1:] if r.scope == "total"]
    assert later.checkpoints == 5 and later.b_simple_start == pytest.approx(kept[0].b_simple_precond)
    assert later.b_simple == pytest.approx(
        sum(r.trace_sigma_precond for r in kept) / sum(r.grad_sq_norm_precond for r in kept)
    )


def test_a_row_from_before_the_optimizer_columns_is_sgd():
    record = {k: v for k, v in asdict(ROWS[0]).items() if k not in PRECOND_FIELDS}
    back = scope_row({**record, "optimizer": None, "b_simple_precond": None, "node_ids": ["n"]})
    assert back.optimizer == "sgd" and math.isnan(back.b_simple_precond) and math.isnan(back.trace_sigma_precond)
    assert {k: v for k, v in asdict(back).items() if k not in PRECOND_FIELDS} == {
        k: v for k, v in asdict(ROWS[0]).items() if k not in PRECOND_FIELDS
    }
