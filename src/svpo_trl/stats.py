"""Paired comparisons of two systems on the same problems: the difference in accuracy with a bootstrap interval.

Two systems evaluated on the same problems are compared problem by problem: resampling problems (not the
two systems separately) keeps the pairing, so the interval reflects how much the difference depends on
which problems were drawn. Over several seeds evaluated on the same problems, the difference is the mean
of the per-seed differences, and each bootstrap draw resamples the same problems for every seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def paired_bootstrap(
    first: Sequence[Sequence[int | bool]] | Sequence[int | bool],
    second: Sequence[Sequence[int | bool]] | Sequence[int | bool],
    *,
    num_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of ``first`` minus accuracy of ``second``, with a percentile bootstrap interval.

    Args:
        first, second: per-problem correctness (0/1) in the same problem order; or one such list per
            seed (``[seed][problem]``), every seed on the same problems.
        num_resamples: bootstrap draws of the problems.
        confidence: coverage of the interval (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        ``{"difference", "low", "high", "num_problems", "num_seeds", "first", "second"}``: the difference
        and the interval in accuracy units (multiply by 100 for points), and each system's accuracy.

    Example::

        paired_bootstrap([1, 1, 0, 1], [1, 0, 0, 1])  # {"difference": 0.25, "low": 0.0, "high": 0.75, ...}
    """
    a = np.asarray(first, dtype=float)
    b = np.asarray(second, dtype=float)
    if a.ndim == 1:
        a, b = a[None, :], b[None, :]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"paired_bootstrap needs the same problems for both systems: shapes {a.shape} and {b.shape}"
        )
    if a.shape[1] == 0:
        raise ValueError("paired_bootstrap needs at least one problem")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    per_problem = (a - b).mean(axis=0)  # the seeds' mean difference on each problem
    rng = np.random.default_rng(seed)
    n = per_problem.shape[0]
    draws = np.empty(num_resamples)
    for start in range(0, num_resamples, 1000):  # bounded memory for large problem sets
        stop = min(start + 1000, num_resamples)
        draws[start:stop] = per_problem[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {
        "difference": float(per_problem.mean()),
        "low": float(low),
        "high": float(high),
        "num_problems": int(n),
        "num_seeds": int(a.shape[0]),
        "first": float(a.mean()),
        "second": float(b.mean()),
    }


def format_difference(result: dict[str, float]) -> str:
    """``+3.2 [+1.1, +5.3]`` in points."""
    return f"{100 * result['difference']:+.1f} [{100 * result['low']:+.1f}, {100 * result['high']:+.1f}]"
