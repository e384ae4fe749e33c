"""The training loop: `run_steps`, the skeleton both stages share (progress,
NaN stop, logging, periodic checkpoints and evaluations, exact resume, the
final save), and SFT on it (`train`); RL supplies its own step (rl_loop.py)."""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from mtcot_jax import data as mdata
from mtcot_jax import sharding as shd
from mtcot_jax.config import Config, ConfigError
from mtcot_jax.data import builders
from mtcot_jax.train import checkpoint as ckpt
from mtcot_jax.train import losses, optim, preemption
from mtcot_jax.train.evaluate import evaluate, render
from mtcot_jax.train.metrics import METRICS_FILE, read_metrics
from mtcot_jax.train.paths import is_local, run_path, write_atomic
from mtcot_jax.train.step import create_state, global_batch


def _check_vocab(cfg: Config, tok) -> None:
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size} pieces ({tok.path}); accepted: >= {tok.vocab_size}")


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


def check_finite(metrics: dict, step: int, mngr, workdir: str) -> None:
  """Raises if the step's loss or gradient was not finite (the step then left the
  state unchanged), naming the last good checkpoint, which is kept."""
  if not float(metrics["finite"]):
    mngr.wait_until_finished()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
        f"training stopped. The last good checkpoint (step {mngr.latest_step()}) is kept in "
        f"{os.path.join(workdir, ckpt.CHECKPOINT_DIR)}")


def run_steps(cfg: Config, state, mngr, step_fn, *, desc: str, t_start: float,
              data_state=lambda done: {}, evaluate_fn=None, postfix=lambda r: {},
              stop_after: int | None = None, progress: bool = True) -> dict:
  """Steps int(state.step) .. train.steps - 1 of a stage.

  step_fn(state, step) -> (state, record): one step (it raises on a non-finite
  loss, see check_finite); record() gives the step's metrics as a JSON-able dict,
  called only at logging steps. Every train.log_every steps the record is logged;
  every train.checkpoint_every a checkpoint (with data_state(done), the input's
  position) is started; every train.eval_every evaluate_fn(params) is logged. A
  run resumed at a step whose evaluation an interruption lost evaluates it first
  (bit-identical parameters give the same figures). At the end the last state is
  saved, the manager closed, the final evaluation run (train.eval_examples > 0)
  and the summary logged. Returns the summary (with "params"), or
  {"stopped_at": step} when stop_after steps of this session ended it early
  (tests simulate interruptions with it; nothing is saved then beyond what was
  already started), or {"preempted": True, "step": step, ...} when SIGTERM (or, on
  several processes, JAX's preemption sync point) ended it: the step reached is
  saved first, with its data_state, and the evaluation due there is left to the
  restart; a SIGTERM during the final save lets it finish, and the restart runs
  the final evaluation (see preemption.py). t_start: when the stage started (for
  its timings). The progress bar and its lines are process 0's.
  """
  t = cfg.train
  start = int(state.step)
  log = MetricsLog(t.workdir, resume_step=start)

  def due(every, done):
    return every and done % every == 0 and done != t.steps

  def run_eval(done):
    ev = evaluate_fn(state.params)
    log.write({"step": done, "eval": ev})
    if main_process:
      bar.write(f"step {done}: " + ", ".join(f"{n} acc {r['accuracy']:.3f}"
                                             for n, r in ev.items()))

  main_process = jax.process_index() == 0     # one progress bar, not one per host
  bar = tqdm(range(start, t.steps), initial=start, total=t.steps,
             disable=not progress or not main_process, desc=desc, dynamic_ncols=True)
  if evaluate_fn is not None and start and due(t.eval_every, start) \
      and start not in log.eval_steps:
    run_eval(start)
  record = log.last_record       # what a finished run resumed at its end reports
  with preemption.Watcher(mngr) as preempt:   # restores the SIGTERM handler on the way out
    for step in bar:
      state, make_record = step_fn(state, step)
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        record = make_record()
        log.write(record)
        bar.set_postfix(postfix(record))
      if due(t.checkpoint_every, done):
        ckpt.save(mngr, state, data_state(done))
        log.sync()     # a URL workdir: the records up to the checkpoint stored with it
      if preempt.reached(done):   # every step, on every process (the sync point's protocol)
        break
      if evaluate_fn is not None and due(t.eval_every, done):
        run_eval(done)
      if stop_after is not None and done - start >= stop_after:
        mngr.wait_until_finished()
        mngr.close()
        log.close()
        return {"stopped_at": done}
    bar.close()
    # The last step's state (the final one, or the one a preemption stopped at).
    if int(state.step) > 0 and mngr.latest_step() != int(state.step):
      ckpt.save(mngr, state, data_state(int(state.step)))
    mngr.wait_until_finished()
    if preempt.received:   # SIGTERM in training or in the final save (one process)
      mngr.close()
      log.close()
      print(preemption.message(int(state.step), t.steps, mngr.directory), file=sys.stderr,
            flush=True)
      return {"preempted": True, "step": int(state.step),
              "train_seconds": round(time.perf_counter() - t_start, 1), "final": record}
  mngr.close()
  t_train = time.perf_counter() - t_start
  evals = evaluate_fn(state.params) if evaluate_fn is not None and t.eval_examples else {}
  summary = {"step": int(state.step), "train_seconds": round(t_train, 1),
             "wall_seconds": round(time.perf_counter() - t_start, 1), "final": record,
             "eval": evals}
  log.write({"step": int(state.step), "summary": summary})
  log.close()
  return {**summary, "params": state.params}


