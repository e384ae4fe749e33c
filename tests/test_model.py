"""The main transformer and the head: causality, cached = teacher-forced, head modes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.model import api

B, T = 3, 12


def _tokens(cfg, seed=1, shape=(B, T)):
  return jax.random.randint(jax.random.key(seed), shape, 1, cfg.model.vocab_size)


def _rows_jacobian(f, *args):
  """d f(*args)[i] / d args[-1] for every output i: f returns one value per
  output row, and one jitted jacrev (a VJP per row, vmapped) gives them all in a
  single compile. The perturbation is the last argument (the first ones, the
  parameters, stay arguments rather than constants baked into the program)."""
  return np.asarray(jax.jit(jax.jacrev(f, argnums=len(args) - 1))(*args))


def test_main_causality(tiny_cfg, tiny_params):
  """d logits[t] / d embedding[u] is exactly zero for u > t (and nonzero for u <= t),
  at every position t."""
  tokens = _tokens(tiny_cfg, shape=(1, 8))
  module = api.main_module(tiny_cfg)

  def per_position(params, z):   # (8,): position t's logits and residual, summed
    out = module.apply({"params": params, "perturbations": {"embeddings": z}}, tokens)
    return out.logits[0].sum(-1) + out.residual[0].sum(-1)

  z = jnp.zeros((1, 8, tiny_cfg.model.d_model))
  jac = _rows_jacobian(per_position, tiny_params["main"], z)[:, 0]   # (t, u, D)
  for t in range(8):
    g = jac[t]
    assert np.all(g[t + 1:] == 0.0), f"position {t} sees the future"
    assert np.all(np.abs(g[: t + 1]).sum(-1) > 0), f"position {t} ignores its past"


def test_head_chain_causality_and_residual_channel(tiny_cfg, tiny_params):
  """Head depth j depends on chain tokens 1..j only, and on the main model's
  inputs only up to its source position (the past arrives through r_t alone)."""
  k = tiny_cfg.head.k
  tokens = _tokens(tiny_cfg, shape=(1, 8))
  chain = api.chain_tokens(tokens, jnp.arange(8)[None], k)
  out = mt.forward(tiny_cfg, tiny_params, tokens)
  head = api.head_module(tiny_cfg)

  def per_depth(params, zc):   # (k,): each depth's features at source position 4
    f = head.apply({"params": params["head"], "perturbations": {"chain_embeddings": zc}},
                   out.sources, chain, params["main"]["embed"])
    return f[0, 4].sum(-1)

  zc = jnp.zeros((8, k, tiny_cfg.model.d_model))
  jac = _rows_jacobian(per_depth, tiny_params, zc)      # (j, source, chain slot, D)
  for j in range(k):
    g = jac[j, 4]   # the chain at source position 4
    assert np.all(g[j + 1:] == 0.0), f"head depth {j + 1} sees later chain tokens"
    assert np.all(np.abs(g[: j + 1]).sum(-1) > 0)

  main = api.main_module(tiny_cfg)

  def per_source(params, z):   # (8,): the head's features at each source position
    mo = main.apply({"params": params["main"], "perturbations": {"embeddings": z}}, tokens)
    f = api.run_head(tiny_cfg, params, mo.sources, chain)
    return f[0].sum((-2, -1))

  z = jnp.zeros((1, 8, tiny_cfg.model.d_model))
  jac = _rows_jacobian(per_source, tiny_params, z)[:, 0]   # (t, u, D)
  for t in range(8):
    g = jac[t]
    assert np.all(g[t + 1:] == 0.0), "the head reads main activations past its source"
    assert np.abs(g[t]).sum() > 0


def _cached_run(cfg, params, tokens, prompt_lens, total_lens, block):
  """Feeds each sequence its prompt in one call, then up to `block` tokens per call
  (ragged: each sequence its own count), collecting every real position's outputs."""
  cache = mt.KVCache.empty(cfg.model, B, capacity=T + block)
  step = jax.jit(lambda p, c, t, n: api.extend(cfg, p, c, t, n))
  got = {name: np.zeros((B, T, dim), np.float32) for name, dim in
         (("logits", cfg.model.vocab_size), ("residual", cfg.model.d_model),
          ("source0", cfg.model.d_model))}
  pos, total = np.zeros(B, int), np.asarray(total_lens)
  n, width = np.asarray(prompt_lens), max(prompt_lens)
  while np.any(pos < total):
    toks = np.zeros((B, width), np.int32)
    for b in range(B):
      toks[b, : n[b]] = tokens[b, pos[b]: pos[b] + n[b]]
    out = step(params, cache, jnp.asarray(toks), jnp.asarray(n, jnp.int32))
    cache = out.cache
    for b in range(B):
      got["logits"][b, pos[b]: pos[b] + n[b]] = out.logits[b, : n[b]]
      got["residual"][b, pos[b]: pos[b] + n[b]] = out.residual[b, : n[b]]
      got["source0"][b, pos[b]: pos[b] + n[b]] = out.sources[0][b, : n[b]]
    pos += n
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    n, width = np.minimum(block, total - pos), block
  return got


