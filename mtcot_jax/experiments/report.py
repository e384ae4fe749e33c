"""Summarises an experiment directory's results.jsonl as report.md plus PNG plots.

Regenerate with `python -m mtcot_jax.experiments report <dir>`. Needs matplotlib,
computes nothing with JAX: it reads JSON files (loading this module imports no JAX;
the runs' metrics.jsonl are read through `mtcot_jax.train.metrics` and the markdown
tables built by `tables.py`, both imported on use).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from typing import Any, Iterable

RESULTS = "results.jsonl"
REPORT = "report.md"
PLOTS = "plots"
DASH = "–"

# The last row wins when a cell's evaluation was appended twice (a rerun).
_KEY = ("task", "method", "seed", "eval", "split")
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p"]


# The columns of report.md's tables (the tables themselves: tables.py).
PRIMARY_COLUMNS = ["method", "n", "accuracy", "passes", "passes ÷ cot", "accuracy ÷ cot",
                   "tokens/pass", "kept/pass", "CoT tokens", "finished", "head accept by depth",
                   "train s"]
EVAL_COLUMNS = ["method", "eval", "n", "k", "accuracy", "passes", "max CoT tokens"]


def load_rows(out_dir: str) -> list[dict]:
  """The rows of out_dir/results.jsonl, in file order, reruns deduplicated (last wins).
  A row without `split` (written before the validation split existed) is a test row."""
  path = os.path.join(out_dir, RESULTS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {RESULTS} in {out_dir}: run the experiments first")
  rows: dict[tuple, dict] = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
      row.setdefault("split", "test")
      rows[tuple(row.get(k) for k in _KEY)] = row
  return list(rows.values())


# ---------------------------------------------------------------------------- statistics


def _stats(values: Iterable[float | None]) -> tuple[float, float, int] | None:
  """(mean, sample std (0 for n = 1), n) of the non-missing values; None if there are none."""
  vals = [float(v) for v in values if v is not None and not _isnan(v)]
  if not vals:
    return None
  std = statistics.stdev(vals) if len(vals) > 1 else 0.0
  return statistics.fmean(vals), std, len(vals)


def _isnan(v: Any) -> bool:
  return isinstance(v, float) and math.isnan(v)


def _per_depth_stats(lists: list[list[float] | None]) -> tuple[list[float], list[float]]:
  lists = [l for l in lists if l]
  depth = max((len(l) for l in lists), default=0)
  means, stds = [], []
  for d in range(depth):
    mean, std, _ = _stats(l[d] for l in lists if len(l) > d)
    means.append(mean)
    stds.append(std)
  return means, stds


# ---------------------------------------------------------------------------- grouping


def _ordered(values: Iterable) -> list:
  """Distinct values in order of first appearance."""
  return list(dict.fromkeys(values))


def _eval_groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in rows:
    groups.setdefault((r["method"], r.get("eval")), []).append(r)
  return groups


def _is_rl(row: dict) -> bool:
  return ((row.get("config") or {}).get("train") or {}).get("stage") == "rl"


def _task_title(rows: list[dict]) -> str:
  row = rows[0]
  args = ", ".join(f"{k}={v}" for k, v in (row.get("task_args") or {}).items())
  name = row.get("task_name")
  detail = f"{name}, {args}" if name and args else (name or args)
  return f"{row['task']} ({detail})" if detail else row["task"]


def _split_line(split: str, rows: list[dict]) -> str:
  """`Split: test (task seeds a..b).`: where a section's numbers come from."""
  seeds = [s for r in rows for s in (r.get("eval_seeds") or [])]
  where = f" (task seeds {min(seeds)}..{max(seeds)})" if seeds else ""
  return f"Split: {split}{where}."


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


# ---------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _style(i: int) -> dict:
  # tab20: twenty distinguishable colours, so that up to 20 methods never share one.
  return {"color": _pyplot().get_cmap("tab20")(i % 20), "marker": _MARKERS[i % len(_MARKERS)]}


def _save(fig, path: str) -> None:
  fig.savefig(path, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)


def _mean_std(rows: list[dict], key: str) -> tuple[float, float] | None:
  s = _stats(r.get(key) for r in rows)
  return None if s is None else s[:2]