def eval_settings(cfg: Config) -> list[tuple[str, int, bool]]:
  """(name, k, cot) of each evaluation: k=0, the configured k, and no-CoT if trained for it."""
  k = cfg.decode.k if cfg.decode.k >= 0 else cfg.head.k
  settings = [("k0", 0, True)]
  if k > 0:
    settings.append((f"k{k}", k, True))
  if cfg.data.no_cot_fraction > 0 or not cfg.data.cot:
    settings.append(("nocot", 0, False))
  return settings


def run_evals(cfg: Config, params, tok, mesh, seed: int) -> dict:
  """Every process decodes the same global evaluation batches (sharded over the
  mesh's batch axes) and grades all of them, so all report the same figures."""
  task = builders.task_for(cfg.data)
  n = cfg.train.eval_examples
  split = shd.batch_shards(cfg, tuple(mesh.devices.shape)) if mesh is not None else 1
  bsz = min(n, max(128, split))
  fits = bsz % split == 0 and n % bsz == 0
  if jax.process_count() > 1 and not fits:
    raise ConfigError(f"train.eval_examples={n} is not accepted on {jax.process_count()} "
                      f"processes: a multiple of {max(128, split)} (or of {split}, below it), "
                      "so that every evaluation batch splits over the mesh's batch axes")
  use_mesh = mesh if fits else None
  results = {}
  for name, k, cot in eval_settings(cfg):
    batches = mdata.make_eval_batches(cfg, tok, n, bsz, cot=cot, process_index=0,
                                      process_count=1)
    r = evaluate(cfg, params, tok, task, batches, k=k, key=jax.random.key(seed), mesh=use_mesh)
    results[name] = r
  return results


def sample_generation(cfg: Config, params, tok, k: int, index: int = 0) -> str:
  import mtcot_jax.decode as dec
  batch = mdata.make_eval_batches(cfg, tok, 1, 1, cot=True)[0]
  res = jax.tree.map(np.asarray, dec.generate(
      cfg, params, batch["prompt_tokens"], batch["prompt_lengths"], jax.random.key(index), k=k,
      eos_id=tok.eos_id, think_end_id=tok.think_end_id))
  ex = batch["examples"][0]
  return (f"question: {ex.question}   (reference answer: {ex.answer})\n"
          + render(tok, res.tokens[0], res.source[0], res.phase[0], res.lengths[0])
          + f"\nforward passes: {res.forward_passes[0]}, tokens: {res.lengths[0]}")


def _hf_tokenizer(path: str):
  from mtcot_jax.data.hf_tokenizer import from_hf_dir
  tok, _ = from_hf_dir(path)
  if tok is None:
    raise ConfigError(f"train.init_from_hf={path!r} has no tokenizer.json or tokenizer.model; "
                      "accepted: a Hugging Face directory with its tokenizer")
  return tok


def _init_params(cfg: Config, mesh, mngr):
  """The parameters of the run in train.init_from (a fresh optimizer starts on them),
  or None: random ones. Not read when this workdir already has a checkpoint."""
  src = cfg.train.init_from
  if mngr.latest_step() is not None:
    return None
  from mtcot_jax.model import api
  if cfg.train.init_from_hf or cfg.train.init_from_gguf:
    from mtcot_jax import hf
    key = jax.random.split(jax.random.key(cfg.train.seed))[0]
    if cfg.train.init_from_gguf:   # each weight put on its sharding as it is read
      return hf.load_gguf(cfg.train.init_from_gguf, base=cfg, key=key, mesh=mesh).params
    params = hf.load_hf(cfg.train.init_from_hf, base=cfg, key=key).params
    return params if mesh is None else jax.device_put(params, api.param_shardings(cfg, mesh))
  if not src:
    return None
  run = ckpt.load_run(src, mesh)
  if api.param_shapes(run.cfg) != api.param_shapes(cfg):
    raise ConfigError(f"train.init_from={src!r}: its model/head config differs from this one; "
                      "accepted: a run with the same model and head shapes")
  return run.params


