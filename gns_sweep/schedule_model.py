"""How many steps a batch-size schedule can save, by McCandlish et al.'s model applied stretch by stretch.

Training is cut into stretches; stretch i needs S_i steps with an unlimited batch (its S_min) and has the
noise scale B_i. At batch b_i it takes S_i (1 + B_i/b_i) steps and S_i (b_i + B_i) examples. With
A = sum S_i, C = sum S_i B_i and D = sum S_i sqrt(B_i):

- one batch b throughout takes A + C/b steps and A b + C examples; the fewest steps with E examples are
  at b = (E - C)/A: A + A C/(E - C);
- the rule b_i = k B_i takes A (1 + 1/k) steps and (1 + k) C examples, exactly those of the one batch
  k C/A, however much B_i varies;
- the fewest steps with E examples (Lagrange) take b_i = (E - C) sqrt(B_i)/D: A + D^2/(E - C) steps. Its
  steps beyond A are the one batch's times D^2/(A C), which is <= 1 (Cauchy-Schwarz) and 1 only when
  B_i is constant.

A schedule run's own path gives the stretches: step t, at batch b_t with noise scale B_t (the monitor's
smoothed reading after it), makes b_t/(b_t + B_t) of a noiseless step's progress, so it is a stretch with
S_t = b_t/(b_t + B_t). With these weights the model gives back the run's own steps (each stretch takes
S_t (1 + B_t/b_t) = 1 step) and examples (S_t (b_t + B_t) = b_t), so its comparisons are at the run's
examples. An unresolved reading (NaN: the noise scale is at least about the batch) counts as 2 b_t, as
the schedule counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gns_sweep.schedule import ScheduleConfig, ScheduleResult, choose_batch


def model_steps(s_min: np.ndarray, b_noise: np.ndarray, batch: np.ndarray) -> float:
    """sum S_i (1 + B_i/b_i): the steps of batch b_i on stretch i. All (n,)."""
    return float(np.sum(s_min * (1.0 + b_noise / batch)))


def model_examples(s_min: np.ndarray, b_noise: np.ndarray, batch: np.ndarray) -> float:
    """sum S_i (b_i + B_i): the examples of batch b_i on stretch i. All (n,)."""
    return float(np.sum(s_min * (batch + b_noise)))


def fixed_batch(s_min: np.ndarray, b_noise: np.ndarray, examples: float) -> float:
    """The one batch size that uses `examples` over every stretch: (E - C)/A (> 0 only when E > C)."""
    return (examples - float(np.sum(s_min * b_noise))) / float(np.sum(s_min))


def fixed_steps(s_min: np.ndarray, b_noise: np.ndarray, examples: float) -> float:
    """The steps of that one batch: A + A C/(E - C), the fewest any one batch size takes with E examples."""
    b = fixed_batch(s_min, b_noise, examples)
    return model_steps(s_min, b_noise, np.full_like(s_min, b))


def sqrt_batches(s_min: np.ndarray, b_noise: np.ndarray, examples: float) -> np.ndarray:
    """The batch sizes with the fewest steps for `examples` in all: b_i = (E - C) sqrt(B_i)/D. (n,)"""
    excess = examples - float(np.sum(s_min * b_noise))  # E - C: the examples beyond the noise's own
    return excess * np.sqrt(b_noise) / float(np.sum(s_min * np.sqrt(b_noise)))


def sqrt_steps(s_min: np.ndarray, b_noise: np.ndarray, examples: float) -> float:
    """Their steps: A + D^2/(E - C)."""
    return model_steps(s_min, b_noise, sqrt_batches(s_min, b_noise, examples))


def excess_factor(s_min: np.ndarray, b_noise: np.ndarray) -> float:
    """D^2/(A C): the best schedule's steps beyond S_min as a fraction of the one batch's, at any examples."""
    d = float(np.sum(s_min * np.sqrt(b_noise)))
    return d * d / (float(np.sum(s_min)) * float(np.sum(s_min * b_noise)))


@dataclass(frozen=True)
class Path:
    """A run's steps as the model's stretches, one per step."""

    batch: np.ndarray  # (n,) the batch size of each step
    b_noise: np.ndarray  # (n,) the noise scale there (an unresolved reading as twice the batch)
    s_min: np.ndarray  # (n,) b/(b + B): the part of a noiseless step each step makes
    unresolved: int  # steps whose reading was unresolved


def path(batch_sizes, b_noise) -> Path:
    """The stretches of a run's steps, from each step's batch size and noise-scale reading."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    raw = np.asarray(b_noise, dtype=np.float64)
    if b.shape != raw.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"need one batch size and one reading per step, got shapes {b.shape} and {raw.shape}")
    missing = np.isnan(raw)
    noise = np.where(missing, 2.0 * b, raw)
    return Path(batch=b, b_noise=noise, s_min=b / (b + noise), unresolved=int(missing.sum()))


@dataclass(frozen=True)
class Floor:
    """What the model says of one schedule run, to its target (or its end when it missed it)."""

    steps: int  # the run's steps (the model's steps of its path are the same)
    examples: int  # its examples (the model's examples of its path are the same)
    s_min: float  # A: the steps the path would take with an unlimited batch
    b_noise_min: float  # the smallest noise scale along the path
    b_noise_max: float  # the largest
    unresolved: int  # steps whose reading was unresolved (counted as twice the batch)
    excess_factor: float  # D^2/(A C): the best schedule's steps beyond A over the one batch's
    run_ratio: float  # the run's steps / the best one batch's with the run's examples
    rule_ratio: float  # nearest power of two to k * B_t, clamped, / the best one batch's with the rule's examples
    sqrt_ratio: float  # the best schedule's steps / the best one batch's, both with the run's examples

    @property
    def spread(self) -> float:
        """max / min of the noise scale along the path."""
        return self.b_noise_max / self.b_noise_min


def floor_of(result: ScheduleResult, config: ScheduleConfig) -> Floor:
    """The model's reading of a run: its path up to the target (all of it when missed), set against the best
    one batch size with the same examples, for the run itself, for its rule applied without lag, and for
    the best schedule (the floor no schedule goes below under the model)."""
    n = result.steps_to_target or result.steps
    if len(result.step_batch_sizes) < n or n == 0:
        raise ValueError(f"the result has {len(result.step_batch_sizes)} steps' batch sizes; need {max(n, 1)}")
    p = path(result.step_batch_sizes[:n], result.step_b_noise[:n])
    examples = model_examples(p.s_min, p.b_noise, p.batch)
    rule = np.array([choose_batch(x, int(b), config) for x, b in zip(p.b_noise, p.batch, strict=True)], float)
    rule_examples = model_examples(p.s_min, p.b_noise, rule)
    fixed = fixed_steps(p.s_min, p.b_noise, examples)
    return Floor(
        steps=n,
        examples=int(p.batch.sum()),
        s_min=float(p.s_min.sum()),
        b_noise_min=float(p.b_noise.min()),
        b_noise_max=float(p.b_noise.max()),
        unresolved=p.unresolved,
        excess_factor=excess_factor(p.s_min, p.b_noise),
        run_ratio=model_steps(p.s_min, p.b_noise, p.batch) / fixed,
        rule_ratio=model_steps(p.s_min, p.b_noise, rule) / fixed_steps(p.s_min, p.b_noise, rule_examples),
        sqrt_ratio=sqrt_steps(p.s_min, p.b_noise, examples) / fixed,
    )
