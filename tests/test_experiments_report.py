"""report.md and plots from a synthetic results.jsonl (no JAX, no training)."""

import json
import os
import statistics
import subprocess
import sys

from mtcot_jax.experiments import report

PNG = b"\x89PNG\r\n\x1a\n"
SEEDS = [0, 1]
TASKS = {"mult3": ("mult", {"digits": 3}), "perm5": ("perm", {"n": 5})}
# (method, seed) -> (accuracy, passes) of the primary row; the same for both tasks.
PRIMARY = {
    ("cot", 0): (0.9, 40.0), ("cot", 1): (0.8, 44.0),
    ("mtcot-k5", 0): (0.85, 12.0), ("mtcot-k5", 1): (0.75, 13.2),
    ("cot-truncated", 0): (0.5, 12.5), ("cot-truncated", 1): (0.4, 13.0),
    ("rl", 0): (0.88, 10.0), ("rl", 1): (0.82, 11.0),
}
TRUNC = {"trunc-paired": 12.0, "trunc-8": 8.0, "trunc-24": 24.0}


def _row(task, method, seed, name, primary, acc, passes, *, k=0, accept=None, budget=None,
         max_cot=64, stage="sft", split="validation"):
  task_name, task_args = TASKS[task]
  return {
      "task": task, "task_name": task_name, "task_args": task_args, "method": method,
      "seed": seed, "eval": name, "primary": primary, "k": k, "cot": True,
      "max_cot_tokens": max_cot, "budget": budget, "accuracy": acc, "forward_passes": passes,
      "forward_passes_std": 1.0, "cot_tokens": passes * max(k, 1), "answer_tokens": 4.0,
      "tokens_per_pass": float(max(k, 1)), "finished": 1.0, "examples": 100,
      "head_acc": accept, "head_accept": accept, "main_acc": 0.95, "train_seconds": 60.0,
      "workdir": f"{task}/{method}/seed{seed}", "config": {"train": {"stage": stage}},
      "commit": "abc1234", "eval_seeds": [1, 2], "split": split,
  }


def _write_results(out):
  rows = []
  for task in TASKS:
    for seed in SEEDS:
      for method in ["cot", "mtcot-k5", "cot-truncated", "rl"]:
        acc, passes = PRIMARY[(method, seed)]
        if method == "cot":
          rows.append(_row(task, method, seed, "k0", True, acc, passes))
        elif method == "cot-truncated":
          for name, cap in TRUNC.items():
            paired = name == "trunc-paired"
            budget = {"max_cot_tokens": int(cap), "target_passes": 12.6 if paired else None}
            a, p = (acc, passes) if paired else (acc * cap / 24.0, cap + 0.5)
            rows.append(_row(task, method, seed, name, paired, a, p, budget=budget,
                             max_cot=int(cap)))
        else:
          accept = [0.9 - 0.1 * d - 0.05 * seed for d in range(5)]
          stage = "rl" if method == "rl" else "sft"
          rows.append(_row(task, method, seed, "k5", True, acc, passes, k=5, accept=accept,
                           stage=stage))
          rows.append(_row(task, method, seed, "k0", False, acc - 0.01, passes * 4, stage=stage))
        if method == "rl":
          wd = os.path.join(out, task, method, f"seed{seed}")
          os.makedirs(wd, exist_ok=True)
          with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
            for step in range(0, 50, 10):
              reward = 0.5 + step / 100 + seed / 20
              f.write(json.dumps({"step": step, "reward_mean": reward}) + "\n")
            f.write(json.dumps({"summary": True, "step": 50}) + "\n")
            f.write(json.dumps({"eval": {"k5": 0.8}, "step": 50}) + "\n")
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))


def _pm(values, digits):
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table_row(text, task, method):
  section = text.split(f"## {task} ")[1].split("### Other evaluations")[0]
  [line] = [l for l in section.splitlines() if l.startswith(f"| {method} |")]
  return [c.strip() for c in line.strip("|").split("|")]


