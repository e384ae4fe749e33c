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

from mtcot_jax.model.attention import fused_attention
from mtcot_jax.model.kv_cache import LayerCache
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
  # The resolved model.attention of a teacher-forced pass (`attention.resolve_attention`):
  # xla, or a fused kernel (cudnn, splash, splash_interpret) given a `CausalSegments`.
  attention: str = "xla"


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


def attention_probs(logits_f32, mask, dtype):
  """softmax over the last axis (the cache slots) where `mask` (broadcast to the
  logits) holds; float32 in, `dtype` out."""
  return jax.nn.softmax(jnp.where(mask, logits_f32, -1e30), axis=-1).astype(dtype)


def attention_einsum(q_BxTxKxGxDh, keys, values, mask_BxTxS, kspec: str, vspec: str):
  """Softmax attention of queries (already scaled by Dh^-1/2) over keys/values in the
  layouts kspec/vspec name (e.g. "bskd"), where `mask_BxTxS` holds: the
  (B, K, G, T, S) scores accumulate in float32 (never rounded to a bf16 dot's
  output) and are materialised. Returns (B, T, K, G, Dh) in q's dtype."""
  dt = q_BxTxKxGxDh.dtype
  logits_BxKxGxTxS = jnp.einsum(f"btkgd,{kspec}->bkgts", q_BxTxKxGxDh, keys.astype(dt),
                                preferred_element_type=jnp.float32)
  probs = attention_probs(logits_BxKxGxTxS, mask_BxTxS[:, None, None], dt)
  return jnp.einsum(f"bkgts,{vspec}->btkgd", probs, values.astype(dt))


class Attention(nn.Module):
  """Grouped-query attention of T new tokens over themselves and, optionally, a cache.

  Without a cache `mask_BxTxS` is (B, T, T), or with a fused `dims.attention` the
  `attention.CausalSegments` it stands for. With a `kv_cache.LayerCache` (this
  layer's keys (B, K, S, Dh) and values in the cache's layout, and the slots the
  new tokens take), the new keys and values are written into the cache first and
  the tokens attend over the whole cache: `mask_BxTxS` is (B, T, S) over its
  slots. Returns the output and the updated LayerCache (None without one).

  `project` and `attend` are the two places a variant changes: `model/cpu.py`
  holds the CPU decode variants (a transposed weight layout, a one-token split).
  """
  dims: BlockDims
  shard: Sharder = Sharder()

  def project(self, x_BxTxD):
    """q (B, T, H, Dh), k and v (B, T, K, Dh) from x, and the output projection
    (B, T, H, Dh) -> (B, T, D). Matrices stored (in, out)."""
    d = self.dims
    D, H, K, Dh, ax = d.d_model, d.num_heads, d.num_kv_heads, d.head_dim, d.embed_axis
    dt = x_BxTxD.dtype
    w = lambda name, n, heads: _param(  # noqa: E731
        self, name, (D, n, Dh), (ax, heads, "head_dim"), d.init_std, d.param_dtype)
    # Created in this order (o first): initial values depend on it.
    wo = _param(self, "o", (H, Dh, D), ("heads", "head_dim", ax), d.init_std, d.param_dtype)
    wq, wk, wv = w("q", H, "heads"), w("k", K, "kv_heads"), w("v", K, "kv_heads")
    q, k, v = (jnp.einsum("btd,dhk->bthk", x_BxTxD, m.astype(dt)) for m in (wq, wk, wv))
    return q, k, v, lambda o_BxTxHxDh: jnp.einsum("bthk,hkd->btd", o_BxTxHxDh, wo.astype(dt))

  def attend(self, q_BxTxKxGxDh, keys, values, mask_BxTxS, kspec: str, vspec: str):
    """Softmax attention over the keys/values (layouts named by kspec/vspec)."""
    return attention_einsum(q_BxTxKxGxDh, keys, values, mask_BxTxS, kspec, vspec)

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, mask_BxTxS, cache: LayerCache | None = None):
    d = self.dims
    H, K, Dh = d.num_heads, d.num_kv_heads, d.head_dim
    dt = jnp.dtype(d.dtype)
    x = x_BxTxD.astype(dt)
    B, T = x.shape[:2]
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, out_proj = self.project(x)
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
    if cache is None and d.attention != "xla":
      out_BxTxHxDh = fused_attention(d.attention, q_BxTxKxGxDh.reshape(B, T, H, Dh), k_BxTxKxDh,
                                     v_BxTxKxDh, mask_BxTxS, self.shard)
      return out_proj(out_BxTxHxDh), None
    if cache is None:
      keys, values, kspec, vspec = k_BxTxKxDh, v_BxTxKxDh, "bskd", "bskd"
    else:
      cache = cache.write(k_BxTxKxDh, v_BxTxKxDh)
      (keys, values), kspec, vspec = cache.read(), "bksd", cache.layout
    out_BxTxKxGxDh = self.attend(q_BxTxKxGxDh, keys, values, mask_BxTxS, kspec, vspec)
    return out_proj(out_BxTxKxGxDh.reshape(B, T, H, Dh)), cache


class SwiGLU(nn.Module):
  dims: BlockDims
  shard: Sharder = Sharder()

  def matrices(self):
    """gate, up (D, F) and down (F, D) and the einsum specs that read them."""
    d = self.dims
    D, F, ax = d.d_model, d.mlp_dim, d.embed_axis
    up = lambda name: _param(self, name, (D, F), (ax, "mlp"), d.init_std, d.param_dtype)  # noqa: E731
    wg, wu = up("gate"), up("up")
    return wg, wu, _param(self, "down", (F, D), ("mlp", ax), d.init_std, d.param_dtype), "df", "fd"

  @nn.compact
  def __call__(self, x_BxTxD):
    dt = jnp.dtype(self.dims.dtype)
    wg, wu, wd, up_spec, down_spec = self.matrices()
    x = x_BxTxD.astype(dt)
    up = lambda w: jnp.einsum(f"...d,{up_spec}->...f", x, w.astype(dt))  # noqa: E731
    h_BxTxF = jax.nn.silu(up(wg)) * up(wu)
    h_BxTxF = self.shard(h_BxTxF, ("batch", "length", "act_mlp"))
    return jnp.einsum(f"...f,{down_spec}->...d", h_BxTxF, wd.astype(dt))


class Block(nn.Module):
  """Pre-RMSNorm transformer block: x + attn(norm x), then + mlp(norm x).
  `parts`: the attention and MLP module classes (variants: `model/cpu.py`)."""
  dims: BlockDims
  shard: Sharder = Sharder()
  parts: tuple = (Attention, SwiGLU)

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, mask_BxTxS, cache: LayerCache | None = None):
    d = self.dims
    norm = lambda name: RMSNorm(d.norm_eps, d.dtype, d.param_dtype, name=name)  # noqa: E731
    attention, mlp = self.parts
    h, cache = attention(d, self.shard, name="attn")(
        norm("attn_norm")(x_BxTxD), pos_BxT, mask_BxTxS, cache)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + mlp(d, self.shard, name="mlp")(norm("mlp_norm")(x_BxTxD))
    x_BxTxD = self.shard(x_BxTxD, ("batch", "length", "act_embed"))
    return x_BxTxD, cache
