"""The `train.py` command line: `python train.py [--config X.yaml] [section.key=value ...]`.

Trains (or resumes) the run in train.workdir, logging to metrics.jsonl and
TensorBoard (WORKDIR/tensorboard), then prints a summary table and the
evaluation accuracies, writes the run's plots to WORKDIR/plots and prints a
sample chain of thought with the head's tokens marked. On a TPU pod slice or a
GPU cluster run the same command on every host (see docs/scaling.md and
`mtcot_jax.distributed`).

Exit status: 0 when the run finished, 2 for input the user can fix, 75 when
SIGTERM (a preemption) stopped it after saving the step it had reached: run the
same command again to resume (`mtcot_jax.train.preemption`).
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import logging as absl_logging
import jax

from mtcot_jax.config import load_config
from mtcot_jax.errors import user_errors

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="a preset YAML (default: configs/demo.yaml)")
  p.add_argument("overrides", nargs="*", help="section.key=value, e.g. head.k=3 train.steps=10")
  return p.parse_args(argv)


def write_plots(cfg) -> None:
  """The run's curves as PNGs in WORKDIR/plots (process 0)."""
  if jax.process_index() != 0:
    return
  from mtcot_jax.tools import plot
  from mtcot_jax.train.loop import TENSORBOARD_DIR
  out = os.path.join(cfg.train.workdir, "plots")
  paths = plot.plot_runs([cfg.train.workdir], out)
  print(f"\nplots ({len(paths)} PNGs) in {out}; TensorBoard: "
        f"tensorboard --logdir {os.path.join(cfg.train.workdir, TENSORBOARD_DIR)}")


def _exit_if_preempted(summary) -> None:
  """SIGTERM saved the step reached (the loop printed where): exit with
  preemption.EXIT_CODE (75), not 0, so that a supervisor restarts the command."""
  if summary.get("preempted"):
    from mtcot_jax.train import preemption
    sys.exit(preemption.EXIT_CODE)


@user_errors
def main(argv=None):
  args = parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)   # tfds/orbax info lines drown the output
  cfg = load_config(args.config, args.overrides)
  # Multi-host: every process runs this command; the runtime must start before
  # anything below touches a device.
  from mtcot_jax import distributed
  if distributed.initialize(cfg.mesh):
    print(distributed.describe(), flush=True)
  if cfg.train.stage == "rl":
    from mtcot_jax.train import rl_loop
    summary = rl_loop.train_rl(cfg)
    _exit_if_preempted(summary)
    print(rl_loop.summary_table(cfg, summary))
    write_plots(cfg)
    return
  from mtcot_jax.train import loop
  summary = loop.train(cfg)
  _exit_if_preempted(summary)
  cfg = summary.get("cfg", cfg)   # train.init_from_hf: the checkpoint's model section
  print(loop.summary_table(cfg, summary))
  write_plots(cfg)
  if jax.process_count() > 1:   # the sample below decodes host-local arrays
    return
  k = cfg.decode.k if cfg.decode.k >= 0 else cfg.head.k
  print(f"\nA sample chain of thought (k={k}); the line under it says which module wrote "
        "each token (0 main model, j head depth j):")
  print(loop.sample_generation(cfg, summary["params"], summary["tokenizer"], k))
  print(f"\ndecode it yourself: python decode.py --checkpoint {cfg.train.workdir} "
        f"--prompt '...' --k {k}")
