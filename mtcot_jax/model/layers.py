"""Building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU, a pre-norm block.

Shapes in names: B batch, T new positions, S cache slots (or keys), D width,
H query heads, K kv heads, G = H // K, Dh head dim, F mlp width.
Parameters are created with logical axis names (see `config.DEFAULT_RULES`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtcot_jax.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class BlockDims:
  """What one transformer block needs: the main model's and the head's share this."""
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  init_std: float
  dtype: str
  param_dtype: str
  embed_axis: str = "embed"   # the logical name of this block's width dimension
  rope_scaling: tuple = ()    # ModelConfig.rope_scaling
  qkv_bias: bool = False
  # Matrices stored (out, in): every product contracts the weight's minor
  # dimension, the layout XLA:CPU's mat-vecs read fastest (decoding with
  # decode.weights_layout=out_in converts to it: `api.to_out_in`). The parameter
  # files keep the (in, out) layout.
  out_in: bool = False


def _param(module: nn.Module, name: str, shape, names, std: float, dtype):
  init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
  return module.param(name, init, shape, jnp.dtype(dtype))


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                       (x.shape[-1],), jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.dtype))


def rope_frequencies(dh: int, theta: float, scaling: tuple = ()) -> jax.Array:
  """(Dh/2,) float32 angular frequencies theta^(-2i/Dh), with Hugging Face's
  `linear` (all divided by the factor) or `llama3` scaling (wavelengths longer
  than original_len / low_freq_factor divided by the factor, shorter than
  original_len / high_freq_factor kept, interpolated smoothly in between)."""
  freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if not scaling:
    return freq
  s = dict(scaling)
  factor = float(s["factor"])
  if s["type"] == "linear":
    return freq / factor
  lo, hi = float(s["low_freq_factor"]), float(s["high_freq_factor"])
  old_len = float(s["original_max_position_embeddings"])
  wavelen = 2 * jnp.pi / freq
  smooth = (old_len / wavelen - lo) / (hi - lo)
  mid = (1 - smooth) * freq / factor + smooth * freq
  return jnp.where(wavelen < old_len / hi, freq, jnp.where(wavelen > old_len / lo,
                                                            freq / factor, mid))


def rope(x_BxTxNxDh: jax.Array, pos_BxT: jax.Array, theta: float,
         scaling: tuple = ()) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  dh = x_BxTxNxDh.shape[-1]
  freq = rope_frequencies(dh, theta, scaling)                                # (Dh/2,)
  ang_BxTx1xR = (pos_BxT.astype(jnp.float32)[..., None] * freq)[:, :, None, :]
  sin, cos = jnp.sin(ang_BxTx1xR), jnp.cos(ang_BxTx1xR)
  x = x_BxTxNxDh.astype(jnp.float32)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxDh.dtype)


def _attention_probs(logits_f32, mask, dtype):
  """softmax over the last axis (the cache slots) where `mask` (broadcast to the
  logits) holds; float32 in, `dtype` out."""
  return jax.nn.softmax(jnp.where(mask, logits_f32, -1e30), axis=-1).astype(dtype)


class Attention(nn.Module):
  """Grouped-query attention of T new tokens over themselves and, optionally, a cache.

  Without a cache `mask_BxTxS` is (B, T, T). With `cache_kv = (k_BxKxSxDh,
  v_BxKxDhxS)` (kv-head-major, the layouts attention reads without a transpose)
  and `write = (b, k, s)` (index arrays broadcasting to (B, K, T): the slots the
  new tokens take), the new keys and values are written into the cache first and
  the tokens attend over the whole cache: `mask_BxTxS` is (B, T, S) over its
  slots. Returns the output and the updated (k, v) cache (None without one).
  """
  dims: BlockDims
  shard: Sharder = Sharder()

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, mask_BxTxS, cache_kv=None, write=None):
    d = self.dims
    D, H, K, Dh = d.d_model, d.num_heads, d.num_kv_heads, d.head_dim
    dt = jnp.dtype(d.dtype)
    ax = d.embed_axis
    x = x_BxTxD.astype(dt)
    B, T = x.shape[:2]
    if d.out_in:   # each product a 2-D (out, in) matrix: one contracting dimension, minor
      proj = lambda name, n, heads: _param(  # noqa: E731
          self, name, (n, Dh, D), (heads, "head_dim", ax), d.init_std, d.param_dtype)
      wo = _param(self, "o", (D, H, Dh), (ax, "heads", "head_dim"), d.init_std, d.param_dtype)
      project = lambda w: jnp.einsum(  # noqa: E731
          "btd,jd->btj", x, w.reshape(-1, D).astype(dt)).reshape(B, T, -1, Dh)
      out_proj = lambda o_BxTxHxDh: jnp.einsum(  # noqa: E731
          "btj,dj->btd", o_BxTxHxDh.reshape(B, T, H * Dh), wo.reshape(D, H * Dh).astype(dt))
    else:
      proj = lambda name, n, heads: _param(  # noqa: E731
          self, name, (D, n, Dh), (ax, heads, "head_dim"), d.init_std, d.param_dtype)
      wo = _param(self, "o", (H, Dh, D), ("heads", "head_dim", ax), d.init_std, d.param_dtype)
      project = lambda w: jnp.einsum("btd,dhk->bthk", x, w.astype(dt))  # noqa: E731
      out_proj = lambda o_BxTxHxDh: jnp.einsum(  # noqa: E731
          "bthk,hkd->btd", o_BxTxHxDh, wo.astype(dt))
    wq, wk, wv = proj("q", H, "heads"), proj("k", K, "kv_heads"), proj("v", K, "kv_heads")
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = project(wq), project(wk), project(wv)
    if d.qkv_bias:
      bias = lambda name, n: self.param(  # noqa: E731
          name, nn.with_logical_partitioning(nn.initializers.zeros, (n, "head_dim")),
          (H if n == "heads" else K, Dh), jnp.dtype(d.param_dtype)).astype(dt)
      q_BxTxHxDh += bias("q_bias", "heads")
      k_BxTxKxDh += bias("k_bias", "kv_heads")
      v_BxTxKxDh += bias("v_bias", "kv_heads")
    q_BxTxHxDh = rope(q_BxTxHxDh, pos_BxT, d.rope_theta, d.rope_scaling)
    k_BxTxKxDh = rope(k_BxTxKxDh, pos_BxT, d.rope_theta, d.rope_scaling)
    q_BxTxHxDh = self.shard(q_BxTxHxDh, ("batch", "length", "act_heads", None))

    G = H // K
    q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh) * jnp.asarray(Dh ** -0.5, dt)
    new_cache = None
    if cache_kv is None:
      keys, values, kspec, vspec = k_BxTxKxDh, v_BxTxKxDh, "bskd", "bskd"
    else:
      # Values (B, K, Dh, S): the Dh slice between the indices puts the indexed
      # dimensions first, so both updates are (B, K, T, Dh) (NumPy's rule).
      b, k, s = write
      to_cache = lambda x, c: x.transpose(0, 2, 1, 3).astype(c.dtype)  # noqa: E731  (B,K,T,Dh)
      new_cache = (cache_kv[0].at[b, k, s].set(to_cache(k_BxTxKxDh, cache_kv[0]), mode="drop"),
                   cache_kv[1].at[b, k, :, s].set(to_cache(v_BxTxKxDh, cache_kv[1]), mode="drop"))
      keys, values, kspec, vspec = new_cache[0], new_cache[1], "bksd", "bkds"

    def attend(q_BxTxKxGxDh, keys, values, mask_BxTxS):
      logits_BxKxGxTxS = jnp.einsum(f"btkgd,{kspec}->bkgts", q_BxTxKxGxDh,
                                    keys.astype(dt)).astype(jnp.float32)
      probs = _attention_probs(logits_BxKxGxTxS, mask_BxTxS[:, None, None], dt)
      return jnp.einsum(f"bkgts,{vspec}->btkgd", probs, values.astype(dt))

    args = (q_BxTxKxGxDh, keys, values, mask_BxTxS)
    if cache_kv is not None and T == 1 and G > 1:   # the platform XLA compiles for decides
      out_BxTxKxGxDh = jax.lax.platform_dependent(
          *args, default=attend, cpu=lambda q, k, v, m: self._one_token(
              q[:, 0], k.astype(dt), v.astype(dt), m)[:, None])
    else:
      out_BxTxKxGxDh = attend(*args)
    return out_proj(out_BxTxKxGxDh.reshape(B, T, H, Dh)), new_cache

  @staticmethod
  def _one_token(q_BxKxGxDh, k_BxKxSxDh, v_BxKxDhxS, mask_Bx1xS):
    """One new token over the cache, as one mat-vec per query head of a group
    for the scores and one for the values (2 G per layer), on a CPU backend only.

    The same arithmetic as the general path, arranged for XLA:CPU: a dot whose
    free dimension on one side is 1 runs as XLA's own mat-vec, which streams the
    cache on every core; with the G queries of a group as that dimension (G > 1)
    XLA:CPU hands the dot to YNNPACK, which runs it on one core at a fixed cost
    of ~25 us: 0.4 ms of a 2.9 ms pass of the 25M model at 266 cache slots
    (docs/results.md, third decode session). The group's keys and values are
    read G times, from the CPU's cache after the first; on an accelerator
    those reads would come from HBM, so there the general path's one dot runs
    (`jax.lax.platform_dependent`: chosen when XLA lowers for the platform).
    """
    G = q_BxKxGxDh.shape[2]
    logits_BxKxGxS = jnp.stack(
        [jnp.einsum("bkd,bksd->bks", q_BxKxGxDh[:, :, g], k_BxKxSxDh) for g in range(G)],
        axis=2).astype(jnp.float32)
    probs = _attention_probs(logits_BxKxGxS, mask_Bx1xS[:, None], v_BxKxDhxS.dtype)
    return jnp.stack(
        [jnp.einsum("bks,bkds->bkd", probs[:, :, g], v_BxKxDhxS) for g in range(G)], axis=2)


class SwiGLU(nn.Module):
  dims: BlockDims
  shard: Sharder = Sharder()

  @nn.compact
  def __call__(self, x_BxTxD):
    d = self.dims
    dt = jnp.dtype(d.dtype)
    ax = d.embed_axis
    D, F = d.d_model, d.mlp_dim
    if d.out_in:
      up_shape, up_names, down_shape, down_names = (F, D), ("mlp", ax), (D, F), (ax, "mlp")
      up_spec, down_spec = "fd", "df"
    else:
      up_shape, up_names, down_shape, down_names = (D, F), (ax, "mlp"), (F, D), ("mlp", ax)
      up_spec, down_spec = "df", "fd"
    wg = _param(self, "gate", up_shape, up_names, d.init_std, d.param_dtype)
    wu = _param(self, "up", up_shape, up_names, d.init_std, d.param_dtype)
    wd = _param(self, "down", down_shape, down_names, d.init_std, d.param_dtype)
    x = x_BxTxD.astype(dt)
    up = lambda w: jnp.einsum(f"...d,{up_spec}->...f", x, w.astype(dt))  # noqa: E731
    h_BxTxF = jax.nn.silu(up(wg)) * up(wu)
    h_BxTxF = self.shard(h_BxTxF, ("batch", "length", "act_mlp"))
    return jnp.einsum(f"...f,{down_spec}->...d", h_BxTxF, wd.astype(dt))


class Block(nn.Module):
  """Pre-RMSNorm transformer block: x + attn(norm x), then + mlp(norm x)."""
  dims: BlockDims
  shard: Sharder = Sharder()

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, mask_BxTxS, cache_kv=None, write=None):
    d = self.dims
    norm = lambda name: RMSNorm(d.norm_eps, d.dtype, d.param_dtype, name=name)  # noqa: E731
    h, new_kv = Attention(d, self.shard, name="attn")(
        norm("attn_norm")(x_BxTxD), pos_BxT, mask_BxTxS, cache_kv, write)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + SwiGLU(d, self.shard, name="mlp")(norm("mlp_norm")(x_BxTxD))
    x_BxTxD = self.shard(x_BxTxD, ("batch", "length", "act_embed"))
    return x_BxTxD, new_kv