def test_write_report(tmp_path):
  out = str(tmp_path)
  _write_results(out)
  path = report.write_report(out)
  assert path == os.path.join(out, "report.md")
  text = open(path).read()
  assert "python -m mtcot_jax.experiments report" in text
  assert report.load_rows(out)[0]["task"] == "mult3"

  for task in TASKS:
    for method in ["cot", "mtcot-k5", "cot-truncated", "rl"]:
      cells = _table_row(text, task, method)
      accs = [PRIMARY[(method, s)][0] for s in SEEDS]
      passes = [PRIMARY[(method, s)][1] for s in SEEDS]
      ratio = [PRIMARY[(method, s)][1] / PRIMARY[("cot", s)][1] for s in SEEDS]
      acc_ratio = [PRIMARY[(method, s)][0] / PRIMARY[("cot", s)][0] for s in SEEDS]
      assert cells[1] == "2"
      assert cells[2] == _pm(accs, 3)
      assert cells[3] == _pm(passes, 1)
      assert cells[4] == _pm(ratio, 2)
      assert cells[5] == _pm(acc_ratio, 2)
    assert _table_row(text, task, "cot")[2] == "0.850 ± 0.071"
    assert _table_row(text, task, "cot")[4] == "1.00 ± 0.00"
    accept = [statistics.mean(0.9 - 0.1 * d - 0.05 * s for s in SEEDS) for d in range(5)]
    col = report.PRIMARY_COLUMNS.index("head accept by depth")
    assert _table_row(text, task, "mtcot-k5")[col] == " ".join(f"{a:.2f}" for a in accept)
    assert _table_row(text, task, "cot")[col] == "–"
    kept = report.PRIMARY_COLUMNS.index("kept/pass")
    assert _table_row(text, task, "cot")[kept] == "–"     # rows without verification

  assert "| cot-truncated | trunc-24 | 2 |" in text
  assert "vs target 12.60" in text
  for task in TASKS:
    for kind in ["accuracy_vs_passes", "accuracy_vs_passes_by_seed", "head_acceptance",
                 "rl_reward"]:
      png = os.path.join(out, "plots", f"{task}_validation_{kind}.png")
      assert f"(plots/{task}_validation_{kind}.png)" in text
      assert os.path.getsize(png) > 1000
      with open(png, "rb") as f:
        assert f.read(8) == PNG


def test_single_seed_without_heads_or_rl(tmp_path):
  out = str(tmp_path)
  rows = [_row("mult3", "cot", 0, "k0", True, 0.9, 40.0),
          _row("mult3", "nocot", 0, "nocot", True, 0.3, 5.0)]
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  text = open(report.write_report(out)).read()
  assert _table_row(text, "mult3", "nocot")[2:5] == ["0.300", "5.0", "0.12"]
  assert os.path.exists(os.path.join(out, "plots", "mult3_validation_accuracy_vs_passes.png"))
  for kind in ("head_acceptance", "accuracy_vs_passes_by_seed", "rl_reward"):
    assert not os.path.exists(os.path.join(out, "plots", f"mult3_validation_{kind}.png"))


def test_each_split_its_own_section(tmp_path):
  """Validation and test rows of the same cells are never averaged together: a
  section per split, named in its heading; a row from before splits is a test row."""
  out = str(tmp_path)
  rows = [_row("mult3", "cot", 0, "k0", True, 0.9, 40.0, split="validation"),
          _row("mult3", "cot", 0, "k0", True, 0.7, 41.0, split="test")]
  old = _row("mult3", "nocot", 0, "nocot", True, 0.3, 5.0)
  del old["split"]
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows + [old]))
  assert [r["split"] for r in report.load_rows(out)] == ["validation", "test", "test"]
  text = open(report.write_report(out)).read()
  val = text.split("## mult3 (mult, digits=3): validation split")[1].split("\n## ")[0]
  test = text.split("## mult3 (mult, digits=3): test split")[1].split("\n## ")[0]
  assert "Split: validation (task seeds 1..2)." in val and "Split: test" in test
  assert "| cot | 1 | 0.900 |" in val and "nocot" not in val
  assert "| cot | 1 | 0.700 |" in test and "| nocot | 1 | 0.300 |" in test
  for split in ("validation", "test"):
    assert os.path.exists(os.path.join(out, "plots", f"mult3_{split}_accuracy_vs_passes.png"))


def test_report_does_not_import_jax():
  code = ("import importlib.util, sys; "
          f"spec = importlib.util.spec_from_file_location('report', {report.__file__!r}); "
          "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
          "assert 'jax' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_by_seed_plot_labels_every_method_on_one_passes_axis(monkeypatch, tmp_path):
  """A method missing from the first seed still gets a legend entry, and a seed
  with few cells is drawn on the same passes axis as the others."""
  figs = []
  monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig))
  rows = [dict(method="a", seed=0, primary=True, accuracy=1.0, forward_passes=30.0),
          dict(method="a", seed=1, primary=True, accuracy=0.5, forward_passes=10.0),
          dict(method="b", seed=1, primary=True, accuracy=0.9, forward_passes=8.0)]
  assert report._plot_accuracy_by_seed(rows, "t", str(tmp_path / "p.png"))
  (fig,) = figs
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert sorted(labels) == ["a", "b"]
  lims = {ax.get_xlim() for ax in fig.axes}
  assert len(lims) == 1 and min(lims)[0] < 8.0 and min(lims)[1] > 30.0