def _legend_outside(ax) -> None:
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _plot_accuracy(rows: list[dict], title: str, path: str) -> bool:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  xs = []
  primary = [r for r in rows if r.get("primary")]
  methods = _ordered(r["method"] for r in rows)
  for i, method in enumerate(methods):
    mine = [r for r in primary if r["method"] == method]
    x, y = _mean_std(mine, "forward_passes"), _mean_std(mine, "accuracy")
    if x is None or y is None:
      continue
    st = _style(i)
    ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], linestyle="none", markersize=8,
                capsize=3, label=method, **st)
    xs.append(x[0])
    # A truncated-CoT cell's budgets form a curve.
    budgets = _eval_groups([r for r in rows if r["method"] == method
                            and str(r.get("eval", "")).startswith("trunc")])
    points = []
    for group in budgets.values():
      bx, by = _mean_std(group, "forward_passes"), _mean_std(group, "accuracy")
      if bx is not None and by is not None:
        points.append((bx, by))
    if len(points) >= 2:
      points.sort(key=lambda p: p[0][0])
      ax.errorbar([p[0][0] for p in points], [p[1][0] for p in points],
                  xerr=[p[0][1] for p in points], yerr=[p[1][1] for p in points],
                  color=st["color"], marker=".", linestyle="--", linewidth=1, capsize=2,
                  alpha=0.8, label=f"{method} (budgets)")
      xs += [p[0][0] for p in points]
  if not xs:
    plt.close(fig)
    return False
  log = min(xs) > 0 and max(xs) / min(xs) >= 10
  if log:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
  return _finish(fig, ax, path, "forward passes per problem (serial main-model passes, mean"
                 + (", log scale)" if log else ")"), "accuracy on held-out problems",
                 f"{title}: accuracy vs forward passes")


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> bool:
  """Labels, the [0, 1] y range, a grid and the legend outside; writes the PNG."""
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  _legend_outside(ax)
  _save(fig, path)
  return True


def _plot_accuracy_by_seed(rows: list[dict], title: str, path: str) -> bool:
  """One panel per seed: every method's primary evaluation of that seed. Where
  seeds disagree (a run that did not learn the task on one seed), means hide what
  each run did; the panels show it."""
  primary = [r for r in rows if r.get("primary") and r.get("accuracy") is not None
             and r.get("forward_passes") is not None]
  seeds = sorted(_ordered(r.get("seed") for r in primary), key=str)
  if len(seeds) < 2 or len(seeds) > 5:
    return False
  plt = _pyplot()
  methods = _ordered(r["method"] for r in rows)
  # One passes axis for every seed (a seed with few cells must not get a zoomed
  # axis), and each method labelled where it first appears.
  fig, axes = plt.subplots(1, len(seeds), figsize=(3.3 * len(seeds) + 1.8, 3.8), sharey=True,
                           sharex=True, squeeze=False)
  labelled = set()
  for ax, seed in zip(axes[0], seeds):
    for i, method in enumerate(methods):
      mine = [r for r in primary if r["method"] == method and r.get("seed") == seed]
      for r in mine:
        ax.plot(r["forward_passes"], r["accuracy"], linestyle="none", markersize=7,
                label=None if method in labelled else method, **_style(i))
        labelled.add(method)
    ax.set_title(f"seed {seed}", fontsize=10)
    ax.set_xlabel("forward passes per problem")
    ax.grid(alpha=0.3)
    ax.set_ylim(-0.03, 1.03)
  axes[0][0].set_ylabel("accuracy on held-out problems")
  fig.suptitle(f"{title}: accuracy vs forward passes, each seed", fontsize=11)
  fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
  fig.tight_layout()
  _save(fig, path)
  return True


def _plot_head_acceptance(rows: list[dict], title: str, path: str) -> bool:
  primary = [r for r in rows if r.get("primary") and r.get("head_accept")]
  if not primary:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  methods = _ordered(r["method"] for r in rows)
  shown = [m for m in methods if any(r["method"] == m for r in primary)]
  for j, method in enumerate(shown):
    means, stds = _per_depth_stats([r["head_accept"] for r in primary if r["method"] == method])
    shift = (j - (len(shown) - 1) / 2) * 0.06  # keeps overlapping error bars apart
    depth = [d + 1 + shift for d in range(len(means))]
    ax.errorbar(depth, means, yerr=stds, capsize=3, linewidth=1.2, label=method,
                **_style(methods.index(method)))
  k = max(len(r["head_accept"]) for r in primary)
  ax.set_xticks(range(1, k + 1))
  return _finish(fig, ax, path, "head depth (token position within a CoT block)",
                 "head acceptance (agrees with main greedy token)",
                 f"{title}: multi-token head acceptance by depth")


