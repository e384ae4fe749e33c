"""Runs a spec's grid: trains each training run once, evaluates every cell on
held-out problems, and keeps `results.jsonl` whole.

Layout of the output directory:

    DIR/spec.yaml                          the spec as run
    DIR/results.jsonl                      one row per cell, split and evaluation (rebuilt
                                           from the cells' cell files after each cell)
    DIR/<task>/_train/<stage>/seed<i>/     training runs (ordinary workdirs), with
                                           done.json once finished
    DIR/<task>/<method>/seed<i>/           the cells: ordinary workdirs (config.yaml with
                                           the method's decode settings, the tokenizer,
                                           checkpoints/ and metrics.jsonl linking to
                                           their last training run) and
                                           cell.<split>.json (their rows on that split)

Cells are evaluated on the spec's `split` (validation unless a final table asks
for test); every row says which. Re-running skips cells that have the split's
cell file and training runs that have done.json (training does not depend on
the split: a test table reuses the runs validation chose from); an interrupted
training run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any

import numpy as np

from mtcot_jax.config import Config, save_config
from mtcot_jax.config_checks import EVAL_SPLITS
from mtcot_jax.experiments import methods as mm
from mtcot_jax.experiments.spec import Cell, Spec, cell_config, cells, load_spec, stage_config, \
    stage_dir
from mtcot_jax.train.metrics import METRICS_FILE

DONE_FILE = "done.json"
CELL_FILE = "cell.json"   # before the validation split: rows evaluated on test
RESULTS_FILE = "results.jsonl"
EVAL_WORK = 50            # an evaluation's weight in training steps, for the time estimate
_PAIRED_TRIES = 5         # evaluations tried to bring cot-truncated's passes within 1 of its pair


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)     # atomic: a kill never leaves half a file


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def cell_file(split: str) -> str:
  """The name of a cell's file of rows on `split`: cell.validation.json, cell.test.json."""
  return f"cell.{split}.json"


def cell_path(out: str, cell_id: str, split: str) -> str | None:
  """The cell's existing file of rows on `split` (a test cell may be an old CELL_FILE,
  whose rows were all on test), or None."""
  for name in (cell_file(split),) + ((CELL_FILE,) if split == "test" else ()):
    path = os.path.join(out, cell_id, name)
    if os.path.exists(path):
      return path
  return None


