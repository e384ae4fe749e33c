"""A run's workdir: config.yaml, the tokenizer, orbax checkpoints, metrics.jsonl.

Checkpoints hold three items: `params`, `train` (optimizer state, step, PRNG key)
and `data` (the input iterator's state, JSON). Orbax writes each step into a
temporary directory and renames it when complete, so a half-written checkpoint
is never listed, hence never restored. `load_run` restores `params` alone.
Restores take their target shardings from the caller (`state`'s, or the rules' on
a mesh), so a checkpoint saved on one mesh or device count restores onto any other.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mtcot_jax.config import Config, ConfigError, load_config, save_config
from mtcot_jax.model import api

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, cfg: Config | None = None, read_only: bool = False
            ) -> ocp.CheckpointManager:
  keep = cfg.train.keep_checkpoints if cfg is not None else None
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=options, item_names=("params", "train", "data"))


def save(mngr: ocp.CheckpointManager, state, data_state: dict[str, Any] | None) -> None:
  """Starts an asynchronous save of `state` (a TrainState) at its step."""
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step,
                                   "key": state.key}),
      data=ocp.args.JsonSave(data_state or {})))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(mngr: ocp.CheckpointManager, state):
  """Restores the latest complete checkpoint onto `state`'s shapes and shardings.

  Returns (state, data_state) or None when the workdir has no checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  train_like = {"opt_state": state.opt_state, "step": state.step, "key": state.key}
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      train=ocp.args.StandardRestore(_abstract(train_like)),
      data=ocp.args.JsonRestore()))
  t = out["train"]
  state = state.replace(params=out["params"], opt_state=t["opt_state"], step=t["step"],
                        key=t["key"])
  return state, dict(out["data"] or {})


def write_run_files(workdir: str, cfg: Config, tokenizer_path: str) -> None:
  """config.yaml and the tokenizer, next to the checkpoints (kept if present)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = load_config(path)
    if _model_part(saved) != _model_part(cfg):
      raise ConfigError(
          f"{workdir} holds a run whose model/head config differs from this one; accepted: "
          "the same model and head config to resume, or a new train.workdir")
  tmp = path + ".tmp"
  save_config(cfg, tmp)
  os.replace(tmp, path)   # atomic: a crash never leaves a half-written config
  tok = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.exists(tok):
    shutil.copyfile(tokenizer_path, tok + ".tmp")
    os.replace(tok + ".tmp", tok)


def _model_part(cfg: Config):
  # Rematerialisation changes memory, not parameters: a run may resume with another.
  return (dataclasses.replace(cfg.model, remat="none"), cfg.head)


@dataclasses.dataclass
class Run:
  """A finished (or running) run, loaded for decoding."""
  cfg: Config
  params: Any
  tokenizer: Any
  step: int
  workdir: str


def abstract_params(cfg: Config, mesh: Mesh | None = None):
  """ShapeDtypeStructs of the parameters carrying their target shardings: the
  rules' on `mesh`, or the first local device without one."""
  shapes = api.param_shapes(cfg)
  if mesh is not None:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, api.param_shardings(cfg, mesh))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def restore_params(workdir: str, cfg: Config, mesh: Mesh | None = None,
                   step: int | None = None):
  """The parameters of the latest (or `step`'s) checkpoint, laid out for `mesh`
  (any shape or device count: orbax reads each device's slice of the saved arrays),
  or on one device without a mesh. Returns (params, step)."""
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir} has no complete checkpoint under {CHECKPOINT_DIR}/")
  params = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params(cfg, mesh))))["params"]
  mngr.close()
  return params, step


def load_run(workdir: str, mesh: Mesh | None = None, step: int | None = None) -> Run:
  """Loads config.yaml, the tokenizer and the latest (or `step`'s) parameters."""
  from mtcot_jax.data import load_tokenizer  # the data layer imports tfds: only here

  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a run directory: no {CONFIG_FILE} in it")
  cfg = load_config(path)
  params, step = restore_params(workdir, cfg, mesh, step)
  tok = load_tokenizer(os.path.join(workdir, TOKENIZER_FILE))
  return Run(cfg=cfg, params=params, tokenizer=tok, step=step, workdir=workdir)
