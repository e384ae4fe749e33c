"""train.vocab_chunks: the compiled SFT step's memory (XLA's memory_analysis) and
step time with the cross-entropy whole and in vocabulary chunks, side by side.

    .venv/bin/python benchmarks/vocab_chunks.py [--chunks 1 8 32] [--repeats 3]

A Qwen2-sized vocabulary (151936) on a model cut small everywhere else (d_model
64, 2 layers, a head of k=2), B x T = 4 x 128 rows: the (B, T, V) float32
logits are 311 MB, the largest thing in the step, while the step still compiles
and runs on a laptop CPU. Times are medians of steps run in turn (one step of
each setting per round), wall and process CPU seconds, each as a ratio to the
first setting's; on cores shared with other processes the CPU ratio is the
steadier one.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
from common import cpu_info  # noqa: E402
from train import synthetic_batch  # noqa: E402

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.train import losses, optim  # noqa: E402
from mtcot_jax.train.step import create_state  # noqa: E402

QWEN2_SMALL = ["model.vocab_size=151936", "model.d_model=64", "model.num_layers=2",
               "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=128",
               "head.k=2", "head.width=32", "head.num_heads=2", "head.mlp_dim=64"]
MB = 1e6


def compiled_step(cfg, B, T):
  """The SFT step compiled for one device, its state and a synthetic batch."""
  opt = optim.make_optimizer(cfg)
  state = create_state(cfg, opt, None)
  batch = jax.tree.map(jax.numpy.asarray, synthetic_batch(cfg, B, T))
  t0 = time.perf_counter()
  step = losses.make_sft_step(cfg, None, opt).lower(state, batch).compile()
  return step, state, batch, time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 32])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  B, T = a.batch, a.seq_len
  print(cpu_info(), f"; load average {os.getloadavg()[0]:.1f}")
  runs = {}
  for n in a.chunks:
    cfg = mt.load_config(None, QWEN2_SMALL + [f"train.vocab_chunks={n}",
                                              f"train.batch_size={B}", f"data.seq_len={T}"])
    runs[n] = [*compiled_step(cfg, B, T), [], []]
  V = cfg.model.vocab_size
  print(f"V={V}, D={cfg.model.d_model}, L={cfg.model.num_layers}, head k={cfg.head.k}, "
        f"B x T = {B} x {T}: (B, T, V) float32 logits {B * T * V * 4 / MB:.0f} MB")

  for r in range(a.repeats + 1):       # round 0 warms up
    loss = {}
    for n, run in runs.items():
      step, state, batch = run[:3]
      t0, c0 = time.perf_counter(), time.process_time()
      run[1], m = step(state, batch)   # the step donates its state
      jax.block_until_ready(m["loss"])
      if r:
        run[4].append(time.perf_counter() - t0)
        run[5].append(time.process_time() - c0)
      loss[n] = float(m["loss"])
    print(f"round {r} loss: " + ", ".join(f"{n} chunks {v:.6f}" for n, v in loss.items())
          + (" (warm-up)" if r == 0 else ""))

  base_wall = statistics.median(runs[a.chunks[0]][4])
  base_cpu = statistics.median(runs[a.chunks[0]][5])
  print(f"{'vocab_chunks':>12} {'temp MB':>9} {'argument MB':>11} {'output MB':>9} "
        f"{'compile s':>9} {'step s':>7} {'wall ratio':>10} {'cpu ratio':>9}")
  for n, (step, _, _, compile_s, walls, cpus) in runs.items():
    mem = step.memory_analysis()
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"{n:12d} {mem.temp_size_in_bytes / MB:9.1f} {mem.argument_size_in_bytes / MB:11.1f} "
          f"{mem.output_size_in_bytes / MB:9.1f} {compile_s:9.1f} {wall:7.2f} "
          f"{wall / base_wall:10.2f} {cpu / base_cpu:9.2f}")


if __name__ == "__main__":
  main()
