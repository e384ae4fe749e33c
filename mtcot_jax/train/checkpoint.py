"""A run's workdir: config.yaml, the tokenizer, orbax checkpoints, metrics.jsonl.

A workdir is a local path or a URL (gs://bucket/run): every path goes through
etils.epath (`paths.py` says what a URL workdir guarantees: whole-object writes,
no lock; orbax's checkpoints on gs:// or a local path only).

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
import tempfile
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from etils import epath
from jax.sharding import Mesh

from mtcot_jax.config import Config, config_from_dict, config_yaml, load_config
from mtcot_jax.data.tokenizer import load_tokenizer
from mtcot_jax.errors import ConfigError, RunLockedError  # noqa: F401  (re-exported)
from mtcot_jax.model import api
from mtcot_jax.train.paths import is_local, run_path, write_atomic

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"         # a sentencepiece model (the tokenizer trained here)
HF_TOKENIZER_FILE = "tokenizer.json"       # a Hugging Face checkpoint's (data/hf_tokenizer.py)
TOKENIZER_SHA_FILE = "tokenizer.sha256"
CHECKPOINT_DIR = "checkpoints"


# The URL schemes orbax writes checkpoints to: its arrays go through TensorStore's
# GCS driver for gs:// and its file driver (an absolute local path) otherwise
# (orbax.checkpoint 0.12: serialization/tensorstore_utils.py).
ORBAX_SCHEMES = ("gs",)


def checkpoint_dir(workdir: str) -> epath.Path:
  """workdir/checkpoints as orbax takes it: an absolute local path, or the URL as
  it is (gs://b/run/checkpoints). Raises ConfigError for a URL scheme orbax cannot
  write (s3://, az://: TensorStore's file driver would take it for a local path)."""
  if is_local(workdir):
    return epath.Path(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)))
  scheme = os.fspath(workdir).split("://", 1)[0]
  if scheme not in ORBAX_SCHEMES:
    raise ConfigError(f"train.workdir={os.fspath(workdir)!r}: orbax cannot write checkpoints "
                      f"to {scheme}://; accepted: a local path (a shared file system, or a "
                      "bucket mounted with GCSFuse) or gs://")
  return run_path(workdir) / CHECKPOINT_DIR


def manager(workdir: str, cfg: Config | None = None, read_only: bool = False
            ) -> ocp.CheckpointManager:
  keep = cfg.train.keep_checkpoints if cfg is not None else None
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                         create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("params", "train", "data"))


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
      dst = run_path(workdir) / "broken_checkpoints"
      dst.mkdir(parents=True, exist_ok=True)
      target = dst / f"{s}-{int(time.time())}"
      src = epath.Path(mngr.directory) / str(s)
      if is_local(src):
        os.replace(src, target)
      else:                      # an object store: a copy, then a delete, object by object
        marker = dst / "README.txt"   # a "directory" there exists once an object is in it
        if not marker.exists():
          marker.write_text("checkpoints training found unreadable, moved aside (kept)\n")
        src.rename(target)
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
  if _same_dir(src, workdir):
    raise ConfigError(f"{where} is this run's own train.workdir; accepted: another run's workdir")
  path = run_path(src) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{where} is not a run directory (no {CONFIG_FILE} in it); accepted: "
                      "the train.workdir of an SFT run")
  stage = read_config(src).train.stage
  if stage != "sft":
    raise ConfigError(f"{where} is an {stage.upper()} run (train.stage={stage} in {path}); "
                      "accepted: the train.workdir of an SFT run")
  mngr = manager(src, read_only=True)
  step = mngr.latest_step()
  mngr.close()
  if step is None:
    raise ConfigError(f"{where} has no complete checkpoint under "
                      f"{run_path(src) / CHECKPOINT_DIR}; accepted: an SFT run that has "
                      "saved one")


def _same_dir(a: str, b: str) -> bool:
  if is_local(a) and is_local(b):
    return os.path.abspath(a) == os.path.abspath(b)
  return str(run_path(a)) == str(run_path(b))


