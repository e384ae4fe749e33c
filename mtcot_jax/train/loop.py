"""The training loop: `run_steps`, the skeleton both stages share (progress,
NaN stop, logging, periodic checkpoints and evaluations, exact resume, the
final save), and SFT on it (`train`); RL supplies its own step (rl_loop.py)."""

from __future__ import annotations

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
from mtcot_jax.train.run_log import (TENSORBOARD_DIR, MetricsLog, _jsonable,  # noqa: F401
                                    summary_writer, tb_scalars)
from mtcot_jax.train.step import create_state, global_batch


def _check_vocab(cfg: Config, tok) -> None:
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size} pieces ({tok.path}); accepted: >= {tok.vocab_size}")


def check_finite(metrics: dict, step: int, mngr, workdir: str) -> None:
  """Raises if the step's loss or gradient was not finite (the step then left the
  state unchanged), naming the last good checkpoint, which is kept."""
  if not float(metrics["finite"]):
    mngr.wait_until_finished()
    raise FloatingPointError(
        f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); "
        f"training stopped. The last good checkpoint (step {mngr.latest_step()}) is kept in "
        f"{os.path.join(workdir, ckpt.CHECKPOINT_DIR)}")


def _preempted(mngr, log, step: int, steps: int, t_start: float, record) -> dict:
  """Closes the manager and the log after a preemption's save; the summary run_steps returns."""
  mngr.close()
  log.close()
  print(preemption.message(step, steps, mngr.directory), file=sys.stderr, flush=True)
  return {"preempted": True, "step": step,
          "train_seconds": round(time.perf_counter() - t_start, 1), "final": record}


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
      return _preempted(mngr, log, int(state.step), t.steps, t_start, record)
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
  mesh's batch axes) and grades all of them, so all report the same figures.
  Each setting's results name the split they were measured on (`split`:
  `data.eval_split`, validation unless a final table asks for test)."""
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
    results[name] = {**r, "split": cfg.data.eval_split}
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
    # Each weight is put on its sharding as it is read.
    if cfg.train.init_from_gguf:
      return hf.load_gguf(cfg.train.init_from_gguf, base=cfg, key=key, mesh=mesh).params
    return hf.load_hf(cfg.train.init_from_hf, base=cfg, key=key, mesh=mesh).params
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
    split = next(iter(summary["eval"].values())).get("split", "")
    lines.append(f"  {'eval':8s} {'accuracy':>9s} {'fwd passes':>11s} {'CoT tokens':>11s} "
                 f"{'finished':>9s} {'tokens/s':>9s}   ({split} split)")
    for name, r in summary["eval"].items():
      lines.append(f"  {name:8s} {r['accuracy']:9.3f} {r['forward_passes']:11.2f} "
                   f"{r['cot_tokens']:11.2f} {r['finished']:9.3f} {r['tokens_per_s']:9.1f}")
  return "\n".join(lines)