def train(cfg: Config, *, stop_after: int | None = None, progress: bool = True) -> dict:
  """Runs (or resumes) SFT in cfg.train.workdir. Returns the final summary.

  stop_after: leave after this many steps of this session without a final save
  (simulates an interruption; used by tests). Refuses a workdir another run holds.
  """
  with ckpt.workdir_lock(cfg.train.workdir):
    return _train(cfg, stop_after, progress)


def _train(cfg: Config, stop_after: int | None, progress: bool) -> dict:
  t_start = time.perf_counter()
  t = cfg.train
  if t.init_from:
    ckpt.check_init_from(t.init_from, t.workdir)
  if t.init_from_hf:   # the model section is the checkpoint's
    from mtcot_jax import hf
    cfg = hf.config_for(t.init_from_hf, base=cfg)
  elif t.init_from_gguf:
    from mtcot_jax import hf
    cfg, gguf_tok = hf.gguf_config(t.init_from_gguf, base=cfg)[:2]
  mesh = shd.make_mesh(cfg)
  if t.init_from and not cfg.data.tokenizer:   # the ids the parameters were trained on
    tok = ckpt.read_tokenizer(t.init_from)
  elif t.init_from_hf:
    tok = _hf_tokenizer(t.init_from_hf)
  elif t.init_from_gguf:
    tok = gguf_tok
  else:
    tok = mdata.tokenizer_for(cfg)
  _check_vocab(cfg, tok)
  if jax.process_index() == 0:
    ckpt.write_run_files(t.workdir, cfg, tok)
  it = mdata.make_train_iterator(cfg, tok)
  optimizer = optim.make_optimizer(cfg, frozen=("main",) if t.freeze_main else ())
  mngr = ckpt.manager(t.workdir, cfg)
  state = create_state(cfg, optimizer, mesh, params=_init_params(cfg, mesh, mngr))
  restored = ckpt.restore_latest(mngr, state, t.workdir)
  if restored is not None:
    state, data_state = restored
    it.set_state(data_state)
  shardings = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
  sft_step = losses.make_sft_step(cfg, mesh, optimizer, shardings)
  tokens_per_step = t.batch_size * cfg.data.seq_len
  timer = {"t": time.perf_counter(), "steps": 0}

  def step_fn(state, step):
    state, metrics = sft_step(state, global_batch(cfg, mesh, next(it)))
    timer["steps"] += 1
    check_finite(metrics, step + 1, mngr, t.workdir)

    def record():
      m = _jsonable(jax.device_get(metrics))
      now = time.perf_counter()
      m.update(step=step + 1, lr=float(optim.schedule(cfg)(step)),
               tokens_per_s=round(timer["steps"] * tokens_per_step / (now - timer["t"]), 1),
               skipped_examples=it.num_skipped)
      timer.update(t=now, steps=0)
      return m
    return state, record

  summary = run_steps(
      cfg, state, mngr, step_fn, desc="sft",
      t_start=t_start, data_state=lambda done: it.get_state(),
      evaluate_fn=lambda params: run_evals(cfg, params, tok, mesh, t.seed),
      postfix=lambda m: {"loss": f"{m['loss']:.3f}", "main_acc": f"{m['main_acc']:.3f}"},
      stop_after=stop_after, progress=progress)
  if "stopped_at" not in summary:
    summary.update(tokenizer=tok, cfg=cfg)
  return summary


def summary_table(cfg: Config, summary: dict) -> str:
  lines = [f"run {cfg.train.workdir}: {summary['step']} steps, "
           f"{summary['train_seconds']}s training, {summary['wall_seconds']}s with evaluation"]
  f = summary.get("final", {})
  if f:
    lines.append(f"  train loss {f['loss']:.4f}  main loss {f['main_loss']:.4f}  "
                 f"main acc {f['main_acc']:.4f}")
    for name in ("head_acc", "head_accept"):
      if name in f:
        lines.append(f"  {name:11s} per depth: " + " ".join(f"{x:.3f}" for x in f[name]))
  if summary.get("eval"):
    lines.append(f"  {'eval':8s} {'accuracy':>9s} {'fwd passes':>11s} {'CoT tokens':>11s} "
                 f"{'finished':>9s} {'tokens/s':>9s}")
    for name, r in summary["eval"].items():
      lines.append(f"  {name:8s} {r['accuracy']:9.3f} {r['forward_passes']:11.2f} "
                   f"{r['cot_tokens']:11.2f} {r['finished']:9.3f} {r['tokens_per_s']:9.1f}")
  return "\n".join(lines)