def read_config(workdir: str) -> Config:
  """The config.yaml of a run (local or a URL). Raises FileNotFoundError."""
  if is_local(workdir):
    return load_config(os.path.join(workdir, CONFIG_FILE))
  path = run_path(workdir) / CONFIG_FILE
  return config_from_dict(yaml.safe_load(path.read_text()) or {})


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on workdir/.lock while a run trains there (process 0
  of a multi-host run takes it for all of them). A second run started on the same
  workdir is refused, naming the lock and the process holding it. The operating
  system releases the lock when its process ends, however it ends (kill -9 too).

  A URL workdir (gs://...) is not locked: object stores have no lock that a killed
  process releases, and a lock file left by a preempted run would refuse its
  restart. Nothing stops two runs from writing the same gs:// workdir then: one
  run per workdir is the user's rule (a warning says so). A URL orbax cannot write
  checkpoints to is refused here, before anything is written (`checkpoint_dir`)."""
  checkpoint_dir(workdir)
  if jax.process_index() != 0:
    yield
    return
  if not is_local(workdir):
    warnings.warn(f"train.workdir={workdir!r} is not locked (object stores have no lock a "
                  "killed run releases): start one run at a time on it", stacklevel=3)
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
    if (os.path.exists(path) if is_local(workdir) else (run_path(workdir) / name).exists()):
      return path
  raise FileNotFoundError(f"{workdir} has no {TOKENIZER_FILE} (or {HF_TOKENIZER_FILE}); "
                          "accepted: a run directory as train.py writes it (config.yaml, "
                          "the tokenizer, checkpoints/)")


def _tokenizer_bytes(tok) -> tuple[str, bytes]:
  """(file name, contents) of `tok` as a workdir keeps it."""
  return (HF_TOKENIZER_FILE if hasattr(tok, "backend") else TOKENIZER_FILE), tok.serialize()


def write_run_files(workdir: str, cfg: Config, tok) -> None:
  """config.yaml and the tokenizer, next to the checkpoints (kept if present).
  Each is written whole or not at all (`paths.write_atomic`): a crash never leaves
  a half-written one."""
  wd = run_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  if (wd / CONFIG_FILE).exists():
    saved = read_config(workdir)
    if _model_part(saved) != _model_part(cfg):
      raise ConfigError(
          f"{workdir} holds a run whose model/head config differs from this one; accepted: "
          "the same model and head config to resume, or a new train.workdir")
  write_atomic(wd / CONFIG_FILE, config_yaml(cfg).encode())
  name, data = _tokenizer_bytes(tok)
  dest = wd / name
  other = [n for n in (TOKENIZER_FILE, HF_TOKENIZER_FILE) if n != name and (wd / n).exists()]
  if other or (dest.exists() and _sha256(dest) != hashlib.sha256(data).hexdigest()):
    raise ConfigError(f"{os.path.join(workdir, (other or [name])[0])} differs from the "
                      f"tokenizer this run trains with ({tok.path or 'in memory'}); accepted: "
                      "the same tokenizer to resume, or a new train.workdir")
  if not dest.exists():
    write_atomic(dest, data)
  sha = wd / TOKENIZER_SHA_FILE
  if not sha.exists():
    write_atomic(sha, (_sha256(dest) + "\n").encode())


def _sha256(path) -> str:
  return hashlib.sha256(run_path(path).read_bytes()).hexdigest()


def read_tokenizer(workdir: str):
  """The tokenizer a run keeps (`tokenizer_file`), from a local path or a URL."""
  path = tokenizer_file(workdir)
  if is_local(path):
    return load_tokenizer(path)
  with tempfile.TemporaryDirectory() as tmp:   # the loaders read local files
    local = os.path.join(tmp, os.path.basename(path))
    with open(local, "wb") as f:
      f.write(run_path(path).read_bytes())
    tok = load_tokenizer(local)
  tok.path = path
  return tok


def check_tokenizer(workdir: str, cfg: Config, tok) -> None:
  """The workdir's tokenizer is the one the run was trained with (its sha256 is
  recorded when the run starts) and fits the model's vocabulary."""
  path = tokenizer_file(workdir)
  sha = os.path.join(workdir, TOKENIZER_SHA_FILE)
  if run_path(sha).exists():
    want = run_path(sha).read_text().strip()
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
  """Loads config.yaml, the tokenizer and the latest (or `step`'s) parameters, from
  a local workdir or a URL (gs://...)."""
  if not (run_path(workdir) / CONFIG_FILE).exists():
    raise FileNotFoundError(f"{workdir} is not a run directory: no {CONFIG_FILE} in it")
  cfg = read_config(workdir)
  params, step = restore_params(workdir, cfg, mesh, step)
  tok = read_tokenizer(workdir)
  check_tokenizer(workdir, cfg, tok)
  return Run(cfg=cfg, params=params, tokenizer=tok, step=step, workdir=workdir)
