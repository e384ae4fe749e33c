"""model.attention: the fused kernels against a float64 reference, forward and
gradient; the choice `auto` makes; the teacher-forced model's wiring; and float32
accumulation of the attention scores and the logits under a bfloat16 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.model import api, attention, layers
from mtcot_jax.model.attention import CausalSegments
from conftest import TINY

U32 = 2.0 ** -24                    # float32's unit roundoff
B, T, H, K, Dh = 2, 128, 4, 2, 8    # T: splash tiles are multiples of 128; K < H (GQA)
G = H // K


def _inputs(packed: bool):
  """q (already scaled), k, v, the output cotangent g, and segment ids (two packed
  sequences in row 0, one in row 1; None unpacked)."""
  ks = jax.random.split(jax.random.key(0), 4)
  q, g = (jax.random.normal(k, (B, T, H, Dh), jnp.float32) for k in (ks[0], ks[3]))
  k, v = (jax.random.normal(kk, (B, T, K, Dh), jnp.float32) for kk in ks[1:3])
  seg = jnp.asarray([[1] * 77 + [2] * 51, [1] * T], jnp.int32) if packed else None
  return q, k, v, g, seg


def _reference(q, k, v, g, seg):
  """float64 attention and its gradient for the loss sum(g * out), by hand, with
  the magnitudes that bound float32 rounding: each quantity recomputed from the
  inputs' absolute values (a running-error bound). Query head h reads kv head h // G."""
  q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
  kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)           # (B, T, H, Dh)
  idx = np.arange(T)
  allowed = np.broadcast_to(idx[:, None] >= idx[None, :], (B, 1, T, T))
  if seg is not None:
    seg = np.asarray(seg)
    allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
  s = np.where(allowed, np.einsum("bthd,bshd->bhts", q, kk), -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", p, vv)
  dp = np.einsum("bthd,bshd->bhts", g, vv)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  group = lambda x: x.reshape(B, T, K, G, Dh).sum(3)  # noqa: E731  (B, T, H, Dh) -> (B, T, K, Dh)
  exact = (out, np.einsum("bhts,bshd->bthd", ds, kk), group(np.einsum("bhts,bthd->bshd", ds, q)),
           group(np.einsum("bhts,bthd->bshd", p, g)))
  aq, ak, av, ag = np.abs(q), np.abs(kk), np.abs(vv), np.abs(g)
  a_dp = np.einsum("bthd,bshd->bhts", ag, av)
  a_ds = p * (a_dp + (p * a_dp).sum(-1, keepdims=True))
  mags = (np.einsum("bhts,bshd->bthd", p, av), np.einsum("bhts,bshd->bthd", a_ds, ak),
          group(np.einsum("bhts,bthd->bshd", a_ds, aq)), group(np.einsum("bhts,bthd->bshd", p, ag)))
  s_abs = np.where(allowed, np.einsum("bthd,bshd->bhts", aq, ak), 0).max()
  return exact, mags, s_abs


def _bounds(mags, s_abs):
  """First-order float32 bounds, any summation order (so the online softmax of
  the flash kernels too). A Dh-term score dot errs by <= Dh u sum|q||k| <= Dh u
  s_abs; exp(s - max) turns that, from s and from the max, into a relative error
  of each probability, plus exp's, the subtraction's, the division's few ulps and
  the T-term normaliser: eps_p = 2 Dh u s_abs + (T + 8) u. Every later sum has at
  most T (keys), Dh or G (grouped kv heads) terms: eps = eps_p + (T + Dh + G) u.
  out = sum p v and dv = sum p g then err by eps times their |.|-magnitude. In dq
  and dk four stages each add at most eps times the magnitude: dp = g.v (Dh u),
  D = sum p dp (eps), ds = p (dp - D) (p's eps_p) and the final T-term sum (T u):
  4 eps times theirs, |ds| measured as p (|g||v| + sum p |g||v|)."""
  eps = 2 * Dh * U32 * s_abs + (T + 8) * U32 + (T + Dh + G) * U32
  return tuple(f * eps * m for f, m in zip((1, 4, 4, 1), mags))


def _einsum_path(q, k, v, mask):
  """Today's path (`Attention.attend`), on (B, T, H, Dh) queries."""
  out = layers.attention_einsum(q.reshape(B, T, K, G, Dh), k, v,
                                jnp.broadcast_to(mask.dense(T), (B, T, T)), "bskd", "bskd")
  return out.reshape(B, T, H, Dh)


IMPLEMENTATIONS = {
    "einsum": _einsum_path,
    # cudnn's exact arguments, run by jax.nn.dot_product_attention's XLA path.
    "dot_product_attention": lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, "xla"),
    "splash_interpret": lambda q, k, v, m: attention.fused_attention("splash_interpret", q, k, v,
                                                                     m),
}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_segment"])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_attention_and_gradient_match_float64(name, packed):
  q, k, v, g, seg = _inputs(packed)
  fn = IMPLEMENTATIONS[name]

  @jax.jit
  def forward_backward(q, k, v, g, seg):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, CausalSegments(seg)), q, k, v)
    return (out, *vjp(g))

  got = forward_backward(q, k, v, g, seg)
  exact, mags, s_abs = _reference(q, k, v, g, seg)
  for what, x, want, bound in zip(("out", "dq", "dk", "dv"), got, exact, _bounds(mags, s_abs)):
    err = np.abs(np.asarray(x, np.float64) - want)
    assert np.all(err <= bound), (what, float(err.max()), float(bound.max()),
                                  float((err / np.maximum(bound, 1e-30)).max()))


