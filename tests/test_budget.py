"""experiments/budget.py's statistics: the paired bootstrap and the verdict rows."""

import numpy as np
import pytest

from mtcot_jax.experiments import budget


def test_bootstrap_resamples_within_groups():
  """Constant differences inside each group: every resample has the same mean,
  the problem-weighted one (stratified; pooled resampling would spread it)."""
  mean, lo, hi = budget.paired_bootstrap([np.ones(10), np.zeros(30)])
  assert mean == lo == hi == 0.25


def test_bootstrap_interval_matches_the_normal_one():
  """+1/-1/0 differences, n = 2,000: the percentile interval's half-width is
  1.96 sd / sqrt(n) to within the bootstrap's Monte Carlo error (4,000
  resamples: ~2% on a percentile of a normal) and the CLT's (n large): 10%."""
  rng = np.random.default_rng(1)
  d = rng.choice([-1.0, 0.0, 1.0], size=2000, p=[0.2, 0.5, 0.3])
  mean, lo, hi = budget.paired_bootstrap([d])
  half = 1.96 * d.std() / np.sqrt(len(d))
  assert mean == pytest.approx(d.mean())
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
  assert lo < mean < hi


def test_verdict_pairs_runs_and_budgets():
  rows = []
  for run, (u, v) in {"a": ([1, 1, 0, 0], [1, 0, 0, 0]), "b": ([0, 1], [0, 1])}.items():
    rows += [{"run": run, "mode": "unverified", "budget": 2, "correct": u, "forward_passes": 5.0},
             {"run": run, "mode": "verified", "budget": 2, "correct": v, "forward_passes": 6.0},
             {"run": run, "mode": "k0", "budget": 2, "correct": v, "forward_passes": 9.0}]
  for r in rows:
    r.update(accuracy=float(np.mean(r["correct"])), cot_tokens=4.0)
  (row,) = budget.verdict(rows)
  assert row["budget"] == 2 and row["runs"] == 2
  assert row["diff"] == pytest.approx(1 / 6)     # one problem of six
  assert row["passes_unverified"] == 5.0 and row["passes_verified"] == 6.0
  assert "| 2 | 2 | +0.167" in budget.table(rows)


def test_bad_budget_raises(tmp_path):
  with pytest.raises(ValueError, match="--budgets -1"):
    budget.main(["runs/none"], [-1], examples=4, tau=None, out=str(tmp_path), split=None)
