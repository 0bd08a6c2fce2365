"""Paired bootstrap intervals of accuracy differences."""

from __future__ import annotations

import numpy as np
import pytest

from svpo_trl.stats import format_difference, paired_bootstrap


def test_difference_and_interval_of_one_seed():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 2, 1000)
    a = b.copy()
    flip = rng.choice(1000, 60, replace=False)
    a[flip] = 1  # a is right wherever b is, and on some more problems
    result = paired_bootstrap(a, b, num_resamples=4000)
    gain = (a.sum() - b.sum()) / 1000
    assert result["difference"] == pytest.approx(gain)
    assert result["first"] == pytest.approx(a.mean()) and result["second"] == pytest.approx(b.mean())
    # The paired standard error is sqrt(p(1-p)/n) for p = share of problems that changed: ~1.96 SE each side
    se = np.sqrt(gain * (1 - gain) / 1000)
    assert result["low"] == pytest.approx(gain - 1.96 * se, abs=0.006)
    assert result["high"] == pytest.approx(gain + 1.96 * se, abs=0.006)
    assert result["low"] > 0 and (result["num_problems"], result["num_seeds"]) == (1000, 1)


def test_identical_systems_have_a_zero_width_interval():
    result = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1])
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert format_difference({"difference": 0.032, "low": 0.011, "high": 0.053}) == "+3.2 [+1.1, +5.3]"


def test_several_seeds_average_per_problem_and_resample_problems_jointly():
    a = [[1, 1, 0, 0], [1, 0, 0, 0]]
    b = [[0, 1, 0, 0], [0, 0, 0, 0]]
    result = paired_bootstrap(a, b, num_resamples=2000)
    assert result["difference"] == pytest.approx(0.25) and result["num_seeds"] == 2
    assert 0 <= result["low"] <= 0.25 <= result["high"] <= 1.0


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="at least one problem"):
        paired_bootstrap([], [])
