"""Token sampling: greedy, temperature, top-k, top-p; and the matching log-probabilities.

`sample` and `logprobs_of` share one logit transform, so a token's log-probability
recomputed by teacher forcing equals the one the decoder saw. The distribution a
token is drawn from is softmax(filter(logits / temperature)); greedy decoding
(temperature 0) takes the argmax and reports log_softmax(logits) at it (the
model's own probability, which is what RL and evaluation want).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
  """Static sampling settings (hashable: part of the compiled loop's key)."""
  temperature: float = 0.0   # 0: greedy
  top_k: int = 0             # 0: off
  top_p: float = 1.0         # 1: off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} is not accepted: a number >= 0 (0: greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} is not accepted: an int >= 0 (0: off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} is not accepted: a number in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def process_logits(logits_xV: jax.Array, s: Sampling) -> jax.Array:
  """The log-probabilities of the distribution tokens are drawn from: (..., V)."""
  logits = logits_xV.astype(jnp.float32)
  if s.greedy:
    return jax.nn.log_softmax(logits, axis=-1)
  logits = logits / s.temperature
  V = logits.shape[-1]
  if 0 < s.top_k < V:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if s.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the
    # mass strictly before it is below top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(before < s.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def sample(key: jax.Array, logits_BxV: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row. Returns (tokens (B,) int32, logprobs (B,) float32)."""
  logp_BxV = process_logits(logits_BxV, s)
  if s.greedy:
    tok_B = jnp.argmax(logits_BxV, axis=-1)
  else:
    tok_B = jax.random.categorical(key, logp_BxV, axis=-1)
  tok_B = tok_B.astype(jnp.int32)
  return tok_B, jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]


def logprobs_of(logits_xV: jax.Array, tokens_x: jax.Array, s: Sampling) -> jax.Array:
  """Teacher-forced: the log-probability of `tokens` under the sampling distribution."""
  logp = process_logits(logits_xV, s)
  return jnp.take_along_axis(logp, tokens_x[..., None].astype(jnp.int32), axis=-1)[..., 0]
