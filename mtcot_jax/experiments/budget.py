"""Accuracy against a pass budget: the regime where the unverified channel and
verified decoding can differ (issue 27).

    python -m mtcot_jax.experiments budget runs/demo --budgets 2 3 4 6 --out runs/budget

For each trained run and each pass budget B (`decode.pass_budget`: the CoT may
spend B main passes after the prefill, then its answer marker is written by
force and the model answers), the run's held-out problems (`data.eval_split`,
validation unless --split test) are decoded greedily (or at --temperature) by:

* `k0`: one token per pass (its CoT holds at most B tokens);
* `verified`: k = head.k, every CoT block checked by the main model (k=0's
  tokens, up to (k+1)B of them);
* `unverified`: k = head.k, the head's tokens are the CoT (fixed blocks, or
  adaptive at --tau), and the answer verified as in `verified` (so that the two
  differ in their CoT only: the answer is k=0's given the CoT, in fewer passes);
* `nocot` once (no CoT: the budget does not apply).

Each row keeps every problem's correctness (and, for tasks with several valid
CoTs, the share of CoTs that are valid derivations), so that methods can be compared
problem by problem: `verdict` gives unverified minus verified accuracy at each
budget with a 95% interval from a paired bootstrap over problems, resampled
within each run (several runs = several seeds). Writes results.jsonl,
budget.md and budget.png under --out.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

MODES = ("k0", "verified", "unverified")


def decode_rows(run, budgets, *, examples: int, tau: float | None, batch: int = 128,
                split: str | None = None, temperature: float = 0.0) -> list[dict]:
  """One row per (mode, budget) and one `nocot` row for a loaded run; greedy, or
  sampled at `temperature` (verified rows: speculative sampling, k=0's distribution)."""
  from mtcot_jax import decode
  from mtcot_jax.data import make_eval_batches
  from mtcot_jax.data.catalog import task_for
  from mtcot_jax.train.evaluate import answer_text
  cfg = run.cfg if split is None else run.cfg.replace(data={"eval_split": split})
  tok, task, k = run.tokenizer, task_for(cfg.data), cfg.head.k
  tau = cfg.decode.head_threshold if tau is None else tau
  params = decode.prepare_params(cfg, run.params)
  settings = {"k0": dict(k=0), "verified": dict(k=k, verify="all"),
              "unverified": dict(k=k, verify="answer", head_threshold=tau)}
  rows = []
  prompts = {cot: make_eval_batches(cfg, tok, examples, batch, cot=cot, process_index=0,
                                    process_count=1) for cot in (True, False)}

  def run_mode(name, budget, cot, **kw):
    batches = prompts[cot]
    correct, passes, cot_len, valid = [], [], [], []
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
      res = jax.tree.map(np.asarray, decode.generate(
          cfg, params, b["prompt_tokens"], b["prompt_lengths"], jax.random.key(i),
          temperature=temperature, eos_id=tok.eos_id, think_end_id=tok.think_end_id,
          pass_budget=budget, **kw))
      for r, ex in enumerate(b["examples"]):
        text = answer_text(tok, res.tokens[r], res.phase[r], res.lengths[r])
        correct.append(bool(task.grade(text, ex)))
        cot_ids = [int(t) for t, p in zip(res.tokens[r, :res.lengths[r]],
                                          res.phase[r, :res.lengths[r]]) if p == 0]
        if cot_ids and cot_ids[-1] == tok.think_end_id:
          cot_ids = cot_ids[:-1]
        if cot:   # tasks with several valid CoTs check the one written (None: not checked)
          valid.append(task.valid_cot(ex.question, tok.decode(cot_ids)))
        passes.append(int(res.forward_passes[r]))
        cot_len.append(int(np.sum(res.phase[r] == 0)))
    rows.append({"mode": name, "budget": budget, "k": kw.get("k", 0), "tau": kw.get(
        "head_threshold", 0.0), "split": cfg.data.eval_split, "examples": len(correct),
        "temperature": temperature,
        "accuracy": float(np.mean(correct)), "forward_passes": float(np.mean(passes)),
        "cot_tokens": float(np.mean(cot_len)), "correct": correct,
        "valid_cot": (None if not valid or valid[0] is None else float(np.mean(valid))),
        "seconds": round(time.perf_counter() - t0, 2)})

  for budget in budgets:
    for name in MODES:
      run_mode(name, budget, True, **settings[name])
  run_mode("nocot", 0, False, k=0)
  return rows


def paired_bootstrap(diffs: list[np.ndarray], n_boot: int = 4000,
                     seed: int = 0) -> tuple[float, float, float]:
  """Mean of per-problem differences and its 95% percentile interval, resampling
  problems with replacement within each group (a run / seed), all groups weighted
  by their problem counts."""
  rng = np.random.default_rng(seed)
  diffs = [np.asarray(d, np.float64) for d in diffs]
  total = sum(len(d) for d in diffs)
  means = np.zeros(n_boot)
  for d in diffs:
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    means += d[idx].sum(axis=1)
  means /= total
  point = float(sum(d.sum() for d in diffs) / total)
  return point, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def verdict(rows: list[dict]) -> list[dict]:
  """Per budget: unverified - verified accuracy (paired over problems and runs),
  with both methods' mean passes."""
  out = []
  for budget in sorted({r["budget"] for r in rows if r["mode"] in MODES}):
    by_run = {}
    for r in rows:
      if r["budget"] == budget and r["mode"] in ("verified", "unverified"):
        by_run.setdefault(r["run"], {})[r["mode"]] = r
    pairs = [v for v in by_run.values() if len(v) == 2]
    if not pairs:
      continue
    diffs = [np.asarray(p["unverified"]["correct"], float) - np.asarray(p["verified"]["correct"],
                                                                         float) for p in pairs]
    mean, lo, hi = paired_bootstrap(diffs)
    out.append({"budget": budget, "runs": len(pairs), "diff": mean, "lo": lo, "hi": hi,
                "passes_unverified": float(np.mean([p["unverified"]["forward_passes"]
                                                    for p in pairs])),
                "passes_verified": float(np.mean([p["verified"]["forward_passes"]
                                                  for p in pairs]))})
  return out


def table(rows: list[dict]) -> str:
  runs = sorted({r["run"] for r in rows})
  lines = ["| run | budget B | mode | accuracy | passes | CoT tokens | valid CoTs |",
           "|---|---|---|---|---|---|---|"]
  for run in runs:
    for r in sorted((r for r in rows if r["run"] == run),
                    key=lambda r: (r["mode"] == "nocot", r["budget"], MODES.index(r["mode"])
                                   if r["mode"] in MODES else 9)):
      b = "-" if r["mode"] == "nocot" else (str(r["budget"]) if r["budget"] else "none")
      v = r.get("valid_cot")
      lines.append(f"| {run} | {b} | {r['mode']} | {r['accuracy']:.3f} | "
                   f"{r['forward_passes']:.2f} | {r['cot_tokens']:.1f} | "
                   f"{'-' if v is None else f'{v:.3f}'} |")
  lines += ["", "| budget B | runs | unverified - verified accuracy [95% paired bootstrap] | "
            "passes unverified / verified |", "|---|---|---|---|"]
  for v in verdict(rows):
    lines.append(f"| {v['budget'] or 'none'} | {v['runs']} | {v['diff']:+.3f} "
                 f"[{v['lo']:+.3f}, {v['hi']:+.3f}] | {v['passes_unverified']:.2f} / "
                 f"{v['passes_verified']:.2f} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
  """Accuracy against mean passes, one panel per run: a line per mode through
  its budgets in increasing order (no budget last), nocot as a point."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = sorted({r["run"] for r in rows})
  fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
  style = {"k0": ("tab:blue", "o"), "verified": ("tab:green", "s"),
           "unverified": ("tab:red", "^"), "nocot": ("black", "x")}
  for ax, run in zip(axes[0], runs):
    for mode, (color, marker) in style.items():
      pts = sorted(((r["forward_passes"], r["accuracy"], r["budget"]) for r in rows
                    if r["run"] == run and r["mode"] == mode),
                   key=lambda p: (p[2] == 0, p[2]))   # joined in budget order, none last
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                label=mode, linestyle="-" if len(pts) > 1 else "none")
        for x, y, b in pts:
          if mode != "nocot":
            ax.annotate(f"B={b or '∞'}", (x, y), fontsize=7, xytext=(3, -9),
                        textcoords="offset points", color=color)
    ax.set_title(run, fontsize=9)
    ax.set_xlabel("main forward passes per problem (mean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  t = rows[0].get("temperature", 0.0) if rows else 0.0
  fig.suptitle("Accuracy against a CoT pass budget B " + (f"(temperature {t})" if t else
                                                          "(greedy)"), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(run_dirs, budgets, *, examples: int, tau, out: str, split: str | None,
         temperature: float = 0.0) -> str:
  from mtcot_jax.train.checkpoint import load_run
  for b in budgets:
    if b < 0:
      raise ValueError(f"--budgets {b}: accepted: ints >= 0 (0: no budget)")
  os.makedirs(out, exist_ok=True)
  rows = []
  for d in run_dirs:
    run = load_run(d)
    for r in decode_rows(run, budgets, examples=examples, tau=tau, split=split,
                         temperature=temperature):
      rows.append({"run": d, **r})
      print(f"{d} {r['mode']:10s} B={r['budget']:3d} acc {r['accuracy']:.3f} "
            f"passes {r['forward_passes']:.2f}", flush=True)
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  text = table(rows)
  with open(os.path.join(out, "budget.md"), "w") as f:
    f.write(text)
  plot(rows, os.path.join(out, "budget.png"))
  return text
