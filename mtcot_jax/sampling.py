"""Token sampling: greedy, temperature, top-k, top-p; and the matching log-probabilities.

`sample` and `logprobs_of` share one logit transform, so a token's log-probability
recomputed by teacher forcing equals the one the decoder saw. The distribution a
token is drawn from is softmax(filter(logits / temperature)); greedy decoding
(temperature 0) takes the argmax and reports log_softmax(logits) at it (the
model's own probability, which is what RL and evaluation want).

The settings may be Python numbers or JAX arrays (traced under jit):

* numbers: fixed when the code is traced; greedy (temperature 0) compiles the
  argmax program, and a filter that is off costs nothing.
* arrays (the decode loops pass them so, `Sampling.traced`): one program serves
  every value. A temperature <= 0 there means greedy, decided per call: the token
  is the argmax and its log-prob the model's own, as above. The filters (top-k,
  top-p) share one sort of the vocabulary, run under `lax.cond` only where one is
  on, so sampling with neither pays no sort. Array values are not validated (that
  cannot be done inside jit): top_k <= 0 or >= V is off, top_p >= 1 is off, top_p
  <= 0 keeps the most probable token only.

top-k with a traced k: the k-th largest logit is read from the sorted logits at
index k-1 (a dynamic index into the one sort, no static size), and every logit
below it is masked, ties at it kept: what `lax.top_k(logits, k)[0][..., -1]`
gives for a static k, bit for bit (the same value). top-p then reads the same
sorted logits with the top-k mask applied (masking is monotone, so they stay
sorted: the one sort serves both).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


def _number(x):
  """x as a Python number where it is one (int, float, numpy scalar); None where
  it is anything else (a JAX array, traced or not)."""
  if isinstance(x, (bool, np.bool_)) or isinstance(x, jax.Array):
    return None
  if isinstance(x, (int, float, np.integer, np.floating)):
    return x.item() if isinstance(x, np.generic) else x
  if isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "iuf":
    return x.item()
  return None


@flax.struct.dataclass(kw_only=True)
class Sampling:
  """Sampling settings: numbers (hashable, usable as a static argument) or scalar
  JAX arrays (a pytree whose leaves are the three values; see the module docstring)."""
  temperature: Any = 0.0   # 0: greedy
  top_k: Any = 0           # 0: off
  top_p: Any = 1.0         # 1: off

  def __post_init__(self):
    # Numbers only: arrays may be traced, and tree unflattening passes other leaves.
    t, k, p = (_number(v) for v in (self.temperature, self.top_k, self.top_p))
    if t is not None and t < 0:
      raise ValueError(f"temperature={t} is not accepted: a number >= 0 (0: greedy)")
    if k is not None and (k < 0 or k != int(k)):
      raise ValueError(f"top_k={k} is not accepted: an int >= 0 (0: off)")
    if p is not None and not 0 < p <= 1:
      raise ValueError(f"top_p={p} is not accepted: a number in (0, 1]")

  @property
  def greedy(self) -> bool:
    """The greedy program: the temperature is the number 0. An array temperature
    gives False (the sampling program, which is greedy where its value is <= 0)."""
    t = _number(self.temperature)
    return t is not None and t == 0

  @property
  def fixed(self) -> bool:
    """Every value is a number (known when the code is traced)."""
    return all(_number(v) is not None for v in (self.temperature, self.top_k, self.top_p))

  def traced(self) -> "Sampling":
    """The values as scalar arrays (float32, int32, float32), the form the decode loops
    take as an argument: a new value is a new argument, not a new program. Numbers
    become numpy scalars (host values, replicated by jit on any mesh), arrays keep
    their place (a tracer stays one)."""
    out = {}
    for name, dtype in (("temperature", jnp.float32), ("top_k", jnp.int32),
                        ("top_p", jnp.float32)):
      v = getattr(self, name)
      if jnp.ndim(v) != 0:
        raise ValueError(f"{name} must be a scalar (one value for the batch); got shape "
                         f"{jnp.shape(v)}")
      out[name] = (np.asarray(v, dtype) if _number(v) is not None else
                   jnp.asarray(v, dtype))
    return Sampling(**out)


def greedy_now(s: Sampling):
  """Whether tokens are the argmax: a Python bool where the temperature is a number,
  else a traced bool (temperature <= 0)."""
  t = _number(s.temperature)
  return t == 0 if t is not None else jnp.asarray(s.temperature) <= 0


def _filter(logits, top_k, top_p):
  """top-k then top-p on (..., V) float32 logits from one sort; None: that filter off.
  top_k / top_p may be numbers or scalar arrays (see the module docstring)."""
  V = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  if top_k is not None:   # the k-th largest value; k off: the smallest (nothing masked)
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V).astype(jnp.int32)
    kth = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1, keepdims=True)
    logits = jnp.where(logits < kth, NEG_INF, logits)
    sorted_desc = jnp.where(sorted_desc < kth, NEG_INF, sorted_desc)   # still sorted
  if top_p is not None:
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the
    # mass strictly before it is below top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    cutoff = jnp.where(top_p < 1.0, cutoff, -jnp.inf)   # top_p >= 1: nothing cut
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def process_logits(logits_xV: jax.Array, s: Sampling) -> jax.Array:
  """The log-probabilities of the distribution tokens are drawn from: (..., V)."""
  logits = logits_xV.astype(jnp.float32)
  if s.greedy:
    return jax.nn.log_softmax(logits, axis=-1)
  V = logits.shape[-1]
  if s.fixed:
    t, k, p = _number(s.temperature), _number(s.top_k), _number(s.top_p)
    logits = logits / t
    if 0 < k < V or p < 1.0:
      logits = _filter(logits, k if 0 < k < V else None, p if p < 1.0 else None)
    return jax.nn.log_softmax(logits, axis=-1)
  s = s.traced()
  t, k, p = s.temperature, s.top_k, s.top_p
  greedy = t <= 0                     # the model's own distribution, as greedy's
  logits = logits / jnp.where(greedy, 1.0, t)
  on = ~greedy & (((k > 0) & (k < V)) | (p < 1.0))
  logits = jax.lax.cond(on, lambda x: _filter(x, k, p), lambda x: x, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def sample(key: jax.Array, logits_BxV: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row. Returns (tokens (B,) int32, logprobs (B,) float32)."""
  logp_BxV = process_logits(logits_BxV, s)
  if s.greedy:
    tok_B = jnp.argmax(logits_BxV, axis=-1)
  else:
    tok_B = jax.random.categorical(key, logp_BxV, axis=-1)
    if not s.fixed:   # a traced temperature <= 0: greedy
      tok_B = jnp.where(greedy_now(s), jnp.argmax(logits_BxV, axis=-1), tok_B)
  tok_B = tok_B.astype(jnp.int32)
  return tok_B, jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]


def logprobs_of(logits_xV: jax.Array, tokens_x: jax.Array, s: Sampling) -> jax.Array:
  """Teacher-forced: the log-probability of `tokens` under the sampling distribution."""
  logp = process_logits(logits_xV, s)
  return jnp.take_along_axis(logp, tokens_x[..., None].astype(jnp.int32), axis=-1)[..., 0]
