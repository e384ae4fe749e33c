"""A run's log as training writes it: metrics.jsonl (`MetricsLog`, one JSON line a
step or evaluation, exact on resume) and TensorBoard scalars beside it, on a local
or URL workdir (`train/paths.py`). `loop.run_steps` owns one per run."""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import time

import jax
import numpy as np

from mtcot_jax.train.metrics import METRICS_FILE, read_metrics
from mtcot_jax.train.paths import is_local, run_path, write_atomic


def _jsonable(metrics: dict) -> dict:
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    out[k] = round(float(v), 6) if v.ndim == 0 else [round(float(x), 6) for x in v]
  return out


TENSORBOARD_DIR = "tensorboard"   # beside metrics.jsonl: `tensorboard --logdir WORKDIR/tensorboard`


def tb_scalars(record: dict) -> dict[str, float]:
  """The TensorBoard scalars of one metrics.jsonl record, by tag.

  A training record's numbers keep their names (`loss`, `lr`, `kl`, ...); a list
  (one entry per head depth) gives `head_acc/depth1` .. `head_acc/depthK`; an
  evaluation, or a summary's final one, gives `eval/<setting>/<name>`
  (`eval/k5/accuracy`). `step` is the x axis, not a scalar; `finite` is always 1
  in a logged record (a non-finite step stops the run first).
  """
  if "summary" in record:
    return _flat("eval", record["summary"].get("eval", {}))
  if "eval" in record:
    return _flat("eval", record["eval"])
  return _flat("", {k: v for k, v in record.items() if k not in ("step", "finite")})


def _flat(prefix: str, value) -> dict[str, float]:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flat(f"{prefix}/{k}" if prefix else k, v))
    return out
  if isinstance(value, (list, tuple)):
    return {f"{prefix}/depth{j + 1}": float(v) for j, v in enumerate(value)
            if isinstance(v, (int, float))}
  if isinstance(value, (int, float)):
    return {prefix: float(value)}
  return {}                                      # text: not a curve


class _EpathEventFile:
  """One TensorBoard event file at a URL (gs://...), written through etils.epath:
  object stores cannot append, so its bytes are kept in memory and the object is
  rewritten whole at each flush (tensorboardX's own gs:// writer does the same)."""

  def __init__(self, path: str):
    self.path = run_path(path)
    self.buffer = io.BytesIO()
    self.dirty = False

  def write(self, data: bytes) -> None:
    self.buffer.write(data)
    self.dirty = True

  def flush(self) -> None:
    if self.dirty:
      self.path.write_bytes(self.buffer.getvalue())
      self.dirty = False

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URL scheme (`record_writer.REGISTERED_FACTORIES`)."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    run_path(path).mkdir(parents=True, exist_ok=True)


def summary_writer(logdir: str, **kwargs):
  """A tensorboardX SummaryWriter for `logdir`, a local directory or a URL.

  tensorboardX writes gs:// with google-cloud-storage and s3:// with boto3 (when
  installed), and takes any other `scheme://` for a local directory name. A URL
  here is written through etils.epath for every scheme (`_EpathEventFile`; it is
  registered for that scheme in tensorboardX, for this process): it works wherever
  orbax's own file operations do, with no further client library."""
  from tensorboardX import SummaryWriter, record_writer
  if not is_local(logdir):
    scheme = logdir.split("://", 1)[0]
    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathEventFiles):
      record_writer.register_writer_factory(scheme, _EpathEventFiles())
  return SummaryWriter(logdir, **kwargs)