def test_cached_equals_teacher_forced(tiny_cfg, tiny_params):
  tokens = np.asarray(_tokens(tiny_cfg))
  ref = mt.forward(tiny_cfg, tiny_params, tokens, with_head=False)
  prompt_lens, total_lens = [2, 5, 3], [12, 9, 11]
  for block in (1, 3, tiny_cfg.head.k + 1):
    got = _cached_run(tiny_cfg, tiny_params, tokens, prompt_lens, total_lens, block)
    want = {"logits": ref.logits, "residual": ref.residual, "source0": ref.sources[0]}
    for name in got:
      for b in range(B):
        L = total_lens[b]
        np.testing.assert_allclose(got[name][b, :L], want[name][b, :L], atol=1e-5, rtol=1e-5,
                                   err_msg=f"{name}, block {block}, sequence {b}")


def test_cache_overflow_raises(tiny_cfg, tiny_params):
  cache = mt.KVCache.empty(tiny_cfg.model, 1, capacity=4)
  cache = cache.replace(lengths=jnp.array([3], jnp.int32))
  try:
    api.extend(tiny_cfg, tiny_params, cache, jnp.ones((1, 2), jnp.int32))
  except ValueError as e:
    assert "capacity is 4" in str(e)
  else:
    raise AssertionError("overflow not detected")


def test_cache_never_writes_out_of_bounds(tiny_cfg, tiny_params):
  """Inside jit (no host check) slots past the capacity are dropped, not clamped."""
  cache = mt.KVCache.empty(tiny_cfg.model, 1, capacity=4)
  first = jax.jit(lambda c, t: api.extend(tiny_cfg, tiny_params, c, t))(
      cache, jnp.array([[5, 6, 7]], jnp.int32)).cache
  over = jax.jit(lambda c, t: api.extend(tiny_cfg, tiny_params, c, t))(
      first, jnp.array([[8, 9, 10]], jnp.int32)).cache
  vals_over, vals_first = np.stack(over.v), np.stack(first.v)             # (L, B, K, Dh, S)
  np.testing.assert_array_equal(vals_over[..., :3], vals_first[..., :3])  # history intact
  assert not np.array_equal(vals_over[..., 3], vals_first[..., 3])        # slot 3 written
  keys_over, keys_first = np.stack(over.k), np.stack(first.k)             # (L, B, K, S, Dh)
  np.testing.assert_array_equal(keys_over[..., :3, :], keys_first[..., :3, :])
  assert not np.array_equal(keys_over[..., 3, :], keys_first[..., 3, :])


