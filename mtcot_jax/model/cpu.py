"""The main model's CPU decode variants: the one place the model knows about XLA:CPU.

The model files (`layers.py`, `transformer.py`) are the accelerator code. Cached
decode passes run their blocks with `decode_parts(out_in)` instead:
- a one-token split of attention (`OneToken*`): on a CPU backend only, chosen by
  `jax.lax.platform_dependent` when XLA lowers for the platform;
- the `out_in` weight layout (`OutIn*`, `to_out_in`): every block product
  contracts the matrix's minor dimension, the layout XLA:CPU's mat-vecs read
  fastest (`decode.weights_layout=out_in`). Parameter files keep (in, out).
The history and the measurements behind both are in docs/cpu_decode.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtcot_jax.model.layers import Attention, SwiGLU, _param, attention_probs


def one_token_attention(q_BxKxGxDh, k_BxKxSxDh, v_BxKxDhxS, mask_Bx1xS):
  """One new token over the cache, as one mat-vec per query head of a group for
  the scores and one for the values (2 G per layer).

  The same arithmetic as `Attention.attend`, arranged for XLA:CPU: a dot whose
  free dimension on one side is 1 runs as XLA's own mat-vec, which streams the
  cache on every core; with the G queries of a group as that dimension (G > 1)
  XLA:CPU hands the dot to YNNPACK, which runs it on one core at a fixed cost of
  ~25 us a dot (docs/cpu_decode.md, third session). The group's keys and values
  are read G times, from the CPU's cache after the first; on an accelerator
  those reads would come from HBM, so there the general path runs.
  """
  G = q_BxKxGxDh.shape[2]
  logits_BxKxGxS = jnp.stack(
      [jnp.einsum("bkd,bksd->bks", q_BxKxGxDh[:, :, g], k_BxKxSxDh,
                  preferred_element_type=jnp.float32) for g in range(G)], axis=2)
  probs = attention_probs(logits_BxKxGxS, mask_Bx1xS[:, None], v_BxKxDhxS.dtype)
  return jnp.stack(
      [jnp.einsum("bks,bkds->bkd", probs[:, :, g], v_BxKxDhxS) for g in range(G)], axis=2)


class OneTokenAttention(Attention):
  """`Attention` whose cached one-token passes (G > 1) run `one_token_attention`
  when XLA compiles for a CPU, the general path on every other platform."""

  def attend(self, q_BxTxKxGxDh, keys, values, mask_BxTxS, kspec: str, vspec: str):
    general = lambda q, k, v, m: Attention.attend(self, q, k, v, m, kspec, vspec)  # noqa: E731
    T, G = q_BxTxKxGxDh.shape[1], q_BxTxKxGxDh.shape[3]
    if (kspec, vspec) != ("bksd", "bkds") or T != 1 or G == 1:
      return general(q_BxTxKxGxDh, keys, values, mask_BxTxS)
    dt = q_BxTxKxGxDh.dtype
    cpu = lambda q, k, v, m: one_token_attention(  # noqa: E731
        q[:, 0], k.astype(dt), v.astype(dt), m)[:, None]
    return jax.lax.platform_dependent(q_BxTxKxGxDh, keys, values, mask_BxTxS, cpu=cpu,
                                      default=general)


class OutInAttention(OneTokenAttention):
  """q/k/v stored (N, Dh, D), o (D, H, Dh): each product a 2-D (out, in) matrix."""

  def project(self, x_BxTxD):
    d = self.dims
    D, H, K, Dh, ax = d.d_model, d.num_heads, d.num_kv_heads, d.head_dim, d.embed_axis
    dt = x_BxTxD.dtype
    B, T = x_BxTxD.shape[:2]
    w = lambda name, n, heads: _param(  # noqa: E731
        self, name, (n, Dh, D), (heads, "head_dim", ax), d.init_std, d.param_dtype)
    wo = _param(self, "o", (D, H, Dh), (ax, "heads", "head_dim"), d.init_std, d.param_dtype)
    wq, wk, wv = w("q", H, "heads"), w("k", K, "kv_heads"), w("v", K, "kv_heads")
    q, k, v = (jnp.einsum("btd,jd->btj", x_BxTxD, m.reshape(-1, D).astype(dt)).reshape(
        B, T, -1, Dh) for m in (wq, wk, wv))
    return q, k, v, lambda o_BxTxHxDh: jnp.einsum(
        "btj,dj->btd", o_BxTxHxDh.reshape(B, T, H * Dh), wo.reshape(D, H * Dh).astype(dt))


class OutInSwiGLU(SwiGLU):
  """gate and up stored (F, D), down (D, F)."""

  def matrices(self):
    d = self.dims
    D, F, ax = d.d_model, d.mlp_dim, d.embed_axis
    up = lambda name: _param(self, name, (F, D), ("mlp", ax), d.init_std, d.param_dtype)  # noqa: E731
    wg, wu = up("gate"), up("up")
    return wg, wu, _param(self, "down", (D, F), (ax, "mlp"), d.init_std, d.param_dtype), "fd", "df"


def decode_parts(out_in: bool = False) -> tuple:
  """The (attention, mlp) module classes of a cached decode pass."""
  return (OutInAttention, OutInSwiGLU) if out_in else (OneTokenAttention, SwiGLU)


# (in, out) -> (out, in) for each block matrix, by its name: the axes moved.
_OUT_IN = {"q": (-3, -1), "k": (-3, -1), "v": (-3, -1), "o": (-1, -3),
           "gate": (-2, -1), "up": (-2, -1), "down": (-2, -1)}


def to_out_in(params):
  """The main blocks' matrices in the layout of `OutInAttention` / `OutInSwiGLU`
  (q/k/v (D, N, Dh) -> (N, Dh, D), o (H, Dh, D) -> (D, H, Dh), gate/up/down
  transposed); either main layout, the head and the embeddings unchanged. A copy
  (`decode.prepare_params` makes it)."""
  def convert(path, x):
    names = [getattr(p, "key", None) for p in path]
    if len(names) >= 2 and names[-2] in ("attn", "mlp") and names[-1] in _OUT_IN:
      src, dst = _OUT_IN[names[-1]]
      return jnp.moveaxis(x, src, dst)
    return x
  return {**params, "main": jax.tree_util.tree_map_with_path(convert, params["main"])}
