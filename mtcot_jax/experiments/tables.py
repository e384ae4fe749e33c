"""The markdown tables of report.md: each method's primary evaluation against `cot`,
the other evaluations, and the equal-passes budgets. Values are mean ± sample std
over seeds (`_fmt`). The rows, their statistics and grouping are report.py's; this
module is imported by `report.write_report` when it writes the report."""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from mtcot_jax.experiments.report import (DASH, EVAL_COLUMNS, PRIMARY_COLUMNS, _eval_groups,
                                          _ordered, _stats)


def _fmt(values: Iterable[float | None], digits: int) -> str:
  """'mean ± std' (sample std) for n >= 2, the bare value for n = 1, '–' for none."""
  s = _stats(values)
  if s is None:
    return DASH
  mean, std, n = s
  return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_mean(values: Iterable[float | None], digits: int) -> str:
  s = _stats(values)
  return DASH if s is None else f"{s[0]:.{digits}f}"


def _per_depth_mean(lists: list[list[float] | None]) -> list[float]:
  """Mean over seeds per depth (ragged lists allowed)."""
  lists = [l for l in lists if l]
  depth = max((len(l) for l in lists), default=0)
  return [statistics.fmean([l[d] for l in lists if len(l) > d]) for d in range(depth)]


def _ratio(num: float | None, den: float | None) -> float | None:
  if num is None or den is None or den == 0:
    return None
  return num / den


def _cell(text: Any) -> str:
  return str(text).replace("|", "\\|")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]
  return out


def primary_table(rows: list[dict]) -> list[str]:
  """One line per method of its primary rows (PRIMARY_COLUMNS); ratios per seed
  against the `cot` row of the same seed."""
  primary = [r for r in rows if r.get("primary")]
  cot = {r.get("seed"): r for r in primary if r["method"] == "cot"}
  lines = []
  for method in _ordered(r["method"] for r in primary):
    mine = [r for r in primary if r["method"] == method]
    pass_ratio, acc_ratio = [], []
    for r in mine:
      base = cot.get(r.get("seed"))
      if base is not None:
        pass_ratio.append(_ratio(r.get("forward_passes"), base.get("forward_passes")))
        acc_ratio.append(_ratio(r.get("accuracy"), base.get("accuracy")))
    accept = _per_depth_mean([r.get("head_accept") for r in mine])
    lines.append([
        method, str(len(mine)),
        _fmt((r.get("accuracy") for r in mine), 3),
        _fmt((r.get("forward_passes") for r in mine), 1),
        _fmt(pass_ratio, 2), _fmt(acc_ratio, 2),
        _fmt((r.get("tokens_per_pass") for r in mine), 2),
        _fmt((r.get("accepted_per_pass") for r in mine), 2),
        _fmt((r.get("cot_tokens") for r in mine), 1),
        _fmt((r.get("finished") for r in mine), 3),
        " ".join(f"{a:.2f}" for a in accept) if accept else DASH,
        _fmt_mean((r.get("train_seconds") for r in mine), 0),
    ])
  return _table(PRIMARY_COLUMNS, lines)


def eval_table(rows: list[dict]) -> list[str]:
  """One line per (method, evaluation) of the non-primary rows (EVAL_COLUMNS)."""
  lines = []
  for (method, name), group in _eval_groups([r for r in rows if not r.get("primary")]).items():
    lines.append([
        method, str(name), str(len(group)),
        "/".join(str(v) for v in _ordered(r.get("k") for r in group)),
        _fmt((r.get("accuracy") for r in group), 3),
        _fmt((r.get("forward_passes") for r in group), 1),
        "/".join(str(v) for v in _ordered(r.get("max_cot_tokens") for r in group)),
    ])
  return _table(EVAL_COLUMNS, lines) if lines else ["(none)"]


def budget_lines(rows: list[dict]) -> list[str]:
  """A bullet per equal-passes evaluation: its mean passes against its target."""
  out = []
  for (method, name), group in _eval_groups(rows).items():
    targets = [(r.get("budget") or {}).get("target_passes") for r in group]
    if all(t is None for t in targets):
      continue
    caps = "/".join(str(v) for v in _ordered(r.get("max_cot_tokens") for r in group))
    out.append(f"- `{method}` `{name}` (equal-passes baseline, max CoT tokens {caps}): "
               f"mean passes {_fmt((r.get('forward_passes') for r in group), 2)} "
               f"vs target {_fmt(targets, 2)}")
  return out
