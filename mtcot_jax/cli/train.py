"""The `train.py` command line.

Until the training loop lands this builds the configured model, runs one
teacher-forced forward pass and prints the parameter counts and shapes.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import mtcot_jax as mt

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--config", default=os.path.normpath(DEFAULT_CONFIG),
                 help="a preset YAML (default: configs/demo.yaml)")
  p.add_argument("overrides", nargs="*", help="section.key=value, e.g. head.k=3")
  return p.parse_args(argv)


def describe(cfg: mt.Config, params) -> str:
  lines = []
  for part in ("main", "head"):
    leaves = jax.tree_util.tree_leaves_with_path(params[part])
    total = sum(int(np.prod(x.shape)) for _, x in leaves)
    lines.append(f"{part}: {total:,} parameters")
    for path, x in leaves:
      lines.append(f"  {jax.tree_util.keystr(path):48s} {str(tuple(x.shape)):16s} {x.dtype}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  cfg = mt.load_config(args.config, args.overrides)
  mesh = mt.make_mesh(cfg)
  params = mt.init_params(cfg, jax.random.key(cfg.train.seed), mesh=mesh)
  print(describe(cfg, params))
  tokens = np.random.default_rng(0).integers(
      0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len))
  t0 = time.perf_counter()
  out = mt.forward(cfg, params, tokens, mesh=mesh)
  jax.block_until_ready(out.logits)
  print(f"forward on {tokens.shape}: logits {out.logits.shape}, residual {out.residual.shape}, "
        f"head features {None if out.head_features is None else out.head_features.shape} "
        f"({time.perf_counter() - t0:.1f}s with compile) on mesh {dict(mesh.shape)}")
