"""Memory per device for a preset, from shapes and shardings alone (no devices).

    python -m mtcot_jax.tools.memory --config configs/tpu_v5e_256.yaml
    python -m mtcot_jax.tools.memory --config configs/gpu_8xh100.yaml --devices 16

Parameters, AdamW moments and gradients are exact: each parameter's shard shape on
an `AbstractMesh` of the preset's device count, by the config's rules (what
`param_shardings` gives on real devices). Activations are an analytic estimate of
what the train step keeps alive for the backward pass (per micro-batch), by
`model.remat`; XLA's real peak also holds transients (the optimizer update, fusion
buffers), so plan with headroom and check on the hardware with
`jax.jit(step).lower(state, batch).compile().memory_analysis()` (`step_memory`
does that for one device, from shapes alone).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from mtcot_jax import sharding as shd
from mtcot_jax.config import Config, ConfigError, load_config
from mtcot_jax.model import api
from mtcot_jax.model.head import head_dims
from mtcot_jax.train import losses, optim
from mtcot_jax.train.step import create_state

GIB = 1024 ** 3


def abstract_mesh(cfg: Config, num_devices: int) -> AbstractMesh:
  return AbstractMesh(shd.mesh_shape(cfg.mesh, num_devices), shd.AXES)


def param_bytes_per_device(cfg: Config, mesh: AbstractMesh) -> int:
  """Bytes of one device's parameter shards (the largest shard of each parameter).

  Raises ConfigError if a parameter dimension does not split over its mesh axes."""
  shapes = api.param_shapes(cfg)
  specs = api.param_specs(cfg)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  total = 0
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, leaf), names in zip(jax.tree_util.tree_leaves_with_path(shapes), flat_specs):
    spec = shd.logical_spec(tuple(names), cfg.mesh.rules)
    for dim, axes in zip(leaf.shape, spec):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      if dim % math.prod(sizes[a] for a in axes):
        raise ConfigError(f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} does "
                          f"not split over mesh axes {axes} of {sizes}")
    shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _split(cfg: Config, shape: dict[str, int], logical: str) -> int:
  axes = dict(cfg.mesh.rules).get(logical)
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  return math.prod(shape[a] for a in axes)


def activation_bytes_per_device(cfg: Config, mesh: AbstractMesh) -> dict[str, int]:
  """Estimated activation bytes per device for one micro-batch of the train step.

  saved:   what the layers keep for the backward pass, all L layers:
           remat full  -> each block's input (B T D);
           remat dots  -> the input and every projection (q k v, attention out,
                          gate up down): dots without batch dimensions;
           remat none  -> everything, incl. the (B H T T) attention probabilities.
  layer:   one block's full activations and their cotangents while it is
           recomputed and differentiated (x2 of the 'none' amount of one layer).
  logits:  (B T V) float32 logits, log-softmax and its gradient (x3); with
           train.vocab_chunks = n, one chunk's (B T V/n).
  head:    the head's chains at P source positions (head.train_positions, 0 = T):
           its layers' activations (not rematerialised) and one depth's
           (B P V) float32 logits, log-softmax and gradient at a time (x3),
           (B P V/n) with n vocabulary chunks.
  """
  m, h = cfg.model, cfg.head
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
  a = np.dtype(m.dtype).itemsize
  B = cfg.train.batch_size // cfg.train.grad_accum // _split(cfg, shape, "batch")
  T = cfg.data.seq_len
  D, L, Dh = m.d_model, m.num_layers, m.dh
  Hl = m.num_heads // _split(cfg, shape, "act_heads")
  Kl = max(m.num_kv_heads // _split(cfg, shape, "act_kv_heads"), 1)
  Fl = m.mlp_dim // _split(cfg, shape, "act_mlp")
  Vl = -(-(m.vocab_size // _split(cfg, shape, "act_vocab")) // cfg.train.vocab_chunks)

  def full_layer(rows, t, width, heads, kv, mlp, dh):
    # x, 2 norms, residual sum, attention out, o-proj out; q k v; gate up silu h;
    # attention logits (f32) and probabilities (compute dtype).
    return (rows * t * (6 * width + (heads + 2 * kv) * dh + 4 * mlp) * a
            + rows * heads * t * t * (4 + a))

  per_layer_none = full_layer(B, T, D, Hl, Kl, Fl, Dh)
  if m.remat == "full":
    saved = L * B * T * D * a
  elif m.remat == "dots":
    saved = L * B * T * (3 * D + (Hl + 2 * Kl) * Dh + 2 * Fl) * a
  else:
    saved = L * per_layer_none
  out = {"saved": saved, "layer": 2 * per_layer_none, "logits": 3 * B * T * Vl * 4, "head": 0}
  if h.k > 0:
    hd = head_dims(m, h)
    P = h.train_positions or T
    P = min(P, T)
    N = B * P                    # chains; the head's blocks are not tensor-sharded
    head_layers = h.num_layers * full_layer(N, h.k, hd.d_model, hd.num_heads, hd.num_kv_heads,
                                            hd.mlp_dim, hd.head_dim)
    inputs = N * h.k * (hd.d_model + 2 * D) * a   # w_p input, token embeddings, features
    out["head"] = head_layers + inputs + 3 * N * Vl * 4
  return out


def step_memory(cfg: Config) -> dict[str, int]:
  """XLA's memory analysis of the compiled SFT step on one device (no mesh), a
  batch of train.batch_size rows of data.seq_len tokens, from shapes alone
  (nothing is allocated or run): bytes of temporaries ("temp": activations,
  logits, gradients' scratch), arguments, outputs and aliased (donated) outputs."""
  optimizer = optim.make_optimizer(cfg)
  state = jax.eval_shape(lambda: create_state(cfg, optimizer, None))
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k.endswith("_mask") else np.int32)
           for k in ("inputs", "targets", "positions", "segment_ids", "cot_mask", "answer_mask")}
  step = losses.make_sft_step(cfg, None, optimizer)
  m = step.lower(state, batch).compile().memory_analysis()
  return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes,
          "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}


