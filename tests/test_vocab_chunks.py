"""train.vocab_chunks: the chunked cross-entropy against a float64 reference, the
SFT loss, metrics and gradients with chunks against one chunk, the compiled
step's memory, and the config check.

Tolerances are float32 error bounds computed from the arrays (u = 2^-24, the
unit roundoff; gamma(m) = m u / (1 - m u) bounds a sum of m products in any
order):
  logit      E = gamma(D) max_j sum_i |h_i| |W_ij|              (each row)
  lse        E (lse is 1-Lipschitz in the logits) + the evaluation of
             m + log(s): every term exp(l - m) is off by EXP + u R (XLA's exp;
             the rounding of its argument, R the logits' range) once, and by as
             much again for each of the n - 1 rescalings exp(m_old - m_new) it
             goes through; the chunk's sum of Vc terms and the n carried
             multiply-adds add gamma(Vc + 2n) relative; the log adds LOG
             relative to |log s| = |lse - m| and the final add u |lse|.
  target's logit  E (the chunk sums add exact zeros to it).
  softmax in the backward pass, relative: the logit's E, lse's bound, the
             term's exp and rescalings again, and 4 roundings (1/s, the
             product, the cotangent, the one-hot's subtraction).
EXP and LOG are XLA:CPU's float32 exp and log, which are accurate to about an
ulp; we allow 4 ulp each. Sums of the gradient's rows add gamma(rows) or
gamma(V + n) of the sum of absolute values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtcot_jax as mt
from mtcot_jax.model import api
from mtcot_jax.tools import memory
from mtcot_jax.train import losses
from mtcot_jax.train.chunked_ce import chunked_stats
from conftest import TINY
from test_train import _batch

U = 2.0 ** -24
EXP = LOG = 4 * U


def gamma(m):
  return m * U / (1 - m * U)


def _reference(h_NxD, w_DxV):
  """float64 logits, log-sum-exp and softmax."""
  l_NxV = h_NxD @ w_DxV
  m_N = l_NxV.max(-1)
  lse_N = m_N + np.log(np.exp(l_NxV - m_N[:, None]).sum(-1))
  return l_NxV, lse_N, np.exp(l_NxV - lse_N[:, None])


def _bounds(h_NxD, w_DxV, n):
  """Per row (E, lse bound, softmax relative bound) of n chunks against exact."""
  D, V = w_DxV.shape
  l_NxV, lse_N, _ = _reference(h_NxD, w_DxV)
  E = gamma(D) * (np.abs(h_NxD) @ np.abs(w_DxV)).max(-1)
  m_N = l_NxV.max(-1)
  R = m_N - l_NxV.min(-1) + 2 * E
  term = n * (EXP + U * R)
  lse = E + term + gamma(-(-V // n) + 2 * n) + LOG * np.abs(lse_N - m_N) + U * np.abs(lse_N)
  return E, lse, E + lse + term + 4 * U


@pytest.mark.parametrize("V,n", [(100, 3), (96, 4)])
def test_chunked_stats_match_float64(V, n):
  """lse, the target's logit, the argmax and the gradients of sum(a * ce) with
  respect to h and the unembedding, a remainder chunk (100 = 3 x 34 - 2) or not."""
  rng = np.random.default_rng(V)
  D = 16
  h = rng.normal(size=(3, 5, D)).astype(np.float32)
  w = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
  t = rng.integers(0, V, (3, 5)).astype(np.int32)
  a = rng.uniform(size=(3, 5)).astype(np.float32)

  def loss(h, w):
    st = chunked_stats(h, w, t, n)
    return jnp.sum(a * st.ce), st

  (_, st), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
  h64, w64, t, a = h.reshape(15, D).astype(np.float64), w.astype(np.float64), t.ravel(), a.ravel()
  l, lse, p = _reference(h64, w64)
  E, lse_err, rho = _bounds(h64, w64, n)
  rows = np.arange(15)
  assert np.all(np.abs(np.asarray(st.lse).ravel() - lse) <= lse_err)
  assert np.all(np.abs(np.asarray(st.picked).ravel() - l[rows, t]) <= E)
  top2 = np.sort(l, -1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] > 2 * E)           # so the argmax is decided
  np.testing.assert_array_equal(np.asarray(st.argmax).ravel(), l.argmax(-1))

  onehot = np.eye(V)[t]
  g = a[:, None] * (p - onehot)                               # d loss / d logits
  dg = a[:, None] * (p * rho[:, None] + U * onehot)           # its bound
  dw_err = np.abs(h64).T @ dg + gamma(15) * np.abs(h64).T @ np.abs(g)
  dh_err = dg @ np.abs(w64).T + gamma(V + n) * np.abs(g) @ np.abs(w64).T
  assert np.all(np.abs(np.asarray(dw, np.float64) - h64.T @ g) <= dw_err)
  assert np.all(np.abs(np.asarray(dh, np.float64).reshape(15, D) - g @ w64.T) <= dh_err)


def test_chunked_stats_bfloat16_accumulate_in_float32():
  """bf16 h and W: the products are exact in float32 (8-bit significands), so the
  float32 bounds hold; an accumulation in bf16 would be off by ~2^-9 of the terms."""
  rng = np.random.default_rng(1)
  D, V, n = 64, 50, 4
  h = rng.normal(size=(2, 6, D)).astype(np.float32)
  w = (0.5 * rng.normal(size=(D, V))).astype(np.float32)
  t = rng.integers(0, V, (2, 6)).astype(np.int32)
  st = jax.jit(lambda h, w: chunked_stats(h, w, t, n, jnp.bfloat16))(h, w)
  bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # noqa: E731
  h64, w64 = bf(h).reshape(12, D), bf(w)
  l, lse, _ = _reference(h64, w64)
  E, lse_err, _ = _bounds(h64, w64, n)
  assert np.all(np.abs(np.asarray(st.lse).ravel() - lse) <= lse_err)
  assert np.all(np.abs(np.asarray(st.picked).ravel() - l[np.arange(12), t.ravel()]) <= E)


def test_chunked_argmax_ties_take_the_first_id():
  """Exact ties (integer logits) across chunks: the smallest id, as jnp.argmax,
  whichever chunk the scan reaches first (chunk c holds ids c, c + n, ...)."""
  h = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  w = np.zeros((2, 12), np.float32)
  w[0, [6, 3, 9]] = 5.0       # row 0: ids 3 (chunk 3), 6 (chunk 2), 9 (chunk 1)
  w[1, [4, 1]] = 5.0          # row 1: ids 1 (chunk 1), 4 (chunk 0)
  st = chunked_stats(h, w, np.zeros(2, np.int32), 4)
  np.testing.assert_array_equal(np.asarray(st.argmax), [3, 1])
  np.testing.assert_array_equal(np.asarray(st.argmax), np.argmax(h @ w, -1))


def _sft_cfg(n):
  # 67 tokens in 3 chunks of 23 (the last one 2 short).
  return mt.load_config(None, TINY + ["model.vocab_size=67", "model.num_layers=1", "head.k=2",
                                      f"train.vocab_chunks={n}"])


def test_sft_loss_metrics_and_gradients_match_one_chunk():
  cfg1, cfg3 = _sft_cfg(1), _sft_cfg(3)
  params = mt.init_params(cfg1, jax.random.key(0))
  b = jax.tree.map(jnp.asarray, _batch(cfg1))
  total = losses.counts(cfg1, b)
  run = lambda cfg: jax.jit(jax.value_and_grad(   # noqa: E731
      lambda p: losses.loss_and_metrics(cfg, p, b, total), has_aux=True))(params)
  (l1, s1), g1 = run(cfg1)
  (l3, s3), g3 = run(cfg3)

  # Bounds from the rows the loss reduces: the main model's final hidden states
  # and each depth's head features, through the same unembedding (both programs
  # compute them by the same operations).
  out = jax.jit(lambda p: api.apply(cfg1, p, b["inputs"], positions=b["positions"],
                                    segment_ids=b["segment_ids"]))(params)
  w = np.asarray(api.unembed_matrix(cfg1, params), np.float64)
  h = np.asarray(api.final_hidden(cfg1, params, out.residual), np.float64).reshape(-1, 32)
  mask = np.asarray(b["cot_mask"] + b["answer_mask"]).ravel()
  head_mask = np.asarray(losses.head_target_mask(b, 2))
  groups = [(h, mask, "main_loss", None)] + [
      (np.asarray(out.head_features[:, :, j], np.float64).reshape(-1, 32),
       head_mask[..., j].ravel(), "head_loss", j) for j in range(2)]
  loss_tol, rho = 0.0, 0.0
  for rows, m, name, j in groups:
    (E1, lse1, rho1), (E3, lse3, rho3) = _bounds(rows, w, 1), _bounds(rows, w, 3)
    _, lse, _ = _reference(rows, w)
    ce_tol = m @ (E1 + lse1 + E3 + lse3) + 2 * gamma(len(m)) * m @ np.abs(lse)
    got, want = (s3[name], s1[name]) if j is None else (s3[name][j], s1[name][j])
    assert abs(float(got) - float(want)) <= ce_tol, (name, j)
    count = float(total.main) if j is None else float(total.head[j])
    weight = 1.0 if j is None else cfg1.head.loss_weight / 2
    loss_tol += weight * ce_tol / max(count, 1.0)
    rho = max(rho, float(np.max(rho1 + rho3)))
  assert abs(float(l3) - float(l1)) <= loss_tol
  for name in ("main_acc", "head_acc", "head_accept"):
    np.testing.assert_array_equal(np.asarray(s3[name]), np.asarray(s1[name]))
  # The gradients: the cotangent entering the network at h, the features and W is
  # within rho (relative) of one chunk's, plus the sums over rows and ids; the
  # network's backward pass is linear in it, and at initialisation (one layer,
  # unit-scale norms) it carries a relative error to each parameter at about that
  # size relative to the parameter's gradient (an assumption, not a bound: a bug
  # here, a lost or doubled path, is an O(1) relative error).
  grad_rho = rho + 2 * (gamma(h.shape[0]) + gamma(67 + 3))
  for (path, a), (_, c) in zip(jax.tree_util.tree_leaves_with_path(g3),
                               jax.tree_util.tree_leaves_with_path(g1)):
    a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
    assert np.max(np.abs(a - c)) <= grad_rho * np.max(np.abs(c)), jax.tree_util.keystr(path)


def test_step_memory_smaller_with_chunks():
  """The compiled SFT step's temporaries (XLA's memory_analysis, no run): one
  chunk holds at least the (B, T, V) float32 logits; 8 chunks hold instead at
  most 3 (B, T, V/8) float32 buffers (a chunk's logits, their exponentials and
  cotangent) and 3 (D, V) float32 copies of the unembedding (chunk layout, its
  gradient, the padded matrix)."""
  over = TINY + ["model.vocab_size=8192", "model.num_layers=1", "head.k=1",
                 "train.batch_size=4", "data.seq_len=64"]
  one = memory.step_memory(mt.load_config(None, over))
  eight = memory.step_memory(mt.load_config(None, over + ["train.vocab_chunks=8"]))
  B, T, V, D = 4, 64, 8192, 32
  logits = B * T * V * 4
  assert one["argument"] == eight["argument"]
  assert one["temp"] - eight["temp"] >= logits - 3 * logits // 8 - 3 * D * V * 4, (one, eight)


@pytest.mark.parametrize("n", [0, 65])
def test_vocab_chunks_checked(n):
  with pytest.raises(mt.ConfigError, match=r"train\.vocab_chunks=.*model\.vocab_size=64"):
    mt.load_config(None, TINY + [f"train.vocab_chunks={n}"])