def test_resolve_attention_by_platform_dtype_and_length():
  def model(**kw):
    return mt.load_config(None, TINY + [f"model.{k}={v}" for k, v in kw.items()]).model
  bf16 = model(dtype="bfloat16")                      # head dim 32 / 4 = 8
  assert attention.resolve_attention(bf16, "gpu", 100) == "cudnn"
  assert attention.resolve_attention(model(), "gpu", 128) == "xla"      # float32: no cuDNN
  assert attention.resolve_attention(model(dtype="bfloat16", head_dim=12), "gpu", 128) == "xla"
  assert attention.resolve_attention(bf16, "tpu", 256) == "splash"
  assert attention.resolve_attention(bf16, "tpu", 100) == "xla"         # splash tiles: 128
  assert attention.resolve_attention(bf16, "cpu", 128) == "xla"
  assert attention.resolve_attention(model(attention="xla"), "gpu", 128) == "xla"
  assert attention.resolve_attention(model(attention="splash"), "tpu", 128) == "splash"
  assert attention.resolve_attention(model(attention="splash"), "cpu", 128) == "splash_interpret"
  with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU.*'cpu'"):
    attention.resolve_attention(model(attention="cudnn", dtype="bfloat16"), "cpu", 128)
  with pytest.raises(ValueError, match="multiple of 128; got 100"):
    attention.resolve_attention(model(attention="splash"), "tpu", 100)


def test_bad_attention_values_fail_at_load():
  with pytest.raises(mt.ConfigError, match=r"model.attention='flash'.*'auto', 'xla', 'cudnn'"):
    mt.load_config(None, ["model.attention=flash"])
  with pytest.raises(mt.ConfigError, match=r"model.attention='cudnn'.*model.dtype='float32'"):
    mt.load_config(None, ["model.attention=cudnn"])
  with pytest.raises(mt.ConfigError, match=r"model.attention='cudnn'.*head dim 12"):
    mt.load_config(None, ["model.attention=cudnn", "model.dtype=bfloat16", "model.head_dim=12"])


def _packed_batch(cfg):
  """(B, T) tokens, positions restarting in each segment, and segment ids."""
  tokens = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.model.vocab_size)
  seg = jnp.asarray([[1] * 77 + [2] * 51, [1] * T], jnp.int32)
  pos = jnp.asarray([list(range(77)) + list(range(51)), list(range(T))], jnp.int32)
  return tokens, pos, seg


def test_model_hands_the_kernel_what_the_xla_path_attends_with(monkeypatch):
  """Wiring: with model.attention=splash every main block calls the resolved kernel
  (the interpreter here) with the queries, keys, values and packing the einsum path
  uses, and uses its output as that path does. The kernel itself is replaced by the
  einsum path on its arguments, so the logits must be the xla model's bit for bit
  (its equivalence is `test_attention_and_gradient_match_float64`'s)."""
  cfg_x = mt.load_config(None, TINY + ["model.attention=xla", "model.scan_layers=true"])
  cfg_s = cfg_x.replace(model={"attention": "splash"})
  params = api.init_params(cfg_x, jax.random.key(0))
  tokens, pos, seg = _packed_batch(cfg_x)
  calls = []

  def einsum_kernel(implementation, q_BxTxHxDh, k, v, mask, shard):
    calls.append(implementation)
    Bq, Tq, Hq, D = q_BxTxHxDh.shape
    out = layers.attention_einsum(q_BxTxHxDh.reshape(Bq, Tq, k.shape[2], -1, D), k, v,
                                  jnp.broadcast_to(mask.dense(Tq), (Bq, Tq, Tq)), "bskd", "bskd")
    return out.reshape(Bq, Tq, Hq, D)

  monkeypatch.setattr(layers, "fused_attention", einsum_kernel)
  logits = {c.model.attention: jax.jit(lambda p, c=c: api.apply(
      c, p, tokens, positions=pos, segment_ids=seg, with_head=False).logits)(params)
      for c in (cfg_x, cfg_s)}
  assert calls and set(calls) == {"splash_interpret"}   # nn.scan may trace its block twice
  np.testing.assert_array_equal(logits["splash"], logits["xla"])


def test_splash_runs_in_a_scanned_rematerialised_model_and_its_gradient():
  """The real kernel (interpreted) composes with nn.scan, remat and grad: the
  program holds Pallas calls, and the loss and gradients come out finite."""
  cfg = mt.load_config(None, TINY + ["model.attention=splash", "model.scan_layers=true",
                                     "model.remat=full"])
  params = api.init_params(cfg, jax.random.key(0))
  tokens, pos, seg = _packed_batch(cfg)

  def loss(p):
    return jnp.mean(api.apply(cfg, p, tokens, positions=pos, segment_ids=seg,
                              with_head=False).logits ** 2)

  assert "pallas_call" in str(jax.make_jaxpr(jax.grad(loss))(params))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


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
  cfg = mt.load_config(None, TINY + ["model.dtype=bfloat16", "model.attention=xla",
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
