"""The decode loops' state, the one helper that commits a block to it, and the result."""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from mtcot_jax.decode import markers
from mtcot_jax.sampling import Sampling
from mtcot_jax.model.transformer import KVCache
from mtcot_jax.tokens import PAD_ID


class GenerateResult(NamedTuple):
  """Per sequence, the generated tokens after the prompt (padded to L)."""
  tokens: jax.Array          # (B, L) int32, PAD past `lengths`
  source: jax.Array          # (B, L) 0 main model, j head depth j, -1 padding
  phase: jax.Array           # (B, L) 0 CoT (incl. its answer marker), 1 answer, -1 padding
  logprobs: jax.Array        # (B, L) log-prob under the distribution sampled from
  #                            (in a verified phase: the main model's, whoever drafted it)
  lengths: jax.Array         # (B,) generated tokens
  forward_passes: jax.Array  # (B,) main-model calls, prefill included
  finished: jax.Array        # (B,) ended with EOS (False: a length limit was hit)
  cot_forced: jax.Array      # (B,) the CoT hit its budget and was closed by force
  accepted: jax.Array        # (B,) head drafts kept by verification (0 where verify="none")


class PassOutput(NamedTuple):
  """One main pass over a (B, T) block: outputs at every block position."""
  cache: KVCache
  logits: jax.Array          # (B, T, V) float32
  sources: tuple             # (B, T, D) per head source layer
  head_state: tuple          # the head's decode state after the pass (`heads.py`)


@flax.struct.dataclass
class State:
  cache: KVCache
  logits: jax.Array       # (B, V) main logits at the last processed position (h)
  sources: tuple          # (B, D) head sources at that position
  head_state: tuple       # the head's decode state: () or per layer memory (keys, values)
  tokens: jax.Array       # (B, L) output buffers
  source: jax.Array
  phase: jax.Array
  logprobs: jax.Array
  n_out: jax.Array        # (B,) tokens written
  n_think: jax.Array      # (B,) CoT tokens before the one that ends it (a marker's last)
  cap: jax.Array          # (B,) the CoT tokens allowed: max_cot, lowered to n_think once
  #                         the row has spent its pass budget (decode.pass_budget)
  cot_done: jax.Array     # (B,) bool
  done: jax.Array         # (B,) bool: EOS written
  passes: jax.Array       # (B,) main forward passes
  forced: jax.Array       # (B,) bool: the CoT was closed by budget forcing
  last: jax.Array         # (B,) the last committed token
  tail: jax.Array         # (B, M-1) the last M-1 committed tokens (prompt's included; -1
  #                         before its start), M the longest answer marker (`markers.py`)
  key: jax.Array
  pend: jax.Array         # (B,) verified phases: the next x1, drawn from the residual
  #                         after a rejected draft; -1: draw it from `logits`
  accepted: jax.Array     # (B,) drafts kept by verification
  sample: Sampling        # the sampling settings as scalar arrays (`Sampling.traced`):
  #                         loop arguments, so a new value is not a new program


def where_rows(rows_B, new, old):
  """`new` in the rows where rows_B holds, else `old` (any trailing shape)."""
  return jnp.where(rows_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def take_at(x_BxTx, n_B):
  """x at each row's position n_B - 1: (B, T, ...) -> (B, ...)."""
  return jnp.take_along_axis(x_BxTx, (n_B - 1)[:, None, None], axis=1)[:, 0]


def _write(buf_BxL, idx_BxT, val_BxT):
  rows = jnp.arange(buf_BxL.shape[0])[:, None]
  return buf_BxL.at[rows, idx_BxT].set(val_BxT.astype(buf_BxL.dtype), mode="drop")


def commit(st: State, *, active_B, block_BxT, source_BxT, phase: int, logprobs_BxT, n_B,
           ends_seq_B, passes_B, key, out: PassOutput | None = None) -> State:
  """The step shared by every loop: write an active row's block at its output
  offset (its first n_B tokens count; the rest are overwritten later), advance
  its counters and tail and, given the pass that read the block, `advance` to it."""
  L = st.tokens.shape[1]
  T = block_BxT.shape[1]
  idx = jnp.where(active_B[:, None], st.n_out[:, None] + jnp.arange(T)[None, :], L)
  last = take_at(block_BxT[..., None], jnp.maximum(n_B, 1))[:, 0]
  st = st.replace(
      tokens=_write(st.tokens, idx, block_BxT), source=_write(st.source, idx, source_BxT),
      phase=_write(st.phase, idx, jnp.full_like(block_BxT, phase)),
      logprobs=_write(st.logprobs, idx, logprobs_BxT),
      n_out=st.n_out + n_B, done=st.done | ends_seq_B, passes=st.passes + passes_B,
      last=jnp.where(active_B, last, st.last),
      tail=markers.roll_tail(st.tail, block_BxT, jnp.where(active_B, n_B, 0)), key=key)
  return st if out is None else advance(st, active_B, n_B, out)


def advance(st: State, active_B, n_B, out: PassOutput) -> State:
  """After a main pass that read n_B new tokens of each active row: its cache
  (lengths moved by n_B), h at the row's last new token, the head's state. The
  pass's logits are (B, T, V), or (B, 1, V) already at that token (`last_only`)."""
  n_last = jnp.maximum(n_B, 1)
  logits = out.logits[:, 0] if out.logits.shape[1] == 1 else take_at(out.logits, n_last)
  return st.replace(
      cache=out.cache.replace(lengths=st.cache.lengths + n_B),
      logits=where_rows(active_B, logits, st.logits),
      sources=tuple(where_rows(active_B, take_at(s, n_last), old)
                    for s, old in zip(out.sources, st.sources)),
      head_state=out.head_state)


def result(st: State) -> GenerateResult:
  """The output buffers masked past each row's length."""
  valid = jnp.arange(st.tokens.shape[1])[None, :] < st.n_out[:, None]
  return GenerateResult(
      tokens=jnp.where(valid, st.tokens, PAD_ID), source=jnp.where(valid, st.source, -1),
      phase=jnp.where(valid, st.phase, -1), logprobs=jnp.where(valid, st.logprobs, 0.0),
      lengths=st.n_out, forward_passes=st.passes, finished=st.done, cot_forced=st.forced,
      accepted=st.accepted)
