"""Float32 accumulation of the attention scores and the logits under a bfloat16 model."""

import jax
import jax.numpy as jnp
import numpy as np

import mtcot_jax as mt
from mtcot_jax.model import api
from conftest import TINY

U32 = 2.0 ** -24                    # float32's unit roundoff
B, K, G = 2, 2, 2                   # TINY: 4 query heads over 2 kv heads


def _dot_generals(jaxpr):
  """Every dot_general in a jaxpr and the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _dot_generals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _dot_generals(sub)


def test_bfloat16_model_accumulates_scores_and_logits_in_float32():
  """In a bfloat16 model the dots that make the (B, K, G, T, T) attention scores and
  the (B, T, V) logits take bfloat16 operands and return float32
  (preferred_element_type): never a bfloat16 result cast up afterwards."""
  cfg = mt.load_config(None, TINY + ["model.dtype=bfloat16",
                                     "model.vocab_size=96"])   # V unlike the MLP's 64
  params = jax.eval_shape(lambda: api.init_params(cfg, jax.random.key(0)))
  Tq, V = 16, cfg.model.vocab_size
  tokens = jax.ShapeDtypeStruct((B, Tq), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p, t: api.apply(cfg, p, t, with_head=False).logits)(params, tokens)
  by_shape = {}
  for eqn in _dot_generals(jaxpr.jaxpr):    # einsum's dots put the axes in their own order
    by_shape.setdefault(tuple(sorted(eqn.outvars[0].aval.shape)), []).append(eqn)
  scores = by_shape[tuple(sorted((B, K, G, Tq, Tq)))]
  logits = by_shape[tuple(sorted((B, Tq, V)))]
  assert len(scores) == cfg.model.num_layers and len(logits) == 1
  for eqn in scores + logits:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    assert eqn.params["preferred_element_type"] == jnp.float32, eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_bfloat16_head_logits_are_float32_sums_of_the_bfloat16_products():
  """`head_logits` in a bfloat16 model: each logit is the float32-accumulated sum
  of D products of bfloat16 values (exact in float32), so it errs from the float64
  sum by at most D u32 sum|f||w| (the sum's D roundings). A bfloat16 result would
  err by up to half a bfloat16 ulp, 2^-9 relative: far more, as checked."""
  cfg = mt.load_config(None, TINY + ["model.dtype=bfloat16"])
  D, V = cfg.model.d_model, cfg.model.vocab_size
  embed = jax.random.normal(jax.random.key(2), (V, D), jnp.float32)
  feats = jax.random.normal(jax.random.key(3), (B, 5, D), jnp.float32)
  got = api.head_logits(cfg, {"main": {"embed": embed}}, feats)
  assert got.dtype == jnp.float32
  f64 = lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
  exact = f64(feats) @ f64(embed).T
  bound = D * U32 * (np.abs(f64(feats)) @ np.abs(f64(embed)).T)
  assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= bound)
  as_bf16 = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
  assert np.any(np.abs(as_bf16 - exact) > bound)