def test_head_decode_mode_equals_training_mode(tiny_cfg, tiny_params):
  """Chains run from one residual per sequence give the same logits as the
  (B, T, k) training-mode batch at that source position."""
  tokens = _tokens(tiny_cfg)
  out = mt.forward(tiny_cfg, tiny_params, tokens)
  k = tiny_cfg.head.k
  run_head = jax.jit(api.run_head, static_argnums=0)          # one compile per chain length
  head_logits = jax.jit(mt.head_logits, static_argnums=0)
  for t in (0, 4, 9):
    sources = tuple(s[:, t] for s in out.sources)
    chain = api.chain_tokens(tokens, jnp.full((B, 1), t), k)[:, 0]
    feats = run_head(tiny_cfg, tiny_params, sources, chain)               # (B, k, D)
    got = head_logits(tiny_cfg, tiny_params, feats)
    want = head_logits(tiny_cfg, tiny_params, out.head_features[:, t])
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    # A shorter chain (decode step j) gives the same first depths.
    short = run_head(tiny_cfg, tiny_params, sources, chain[:, :2])
    chex.assert_trees_all_close(short, feats[:, :2], atol=1e-5, rtol=1e-5)


def test_head_positions_subset(tiny_cfg, tiny_params):
  tokens = _tokens(tiny_cfg)
  full = mt.forward(tiny_cfg, tiny_params, tokens)
  pos = jnp.array([[1, 7], [0, 11], [5, 5]], jnp.int32)
  sub = mt.forward(tiny_cfg, tiny_params, tokens, head_positions=pos)
  want = full.head_features[jnp.arange(B)[:, None], pos]
  chex.assert_trees_all_close(sub.head_features, want, atol=1e-5, rtol=1e-5)


def _head_loss(cfg, params, tokens):
  out = api.apply(cfg, params, tokens)
  logits = mt.head_logits(cfg, params, out.head_features)       # tiny vocab: fine here
  return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


# Jitted: one compile per config instead of one per primitive (eager grad).
_head_loss_grad = jax.jit(jax.grad(_head_loss, argnums=1), static_argnums=0)


def test_stop_gradient_residual(tiny_cfg, tiny_params):
  tokens = _tokens(tiny_cfg)
  g_on = _head_loss_grad(tiny_cfg, tiny_params, tokens)
  assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_on["main"]))
  assert float(jnp.abs(g_on["main"]["layer_1"]["mlp"]["down"]).sum()) > 0
  cfg_sg = tiny_cfg.replace(head={"stop_gradient_residual": True})
  g_off = _head_loss_grad(cfg_sg, tiny_params, tokens)
  for path, leaf in jax.tree_util.tree_leaves_with_path(g_off["main"]):
    assert float(jnp.abs(leaf).sum()) == 0.0, jax.tree_util.keystr(path)
  assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g_off["head"]))


def test_bad_tokens_raise(tiny_cfg, tiny_params):
  for bad in (jnp.full((1, 3), tiny_cfg.model.vocab_size), jnp.full((1, 3), -1)):
    try:
      mt.forward(tiny_cfg, tiny_params, bad)
    except ValueError as e:
      assert "vocab_size=64" in str(e)
    else:
      raise AssertionError("out-of-vocabulary ids accepted")


def test_float64_reference_logits(tiny_cfg, tiny_params):
  """The forward matches an independent numpy float64 implementation."""
  tokens = np.asarray(_tokens(tiny_cfg, shape=(2, 6)))
  got = np.asarray(mt.forward(tiny_cfg, tiny_params, tokens, with_head=False).logits)
  np.testing.assert_allclose(got, _numpy_forward(tiny_cfg, tiny_params, tokens), atol=2e-5)


