"""Verified decoding on a trained run: passes and wall-clock tokens/s against k=0.

    make demo                                        # trains runs/demo (~5 min) if absent
    .venv/bin/python benchmarks/verify.py            # runs/demo, batch 1 and 8 (~1-2 min)
    .venv/bin/python benchmarks/verify.py --run runs/channel/perm4/ctx-k5/seed0 --examples 64

For each batch size, the same held-out problems (the run's data.eval_split) are
decoded greedily by every mode below, interleaved round by round (the machine is
noisy), each call warm (compiled beforehand) and ended by `block_until_ready`;
the time of a mode is the median over rounds of the sum over its batches. Rows:

* `k=0`: one token per main pass (the reference: every other row's tokens per
  second and passes are divided by this row's, measured in the same rounds);
* `k=K none`: the unverified multi-token CoT (the run's decode.head_threshold);
* `k=K answer`: the unverified CoT, then a verified answer;
* `k=K all`: everything verified: k=0's tokens exactly (checked here), in fewer passes.

Columns: accuracy, mean passes per problem, tokens per pass, drafts kept per
pass, wall-clock tokens/s and its ratio to k=0's. A verified iteration runs the
head's k-step chain and one main pass over k+1 tokens, so on a compute-bound
CPU its wall-clock gain is smaller than its pass reduction; at the memory-bound
batch sizes of accelerators a pass over k+1 tokens costs about one over 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_info  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.data import make_eval_batches  # noqa: E402
from mtcot_jax.data.catalog import task_for  # noqa: E402
from mtcot_jax.train.evaluate import answer_text  # noqa: E402


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run", default="runs/demo", help="a trained workdir (default: runs/demo)")
  p.add_argument("--examples", type=int, default=32, help="held-out problems (default 32)")
  p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
  p.add_argument("--k", type=int, default=None, help="head tokens per block (default head.k)")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds (median; default 3)")
  return p.parse_args(argv)


def _decode(cfg, params, tok, batches, k, verify):
  outs = []
  for i, b in enumerate(batches):
    res = mt.generate(cfg, params, b["prompt_tokens"], b["prompt_lengths"], jax.random.key(i),
                      k=k, verify=verify, temperature=0.0, eos_id=tok.eos_id,
                      think_end_id=tok.think_end_id)
    outs.append(res)
  jax.block_until_ready(outs)
  return [jax.tree.map(np.asarray, r) for r in outs]


def main(argv=None) -> None:
  a = _parse(argv)
  if not os.path.exists(os.path.join(a.run, "config.yaml")):
    sys.exit(f"--run {a.run!r} is not a trained workdir (no config.yaml); accepted: a "
             "train.workdir such as runs/demo (make demo trains it)")
  run = mt.load_run(a.run)
  cfg, params, tok = run.cfg, run.params, run.tokenizer
  task = task_for(cfg.data)
  k = cfg.head.k if a.k is None else a.k
  modes = [("k=0", 0, "none"), (f"k={k} none", k, "none"), (f"k={k} answer", k, "answer"),
           (f"k={k} all", k, "all")]
  print(f"run {a.run}: task {cfg.data.task}, head.context={cfg.head.context}, "
        f"decode.head_threshold={cfg.decode.head_threshold}; {a.examples} held-out problems, "
        f"greedy; {cpu_info()}")
  for B in a.batch:
    batches = make_eval_batches(cfg, tok, a.examples, B)
    results, times = {}, {m[0]: [] for m in modes}
    for name, kk, verify in modes:                   # compile (and check) once
      results[name] = _decode(cfg, params, tok, batches, kk, verify)
    for _ in range(a.rounds):
      for name, kk, verify in modes:
        t0 = time.perf_counter()
        _decode(cfg, params, tok, batches, kk, verify)
        times[name].append(time.perf_counter() - t0)
    ref = results["k=0"]
    for r, r0 in zip(results[f"k={k} all"], ref):
      n = r0.tokens.shape[1]
      assert np.array_equal(r.tokens[:, :n], r0.tokens), "verify=all must write k=0's tokens"
    print(f"\nbatch {B} ({len(batches)} calls, median of {a.rounds} rounds)")
    print(f"{'mode':<14}{'accuracy':>9}{'passes':>8}{'÷ k=0':>7}{'tok/pass':>9}"
          f"{'kept/pass':>10}{'tok/s':>9}{'× k=0':>7}")
    base_tps = base_passes = None
    for name, _, _ in modes:
      rs = results[name]
      correct = [task.grade(answer_text(tok, r.tokens[i], r.phase[i], r.lengths[i]), ex)
                 for r, b in zip(rs, batches) for i, ex in enumerate(b["examples"])]
      tokens = sum(int(r.lengths.sum()) for r in rs)
      passes = sum(int(r.forward_passes.sum()) for r in rs)
      kept = sum(int(r.accepted.sum()) for r in rs)
      tps = tokens / statistics.median(times[name])
      if base_tps is None:
        base_tps, base_passes = tps, passes
      print(f"{name:<14}{np.mean(correct):>9.3f}{passes / len(correct):>8.2f}"
            f"{passes / base_passes:>7.2f}{tokens / passes:>9.2f}{kept / passes:>10.2f}"
            f"{tps:>9.0f}{tps / base_tps:>7.2f}")


if __name__ == "__main__":
  main()
