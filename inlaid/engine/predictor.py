"""Per-task output-length predictor, learned online from finished requests. Torch-free.

Model, per task: ``output_len ≈ mean + slope · (prompt_len − mean_prompt_len)``, fit by streaming
least squares (Welford-style running moments, O(1) per request, numerically stable). Guards for
little data:
- the mean is shrunk towards a prior with ``prior_weight`` pseudo-observations; the prior is the
  pooled mean of all tasks seen so far, or ``default_length`` before any request has finished;
- the slope is used only after ``min_samples_for_slope`` requests whose prompt lengths vary.
The error is measured prequentially: each finished request is first predicted, then learned, so the
reported mean absolute error is an honest out-of-sample figure (bench reports it per task).
Requests cut by ``max_tokens`` are learned at their cut length; that is the length the scheduler
must plan for under the same limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inlaid.errors import ConfigError

MIN_PROMPT_VARIANCE = 1.0  # tokens²: below this the prompt length carries no usable signal


def predicted_remaining(predicted_total: float, num_generated: int, max_tokens: int) -> float:
    """Tokens still to come (>= 1) for a request predicted to make ``predicted_total``. One that
    outlived its prediction expects as many tokens again as it has made (capped by max_tokens):
    treating it as nearly done would let a badly mispredicted long request jump every queue."""
    total = min(predicted_total, max_tokens)
    if num_generated >= total:
        total = min(2 * num_generated, max_tokens)
    return max(total - num_generated, 1.0)


@dataclass
class _RunningFit:
    """Streaming moments of (prompt_len x, output_len y) plus the prequential error."""

    n: int = 0
    mean_x: float = 0.0
    mean_y: float = 0.0
    m2_x: float = 0.0  # Σ (x − mean_x)²
    c_xy: float = 0.0  # Σ (x − mean_x)(y − mean_y)
    abs_error_sum: float = 0.0

    def update(self, x: float, y: float) -> None:
        self.n += 1
        dx = x - self.mean_x
        self.mean_x += dx / self.n
        self.mean_y += (y - self.mean_y) / self.n
        self.m2_x += dx * (x - self.mean_x)
        self.c_xy += dx * (y - self.mean_y)

    def slope(self, min_samples: int) -> float:
        if self.n < min_samples or self.m2_x / self.n < MIN_PROMPT_VARIANCE:
            return 0.0
        return self.c_xy / self.m2_x

    @property
    def mae(self) -> float:
        return self.abs_error_sum / self.n if self.n else math.nan


@dataclass(frozen=True)
class TaskStats:
    num_observations: int
    mean_output_len: float
    slope_per_prompt_token: float
    mae: float


class OutputLengthPredictor:
    """Predicts a request's total output tokens from its task (adapter name) and prompt length."""

    def __init__(self, default_length: float = 128.0, prior_weight: float = 4.0,
                 min_samples_for_slope: int = 16, use_prompt_length: bool = True) -> None:
        if default_length < 1 or prior_weight < 0 or min_samples_for_slope < 2:
            raise ConfigError("predictor needs default_length >= 1, prior_weight >= 0 and "
                              "min_samples_for_slope >= 2")
        self.default_length = float(default_length)
        self.prior_weight = float(prior_weight)
        self.min_samples_for_slope = min_samples_for_slope
        self.use_prompt_length = use_prompt_length
        self._tasks: dict[str | None, _RunningFit] = {}
        self._pooled = _RunningFit()

    @property
    def tasks(self) -> list[str | None]:
        return list(self._tasks)

    def _prior(self) -> float:
        return self._pooled.mean_y if self._pooled.n else self.default_length

    def predict(self, task: str | None, prompt_len: int) -> float:
        """Expected output tokens (>= 1). ``task`` None is the base model without adapter."""
        fit = self._tasks.get(task)
        if fit is None:
            return max(self._prior(), 1.0)
        mean = (fit.n * fit.mean_y + self.prior_weight * self._prior()) / (fit.n + self.prior_weight)
        slope = fit.slope(self.min_samples_for_slope) if self.use_prompt_length else 0.0
        return max(mean + slope * (prompt_len - fit.mean_x), 1.0)

    def observe(self, task: str | None, prompt_len: int, output_len: int) -> float:
        """Learn from a finished request; returns the absolute error of the prediction made for it
        just before learning (the prequential error that ``mean_absolute_error`` averages)."""
        error = abs(self.predict(task, prompt_len) - output_len)
        fit = self._tasks.setdefault(task, _RunningFit())
        for stats in (fit, self._pooled):
            stats.abs_error_sum += error
            stats.update(float(prompt_len), float(output_len))
        return error

    @property
    def num_observations(self) -> int:
        """Finished requests learned, all tasks together."""
        return self._pooled.n

    @property
    def mean_absolute_error(self) -> float:
        """Prequential MAE in tokens over all tasks (NaN before any observation)."""
        return self._pooled.mae

    def stats(self, task: str | None) -> TaskStats:
        """One task's figures for the bench table (zeros and NaN MAE for an unseen task)."""
        fit = self._tasks.get(task, _RunningFit())
        return TaskStats(fit.n, fit.mean_y, fit.slope(self.min_samples_for_slope), fit.mae)
