"""Evaluation with `generate`: task accuracy, forward passes, CoT length; and a
readable rendering of a generation with the head's tokens marked."""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mtcot_jax import decode
from mtcot_jax.config import Config


def host_array(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) global array, on this host."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def answer_text(tok, tokens, phase, length) -> str:
  ids = [int(t) for t, p in zip(tokens[:length], phase[:length]) if p == 1 and t != tok.eos_id]
  return tok.decode(ids)


def evaluate(cfg: Config, params, tok, task, batches, *, k: int, key: jax.Array,
             mesh: Mesh | None = None, **sampling) -> dict:
  """Accuracy by the task's grader over `batches` (from make_eval_batches).

  Returns accuracy, mean forward passes, mean CoT / answer lengths, the share of
  finished sequences and generated tokens per second of decoding, warm: the first batch is
  decoded once untimed, so that compiling the loops is not counted (it was most
  of the time of a small evaluation, and more for k > 0, whose loops are larger).
  """
  correct, passes, cot_len, ans_len, finished, n, tokens = [], [], [], [], [], 0, 0
  accepted = []
  params = decode.prepare_params(cfg, params)   # decode.weights_dtype/_layout: once, not per batch

  def run(i, batch):
    return decode.generate(cfg, params, batch["prompt_tokens"], batch["prompt_lengths"],
                           jax.random.fold_in(key, i), k=k, eos_id=tok.eos_id,
                           think_end_id=tok.think_end_id, mesh=mesh, **sampling)
  if batches:
    jax.block_until_ready(run(0, batches[0]))
  dt = 0.0   # decoding alone (grading on the host not counted)
  for i, batch in enumerate(batches):
    t0 = time.perf_counter()
    res = jax.tree.map(host_array, run(i, batch))
    dt += time.perf_counter() - t0
    for b, ex in enumerate(batch["examples"]):
      text = answer_text(tok, res.tokens[b], res.phase[b], res.lengths[b])
      correct.append(task.grade(text, ex))
      passes.append(res.forward_passes[b])
      cot_len.append(np.sum(res.phase[b] == 0))
      ans_len.append(np.sum(res.phase[b] == 1))
      finished.append(res.finished[b])
      accepted.append(res.accepted[b])
      tokens += int(res.lengths[b])
      n += 1
  return {"accuracy": float(np.mean(correct)), "forward_passes": float(np.mean(passes)),
          "forward_passes_std": float(np.std(passes)),
          "cot_tokens": float(np.mean(cot_len)), "answer_tokens": float(np.mean(ans_len)),
          "tokens_per_pass": tokens / max(float(np.sum(passes)), 1.0),
          "finished": float(np.mean(finished)), "examples": n, "tokens_per_s": tokens / dt,
          "accepted_per_pass": float(np.sum(accepted)) / max(float(np.sum(passes)), 1.0)}


def teacher_forced_metrics(cfg: Config, params, tok, examples, batch_size: int = 128) -> dict:
  """The SFT metrics on `examples` (e.g. held-out ones), teacher-forced: main-token
  accuracy on CoT and answer targets, and the head's accuracy and agreement with
  the main model's greedy token (acceptance) per depth on CoT targets. Examples
  longer than data.seq_len are left out (`examples` counts those used)."""
  from mtcot_jax.data import encode_example
  from mtcot_jax.train import losses

  T = cfg.data.seq_len
  rows = [r for r in (encode_example(tok, ex) for ex in examples) if len(r["inputs"]) <= T]
  if not rows:
    raise ValueError(f"no example fits in data.seq_len={T}")

  @jax.jit
  def sums_of(p, batch):
    total = losses.counts(cfg, batch)
    return losses.loss_and_metrics(cfg, p, batch, total)[1], total

  acc, tot = None, None
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {"inputs": np.full((batch_size, T), tok.pad_id, np.int32),
             "targets": np.full((batch_size, T), tok.pad_id, np.int32),
             "positions": np.zeros((batch_size, T), np.int32),
             "segment_ids": np.zeros((batch_size, T), np.int32),
             "cot_mask": np.zeros((batch_size, T), np.float32),
             "answer_mask": np.zeros((batch_size, T), np.float32)}
    for i, r in enumerate(chunk):   # unused rows stay empty: no targets, one shape
      n = len(r["inputs"])
      for key in ("inputs", "targets", "cot_mask", "answer_mask"):
        batch[key][i, :n] = r[key]
      batch["positions"][i, :n] = np.arange(n)
      batch["segment_ids"][i, :n] = 1
    sums, total = jax.device_get(sums_of(params, batch))
    acc = sums if acc is None else jax.tree.map(np.add, acc, sums)
    tot = total if tot is None else jax.tree.map(np.add, tot, total)
  out = {k: np.asarray(v) for k, v in losses.finalize(acc, tot).items()}
  res = {"main_acc": float(out["main_acc"]), "main_loss": float(out["main_loss"]),
         "examples": len(rows)}
  for name in ("head_acc", "head_accept", "head_loss"):
    if name in out:
      res[name] = [round(float(x), 6) for x in out[name]]
  return res


def render(tok, tokens, source, phase, length) -> str:
  """Two lines: the generated text, and under each character the writer of its
  token (0 = main model, j = head depth j; blank in the answer)."""
  text, marks = [], []
  for t, s, p in zip(tokens[:length], source[:length], phase[:length]):
    piece = tok.decode([int(t)], keep_special=True) or tok.id_to_piece(int(t))
    text.append(piece)
    marks.append((str(int(s)) if p == 0 else " ") * len(piece))
  return "".join(text) + "\n" + "".join(marks)