def report(cfg: Config, num_devices: int) -> dict[str, Any]:
  """Per-device bytes of each component and the total, for `num_devices` devices."""
  mesh = abstract_mesh(cfg, num_devices)
  batch_split = shd.batch_shards(cfg, mesh.axis_sizes)
  if cfg.train.batch_size % (batch_split * cfg.train.grad_accum):
    raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split into "
                      f"{cfg.train.grad_accum} micro-batches over {batch_split} batch shards")
  shapes = api.param_shapes(cfg)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  n_main = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["main"]))
  params = param_bytes_per_device(cfg, mesh)
  acts = activation_bytes_per_device(cfg, mesh)
  grads = params * (2 if cfg.train.grad_accum > 1 else 1)  # + the accumulator
  rows = {"params": params, "adamw_moments": 2 * params, "grads": grads, **{
      f"act_{k}": v for k, v in acts.items()}}
  rows["total"] = sum(rows.values())
  return {"mesh": dict(zip(shd.AXES, mesh.axis_sizes)), "devices": num_devices,
          "num_params": n_params, "num_params_main": n_main,
          "rows_per_device": cfg.train.batch_size // cfg.train.grad_accum // batch_split,
          "bytes": rows}


def format_report(cfg: Config, r: dict[str, Any]) -> str:
  m = cfg.model
  lines = [
      f"{r['num_params'] / 1e9:.3f}B parameters ({r['num_params_main'] / 1e9:.3f}B main model), "
      f"param_dtype {m.param_dtype}, compute {m.dtype}, scan_layers {m.scan_layers}, "
      f"remat {m.remat}",
      f"{r['devices']} devices, mesh {r['mesh']}, {r['rows_per_device']} sequences of "
      f"{cfg.data.seq_len} tokens per device per micro-batch (grad_accum "
      f"{cfg.train.grad_accum})",
      f"{'component':16s} {'GiB/device':>11s}"]
  for name, value in r["bytes"].items():
    lines.append(f"{name:16s} {value / GIB:11.3f}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="a preset YAML")
  p.add_argument("--devices", type=int, default=0,
                 help="device count (default: the product of the mesh axes, -1 counted as 1)")
  p.add_argument("overrides", nargs="*", help="section.key=value")
  args = p.parse_args(argv)
  cfg = load_config(args.config, args.overrides)
  devices = args.devices or math.prod(a for a in cfg.mesh.shape if a != -1)
  print(format_report(cfg, report(cfg, devices)))


if __name__ == "__main__":
  main()
