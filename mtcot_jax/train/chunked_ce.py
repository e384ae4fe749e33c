"""Cross-entropy statistics of `h @ unembed` over vocabulary chunks
(train.vocab_chunks), without the (..., V) float32 logits.

With a 152k vocabulary the logits are the training step's largest activation:
(B, T, V) float32 for the main model, and as much again per head depth. Here
the vocabulary is cut into n chunks and a `lax.scan` walks over them, keeping
per row only an online log-sum-exp (running max m and sum s of exp(logit - m)),
the target's logit and a running argmax. The scan body is rematerialised
(`jax.checkpoint`): the forward pass keeps each chunk's small carry, and the
backward pass recomputes each chunk's logits from h and the chunk's columns.
Live logits are (..., V/n) float32.

Chunk c holds the columns c, c + n, c + 2n, ... (strided, not contiguous): a
vocabulary axis sharded over the mesh's `tensor` axis then stays sharded the
same way inside every chunk (`unembed.reshape(D, V/n, n)` keeps the split on the
V/n axis) and no chunk lives on one device alone. n need not divide V: the
vocabulary is padded to a multiple of n with columns whose logit is -inf, which
add nothing to the sum and never win the argmax.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtcot_jax.sharding import Sharder


class VocabStats(NamedTuple):
  """Per row: what the loss and its metrics need from the logits."""
  lse: jax.Array      # (...,) float32 log-sum-exp over the vocabulary
  picked: jax.Array   # (...,) float32 the target's logit
  argmax: jax.Array   # (...,) int32 the first index of the largest logit

  @property
  def ce(self) -> jax.Array:
    """(...,) cross-entropy = logsumexp - the target's logit."""
    return self.lse - self.picked


def full_stats(logits_xV: jax.Array, targets_x: jax.Array) -> VocabStats:
  """The stats of materialised logits (one chunk: the numbers before chunking)."""
  logits_xV = logits_xV.astype(jnp.float32)
  picked = jnp.take_along_axis(logits_xV, targets_x[..., None], axis=-1)[..., 0]
  return VocabStats(jax.nn.logsumexp(logits_xV, axis=-1), picked,
                    jnp.argmax(logits_xV, axis=-1).astype(jnp.int32))


def chunk_columns(unembed_DxV: jax.Array, chunks: int) -> jax.Array:
  """(n, D, ceil(V/n)): chunk c's columns c, c + n, ... of the (D, V) matrix,
  zero past V (`chunked_stats` gives those columns logit -inf)."""
  D, V = unembed_DxV.shape
  Vc = -(-V // chunks)
  if Vc * chunks != V:
    unembed_DxV = jnp.pad(unembed_DxV, ((0, 0), (0, Vc * chunks - V)))
  return unembed_DxV.reshape(D, Vc, chunks).transpose(2, 0, 1)


def chunked_stats(h_xD: jax.Array, unembed_DxV: jax.Array, targets_x: jax.Array, chunks: int,
                  dtype=jnp.float32, shard: Sharder = Sharder()) -> VocabStats:
  """`full_stats(h @ unembed, targets)` over `chunks` vocabulary chunks.

  h_xD (..., D) and unembed_DxV (D, V) are cast to `dtype` and multiplied with
  float32 accumulation; targets_x (...,) int in [0, V). Gradients flow to h and
  the unembedding (not through the argmax). With h of shape (B, T, D) each
  chunk's logits are constrained like the full logits ("batch", "length",
  "act_vocab").
  """
  V = unembed_DxV.shape[1]
  h_xD = h_xD.astype(dtype)
  w_nxDxVc = chunk_columns(unembed_DxV.astype(dtype), chunks)
  Vc = w_nxDxVc.shape[2]
  targets_x = targets_x.astype(jnp.int32)
  rows = h_xD.shape[:-1]

  @jax.checkpoint
  def body(carry, xs):
    m_x, s_x, picked_x, arg_x = carry
    w_DxVc, c = xs
    logits_xVc = jnp.einsum("...d,dv->...v", h_xD, w_DxVc, preferred_element_type=jnp.float32)
    if logits_xVc.ndim == 3:
      logits_xVc = shard(logits_xVc, ("batch", "length", "act_vocab"))
    cols_Vc = jnp.arange(Vc, dtype=jnp.int32) * chunks + c
    logits_xVc = jnp.where(cols_Vc < V, logits_xVc, -jnp.inf)
    # The max only shifts the exponentials (lse = m + log s for any m): a
    # constant to the gradient, which comes through s alone.
    const_xVc = jax.lax.stop_gradient(logits_xVc)
    cmax_x = jnp.max(const_xVc, axis=-1)
    carg_x = cols_Vc[jnp.argmax(const_xVc, axis=-1)]
    new_m_x = jnp.maximum(m_x, cmax_x)
    s_x = (s_x * jnp.exp(m_x - new_m_x)
           + jnp.sum(jnp.exp(logits_xVc - new_m_x[..., None]), axis=-1))
    picked_x = picked_x + jnp.sum(
        jnp.where(cols_Vc == targets_x[..., None], logits_xVc, 0.0), axis=-1)
    # The first index of the largest logit, as jnp.argmax: ties go to the smaller id.
    take = (cmax_x > m_x) | ((cmax_x == m_x) & (carg_x < arg_x))
    return (new_m_x, s_x, picked_x, jnp.where(take, carg_x, arg_x)), None

  init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32))
  (m_x, s_x, picked_x, arg_x), _ = jax.lax.scan(
      body, init, (w_nxDxVc, jnp.arange(chunks, dtype=jnp.int32)))
  return VocabStats(m_x + jnp.log(s_x), picked_x, arg_x)