def _reward_curve(out_dir: str, workdir: str) -> tuple[list[float], list[float]]:
  from mtcot_jax.train.metrics import read_metrics
  try:
    records = read_metrics(os.path.join(out_dir, workdir))
  except FileNotFoundError:
    records = []
  rows = [r for r in records if r.get("reward_mean") is not None and "step" in r]
  return [r["step"] for r in rows], [r["reward_mean"] for r in rows]


def _plot_rl_reward(rows: list[dict], out_dir: str, title: str, path: str) -> bool:
  cells = {}
  for r in rows:
    if _is_rl(r) and r.get("workdir"):
      cells.setdefault(r["workdir"], r)
  curves = []
  for workdir, r in cells.items():
    steps, rewards = _reward_curve(out_dir, workdir)
    if steps:
      curves.append((r, steps, rewards))
  if not curves:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  methods = _ordered(r["method"] for r in rows)
  styles = ["-", "--", ":", "-."]
  seeds = _ordered(r.get("seed") for r, _, _ in curves)
  for r, steps, rewards in curves:
    color = _style(methods.index(r["method"]))["color"]
    ax.plot(steps, rewards, linewidth=1, alpha=0.85, color=color,
            linestyle=styles[seeds.index(r.get("seed")) % len(styles)],
            label=f"{r['method']} seed {r.get('seed')}")
  ax.set_xlabel("RL step")
  ax.set_ylabel("mean reward per rollout")
  ax.set_title(f"{title}: RL reward")
  ax.grid(alpha=0.3)
  _legend_outside(ax)
  _save(fig, path)
  return True


# ---------------------------------------------------------------------------- report


def write_report(out_dir: str) -> str:
  """Writes out_dir/report.md and out_dir/plots/*.png from out_dir/results.jsonl; returns
  the report's path."""
  from mtcot_jax.experiments.tables import budget_lines, eval_table, primary_table
  rows = load_rows(out_dir)
  plots = os.path.join(out_dir, PLOTS)
  os.makedirs(plots, exist_ok=True)
  cells = _ordered((r["task"], r["method"], r.get("seed")) for r in rows)
  seeds = sorted(_ordered(r.get("seed") for r in rows), key=str)
  commits = _ordered(r.get("commit") for r in rows if r.get("commit"))
  lines = [
      "# Experiment report", "",
      f"Results: `{os.path.join(out_dir, RESULTS)}`: {len(rows)} evaluations of {len(cells)} "
      f"cells (task × method × seed), seeds {', '.join(str(s) for s in seeds) or DASH}"
      + (f", commit {', '.join(commits)}" if commits else "") + ".", "",
      f"Regenerate with `python -m mtcot_jax.experiments report {out_dir}`.", "",
      "Primary rows are each method's headline evaluation. Values are mean ± sample std over "
      "seeds (a bare value when n = 1). Ratios are taken per seed against the `cot` cell of "
      "the same task and seed. Passes are serial main-model forward passes per problem.", "",
      "Each section's numbers come from one held-out split, named in its heading: "
      "`validation` (for choosing settings) or `test` (a final table, computed once).",
  ]
  for task, split in _ordered((r["task"], r["split"]) for r in rows):
    mine = [r for r in rows if r["task"] == task and r["split"] == split]
    title = _task_title(mine)
    lines += ["", f"## {title}: {split} split", "", _split_line(split, mine), "",
              "### Primary evaluations", ""] + primary_table(mine)
    lines += ["", "### Other evaluations", ""] + eval_table(mine)
    budget = budget_lines(mine)
    if budget:
      lines += ["", "### Equal-passes budgets", ""] + budget
    made = []
    name, plot_title = _safe(f"{task}_{split}"), f"{title}, {split} split"
    for kind, label, draw in [
        ("accuracy_vs_passes", "accuracy vs passes",
         lambda p: _plot_accuracy(mine, plot_title, p)),
        ("accuracy_vs_passes_by_seed", "accuracy vs passes, each seed",
         lambda p: _plot_accuracy_by_seed(mine, plot_title, p)),
        ("head_acceptance", "head acceptance",
         lambda p: _plot_head_acceptance(mine, plot_title, p)),
        ("rl_reward", "RL reward", lambda p: _plot_rl_reward(mine, out_dir, plot_title, p)),
    ]:
      rel = f"{PLOTS}/{name}_{kind}.png"
      if draw(os.path.join(out_dir, rel)):
        made.append(f"![{task} {label}]({rel})")
    if made:
      lines += ["", "### Plots", ""] + [m for p in made for m in (p, "")][:-1]
  path = os.path.join(out_dir, REPORT)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