class MetricsLog:
  """Appends one JSON object per line to workdir/metrics.jsonl and writes the same
  numbers as TensorBoard scalars (`tb_scalars`) under workdir/tensorboard, on
  process 0 only.

  A run resumed from its checkpoint at step `resume_step` first drops what an
  interrupted session logged after that checkpoint (those steps are about to be
  run and logged again), its summaries, and a last line cut short by a kill, so
  that every step appears once; the file is rewritten atomically. Its new event
  file starts with a purge at `resume_step` (TensorBoard hides the events of
  earlier files from that step on; tensorboardX's `purge_step`), then repeats the
  kept records of `resume_step` itself, so that TensorBoard shows what
  metrics.jsonl holds. Call close() at the end (it flushes the event file).

  A URL workdir (gs://...; object stores cannot append): the file's lines are kept
  in memory and the whole object rewritten by `sync()`, at most every `sync_secs`
  as records come, after each checkpoint is started (run_steps; so the records up
  to a checkpoint are stored before it can be restored) and at close, or at exit
  when the run raises (a non-finite loss). A kill loses the records since the
  last sync, all of them after the last checkpoint: the resumed run logs those
  steps again. The event file is rewritten whole too (`summary_writer`), at most
  every `sync_secs`. (MaxText uploads each log period's records as a new object,
  metrics_step_A_to_step_B.txt; one rewritten object keeps one file to read.)
  """

  def __init__(self, workdir: str, resume_step: int | None = None, sync_secs: float = 30.0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.local = is_local(workdir)
    self.enabled = jax.process_index() == 0
    self.eval_steps: set[int] = set()    # steps whose evaluation is logged
    self.last_record: dict = {}          # the last training step's record kept
    self.writer = None
    self.sync_secs = sync_secs
    self._lines: list[str] = []          # a URL workdir: the file's lines, as sync() writes them
    self._dirty = False
    self._last_sync = float("-inf")
    if not self.enabled:
      return
    at_resume = []
    if resume_step is not None and run_path(self.path).exists():
      at_resume = self._truncate(resume_step)
    tb_dir = os.path.join(workdir, TENSORBOARD_DIR)
    run_path(tb_dir).mkdir(parents=True, exist_ok=True)
    # Event files are read in name order: time (whole seconds), host, then this
    # session's number, which orders two sessions started within one second.
    # The writer's thread writes the events and flushes them within flush_secs
    # (its flush() does not wait for the thread): a kill loses about a second.
    session = sum(1 for p in run_path(tb_dir).iterdir() if ".tfevents." in p.name)
    self.writer = summary_writer(tb_dir, purge_step=resume_step,
                                 flush_secs=1 if self.local else sync_secs,
                                 filename_suffix=f".{session:04d}")
    for record in at_resume:
      self._add_scalars(record)
    if not self.local:
      atexit.register(self.close)

  def _truncate(self, resume_step: int) -> list[dict]:
    """Rewrites metrics.jsonl without the records after `resume_step`; returns the
    kept records of `resume_step` itself."""
    kept = [r for r in read_metrics(os.path.dirname(self.path))
            if r.get("step", 0) <= resume_step and "summary" not in r]
    for record in kept:
      if "eval" in record:
        self.eval_steps.add(record["step"])
      elif "loss" in record:
        self.last_record = record
    text = "".join(json.dumps(r) + "\n" for r in kept)   # each line as write() wrote it
    if not self.local:
      self._lines = [json.dumps(r) + "\n" for r in kept]
      self._dirty = run_path(self.path).read_text() != text
      return [r for r in kept if r.get("step") == resume_step]
    with open(self.path) as f:
      changed = f.read() != text
    if changed:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    return [r for r in kept if r.get("step") == resume_step]

  def _add_scalars(self, record: dict) -> None:
    for tag, value in tb_scalars(record).items():
      self.writer.add_scalar(tag, value, global_step=record["step"])

  def write(self, record: dict) -> None:
    if self.enabled:
      line = json.dumps(record) + "\n"
      if self.local:
        with open(self.path, "a") as f:
          f.write(line)
      else:
        self._lines.append(line)
        self._dirty = True
      if self.writer is not None:
        self._add_scalars(record)
        if self.local:
          self.writer.flush()
      if not self.local and time.monotonic() - self._last_sync >= self.sync_secs:
        self.sync()

  def sync(self) -> None:
    """A URL workdir: writes metrics.jsonl whole with every record so far, and the
    event file. Locally a no-op: each record is appended as it is written."""
    if not self.enabled or self.local:
      return
    if self._dirty:
      write_atomic(run_path(self.path), "".join(self._lines).encode())
      self._dirty = False
    if self.writer is not None:
      self.writer.flush()
    self._last_sync = time.monotonic()

  def close(self) -> None:
    self.sync()
    if self.writer is not None:
      self.writer.close()
      self.writer = None
    if self.enabled and not self.local:
      atexit.unregister(self.close)