def commit() -> str:
  """The source tree's git commit (+ `-dirty` with uncommitted changes), or 'unknown'."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    return head + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _eval_cfg(cfg: Config) -> Config:
  """The cell's config without what differs between seeds and cells but not the
  decoder: one compile serves every seed."""
  return cfg.replace(train={"seed": 0, "workdir": "", "init_from": ""}, data={"seed": 0})


def train_stage(spec: Spec, cell: Cell, stage: mm.Stage, out: str) -> dict:
  """Trains (or resumes) one training run unless it is done; returns its done.json."""
  workdir = stage_dir(out, cell, stage)
  done = os.path.join(workdir, DONE_FILE)
  if os.path.exists(done):
    return _read_json(done)
  cfg = stage_config(spec, cell, stage, out)
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
  if cfg.train.stage == "rl":
    from mtcot_jax.train import rl_loop
    summary = rl_loop.train_rl(cfg, progress=False)
  else:
    from mtcot_jax.train import loop
    summary = loop.train(cfg, progress=False)
  if summary.get("preempted"):   # SIGTERM: the step reached is saved, nothing is done yet
    from mtcot_jax.train.preemption import Preempted
    raise Preempted(f"{workdir} saved at step {summary['step']} of {cfg.train.steps}")
  record = {"stage": stage.name, "steps": summary["step"],
            "train_seconds": summary["train_seconds"], "resumed": resumed,
            "final": summary.get("final", {}), "commit": commit()}
  _write_json(done, record)
  return record


def _link_cell(cfg: Config, cell_dir: str, run_dir: str) -> None:
  """Makes the cell an ordinary workdir: its config, the tokenizer, and links to
  the checkpoints and metrics of the training run it evaluates."""
  from mtcot_jax.train import checkpoint as ckpt
  os.makedirs(cell_dir, exist_ok=True)
  save_config(cfg, os.path.join(cell_dir, ckpt.CONFIG_FILE + ".tmp"))
  os.replace(os.path.join(cell_dir, ckpt.CONFIG_FILE + ".tmp"),
             os.path.join(cell_dir, ckpt.CONFIG_FILE))
  tok = ckpt.tokenizer_file(run_dir)
  shutil.copyfile(tok, os.path.join(cell_dir, os.path.basename(tok)))
  for name in (ckpt.CHECKPOINT_DIR, METRICS_FILE):
    link = os.path.join(cell_dir, name)
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(os.path.relpath(os.path.join(run_dir, name), cell_dir), link)


def _paired_budget(evaluate_at, target: float, answer_tokens: float) -> tuple[int, dict]:
  """The CoT budget whose mean forward passes come closest to `target` (within 1
  when any budget can): a budget-forced k=0 decode costs max_cot + 1 + answer
  passes, so start there and correct by the measured difference."""
  m = max(1, int(round(target - 1 - answer_tokens)))
  tried: dict[int, dict] = {}
  for _ in range(_PAIRED_TRIES):
    tried[m] = evaluate_at(m)
    diff = target - tried[m]["forward_passes"]
    if abs(diff) < 1:
      break
    step = int(round(diff)) or (1 if diff > 0 else -1)
    nxt = max(1, m + step)
    while nxt in tried and nxt != m:   # never evaluate a budget twice
      nxt = max(1, nxt + (1 if diff > 0 else -1))
    if nxt in tried:
      break
    m = nxt
  best = min(tried, key=lambda b: abs(tried[b]["forward_passes"] - target))
  return best, tried[best]


def evaluate_cell(spec: Spec, cell: Cell, out: str, train_records: list[dict]) -> list[dict]:
  """Evaluates a cell on the task's held-out problems; returns its result rows."""
  import jax
  from mtcot_jax.data import builders, make_eval_batches
  from mtcot_jax.train import checkpoint as ckpt
  from mtcot_jax.train.evaluate import evaluate, teacher_forced_metrics

  cfg = cell_config(spec, cell, out)
  cell_dir = os.path.join(out, cell.id)
  _link_cell(cfg, cell_dir, stage_dir(out, cell, cell.method.stages[-1]))
  run = ckpt.load_run(cell_dir)          # exactly what decode.py --checkpoint reads
  ecfg, params, tok = _eval_cfg(run.cfg), run.params, run.tokenizer
  task = builders.task_for(cfg.data)
  n = spec.eval_examples
  seeds = builders.split_seeds(cfg.data, spec.split)[:n]
  if len(seeds) < n:
    raise ValueError(f"{cell.id}: the {spec.split} split has {len(seeds)} problems, fewer "
                     f"than eval_examples={n}")
  if seeds.min() < cfg.data.train_size:          # by construction; checked, not assumed
    raise AssertionError(f"{cell.id}: {spec.split} seeds overlap the training seeds")
  bsz = -(-n // -(-n // 128))                    # <= 128 a batch, equal batches
  batches = {c: make_eval_batches(cfg, tok, n, bsz, cot=c, process_index=0, process_count=1)
             for c in {e.cot for e in cell.method.evals}}
  key = jax.random.key(cell.seed)

  def run_eval(e: mm.Eval, max_cot: int | None = None) -> dict:
    kw = {} if max_cot is None else {"max_cot_tokens": max_cot}
    r = evaluate(ecfg, params, tok, task, batches[e.cot], k=e.k, key=key, **kw)
    r["max_cot_tokens"] = cfg.decode.max_cot_tokens if max_cot is None else max_cot
    return r

  tf = {}
  if cfg.head.k > 0 and cfg.data.cot:   # the head's held-out accuracy, teacher-forced
    examples = [ex for b in make_eval_batches(cfg, tok, n, n, process_index=0,
                                               process_count=1) for ex in b["examples"]]
    tf = teacher_forced_metrics(ecfg, params, tok, examples)
  results: dict[str, dict] = {}
  budgets: dict[str, dict | None] = {}
  for e in sorted(cell.method.evals, key=lambda e: e.budget is not None):
    if e.budget is None:
      results[e.name], budgets[e.name] = run_eval(e), None
      continue
    full = next((results[x.name] for x in cell.method.evals if x.budget is None and x.k == 0
                 and x.cot), None) or run_eval(mm.Eval("k0", 0))
    if e.budget == "paired":
      pair = _read_json(cell_path(out, os.path.join(cell.task.name, cell.method.pair,
                                                    f"seed{cell.seed}"), spec.split))
      target = next(r for r in pair["rows"] if r["primary"])["forward_passes"]
      m, r = _paired_budget(lambda b: run_eval(e, b), target, full["answer_tokens"])
      budgets[e.name] = {"max_cot_tokens": m, "target_passes": target}
    else:
      m = max(1, int(round(float(e.budget) * (full["cot_tokens"] - 1))))  # without </think>
      r = run_eval(e, m)
      budgets[e.name] = {"max_cot_tokens": m, "target_passes": None, "fraction": e.budget}
    results[e.name] = r
  train_seconds = round(sum(t["train_seconds"] for t in train_records), 1)
  common = {"task": cell.task.name, "task_name": cell.task.task,
            "task_args": dict(cell.task.args), "method": cell.method.name, "seed": cell.seed,
            "head_acc": tf.get("head_acc"), "head_accept": tf.get("head_accept"),
            "main_acc": tf.get("main_acc"), "train_seconds": train_seconds,
            "train_runs": [os.path.relpath(stage_dir(out, cell, s), out)
                           for s in cell.method.stages],
            "workdir": cell.id, "config": cfg.to_dict(), "commit": commit(),
            "split": spec.split, "eval_seeds": [int(seeds.min()), int(seeds.max())],
            "train_seeds": [0, cfg.data.train_size - 1]}
  rows = []
  for e in cell.method.evals:
    r = results[e.name]
    rows.append({**common, "eval": e.name, "primary": e.primary, "k": e.k, "cot": e.cot,
                 "budget": budgets[e.name],
                 **{key: r[key] for key in ("accuracy", "forward_passes", "forward_passes_std",
                                            "cot_tokens", "answer_tokens", "tokens_per_pass",
                                            "finished", "examples", "max_cot_tokens")},
                 "accepted_per_pass": r.get("accepted_per_pass"),
                 "verify": cfg.decode.verify})
  return rows


def _jsonify(obj):
  if isinstance(obj, dict):
    return {k: _jsonify(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonify(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    return obj.item()
  return obj


def collect(out: str, spec: Spec | None = None) -> list[dict]:
  """Every finished cell's rows on every split, in the spec's order (`spec`, else
  DIR/spec.yaml's), rewritten to results.jsonl. Rows of an old CELL_FILE get
  `split: test` (what they were evaluated on)."""
  rows = []
  for root, dirs, files in os.walk(out):
    dirs[:] = sorted(d for d in dirs if d not in ("_train", "plots", ".jax_cache")
                     and not os.path.islink(os.path.join(root, d)))  # not the checkpoints
    for split in EVAL_SPLITS:
      path = cell_path(out, os.path.relpath(root, out), split)
      if path is not None:
        rows.extend({"split": split, **r} for r in _read_json(path)["rows"])
  if spec is None and os.path.exists(os.path.join(out, "spec.yaml")):
    spec = load_spec(os.path.join(out, "spec.yaml"))
  if spec is not None:   # the spec's order: tasks, methods, seeds
    t_idx = {t.name: i for i, t in enumerate(spec.tasks)}
    m_idx = {m.name: i for i, m in enumerate(spec.methods)}
    rows.sort(key=lambda r: (t_idx.get(r["task"], 99), m_idx.get(r["method"], 99), r["seed"],
                             EVAL_SPLITS.index(r["split"])))
  tmp = os.path.join(out, RESULTS_FILE + ".tmp")
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, os.path.join(out, RESULTS_FILE))
  return rows


def _setup_jax(out: str) -> None:
  import jax
  if not jax.config.jax_compilation_cache_dir:   # seeds and cells share their compiles
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(spec_path: str, out: str | None = None, *, seeds: int | None = None,
        only: str | None = None, split: str | None = None, progress: bool = True,
        stop_after_cells: int | None = None) -> dict:
  """Runs (or resumes) the spec's cells in `out` (default runs/experiments/<spec name>).

  only: a glob on cell ids (`mult3/*`); a cot-truncated cell also runs its pair.
  split: the held-out split to evaluate on instead of the spec's (`test`: a final table).
  stop_after_cells: leave after this many cells (simulates an interruption; tests).
  Returns counts: cells, skipped, evaluated, trained (training runs).
  """
  from tqdm import tqdm

  spec = load_spec(spec_path, seeds, split)
  if out is None:
    out = os.path.join("runs", "experiments",
                       os.path.splitext(os.path.basename(spec_path))[0])
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  spec_copy = os.path.join(out, "spec.yaml")
  if os.path.abspath(spec_path) != spec_copy:
    _write_spec_copy(spec, spec_copy)
  _setup_jax(out)

  selected = cells(spec, only)
  ids = {c.id for c in selected}
  todo = []
  for c in cells(spec):      # in the full order, so a pair comes before its truncation
    needed = c.id in ids or any(
        o.method.pair == c.method.name and o.task == c.task and o.seed == c.seed
        for o in selected)
    if needed and cell_path(out, c.id, spec.split) is None:
      todo.append(c)
  pending_stages: dict[str, int] = {}
  for c in todo:
    for s in c.method.stages:
      d = stage_dir(out, c, s)
      if not os.path.exists(os.path.join(d, DONE_FILE)):
        pending_stages[d] = stage_config(spec, c, s, out).train.steps
  work = sum(pending_stages.values()) + EVAL_WORK * sum(len(c.method.evals) for c in todo)
  stats = {"cells": len(selected), "skipped": len(selected) - len([c for c in todo
                                                                    if c.id in ids]),
           "evaluated": 0, "trained": 0}
  import jax
  progress = progress and jax.process_index() == 0   # one bar, not one per host
  bar = tqdm(total=work, disable=not progress, unit="step", dynamic_ncols=True,
             desc=f"{len(todo)} cells", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
             "[{elapsed}<{remaining}]")
  for i, c in enumerate(todo):
    t0 = time.perf_counter()
    records = []
    for s in c.method.stages:
      d = stage_dir(out, c, s)
      trained_now = d in pending_stages
      records.append(train_stage(spec, c, s, out))
      if trained_now:
        stats["trained"] += 1
        bar.update(pending_stages.pop(d))
    rows = evaluate_cell(spec, c, out, records)
    _write_json(os.path.join(out, c.id, cell_file(spec.split)),
                {"cell": c.id, "rows": _jsonify(rows), "seconds": time.perf_counter() - t0})
    collect(out, spec)
    stats["evaluated"] += 1
    bar.update(EVAL_WORK * len(c.method.evals))
    primary = next(r for r in rows if r["primary"])
    line = (f"{c.id}: {primary['eval']} {spec.split} accuracy {primary['accuracy']:.3f}, "
            f"{primary['forward_passes']:.1f} passes, {primary['tokens_per_pass']:.2f} "
            f"tokens/pass ({time.perf_counter() - t0:.0f}s)")
    if progress:
      bar.write(line)
    if stop_after_cells is not None and i + 1 >= stop_after_cells:
      break
  bar.close()
  collect(out, spec)
  return stats


def _write_spec_copy(spec: Spec, path: str) -> None:
  """The spec as run, with `base` made absolute so the copy loads from `out`."""
  import yaml
  with open(spec.path) as f:
    raw = yaml.safe_load(f)
  raw["base"] = spec.base
  raw["split"] = spec.split      # as run (the --split flag may have set it)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(f"# copied from {spec.path}\n")
    yaml.safe_dump(raw, f, sort_keys=False)
  os.replace(tmp, path)
