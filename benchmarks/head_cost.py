"""The head's share of an SFT step, for each head design, measured side by side.

    .venv/bin/python benchmarks/head_cost.py [--repeats 5] [--rounds 3]

Times the real SFT step (forward, backward, AdamW) of configs/small.yaml on a
synthetic batch with no head (head.k=0) and with each head below, interleaved
over several rounds (the machine is noisy), and prints each head's share of its
step: (step - step without a head) / step. DESIGN.md's target: <= 0.25 at k=5.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
from common import cpu_info, time_fn  # noqa: E402
import importlib.util  # noqa: E402

# benchmarks/train.py (not the top-level train.py, which shadows it on sys.path)
_spec = importlib.util.spec_from_file_location(
    "bench_train", os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"))
_bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_train)
synthetic_batch = _bench_train.synthetic_batch

import mtcot_jax as mt  # noqa: E402
from mtcot_jax.train import losses, optim  # noqa: E402
from mtcot_jax.train.step import create_state  # noqa: E402

SMALL = "configs/small.yaml"   # the experiments' base: the projection head, 1 x 64
HEADS = {
    "no head (k=0)": ["head.k=0"],
    "projection 1x64": [],
    "context -1, 2x64 (demo)": ["head.context=-1", "head.num_layers=2",
                                "head.train_positions=26"],
    "context -1, 2x64, P=40": ["head.context=-1", "head.num_layers=2"],
    "context -1, 2x128 (paper)": ["head.context=-1", "head.num_layers=2", "head.width=128",
                                  "head.num_heads=4"],
    "context 16, 2x128": ["head.context=16", "head.num_layers=2", "head.width=128",
                          "head.num_heads=4"],
}


def stepper(cfg, B, T):
  opt = optim.make_optimizer(cfg)
  holder = {"state": create_state(cfg, opt, None)}
  step = losses.make_sft_step(cfg, None, opt)
  batch = jax.tree.map(jax.numpy.asarray, synthetic_batch(cfg, B, T))

  def run():
    holder["state"], m = step(holder["state"], batch)
    return m["loss"]
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  print(cpu_info(), f"; load average {os.getloadavg()[0]:.1f}")
  B, T = 32, 64
  runs = {name: stepper(mt.load_config(SMALL, o), B, T) for name, o in HEADS.items()}
  times = {name: [] for name in runs}
  for _ in range(a.rounds):
    for name, run in runs.items():
      times[name].append(time_fn(run, warmup=2, repeats=a.repeats)["median"])
  base = statistics.median(times["no head (k=0)"])
  print(f"small.yaml SFT step, batch {B}x{T}, k=5, chains at head.train_positions=40 "
        "unless said")
  print(f"{'head':26s} {'step ms':>8s} {'head share':>10s}")
  for name, ts in times.items():
    t = statistics.median(ts)
    print(f"{name:26s} {1e3 * t:8.1f} {(t - base) / t:10.3f}")


if __name__ == "__main__":
  main()
