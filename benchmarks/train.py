"""Train-step throughput: the real SFT step (forward, backward, AdamW update) on
synthetic batches, its achieved FLOP/s, and that rate divided by a float32
matmul's measured in the same run.

    .venv/bin/python benchmarks/train.py [--quick] [--repeats 3]

FLOPs: 3x the forward matmul FLOPs of `forward.flop_count` (backward = 2x), with
the head's term scaled by head.train_positions / T when the head runs at a
subset of positions; the optimizer's elementwise update is not counted.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import cpu_info, matmul_flops, time_fn  # noqa: E402
from forward import DEMO, M50, flop_count  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.train import losses, optim  # noqa: E402
from mtcot_jax.train.step import create_state  # noqa: E402


def synthetic_batch(cfg, B, T, seed=0):
  """Rows of a 10-token prompt, a CoT over ~60% of the row and a short answer."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(6, cfg.model.vocab_size, (B, T)).astype(np.int32)
  cot = np.zeros((B, T), np.float32)
  cot[:, 10:10 + int(0.6 * T)] = 1
  ans = np.zeros((B, T), np.float32)
  ans[:, 10 + int(0.6 * T):T - 1] = 1
  return {"inputs": inputs, "targets": np.roll(inputs, -1, 1),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          "segment_ids": np.ones((B, T), np.int32), "cot_mask": cot, "answer_mask": ans}


def bench(name, cfg, B, T, repeats, mm):
  opt = optim.make_optimizer(cfg)
  state = create_state(cfg, opt, None)
  step = losses.make_sft_step(cfg, None, opt)
  batch = jax.tree.map(jax.numpy.asarray, synthetic_batch(cfg, B, T))
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], batch)
    return m["loss"]

  t = time_fn(run, warmup=2, repeats=repeats)["median"]
  f = flop_count(cfg, B, T, with_head=cfg.head.k > 0)
  P = cfg.head.train_positions
  head = f["head"] * (min(P, T) / T if P else 1.0)
  flops = 3 * (f["forward"] - f["head"] + head)
  rate = flops / t
  n_params = sum(x.size for x in jax.tree.leaves(holder["state"].params))
  print(f"{name:22s} {n_params / 1e6:7.2f}M {B:>3}x{T:<4} {B * T / t:9.0f} {1e3 * t:9.1f} "
        f"{rate / 1e9:8.1f} {mm / 1e9:8.1f} {rate / mm:6.3f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
  a = p.parse_args()
  print(cpu_info(), f"; load average {os.getloadavg()[0]:.1f}")
  demo = mt.load_config(DEMO)
  big = mt.load_config(None, M50 + ["head.width=128", "head.num_heads=2",
                                    "head.train_positions=160"])
  runs = [("demo (its preset)", demo, 32, demo.data.seq_len),
          ("50M, head W=128", big, 8, 256)]
  n = 2048
  if a.quick:
    runs = [("demo (its preset)", demo, 4, 64)]
    n = 512
  mm = matmul_flops(n)
  print(f"float32 matmul {n}^3: {mm / 1e9:.1f} GFLOP/s")
  print(f"{'config':22s} {'params':>8s} {'BxT':>8s} {'tok/s':>9s} {'step ms':>9s} "
        f"{'GFLOP/s':>8s} {'mm GF/s':>8s} {'ratio':>6s}")
  for name, cfg, B, T in runs:
    bench(name, cfg, B, T, a.repeats, mm)
  print(f"float32 matmul at the end: {matmul_flops(n) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
