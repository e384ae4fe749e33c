"""A run's workdir: config.yaml, the tokenizer, orbax checkpoints, metrics.jsonl.

Checkpoints hold three items: `params`, `train` (optimizer state, step, PRNG key)
and `data` (the input iterator's state, JSON). Orbax writes each step into a
temporary directory and renames it when complete, so a half-written checkpoint
is never listed, hence never restored. `load_run` restores `params` alone.
Restores take their target shardings from the caller (`state`'s, or the rules' on
a mesh), so a checkpoint saved on one mesh or device count restores onto any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mtcot_jax.config import Config, load_config, save_config
from mtcot_jax.data.tokenizer import load_tokenizer
from mtcot_jax.errors import ConfigError, RunLockedError  # noqa: F401  (re-exported)
from mtcot_jax.model import api

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"         # a sentencepiece model (the tokenizer trained here)
HF_TOKENIZER_FILE = "tokenizer.json"       # a Hugging Face checkpoint's (data/hf_tokenizer.py)
TOKENIZER_SHA_FILE = "tokenizer.sha256"
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


def _restore_readable(mngr: ocp.CheckpointManager, args, step: int | None = None):
  """Restores `step`, or else the latest checkpoint that can be read: one whose
  files were truncated or deleted after orbax committed it (orbax never lists a
  half-written one) is skipped with a warning naming it, and the one before it
  restored. Returns (step, restored) or None when there is no checkpoint; raises
  ValueError naming each broken one when none can be read."""
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  broken = []
  for s in steps:
    try:
      out = mngr.restore(s, args=args)
    except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
      broken.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    if broken:
      warnings.warn(f"unreadable checkpoints in {mngr.directory} skipped "
                    f"({'; '.join(broken)}); restored step {s}")
    return s, out
  if broken:
    raise ValueError(f"no checkpoint in {mngr.directory} can be read ({'; '.join(broken)}); "
                     "accepted: a checkpoint directory as train.py writes it (move the broken "
                     "step directories aside to start afresh)")
  return None


def _set_aside(mngr: ocp.CheckpointManager, workdir: str, newest_good: int) -> None:
  """Moves unreadable checkpoints newer than the one restored to
  workdir/broken_checkpoints/ (kept, not deleted), so that training can save
  those steps again."""
  for s in mngr.all_steps():
    if s > newest_good:
      dst = os.path.join(workdir, "broken_checkpoints")
      os.makedirs(dst, exist_ok=True)
      target = os.path.join(dst, f"{s}-{int(time.time())}")
      os.replace(os.path.join(str(mngr.directory), str(s)), target)
      warnings.warn(f"moved the unreadable checkpoint of step {s} to {target}")
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, state, workdir: str | None = None):
  """Restores the latest readable checkpoint onto `state`'s shapes and shardings
  (see `_restore_readable`; with `workdir`, unreadable newer ones are moved aside).

  Returns (state, data_state) or None when the workdir has no checkpoint.
  """
  if mngr.latest_step() is None:
    return None
  train_like = {"opt_state": state.opt_state, "step": state.step, "key": state.key}
  step, out = _restore_readable(mngr, ocp.args.Composite(
      params=ocp.args.StandardRestore(_abstract(state.params)),
      train=ocp.args.StandardRestore(_abstract(train_like)),
      data=ocp.args.JsonRestore()))
  if workdir is not None and step != mngr.latest_step() and jax.process_index() == 0:
    _set_aside(mngr, workdir, step)
  t = out["train"]
  state = state.replace(params=out["params"], opt_state=t["opt_state"], step=t["step"],
                        key=t["key"])
  return state, dict(out["data"] or {})


def check_init_from(src: str, workdir: str) -> None:
  """train.init_from must name a finished-or-running SFT run with a checkpoint,
  other than this run's own workdir. Raises ConfigError naming what is wrong."""
  where = f"train.init_from={src!r}"
  if os.path.abspath(src) == os.path.abspath(workdir):
    raise ConfigError(f"{where} is this run's own train.workdir; accepted: another run's workdir")
  path = os.path.join(src, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f"{where} is not a run directory (no {CONFIG_FILE} in it); accepted: "
                      "the train.workdir of an SFT run")
  stage = load_config(path).train.stage
  if stage != "sft":
    raise ConfigError(f"{where} is an {stage.upper()} run (train.stage={stage} in {path}); "
                      "accepted: the train.workdir of an SFT run")
  mngr = manager(src, read_only=True)
  step = mngr.latest_step()
  mngr.close()
  if step is None:
    raise ConfigError(f"{where} has no complete checkpoint under "
                      f"{os.path.join(src, CHECKPOINT_DIR)}; accepted: an SFT run that has "
                      "saved one")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on workdir/.lock while a run trains there (process 0
  of a multi-host run takes it for all of them). A second run started on the same
  workdir is refused, naming the lock and the process holding it. The operating
  system releases the lock when its process ends, however it ends (kill -9 too)."""
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise RunLockedError(
          f"{workdir} is in use by another run (process {holder}, which holds {path}); "
          "accepted: wait for that run to end, or give this one another train.workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)                 # closing the descriptor releases the lock


def tokenizer_file(workdir: str) -> str:
  """The path of a workdir's tokenizer: tokenizer.model, or tokenizer.json for a
  run started from a Hugging Face checkpoint. Raises FileNotFoundError."""
  for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"{workdir} has no {TOKENIZER_FILE} (or {HF_TOKENIZER_FILE}); "
                          "accepted: a run directory as train.py writes it (config.yaml, "
                          "the tokenizer, checkpoints/)")


def _tokenizer_bytes(tok) -> tuple[str, bytes]:
  """(file name, contents) of `tok` as a workdir keeps it."""
  return (HF_TOKENIZER_FILE if hasattr(tok, "backend") else TOKENIZER_FILE), tok.serialize()


def write_run_files(workdir: str, cfg: Config, tok) -> None:
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
  name, data = _tokenizer_bytes(tok)
  dest = os.path.join(workdir, name)
  other = [n for n in (TOKENIZER_FILE, HF_TOKENIZER_FILE)
           if n != name and os.path.exists(os.path.join(workdir, n))]
  if other or (os.path.exists(dest) and _sha256(dest) != hashlib.sha256(data).hexdigest()):
    raise ConfigError(f"{os.path.join(workdir, (other or [name])[0])} differs from the "
                      f"tokenizer this run trains with ({tok.path or 'in memory'}); accepted: "
                      "the same tokenizer to resume, or a new train.workdir")
  if not os.path.exists(dest):
    with open(dest + ".tmp", "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(dest + ".tmp", dest)
  sha = os.path.join(workdir, TOKENIZER_SHA_FILE)
  if not os.path.exists(sha):
    with open(sha + ".tmp", "w") as f:
      f.write(_sha256(dest) + "\n")
    os.replace(sha + ".tmp", sha)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def check_tokenizer(workdir: str, cfg: Config, tok) -> None:
  """The workdir's tokenizer is the one the run was trained with (its sha256 is
  recorded when the run starts) and fits the model's vocabulary."""
  path = tokenizer_file(workdir)
  sha = os.path.join(workdir, TOKENIZER_SHA_FILE)
  if os.path.exists(sha):
    with open(sha) as f:
      want = f.read().strip()
    if _sha256(path) != want:
      raise ValueError(f"{path} is not the tokenizer this run was trained with (its sha256 "
                       f"differs from the one recorded in {sha}); accepted: the run's own "
                       f"{os.path.basename(path)}")
  if tok.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"{path} has {tok.vocab_size} pieces, more than the run's "
                     f"model.vocab_size={cfg.model.vocab_size}: it is not this run's tokenizer; "
                     f"accepted: the run's own {os.path.basename(path)}")


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
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"{workdir} has no complete checkpoint under {CHECKPOINT_DIR}/")
  step, out = _restore_readable(mngr, ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params(cfg, mesh))), step)
  mngr.close()
  return out["params"], step


def load_run(workdir: str, mesh: Mesh | None = None, step: int | None = None) -> Run:
  """Loads config.yaml, the tokenizer and the latest (or `step`'s) parameters."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a run directory: no {CONFIG_FILE} in it")
  cfg = load_config(path)
  params, step = restore_params(workdir, cfg, mesh, step)
  tok = load_tokenizer(tokenizer_file(workdir))
  check_tokenizer(workdir, cfg, tok)
  return Run(cfg=cfg, params=params, tokenizer=tok, step=step, workdir=workdir)
