"""Output-length predictor: priors, learning per task, the linear prompt-length term, reported MAE."""

from __future__ import annotations

import math
import random

import pytest

from inlaid.engine.predictor import OutputLengthPredictor
from inlaid.errors import ConfigError

# task -> (mean output length, noise half-width); lengths independent of the prompt
TASKS = {"summarize": (120, 10), "classify": (3, 1), "translate": (60, 8), None: (30, 5)}


def sample(rng: random.Random) -> tuple[str | None, int, int]:
    task = rng.choice(list(TASKS))
    mean, noise = TASKS[task]
    return task, rng.randrange(10, 200), max(1, round(mean + rng.uniform(-noise, noise)))


def test_unseen_task_uses_default_then_pooled_mean() -> None:
    p = OutputLengthPredictor(default_length=50)
    assert p.predict("new", 10) == 50
    assert math.isnan(p.mean_absolute_error)
    p.observe("a", 10, 10)
    p.observe("b", 10, 30)
    assert p.predict("never-seen", 99) == pytest.approx(20)


def test_few_observations_are_shrunk_towards_the_prior() -> None:
    p = OutputLengthPredictor(default_length=100, prior_weight=4)
    p.observe("t", 10, 20)  # pooled prior becomes 20 too, so check with a second task
    p.observe("u", 10, 180)  # pooled mean 100
    assert p.predict("u", 10) == pytest.approx((180 + 4 * 100) / 5)


def test_error_decreases_as_it_learns_per_task_lengths() -> None:
    rng = random.Random(0)
    p = OutputLengthPredictor(default_length=128)
    errors = [p.observe(*sample(rng)) for _ in range(600)]
    early, late = sum(errors[:20]) / 20, sum(errors[-200:]) / 200
    assert late < early / 5
    assert late < 8  # close to the noise level (mean |uniform noise| ≤ 5)
    # a single global mean would be far worse on this mix of tasks
    lengths = [sample(rng)[2] for _ in range(2000)]
    global_mean = sum(lengths) / len(lengths)
    assert late < sum(abs(y - global_mean) for y in lengths) / len(lengths) / 4
    for task, (mean, _) in TASKS.items():
        assert p.predict(task, 100) == pytest.approx(mean, abs=3)


def test_reported_mae_is_the_mean_of_prequential_errors() -> None:
    rng = random.Random(1)
    p = OutputLengthPredictor()
    errors = {}
    for _ in range(100):
        task, prompt_len, out_len = sample(rng)
        expected = abs(p.predict(task, prompt_len) - out_len)
        errors.setdefault(task, []).append(p.observe(task, prompt_len, out_len))
        assert errors[task][-1] == pytest.approx(expected)
    all_errors = [e for errs in errors.values() for e in errs]
    assert p.num_observations == 100
    assert p.mean_absolute_error == pytest.approx(sum(all_errors) / 100)
    for task, errs in errors.items():
        stats = p.stats(task)
        assert stats.num_observations == len(errs)
        assert stats.mae == pytest.approx(sum(errs) / len(errs))
    assert p.stats("unseen").num_observations == 0 and math.isnan(p.stats("unseen").mae)


def test_prompt_length_term_is_learned_when_it_matters() -> None:
    rng = random.Random(2)
    p = OutputLengthPredictor()
    flat = OutputLengthPredictor(use_prompt_length=False)
    xs, ys = [], []
    for _ in range(300):  # e.g. translation: output ≈ 1.5 × input
        xs.append(rng.randrange(10, 300))
        ys.append(round(1.5 * xs[-1] + 5 + rng.uniform(-3, 3)))
        p.observe("translate", xs[-1], ys[-1])
        flat.observe("translate", xs[-1], ys[-1])
    # the streaming fit is exactly the batch least-squares fit
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    ols = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    assert p.stats("translate").slope_per_prompt_token == pytest.approx(ols, rel=1e-9)
    assert p.stats("translate").mean_output_len == pytest.approx(my, rel=1e-12)
    assert ols == pytest.approx(1.5, abs=0.05)
    assert p.predict("translate", 200) == pytest.approx(305, abs=6)
    assert p.mean_absolute_error < flat.mean_absolute_error / 3


def test_slope_waits_for_varied_prompts() -> None:
    p = OutputLengthPredictor(min_samples_for_slope=4)
    for y in (10, 20, 30, 40, 50):
        p.observe("t", 64, y)  # one prompt length: no slope to learn
    assert p.stats("t").slope_per_prompt_token == 0
    assert p.predict("t", 1000) == p.predict("t", 1)


def test_predictions_are_at_least_one_token() -> None:
    p = OutputLengthPredictor(min_samples_for_slope=2)
    for x, y in [(10, 100), (100, 1), (110, 1), (20, 90)]:
        p.observe("t", x, y)
    assert p.predict("t", 10_000) == 1.0


@pytest.mark.parametrize("kwargs", [{"default_length": 0}, {"prior_weight": -1},
                                    {"min_samples_for_slope": 1}])
def test_bad_settings_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        OutputLengthPredictor(**kwargs)
