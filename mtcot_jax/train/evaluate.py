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
  finished sequences and generated tokens per second.
  """
  correct, passes, cot_len, ans_len, finished, n, tokens = [], [], [], [], [], 0, 0
  t0 = time.perf_counter()
  for i, batch in enumerate(batches):
    res = decode.generate(cfg, params, batch["prompt_tokens"], batch["prompt_lengths"],
                          jax.random.fold_in(key, i), k=k, eos_id=tok.eos_id,
                          think_end_id=tok.think_end_id, mesh=mesh, **sampling)
    res = jax.tree.map(host_array, res)
    for b, ex in enumerate(batch["examples"]):
      text = answer_text(tok, res.tokens[b], res.phase[b], res.lengths[b])
      correct.append(task.grade(text, ex))
      passes.append(res.forward_passes[b])
      cot_len.append(np.sum(res.phase[b] == 0))
      ans_len.append(np.sum(res.phase[b] == 1))
      finished.append(res.finished[b])
      tokens += int(res.lengths[b])
      n += 1
  dt = time.perf_counter() - t0
  return {"accuracy": float(np.mean(correct)), "forward_passes": float(np.mean(passes)),
          "cot_tokens": float(np.mean(cot_len)), "answer_tokens": float(np.mean(ans_len)),
          "finished": float(np.mean(finished)), "examples": n, "tokens_per_s": tokens / dt}


def render(tok, tokens, source, phase, length) -> str:
  """Two lines: the generated text, and under each character the writer of its
  token (0 = main model, j = head depth j; blank in the answer)."""
  text, marks = [], []
  for t, s, p in zip(tokens[:length], source[:length], phase[:length]):
    piece = tok.decode([int(t)], keep_special=True) or tok.id_to_piece(int(t))
    text.append(piece)
    marks.append((str(int(s)) if p == 0 else " ") * len(piece))
  return "".join(text) + "\n" + "".join(marks)
