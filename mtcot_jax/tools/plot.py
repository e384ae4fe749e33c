"""PNG plots of training runs, from their metrics.jsonl.

    python -m mtcot_jax.tools.plot runs/demo                   # -> runs/demo/plots/*.png
    python -m mtcot_jax.tools.plot runs/a runs/b --out cmp     # one line per run

One figure per group of curves, each written only when some run logged them:
loss.png (SFT losses), main_acc.png, head_acc.png / head_accept.png / head_loss.png
(per head depth), optimizer.png (learning rate, gradient norm), throughput.png,
rl.png (GRPO rollouts), eval.png (evaluation accuracy and forward passes per
decode setting). Runs are labelled by their workdir's name. train.py writes a
run's plots into WORKDIR/plots when it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtcot_jax.errors import user_errors
from mtcot_jax.train.metrics import METRICS_FILE, read_metrics
from mtcot_jax.train.paths import is_local, run_path

PANEL_IN = (4.6, 3.2)   # inches per subplot
DPI = 120
NATS = "cross-entropy (nats/token)"


@dataclasses.dataclass
class Run:
  name: str
  train: list[dict]   # training records by step
  evals: list[dict]   # {"step", "eval": {setting: {...}}} by step, the final evaluation too
  color: str = "C0"   # the run's line color and style in every figure
  style: str = "-"


@dataclasses.dataclass(frozen=True)
class Panel:
  key: str            # a training record's key; a per-depth list is averaged
  title: str
  ylabel: str
  log: bool = False   # log scale where every value is positive and they span a decade


def read_run(workdir: str, name: str | None = None) -> Run:
  """The records of workdir/metrics.jsonl (a line cut short by a kill is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not run_path(path).is_file():
    raise FileNotFoundError(f"no metrics.jsonl in {workdir!r} ({path} does not exist); "
                            "accepted: a run's train.workdir, which holds metrics.jsonl")
  train, evals = {}, {}
  for r in read_metrics(workdir):
    if "step" not in r:
      continue
    if "summary" in r:
      if r["summary"].get("eval"):
        evals[r["step"]] = {"step": r["step"], "eval": r["summary"]["eval"]}
    elif "eval" in r:
      evals[r["step"]] = r
    else:
      train[r["step"]] = r
  if not train and not evals:
    raise ValueError(f"{path} holds no records yet; accepted: a run that has logged a step")
  return Run(name or os.path.basename(os.path.normpath(workdir)),
             [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)])


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps (N,), values (N,) or (N, K) for a per-depth list) of the records holding key."""
  rows = [r for r in records if key in r]
  return (np.array([r["step"] for r in rows]),
          np.array([r[key] for r in rows], np.float64))


def _new_figure(n: int, ncols: int, sharey=False) -> tuple[Figure, list]:
  ncols = max(1, min(n, ncols))
  nrows = -(-n // ncols)
  fig = Figure(figsize=(PANEL_IN[0] * ncols, PANEL_IN[1] * nrows + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, list(axes[:n])


def _finish(fig: Figure, axes: list, title: str, runs: list[Run], run_legend: bool) -> Figure:
  fig.suptitle(title if len(runs) > 1 else f"{title}: {runs[0].name}", fontsize=13)
  for ax in axes:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
  if run_legend and len(runs) > 1:
    lines = {}
    for ax in axes:
      for line in ax.get_lines():
        lines.setdefault(line.get_label(), line)
    fig.legend(list(lines.values()), list(lines), loc="outside lower center",
               ncols=min(len(lines), 4), title="run", frameon=False)
  return fig


def _set_scale(ax, values: list[np.ndarray], log: bool) -> None:
  v = np.concatenate([x.ravel() for x in values]) if values else np.array([])
  if log and v.size and np.all(v > 0) and v.max() > 10 * v.min():
    ax.set_yscale("log")


def _plot(ax, run: Run, steps, values, markers: bool):
  ax.plot(steps, values, color=run.color, ls=run.style, label=run.name, lw=1.4,
          marker="o" if markers or len(steps) < 12 else None, ms=3.5)


def panels_figure(runs: list[Run], title: str, panels: list[Panel],
                  ncols: int = 3) -> Figure | None:
  """One subplot per panel that some run logged, one line per run."""
  panels = [p for p in panels if any(series(r.train, p.key)[0].size for r in runs)]
  if not panels:
    return None
  fig, axes = _new_figure(len(panels), ncols)
  for ax, p in zip(axes, panels):
    seen = []
    for run in runs:
      steps, v = series(run.train, p.key)
      if steps.size:
        v = v.mean(axis=1) if v.ndim == 2 else v
        _plot(ax, run, steps, v, markers=False)
        seen.append(v)
    _set_scale(ax, seen, p.log)
    if len(panels) > 1:
      ax.set_title(p.title)
    ax.set_ylabel(p.ylabel)
  return _finish(fig, axes, title, runs, run_legend=True)


def depth_figure(runs: list[Run], key: str, title: str, ylabel: str,
                 log: bool = False) -> Figure | None:
  """A per-depth list over steps: one run, one line per depth (depth 1 dark, the
  deepest light); several runs, one subplot per depth and one line per run."""
  data = [series(r.train, key) for r in runs]
  depths = max((v.shape[1] for _, v in data if v.ndim == 2 and v.size), default=0)
  if not depths:
    return None
  if len(runs) == 1:
    fig, (ax,) = _new_figure(1, 1)
    fig.set_size_inches(PANEL_IN[0] * 1.6, PANEL_IN[1] * 1.4)
    steps, v = data[0]
    cmap = matplotlib.colormaps["viridis"]
    for j in range(depths):
      ax.plot(steps, v[:, j], color=cmap(j / max(depths - 1, 1) * 0.9), lw=1.4,
              label=f"depth {j + 1}", marker="o" if len(steps) < 12 else None, ms=3.5)
    _set_scale(ax, [v], log)
    ax.set_ylabel(ylabel)
    ax.legend(title="head depth", fontsize=8, ncols=2 if depths > 4 else 1)
    return _finish(fig, [ax], title, runs, run_legend=False)
  fig, axes = _new_figure(depths, 4)
  for j, ax in enumerate(axes):
    seen = []
    for run, (steps, v) in zip(runs, data):
      if v.ndim == 2 and v.shape[1] > j:
        _plot(ax, run, steps, v[:, j], markers=False)
        seen.append(v[:, j])
    _set_scale(ax, seen, log)
    ax.set_title(f"depth {j + 1}")
    ax.set_ylabel(ylabel)
  return _finish(fig, axes, title, runs, run_legend=True)


EVAL_ROWS = (("accuracy", "accuracy (fraction correct)"),
             ("forward_passes", "forward passes per example"),
             ("tokens_per_pass", "tokens per forward pass"))


def eval_figure(runs: list[Run]) -> Figure | None:
  """Evaluations over steps: a column per decode setting (k0, k5, nocot, ...), a
  row per number (accuracy, forward passes, tokens per pass), a line per run."""
  settings = []
  for run in runs:
    for e in run.evals:
      settings += [s for s in e["eval"] if s not in settings]
  if not settings:
    return None
  fig, axes = _new_figure(len(EVAL_ROWS) * len(settings), len(settings), sharey="row")
  last_step = max([r.train[-1]["step"] for r in runs if r.train]
                  + [e["step"] for r in runs for e in r.evals])
  for row, (key, ylabel) in enumerate(EVAL_ROWS):
    for col, setting in enumerate(settings):
      ax = axes[row * len(settings) + col]
      for run in runs:
        pts = [(e["step"], e["eval"][setting][key]) for e in run.evals
               if key in e["eval"].get(setting, {})]
        if pts:
          steps, v = np.array(pts).T
          _plot(ax, run, steps, v, markers=True)
          if len(runs) == 1:    # the last value as text (several runs' would overlap)
            ax.annotate(f"{v[-1]:.3g}", (steps[-1], v[-1]), xytext=(-4, 5),
                        textcoords="offset points", ha="right", fontsize=8, color=run.color)
      if row == 0:
        ax.set_title(f"eval {setting}")
      if key == "accuracy":
        ax.set_ylim(-0.03, 1.08)
      ax.set_xlim(0, last_step * 1.05)
      ax.margins(y=0.15)
      if col == 0:
        ax.set_ylabel(ylabel)
  return _finish(fig, axes, "Evaluation on the eval split, by decode setting", runs,
                 run_legend=True)


def figures(runs: list[Run]) -> dict[str, Figure]:
  """Every figure some run has numbers for, by file name (without .png)."""
  sft = [Panel("loss", "total loss (main + head)", NATS, log=True),
         Panel("main_loss", "main model", NATS, log=True),
         Panel("head_loss", "head (mean over depths)", NATS, log=True)]
  sft_runs = [r for r in runs if any("main_loss" in x for x in r.train)]
  rl = [Panel("reward_mean", "mean reward", "reward"),
        Panel("accuracy", "rollout accuracy", "fraction correct"),
        Panel("kl", "KL to the SFT model", "nats/token"),
        Panel("clip_frac", "clipped ratio", "fraction of tokens"),
        Panel("pass_fraction", "forward passes / k=0 passes", "fraction"),
        Panel("forward_passes", "forward passes", "per rollout"),
        Panel("cot_tokens", "CoT length", "tokens per rollout"),
        Panel("loss", "GRPO loss", "loss")]
  rl_runs = [r for r in runs if any("reward_mean" in x for x in r.train)]
  figs = {
      "loss": panels_figure(sft_runs, "Training loss", sft) if sft_runs else None,
      "main_acc": panels_figure(runs, "Main model next-token accuracy", [
          Panel("main_acc", "main model", "accuracy (fraction of targets)")]),
      "head_acc": depth_figure(runs, "head_acc", "Head accuracy per depth",
                               "accuracy (fraction of targets)"),
      "head_accept": depth_figure(runs, "head_accept",
                                  "Head acceptance per depth (head token = main model's)",
                                  "acceptance (fraction)"),
      "head_loss": depth_figure(runs, "head_loss", "Head loss per depth", NATS, log=True),
      "optimizer": panels_figure(runs, "Optimizer", [
          Panel("lr", "learning rate", "learning rate"),
          Panel("grad_norm", "gradient norm (before clipping)", "global L2 norm", log=True)]),
      "throughput": panels_figure(runs, "Training throughput", [
          Panel("tokens_per_s", "training tokens per second", "training tokens / s", log=True)]),
      "rl": panels_figure(rl_runs, "RL (GRPO) rollouts", rl, ncols=4) if rl_runs else None,
      "eval": eval_figure(runs),
  }
  return {name: fig for name, fig in figs.items() if fig is not None}


def run_names(workdirs: list[str]) -> list[str]:
  """Each workdir's last path component, or its whole path where two would read alike."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot_runs(workdirs: list[str], out: str) -> list[str]:
  """Writes the figures of these runs as out/<name>.png (a local directory or a
  URL, gs://...; so may the workdirs be); returns their paths."""
  runs = [read_run(w, n) for w, n in zip(workdirs, run_names(workdirs))]
  for i, run in enumerate(runs):
    run.color, run.style = f"C{i % 10}", ("-", "--", "-.", ":")[i % 4]
  run_path(out).mkdir(parents=True, exist_ok=True)
  paths = []
  for name, fig in figures(runs).items():
    path = os.path.join(out, f"{name}.png")
    if is_local(path):
      fig.savefig(path, dpi=DPI)
    else:
      png = io.BytesIO()
      fig.savefig(png, format="png", dpi=DPI)
      run_path(path).write_bytes(png.getvalue())
    paths.append(path)
  return paths


def default_out(workdirs: list[str]) -> str:
  return os.path.join(workdirs[0], "plots") if len(workdirs) == 1 else "plots"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR",
                 help="a run's train.workdir (it holds metrics.jsonl)")
  p.add_argument("--out", help="where the PNGs go (default: WORKDIR/plots for one run, "
                               "./plots for several)")
  return p.parse_args(argv)


@user_errors
def main(argv=None):
  args = parse_args(argv)
  out = args.out or default_out(args.workdirs)
  paths = plot_runs(args.workdirs, out)
  print(f"wrote {len(paths)} plots to {out}: " + ", ".join(os.path.basename(p) for p in paths))


if __name__ == "__main__":
  main()