def _numpy_forward(cfg, params, tokens):
  m = cfg.model
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["main"])
  norm = lambda x, s: x / np.sqrt((x * x).mean(-1, keepdims=True) + m.norm_eps) * s  # noqa: E731
  Tn = tokens.shape[1]
  dh = m.dh
  inv = m.rope_theta ** (-np.arange(0, dh, 2) / dh)
  ang = np.arange(Tn)[:, None] * inv[None]

  def rot(x):  # (B, T, N, dh)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

  x = p["embed"][tokens]
  G = m.num_heads // m.num_kv_heads
  for i in range(m.num_layers):
    lp = p[f"layer_{i}"]
    h = norm(x, lp["attn_norm"]["scale"])
    q = rot(np.einsum("btd,dhk->bthk", h, lp["attn"]["q"]))
    k = np.repeat(rot(np.einsum("btd,dhk->bthk", h, lp["attn"]["k"])), G, axis=2)
    v = np.repeat(np.einsum("btd,dhk->bthk", h, lp["attn"]["v"]), G, axis=2)
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((Tn, Tn), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("bthk,hkd->btd", np.einsum("bhts,bshk->bthk", a, v), lp["attn"]["o"])
    h = norm(x, lp["mlp_norm"]["scale"])
    g = h @ lp["mlp"]["gate"]
    x = x + ((g / (1 + np.exp(-g))) * (h @ lp["mlp"]["up"])) @ lp["mlp"]["down"]
  return norm(x, p["final_norm"]["scale"]) @ p["embed"].T


@pytest.mark.parametrize("context", [-1, 2])
def test_context_head_causality(tiny_cfg, context):
  """The head with context: the chain at source t never reads a position > t (through
  the memory or the main model), depth j reads chain tokens 1..j only, and the
  window C reads the memory of positions t-C < u <= t and no earlier ones."""
  cfg = tiny_cfg.replace(head={"context": context})
  params = mt.init_params(cfg, jax.random.key(1))
  k = cfg.head.k
  tokens = _tokens(cfg, shape=(1, 8))
  main = api.main_module(cfg)
  pos = jnp.arange(8)[None]
  mask = api.context_mask(cfg, pos, 8)

  def first_depth(params, z):   # (8,): depth 1's features at each source position
    mo = main.apply({"params": params["main"], "perturbations": {"embeddings": z}}, tokens)
    f = api.head_module(cfg).apply(
        {"params": params["head"]}, mo.sources, api.chain_tokens(tokens, pos, k),
        params["main"]["embed"], pos, pos, mask)
    return f[0, :, 0].sum(-1)

  z = jnp.zeros((1, 8, cfg.model.d_model))
  jac = _rows_jacobian(first_depth, params, z)[:, 0]   # (t, u, D)
  for t in range(8):
    g = jac[t]
    assert np.all(g[t + 1:] == 0.0), "the head reads positions past its source"
    assert np.all(np.abs(g[: t + 1]).sum(-1) > 0)

  # Through the memory alone (the main model's outputs held fixed): the window.
  out = mt.forward(cfg, params, tokens)
  chain = api.chain_tokens(tokens, pos, k)

  def from_sources(params, dz):   # (k,): each depth's features at source 5
    src = tuple(s + dz for s in out.sources)
    f = api.head_module(cfg).apply({"params": params["head"]}, src, chain,
                                   params["main"]["embed"], pos, pos, mask)
    return f[0, 5].sum(-1)

  t = 5
  lo = t - context if context > 0 else -1
  jac = _rows_jacobian(from_sources, params, jnp.zeros_like(out.sources[0]))   # (j, 1, u, D)
  for j in range(k):
    g = np.abs(jac[j, 0]).sum(-1)
    assert np.all(g[t + 1:] == 0.0) and np.all(g[lo + 1: t + 1] > 0), (j, g)
    assert np.all(g[: lo + 1] == 0.0), f"the window {context} reads older memory"

  head = api.head_module(cfg)

  def chain_feat(params, zc):   # (k,): each depth's features at source 4
    f = head.apply({"params": params["head"], "perturbations": {"chain_embeddings": zc}},
                   out.sources, chain, params["main"]["embed"], pos, pos, mask)
    return f[0, 4].sum(-1)

  zc = jnp.zeros((1, 8, k, cfg.model.d_model))
  jac = _rows_jacobian(chain_feat, params, zc)   # (j, 1, source, chain slot, D)
  for j in range(k):
    g = jac[j, 0, 4]
    assert np.all(g[j + 1:] == 0.0), f"head depth {j + 1} sees later chain tokens"
    assert np.all(np.abs(g[: j + 1]).sum(-1) > 0)
