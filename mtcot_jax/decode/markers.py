"""Answer markers: the token sequences whose last token ends the CoT.

A marker is a tuple of token ids; `Decoder.markers` holds one or more variants
(e.g. the ids of "Answer:" and of " Answer:", which a BPE tokenises apart), by
default the single token `</think>`. The CoT ends at the block position where a
marker's last token is committed, wherever its first tokens were committed: in
an earlier block or at the end of the prompt. So every row keeps its last
M - 1 committed tokens (M the longest marker) as a `tail`, seeded from the
prompt at prefill; -1 marks a slot before the prompt's start (it matches
nothing: token ids are >= 0).

Budget forcing writes the first variant, token by token (`forced_token`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

Markers = tuple[tuple[int, ...], ...]


def tail_len(markers: Markers) -> int:
  """M - 1: the committed tokens a row keeps to see a marker begun before a block."""
  return max(len(m) for m in markers) - 1


def marker_hits(tail_BxM, block_BxT, markers: Markers):
  """(B, T) bool: a marker's last token is at block position i, its earlier
  tokens before it in the block or at the end of `tail` (B, M-1), the row's
  last committed tokens."""
  M1, T = tail_BxM.shape[1], block_BxT.shape[1]
  ext = jnp.concatenate([tail_BxM.astype(block_BxT.dtype), block_BxT], axis=1)  # (B, M-1+T)
  hits = []
  for marker in markers:
    start = M1 - len(marker) + 1            # ext index of marker[0] when it ends at block pos 0
    hits.append(functools.reduce(jnp.logical_and, [
        ext[:, start + j: start + j + T] == tok for j, tok in enumerate(marker)]))
  return functools.reduce(jnp.logical_or, hits)


def ends_with_marker(window_BxM, markers: Markers):
  """(B,) bool: the window (a row's last M tokens) ends with a marker."""
  return marker_hits(window_BxM[:, :-1], window_BxM[:, -1:], markers)[:, 0]


def prompt_window(prompt_BxP, lens_B, width: int):
  """(B, width): each prompt's last `width` tokens, -1 before its start."""
  idx = lens_B[:, None] - width + jnp.arange(width, dtype=lens_B.dtype)[None, :]
  got = jnp.take_along_axis(prompt_BxP, jnp.maximum(idx, 0), axis=1)
  return jnp.where(idx >= 0, got, -1).astype(jnp.int32)


def roll_tail(tail_BxM, block_BxT, n_B):
  """The tail after committing the first n_B tokens of each row's block: the
  last M-1 tokens of tail + block[:n]. n_B = 0 leaves a row's tail as it is."""
  M1 = tail_BxM.shape[1]
  if M1 == 0:
    return tail_BxM
  ext = jnp.concatenate([tail_BxM, block_BxT.astype(tail_BxM.dtype)], axis=1)
  return jnp.take_along_axis(ext, n_B[:, None] + jnp.arange(M1)[None, :], axis=1)


def forced_token(markers: Markers, n_forced_B):
  """Budget forcing's token for a row that has written n_forced_B of them: the
  first variant's token at that index (clipped: a marker always ends by then)."""
  first = jnp.asarray(markers[0], jnp.int32)
  return first[jnp.clip(n_forced_B, 0, len(markers[0]) - 1)]
